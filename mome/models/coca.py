"""CoCa (Yu et al. 2022, "Contrastive Captioners") built from mome's modules.

An image encoder (ViT) whose tokens two attentional poolers summarise: one query for the contrastive
embedding, ``caption_queries`` queries for the captioner's cross-attention. A unimodal text decoder
(causal self-attention) reads the caption with a [CLS] token appended: the [CLS] state is the text
embedding and the other states feed a multimodal decoder (causal self-attention + cross-attention to the
pooled image tokens) that predicts the next token. One pass of the text gives both losses: the causal
mask keeps every caption position from seeing the tokens after it and the [CLS], so the captioning
states are those of the caption alone. Attention runs on ``mome.ops.attention`` (decoding on
``mome.ops.decode_attention`` against KV caches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.models._vision_text import HEAD_PAIRS, VisionTextConfig, check_text_inputs
from mome.models.transformer import PatchEmbedding
from mome.nn._heads import merge_heads, split_heads
from mome.nn.decoder import STRATEGIES, CaptionDecoderLayer, filter_logits
from mome.nn.itc import ITCLoss
from mome.nn.pooling import AttentionalPooler
from mome.ops._validate import is_int, is_real

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CoCaConfig(VisionTextConfig):
    """Sizes of a CoCa model.

    text_depth: layers of the unimodal (text-only, causal) decoder; multimodal_depth: layers of the
    decoder with cross-attention. max_text_len: the longest caption in tokens (bos and eos included; the
    appended [CLS] is extra). caption_queries: the captioning pooler's queries (CoCa: 256; the contrastive
    pooler has one). contrastive_weight, caption_weight: CoCa's loss weights (1 and 2).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vision_dim: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    text_dim: int = 768
    text_depth: int = 12
    multimodal_depth: int = 12
    text_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 64000
    max_text_len: int = 76
    embed_dim: int = 512
    caption_queries: int = 256
    pooler_heads: int = 8
    pad_id: int = 0
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    init_temperature: float = 0.07
    label_smoothing: float = 0.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "in_chans", "vision_dim", "vision_depth", "vision_heads", "text_dim",
                 "text_depth", "multimodal_depth", "text_heads", "vocab_size", "embed_dim", "caption_queries",
                 "pooler_heads")  # fmt: skip
        self.check_shapes(sizes, (*HEAD_PAIRS, ("vision_dim", "pooler_heads")))
        self.check_caption_length()
        self.check_token_ids("pad_id")
        self.check_weights("contrastive_weight", "caption_weight")
        self.check_label_smoothing()


def coca_base(**overrides) -> CoCaConfig:
    """CoCa-Base as the paper sizes it: a ViT-B/16 image encoder (12 layers of 768, 224 px), 12 unimodal and
    12 multimodal text layers of 768, 256 captioning queries, a 64k vocabulary; 512-d embeddings (open_clip)."""
    return CoCaConfig().replace(**overrides)


def coca_tiny(**overrides) -> CoCaConfig:
    """A tiny CoCa for tests and the demo: 48 px images in 12 px patches, 64 wide, 2 image layers, 1 unimodal
    and 1 multimodal text layer, 16 captioning queries, a 32-token vocabulary."""
    config = CoCaConfig(
        image_size=48,
        patch_size=12,
        vision_dim=64,
        vision_depth=2,
        vision_heads=4,
        text_dim=64,
        text_depth=1,
        multimodal_depth=1,
        text_heads=4,
        vocab_size=32,
        max_text_len=12,
        embed_dim=64,
        caption_queries=16,
        pooler_heads=4,
        init_temperature=0.1,
        eps=1e-6,
    )
    return config.replace(**overrides)


