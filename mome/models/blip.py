"""BLIP (Li et al. 2022, "Bootstrapping Language-Image Pre-training") built from mome's modules, with CapFilt.

A ViT image encoder and one text transformer used three ways: the unimodal text encoder (a [CLS] prompt,
bidirectional self-attention, no cross-attention) for ITC, the image-grounded text encoder (an [ENC] prompt,
cross-attention to the image tokens) for ITM, and the image-grounded decoder (the bos token as [DEC], causal
self-attention) for the LM loss and captioning. As in BLIP, encoder and decoder share every parameter except
the self-attention: each layer's cross-attention and FFN with their LayerNorms, the token and position
embeddings and the final LayerNorm are the same modules. The decoder is a :class:`mome.nn.CaptionDecoder`
(KV-cached ``generate``); the text encoder's layers hold their own self-attention and the decoder layers'
shared parts. :func:`bootstrap` is CapFilt: caption images with a captioner, keep the pairs a filter's ITM
head calls matching.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.models._vision_text import VisionTextConfig
from mome.models.coca import TransformerBlock, _init_weights
from mome.models.transformer import PatchEmbedding
from mome.nn._heads import merge_heads, split_heads
from mome.nn.decoder import CaptionDecoder, CaptionDecoderLayer
from mome.nn.heads import ITCHead, ITMHead, itm_inputs
from mome.ops._validate import is_int, is_real
from mome.ops.itc import ITCOutput

# what a decoder layer shares with the text encoder layer above it: all but the self-attention (norm1, self_qkv,
# self_out)
SHARED_LAYER_MODULES = ("norm2", "cross_q", "cross_kv", "cross_out", "norm3", "fc1", "fc2")
ITC_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class BLIPConfig(VisionTextConfig):
    """Sizes of a BLIP model.

    text_depth: layers of the text transformer (encoder and decoder alike). max_text_len: the longest text in
    tokens, prompt / bos and eos included. itc_weight, itm_weight, lm_weight: the loss weights (BLIP: 1, 1, 1).
    itm_class_balance: weigh the ITM match and no-match labels equally (BLIP: False; each batch has one match
    per two non-matches). label_smoothing: of the LM loss (BLIP: 0.1). itc_pool: the ITC features, the [CLS]
    states (``"cls"``, BLIP) or the mean of the unpadded final states (``"mean"``: every sample has its own feature
    from the first step, which a tiny model trained from scratch for minutes learns from far faster).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vision_dim: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    text_dim: int = 768
    text_depth: int = 12
    text_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 30524  # BERT's 30522 and BLIP's [DEC], [ENC]
    max_text_len: int = 35
    embed_dim: int = 256
    pad_id: int = 0
    init_temperature: float = 0.07
    label_smoothing: float = 0.1
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    itm_class_balance: bool = False
    itc_pool: str = "cls"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "in_chans", "vision_dim", "vision_depth", "vision_heads", "text_dim",
                 "text_depth", "text_heads", "vocab_size", "embed_dim")  # fmt: skip
        self.check_shapes(sizes)
        self.check_caption_length()
        self.check_token_ids("pad_id")
        self.check_weights("itc_weight", "itm_weight", "lm_weight")
        self.check_label_smoothing()
        if self.itc_pool not in ITC_POOLS:
            raise ValueError(f"itc_pool must be one of {ITC_POOLS}, got {self.itc_pool!r}")
        if not isinstance(self.itm_class_balance, bool):
            raise ValueError(f"itm_class_balance must be a bool, got {self.itm_class_balance!r}")


def blip_base(**overrides) -> BLIPConfig:
    """BLIP with ViT-B/16 (12 layers of 768, 224 px) and a BERT-base text transformer (12 layers of 768, 12 heads,
    BERT's vocabulary and BLIP's two prompt tokens), 256-d ITC embeddings, LM label smoothing 0.1."""
    return BLIPConfig().replace(**overrides)