def _ffn(fc1: nn.Linear, fc2: nn.Linear, x: Tensor) -> Tensor:
    """``fc2(gelu(fc1(x)))`` as one ``mome.ops.modality_ffn`` call with a single expert (bias + GELU fused on GPU)."""
    tokens = x.reshape(-1, x.shape[-1])  # [T, D]
    one_expert = torch.zeros(tokens.shape[0], dtype=torch.int64, device=x.device)
    out = ops.modality_ffn(tokens, one_expert, fc1.weight[None], fc1.bias[None], fc2.weight[None], fc2.bias[None],
                           activation="gelu")  # fmt: skip
    return out.view(*x.shape[:-1], fc2.out_features)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))``, ``x + FFN(LN(x))``; causal self-attention for the text decoder,
    bidirectional for the image encoder. ``step`` decodes one token against a KV cache (causal blocks)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool, eps: float) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, N, D)``; ``key_padding_mask`` ``(B, N)`` bool, True = a key no query sees."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))  # [B, H, N, Dh]
        attended = ops.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
        x = x + self.proj(merge_heads(attended))
        return x + _ffn(self.fc1, self.fc2, self.norm2(x))

    def step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, position: int) -> Tensor:
        """One token ``x`` ``(B, D)`` at ``position``; its key and value go into the caches ``(B, H, Nmax, Dh)``."""
        batch, dim = x.shape
        q, k, v = (t.view(batch, self.heads, dim // self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        k_cache[:, :, position] = k
        v_cache[:, :, position] = v
        seen = torch.full((batch,), position + 1, dtype=torch.int32, device=x.device)
        x = x + self.proj(ops.decode_attention(q, k_cache, v_cache, seen).reshape(batch, dim))
        return x + _ffn(self.fc1, self.fc2, self.norm2(x))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, causal={self.causal}"


class ImageStates(NamedTuple):
    pooled: Tensor  # [B, vision_dim] the contrastive pooler's output, normed
    tokens: Tensor  # [B, caption_queries, vision_dim] the captioning pooler's outputs, normed


class TextStates(NamedTuple):
    tokens: Tensor  # [B, L, text_dim] the unimodal decoder's states of the caption tokens
    cls: Tensor | None  # [B, text_dim] the appended [CLS] state, normed (None when no [CLS] was appended)


class CoCaOutput(NamedTuple):
    image_embed: Tensor  # [B, embed_dim] unit norm
    text_embed: Tensor  # [B, embed_dim] unit norm
    logits: Tensor  # [B, L - 1, vocab_size] position i predicts text token i + 1


class CoCaLosses(NamedTuple):
    loss: Tensor  # contrastive_weight · contrastive + caption_weight · caption
    contrastive: Tensor
    caption: Tensor


class CoCa(nn.Module):
    """CoCa: ``loss`` (contrastive + captioning from one forward), ``encode_image`` / ``encode_text`` (unit-norm
    embeddings for retrieval) and ``generate`` (KV-cached captioning).

    Text is ``(B, L)`` int ids, right-padded, starting with a bos token; ``text_padding_mask`` ``(B, L)`` bool
    (True = pad) keeps the [CLS] from reading the padding (the causal mask keeps the caption from reading it),
    so a caption's embedding does not depend on how much padding follows it. Without a mask every token counts.
    The caption loss ignores padded targets and targets equal to ``config.pad_id``.
    """

    def __init__(self, config: CoCaConfig) -> None:
        super().__init__()
        if not isinstance(config, CoCaConfig):
            raise TypeError(f"config must be a CoCaConfig, got {type(config).__name__}")
        self.config = c = config
        hidden_text = int(c.text_dim * c.mlp_ratio)
        # image encoder: ViT, then the two attentional poolers
        self.patch_embed = PatchEmbedding(c.image_size, c.patch_size, c.in_chans, c.vision_dim)
        self.patch_embed.mask_token = None  # BEiT's masked-image-modelling token: CoCa never masks patches
        self.image_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.vision_dim))
        self.image_blocks = nn.ModuleList(
            TransformerBlock(c.vision_dim, c.vision_heads, c.mlp_ratio, False, c.eps) for _ in range(c.vision_depth)
        )
        self.image_norm = nn.LayerNorm(c.vision_dim, eps=c.eps)
        self.contrastive_pooler = AttentionalPooler(c.vision_dim, c.vision_dim, c.pooler_heads, 1, c.eps)
        self.caption_pooler = AttentionalPooler(c.vision_dim, c.vision_dim, c.pooler_heads, c.caption_queries, c.eps)
        self.contrastive_norm = nn.LayerNorm(c.vision_dim, eps=c.eps)
        self.caption_norm = nn.LayerNorm(c.vision_dim, eps=c.eps)
        self.image_proj = nn.Linear(c.vision_dim, c.embed_dim, bias=False)
        # unimodal text decoder; its [CLS] has no position: its state depends on the caption alone
        self.token_embed = nn.Embedding(c.vocab_size, c.text_dim)
        self.text_pos_embed = nn.Parameter(torch.zeros(c.max_text_len, c.text_dim))
        self.text_cls = nn.Parameter(torch.zeros(c.text_dim))
        self.text_blocks = nn.ModuleList(
            TransformerBlock(c.text_dim, c.text_heads, c.mlp_ratio, True, c.eps) for _ in range(c.text_depth)
        )
        self.text_norm = nn.LayerNorm(c.text_dim, eps=c.eps)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim, bias=False)
        # multimodal decoder: causal self-attention, cross-attention to the captioning pooler's tokens
        self.multimodal_layers = nn.ModuleList(
            CaptionDecoderLayer(c.text_dim, c.text_heads, hidden_text, c.vision_dim, c.eps)
            for _ in range(c.multimodal_depth)
        )
        self.multimodal_norm = nn.LayerNorm(c.text_dim, eps=c.eps)
        self.lm_head = nn.Linear(c.text_dim, c.vocab_size)
        self.itc = ITCLoss(init_temperature=c.init_temperature)
        self.apply(_init_weights)
        for param in (self.image_pos_embed, self.patch_embed.cls_token, self.text_pos_embed, self.text_cls):
            nn.init.trunc_normal_(param, std=0.02)

    # -- image ------------------------------------------------------------------------------------
    def image_states(self, images: Tensor) -> ImageStates:
        """images ``(B, C, H, W)`` -> the contrastive pooler's state and the captioning pooler's tokens."""
        if isinstance(images, Tensor) and images.device != self.image_pos_embed.device:
            raise ValueError(f"images must be on the model's device {self.image_pos_embed.device}, got {images.device}")
        x = self.patch_embed(images) + self.image_pos_embed  # [B, 1 + P, Dv]
        for block in self.image_blocks:
            x = block(x)
        x = self.image_norm(x)
        pooled = self.contrastive_norm(self.contrastive_pooler(x)[:, 0])  # [B, Dv]
        return ImageStates(pooled, self.caption_norm(self.caption_pooler(x)))  # [B, Q, Dv]

    def image_embedding(self, states: ImageStates) -> Tensor:
        return F.normalize(self.image_proj(states.pooled), dim=-1)

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(B, embed_dim)``."""
        return self.image_embedding(self.image_states(images))

    # -- text -------------------------------------------------------------------------------------
    def text_states(self, text_ids: Tensor, text_padding_mask: Tensor | None = None, cls: bool = True) -> TextStates:
        """The unimodal decoder over ``text_ids`` ``(B, L)`` (and the appended [CLS] when ``cls``)."""
        check_text_inputs(text_ids, text_padding_mask, self.config, self.token_embed.weight.device)
        batch, length = text_ids.shape
        x = self.token_embed(text_ids.long()) + self.text_pos_embed[:length]  # [B, L, Dt]
        padding = text_padding_mask
        if cls:
            x = torch.cat([x, self.text_cls.to(x.dtype).expand(batch, 1, -1)], dim=1)  # [B, L + 1, Dt]
            if padding is not None:
                padding = torch.cat([padding, padding.new_zeros(batch, 1)], dim=1)
        for block in self.text_blocks:
            x = block(x, padding)
        if not cls:
            return TextStates(x, None)
        return TextStates(x[:, :length], self.text_norm(x[:, length]))

    def text_embedding(self, states: TextStates) -> Tensor:
        return F.normalize(self.text_proj(states.cls), dim=-1)

    def encode_text(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Unit-norm text embeddings ``(B, embed_dim)`` from the [CLS] state."""
        return self.text_embedding(self.text_states(text_ids, text_padding_mask))

    # -- multimodal decoder -----------------------------------------------------------------------
    def caption_logits(self, text_tokens: Tensor, image_tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, L, V)`` of the unimodal states ``(B, L, Dt)`` attending to ``image_tokens``."""
        x = text_tokens
        for layer in self.multimodal_layers:
            x = layer(x, *layer.image_kv(image_tokens), None)
        return self.lm_head(self.multimodal_norm(x))

    def caption_loss(self, logits: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of ``logits`` ``(B, L - 1, V)`` against ``text_ids[:, 1:]``, padding ignored."""
        targets = text_ids[:, 1:].long()
        ignored = targets == self.config.pad_id
        if text_padding_mask is not None:
            ignored = ignored | text_padding_mask[:, 1:]
        targets = targets.masked_fill(ignored, IGNORE_INDEX)
        at_least_fp32 = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(at_least_fp32), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=self.config.label_smoothing)  # fmt: skip

    # -- training ---------------------------------------------------------------------------------
    def forward(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> CoCaOutput:
        """Both embeddings and the caption logits, from one pass of the image and one of the text."""
        if isinstance(text_ids, Tensor) and text_ids.dim() == 2 and text_ids.shape[1] < 2:
            raise ValueError(f"text_ids must be (B, L >= 2): a token and its target, got {tuple(text_ids.shape)}")
        image = self.image_states(images)
        text = self.text_states(text_ids, text_padding_mask)
        if image.pooled.shape[0] != text.tokens.shape[0]:
            raise ValueError(
                f"images and text_ids must have the same batch, got {image.pooled.shape[0]} and {text.tokens.shape[0]}"
            )
        logits = self.caption_logits(text.tokens[:, :-1], image.tokens)  # [B, L - 1, V]
        return CoCaOutput(self.image_embedding(image), self.text_embedding(text), logits)

    def loss(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        positive_ids: Tensor | None = None,
    ) -> CoCaLosses:
        """CoCa's losses: ``contrastive`` (InfoNCE both ways, ``self.itc``'s learnable temperature; pairs with
        equal ``positive_ids`` ``(B,)`` are each other's positives), ``caption`` (next-token cross-entropy)
        and ``loss = contrastive_weight · contrastive + caption_weight · caption``."""
        out = self(images, text_ids, text_padding_mask)
        contrastive = self.itc(out.image_embed, out.text_embed, positive_ids=positive_ids).loss
        caption = self.caption_loss(out.logits, text_ids, text_padding_mask)
        total = self.config.contrastive_weight * contrastive + self.config.caption_weight * caption
        return CoCaLosses(total, contrastive, caption)

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Captions ``(B, T)`` int64, ``T <= max_new_tokens + 1``, bos first, ``pad_id`` after a sequence's eos;
        stops once every sequence has ended. ``strategy="sample"`` draws from ``softmax(logits / temperature)``
        within ``top_k`` / ``top_p`` using ``generator``. ``use_cache=False`` reruns both decoders over the whole
        prefix every step (the check that the KV caches change nothing). ``return_logits`` also returns the
        ``(B, T - 1, V)`` logits each step chose from."""
        self._check_generate_args(max_new_tokens, bos_id, eos_id, strategy, temperature, top_k, top_p, generator)
        image_tokens = self.image_states(images).tokens  # [B, Q, Dv]
        batch, device = image_tokens.shape[0], image_tokens.device
        if strategy == "sample" and generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator must be on the images' device ({device.type}), got one on {generator.device}")
        ids = torch.full((batch, 1), bos_id, dtype=torch.int64, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        image_kv = [layer.image_kv(image_tokens) for layer in self.multimodal_layers]
        heads = self.config.text_heads
        cache_shape = (batch, heads, max_new_tokens + 1, self.config.text_dim // heads)
        dtype = self.token_embed.weight.dtype
        caches = [
            (torch.zeros(cache_shape, dtype=dtype, device=device), torch.zeros(cache_shape, dtype=dtype, device=device))
            for _ in range(len(self.text_blocks) + len(self.multimodal_layers) if use_cache else 0)
        ]
        step_logits = []
        for position in range(max_new_tokens):
            if bool(finished.all()):
                break
            if use_cache:
                logits = self._step(ids[:, -1], position, caches, image_kv)
            else:
                logits = self.caption_logits(self.text_states(ids, cls=False).tokens, image_tokens)[:, -1]
            step_logits.append(logits)
            next_ids = _choose(logits, strategy, temperature, top_k, top_p, generator)
            next_ids = next_ids.masked_fill(finished, self.config.pad_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == eos_id
        if not return_logits:
            return ids
        if not step_logits:
            return ids, torch.zeros(batch, 0, self.config.vocab_size, dtype=dtype, device=device)
        return ids, torch.stack(step_logits, dim=1)

    def _step(self, last_ids: Tensor, position: int, caches: list, image_kv: list) -> Tensor:
        """Logits ``(B, V)`` after the token ``last_ids`` ``(B,)`` at ``position``, through both decoders' caches."""
        x = self.token_embed(last_ids) + self.text_pos_embed[position]  # [B, Dt]
        text_caches, multimodal_caches = caches[: len(self.text_blocks)], caches[len(self.text_blocks) :]
        for block, (k_cache, v_cache) in zip(self.text_blocks, text_caches, strict=True):
            x = block.step(x, k_cache, v_cache, position)
        for layer, (k_cache, v_cache), (image_k, image_v) in zip(
            self.multimodal_layers, multimodal_caches, image_kv, strict=True
        ):
            x = layer.step(x, k_cache, v_cache, position, image_k, image_v, None)
        return self.lm_head(self.multimodal_norm(x))

    # -- checks -----------------------------------------------------------------------------------
    def _check_generate_args(self, max_new_tokens, bos_id, eos_id, strategy, temperature, top_k, top_p, generator):
        c = self.config
        if not is_int(max_new_tokens) or not 0 <= max_new_tokens < c.max_text_len:
            raise ValueError(
                f"max_new_tokens must be an int in [0, config.max_text_len - 1 = {c.max_text_len - 1}] (bos takes "
                f"one position), got {max_new_tokens!r}"
            )
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not is_int(value) or not 0 <= value < c.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={c.vocab_size}), got {value!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not is_real(temperature) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not is_real(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def _choose(logits: Tensor, strategy: str, temperature: float, top_k, top_p, generator) -> Tensor:
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal 0.02 for weights, zero biases, unit LayerNorms (the poolers' queries included)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