def blip_tiny(**overrides) -> BLIPConfig:
    """A tiny BLIP for tests and the demo: 48 px images in 12 px patches, 64 wide, two vision and two text layers."""
    config = BLIPConfig(
        image_size=48,
        patch_size=12,
        vision_dim=64,
        vision_depth=2,
        vision_heads=4,
        text_dim=64,
        text_depth=2,
        text_heads=4,
        vocab_size=32,
        max_text_len=12,
        embed_dim=64,
        init_temperature=0.1,
        label_smoothing=0.0,
    )
    return config.replace(**overrides)


class BLIPTextEncoderLayer(nn.Module):
    """Pre-norm block: ``x + SelfAttn(LN(x))`` (bidirectional, its own), then with image tokens
    ``x + CrossAttn(LN(x), image)``, then ``x + FFN(LN(x))``: cross-attention and FFN are ``shared``'s modules."""

    def __init__(self, shared: CaptionDecoderLayer, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for name in SHARED_LAYER_MODULES:
            setattr(self, name, getattr(shared, name))

    # the decoder layer's own image_kv and ffn read only the shared modules (cross_kv; fc1, fc2) and heads
    image_kv = CaptionDecoderLayer.image_kv
    ffn = CaptionDecoderLayer.ffn

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None,
        image_kv: tuple[Tensor, Tensor] | None = None,
        image_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``x`` ``(B, L, D)``; ``image_kv``: this layer's :meth:`image_kv` of the image tokens, None for text only."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))  # [B, H, L, Dh]
        x = x + self.proj(merge_heads(ops.attention(q, k, v, key_padding_mask=key_padding_mask)))
        if image_kv is not None:
            q = split_heads(self.cross_q(self.norm2(x)), self.heads)
            attended = ops.attention(q, *image_kv, key_padding_mask=image_padding_mask)
            x = x + self.cross_out(merge_heads(attended))
        return x + self.ffn(self.norm3(x))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class BLIPTextEncoder(nn.Module):
    """BLIP's text encoder over ``decoder``'s shared parameters: :meth:`forward` without image tokens is the
    unimodal encoder ([CLS] prompt), with them the image-grounded one ([ENC] prompt). The prompt replaces the
    embedding of the first token (the bos), as BLIP's tokenizer puts [CLS] / [ENC] first."""

    def __init__(self, decoder: CaptionDecoder, eps: float) -> None:
        super().__init__()
        dim = decoder.dim
        self.token_embed = decoder.token_embed
        self.pos_embed = decoder.pos_embed
        self.cls_prompt = nn.Parameter(torch.zeros(dim))
        self.enc_prompt = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList(BLIPTextEncoderLayer(layer, dim, decoder.heads, eps) for layer in decoder.layers)
        self.norm = decoder.norm

    def forward(
        self,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        image_tokens: Tensor | None = None,
        image_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Final states ``(B, L, D)``, normed; position 0 is the [CLS] (text only) or [ENC] (with image) state."""
        length = text_ids.shape[1]
        x = self.token_embed(text_ids.long()) + self.pos_embed[:length]  # [B, L, D]
        prompt = self.cls_prompt if image_tokens is None else self.enc_prompt
        x = torch.cat([(prompt.to(x.dtype) + self.pos_embed[0]).expand(x.shape[0], 1, -1), x[:, 1:]], dim=1)
        for layer in self.layers:
            image_kv = None if image_tokens is None else layer.image_kv(image_tokens)
            x = layer(x, text_padding_mask, image_kv, image_padding_mask)
        return self.norm(x)


class BLIPOutput(NamedTuple):
    image_embed: Tensor  # [B, embed_dim] unit norm, from the image [CLS] (or mean, config.itc_pool)
    text_embed: Tensor  # [B, embed_dim] unit norm, from the text [CLS] (or mean)
    itm_logits: Tensor  # [B, 2] of the given pairs, class 1 = match
    lm_logits: Tensor  # [B, L - 1, vocab_size] position i predicts text token i + 1


class BLIPLosses(NamedTuple):
    loss: Tensor  # itc_weight · itc + itm_weight · itm + lm_weight · lm
    itc: Tensor
    itm: Tensor
    lm: Tensor


class BLIP(nn.Module):
    """BLIP: ``loss`` (ITC, ITM on ITC-sampled hard negatives, LM), ``encode_image`` / ``encode_text`` (retrieval),
    ``itm_logits`` (matching), ``generate`` (KV-cached captioning).

    Text is ``(B, L)`` int ids, right-padded with ``config.pad_id``, starting with a bos token (the decoder's
    [DEC]; the encoders replace it by their prompt). ``text_padding_mask`` ``(B, L)`` bool (True = pad) keeps
    the encoders from reading the padding; the LM loss ignores targets equal to ``pad_id``.
    """

    def __init__(self, config: BLIPConfig) -> None:
        super().__init__()
        if not isinstance(config, BLIPConfig):
            raise TypeError(f"config must be a BLIPConfig, got {type(config).__name__}")
        self.config = c = config
        self.patch_embed = PatchEmbedding(c.image_size, c.patch_size, c.in_chans, c.vision_dim)
        self.patch_embed.mask_token = None  # BEiT's masked-image-modelling token: BLIP never masks patches
        self.image_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.vision_dim))
        self.image_blocks = nn.ModuleList(
            TransformerBlock(c.vision_dim, c.vision_heads, c.mlp_ratio, False, c.eps) for _ in range(c.vision_depth)
        )
        self.image_norm = nn.LayerNorm(c.vision_dim, eps=c.eps)
        self.text_decoder = CaptionDecoder(
            c.vocab_size, c.text_dim, c.text_depth, c.text_heads, c.mlp_ratio, c.max_text_len, c.vision_dim, c.pad_id,
            c.label_smoothing, c.eps,
        )  # fmt: skip
        self.text_encoder = BLIPTextEncoder(self.text_decoder, c.eps)
        self.itc = ITCHead(c.text_dim, c.embed_dim, init_temperature=c.init_temperature)
        if c.vision_dim != c.text_dim:  # ITCHead sizes both projections by one width
            self.itc.image_proj = nn.Linear(c.vision_dim, c.embed_dim)
        self.itm = ITMHead(c.text_dim)
        self.apply(_init_weights)
        for param in (self.image_pos_embed, self.patch_embed.cls_token, self.text_decoder.pos_embed,
                      self.text_encoder.cls_prompt, self.text_encoder.enc_prompt):  # fmt: skip
            nn.init.trunc_normal_(param, std=0.02)

    # -- encoders ---------------------------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> Tensor:
        """images ``(B, C, H, W)`` -> the ViT's final states ``(B, 1 + P, vision_dim)``, normed ([CLS] first)."""
        if isinstance(images, Tensor) and images.device != self.image_pos_embed.device:
            raise ValueError(f"images must be on the model's device {self.image_pos_embed.device}, got {images.device}")
        x = self.patch_embed(images) + self.image_pos_embed  # [B, 1 + P, Dv]
        for block in self.image_blocks:
            x = block(x)
        return self.image_norm(x)

    def text_states(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """The unimodal text encoder's states ``(B, L, text_dim)`` ([CLS] first)."""
        self._check_text(text_ids, text_padding_mask)
        return self.text_encoder(text_ids, text_padding_mask)

    def _pooled(self, states: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The ITC feature ``(B, D)`` of states ``(B, N, D)``: the [CLS] state, or the mean of the unpadded ones."""
        if self.config.itc_pool == "cls":
            return states[:, 0]
        if padding_mask is None:
            return states.mean(1)
        keep = (~padding_mask).unsqueeze(-1).to(states.dtype)  # [B, N, 1]
        return (states * keep).sum(1) / keep.sum(1).clamp_min(1)

    def image_embedding(self, image_tokens: Tensor) -> Tensor:
        return self.itc(self._pooled(image_tokens), None)[0]

    def text_embedding(self, text_states: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        return self.itc(None, self._pooled(text_states, text_padding_mask))[1]

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(B, embed_dim)``."""
        return self.image_embedding(self.image_tokens(images))

    def encode_text(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Unit-norm text embeddings ``(B, embed_dim)`` from the [CLS] state (or the mean, ``config.itc_pool``)."""
        return self.text_embedding(self.text_states(text_ids, text_padding_mask), text_padding_mask)

    def match_logits(self, image_tokens: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """ITM logits ``(B, 2)`` (class 1 = match) of the image-grounded encoder's [ENC] state, pair by pair."""
        self.text_decoder._check_image(image_tokens, None)  # (B, M, vision_dim), the model's device and dtype
        self._check_text(text_ids, text_padding_mask)
        self._check_batch(image_tokens.shape[0], text_ids.shape[0])
        return self.itm(self.text_encoder(text_ids, text_padding_mask, image_tokens)[:, 0])

    def itm_logits(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """ITM logits ``(B, 2)`` of image i with text i."""
        return self.match_logits(self.image_tokens(images), text_ids, text_padding_mask)

    # -- losses -----------------------------------------------------------------------------------
    def itc_output(
        self,
        image_tokens: Tensor,
        text_states: Tensor,
        positive_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        text_padding_mask: Tensor | None = None,
    ) -> ITCOutput:
        """ITC at the learnable temperature, with one hard negative per image and per text drawn ∝ exp(similarity)
        among the non-positives (BLIP); pairs with equal ``positive_ids`` ``(B,)`` are each other's positives.
        ``text_padding_mask`` is read only with ``config.itc_pool="mean"``."""
        image_embed = self.image_embedding(image_tokens)
        text_embed = self.text_embedding(text_states, text_padding_mask)
        return self.itc.loss(image_embed, text_embed, positive_ids=positive_ids, hard_negatives="sample",
                             hard_negative_source="similarity", generator=generator)  # fmt: skip

    def itm_loss(self, image_tokens: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None, labels: Tensor):
        """Cross-entropy of :meth:`match_logits` on pairs (e.g. from :func:`mome.nn.itm_inputs`); ``labels`` ``(B,)``
        1 = match. With ``config.itm_class_balance`` both classes weigh the same in total."""
        logits = self.match_logits(image_tokens, text_ids, text_padding_mask)
        weight = None
        if self.config.itm_class_balance:
            matches = labels.float().mean().clamp(1e-6, 1 - 1e-6)
            weight = torch.stack([0.5 / (1 - matches), 0.5 / matches]).to(logits.dtype)
        return F.cross_entropy(logits, labels, weight=weight)

    def forward(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> BLIPOutput:
        """Embeddings, ITM logits of the given pairs and the decoder's next-token logits."""
        if isinstance(text_ids, Tensor) and text_ids.dim() == 2 and text_ids.shape[1] < 2:
            raise ValueError(f"text_ids must be (B, L >= 2): a token and its target, got {tuple(text_ids.shape)}")
        image_tokens = self.image_tokens(images)
        text = self.text_states(text_ids, text_padding_mask)
        self._check_batch(image_tokens.shape[0], text.shape[0])
        lm_logits = self.text_decoder(text_ids[:, :-1], image_tokens)
        return BLIPOutput(self.image_embedding(image_tokens), self.text_embedding(text, text_padding_mask),
                          self.match_logits(image_tokens, text_ids, text_padding_mask), lm_logits)  # fmt: skip

    def loss(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        positive_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> BLIPLosses:
        """BLIP's three losses on a batch: ``itc``; ``itm`` on the B pairs, each image with its hard-negative text
        and each text with its hard-negative image (ITC-sampled with ``generator``); ``lm``, the decoder's
        next-token cross-entropy; and their weighted sum ``loss``."""
        if isinstance(text_ids, Tensor) and text_ids.dim() == 2 and text_ids.shape[1] < 2:
            raise ValueError(f"text_ids must be (B, L >= 2): a token and its target, got {tuple(text_ids.shape)}")
        image_tokens = self.image_tokens(images)
        text = self.text_states(text_ids, text_padding_mask)
        self._check_batch(image_tokens.shape[0], text.shape[0])
        itc = self.itc_output(image_tokens, text, positive_ids, generator, text_padding_mask=text_padding_mask)
        pair_tokens, pair_ids, pair_padding, labels = itm_inputs(
            image_tokens, text_ids, text_padding_mask, itc.neg_text_idx, itc.neg_image_idx
        )
        itm = self.itm_loss(pair_tokens, pair_ids, pair_padding, labels)
        lm = self.text_decoder.loss(text_ids, image_tokens)
        c = self.config
        return BLIPLosses(c.itc_weight * itc.loss + c.itm_weight * itm + c.lm_weight * lm, itc.loss, itm, lm)

    # -- captioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Tensor, max_new_tokens: int, bos_id: int, eos_id: int, **options):
        """Captions ``(B, T)`` from the image-grounded decoder, bos ([DEC]) first; ``options`` are
        :meth:`mome.nn.CaptionDecoder.generate`'s (strategy, temperature, top_k, top_p, generator, use_cache,
        return_logits)."""
        return self.text_decoder.generate(self.image_tokens(images), max_new_tokens, bos_id, eos_id, **options)

    # -- checks -----------------------------------------------------------------------------------
    def _check_text(self, text_ids: Tensor, text_padding_mask: Tensor | None) -> None:
        integer = isinstance(text_ids, Tensor) and text_ids.dtype in (torch.int64, torch.int32)
        if not integer or text_ids.dim() != 2:
            got = f"{tuple(text_ids.shape)} {text_ids.dtype}" if isinstance(text_ids, Tensor) else type(text_ids)
            raise TypeError(f"text_ids must be an int64 (or int32) tensor (B, L), got {got}")
        self.text_decoder._check_text(text_ids, text_ids.shape[0])  # length, device, id range
        if text_padding_mask is not None:
            if not isinstance(text_padding_mask, Tensor) or text_padding_mask.dtype != torch.bool:
                got = text_padding_mask.dtype if isinstance(text_padding_mask, Tensor) else type(text_padding_mask)
                raise TypeError(f"text_padding_mask must be a bool tensor (True = pad), got {got}")
            if text_padding_mask.shape != text_ids.shape or text_padding_mask.device != text_ids.device:
                raise ValueError(f"text_padding_mask must have text_ids' shape {tuple(text_ids.shape)} and device "
                                 f"{text_ids.device}, got {tuple(text_padding_mask.shape)} on "
                                 f"{text_padding_mask.device}")  # fmt: skip

    @staticmethod
    def _check_batch(images: int, texts: int) -> None:
        if images != texts:
            raise ValueError(f"images and text_ids must have the same batch, got {images} and {texts}")


class BootstrappedPair(NamedTuple):
    image: Tensor  # [C, H, W] the pair's image, as given
    text_ids: Tensor  # [L] int64: the original caption as given, or a synthetic one (bos ... eos, no padding)
    synthetic: bool  # True for the captioner's caption


@torch.no_grad()
def bootstrap(
    captioner: BLIP,
    filter: BLIP,
    pairs: Iterable[tuple[Tensor, Tensor]],
    *,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    threshold: float = 0.5,
    strategy: str = "sample",
    top_p: float | None = 0.9,
    generator: torch.Generator | None = None,
) -> list[BootstrappedPair]:
    """CapFilt: for every ``(image, text_ids)`` pair (``(C, H, W)`` float and ``(L,)`` int ids, right-padded with
    the filter's ``pad_id`` if at all), the captioner writes one synthetic caption of the image (BLIP: nucleus
    sampling, ``top_p`` 0.9; ``strategy="greedy"`` for the most likely one), and the filter's ITM head scores
    the original and the synthetic caption against the image: a caption is kept when its match probability
    exceeds ``threshold``. Returns the kept pairs in input order, each original before its image's synthetic
    caption. ``max_new_tokens`` defaults to the captioner's longest caption; ``batch_size`` pairs run at once.
    Models run as they are (call ``.eval()`` first for dropout-free captions and scores)."""
    if not isinstance(captioner, BLIP) or not isinstance(filter, BLIP):
        got = f"{type(captioner).__name__} and {type(filter).__name__}"
        raise TypeError(f"captioner and filter must be BLIP models, got {got}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_real(threshold) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a match probability in [0, 1), got {threshold!r}")
    if max_new_tokens is None:
        max_new_tokens = captioner.config.max_text_len - 1
    kept: list[BootstrappedPair] = []
    chunk: list[tuple[Tensor, Tensor]] = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs must yield (image, text_ids) tuples, got {type(pair).__name__} at pair {index}")
        image, text_ids = pair
        if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
            raise ValueError(f"pair {index}: image must be a (C, H, W) float tensor, got {_describe(image)}")
        if not isinstance(text_ids, Tensor) or text_ids.dim() != 1 or text_ids.is_floating_point():
            raise ValueError(f"pair {index}: text_ids must be a (L,) int tensor, got {_describe(text_ids)}")
        chunk.append((image, text_ids))
        if len(chunk) == batch_size:
            kept += _capfilt_chunk(captioner, filter, chunk, bos_id, eos_id, max_new_tokens, threshold,
                                   strategy=strategy, top_p=top_p, generator=generator)  # fmt: skip
            chunk = []
    if chunk:
        kept += _capfilt_chunk(captioner, filter, chunk, bos_id, eos_id, max_new_tokens, threshold,
                               strategy=strategy, top_p=top_p, generator=generator)  # fmt: skip
    return kept


def _describe(value) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__


def _pad_texts(texts: list[Tensor], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(N, L)`` ids right-padded with ``pad_id`` and the padding mask (True where an id equals ``pad_id``)."""
    width = max(int(t.shape[0]) for t in texts)
    ids = torch.full((len(texts), width), pad_id, dtype=torch.int64, device=device)
    for row, text in enumerate(texts):
        ids[row, : text.shape[0]] = text.to(device)
    return ids, ids == pad_id


def _capfilt_chunk(captioner, filter, chunk, bos_id, eos_id, max_new_tokens, threshold, **sampling):
    device = filter.image_pos_embed.device
    images = torch.stack([image for image, _ in chunk])
    generated = captioner.generate(images.to(captioner.image_pos_embed.device), max_new_tokens, bos_id, eos_id,
                                   **sampling).to(device)  # fmt: skip
    pad_id = filter.config.pad_id
    synthetic = [row[: _length(row, eos_id, pad_id)] for row in generated.cpu()]
    originals = [text for _, text in chunk]
    texts, padding = _pad_texts(originals + synthetic, pad_id, device)
    image_tokens = filter.image_tokens(images.to(device))
    match = filter.match_logits(image_tokens.repeat(2, 1, 1), texts, padding).float().softmax(-1)[:, 1]
    keep = (match > threshold).tolist()
    size = len(chunk)
    kept = []
    for row, (image, text) in enumerate(chunk):
        if keep[row]:
            kept.append(BootstrappedPair(image, text, False))
        if keep[size + row]:
            kept.append(BootstrappedPair(image, synthetic[row], True))
    return kept


def _length(ids: Tensor, eos_id: int, pad_id: int) -> int:
    """Tokens up to and including the first eos; without one, up to the last token that is not padding."""
    ends = (ids == eos_id).nonzero()
    if ends.numel():
        return int(ends[0, 0]) + 1
    content = (ids != pad_id).nonzero()
    return int(content[-1, 0]) + 1 if content.numel() else 1
