"""ALBEF (Li et al. 2021, "Align before Fuse") built from mome's modules.

A ViT image encoder; a BERT-style text encoder split into unimodal layers (text only) and fusion layers that
add cross-attention to the image tokens. Three losses: image-text contrastive (ITC) on the [CLS] embeddings,
with momentum-distilled targets and a queue of past momentum features as extra negatives; image-text matching
(ITM) on the fused [CLS], with in-batch hard negatives drawn by ITC similarity; masked language modelling (MLM)
through the fusion layers, optionally distilled from the momentum model too. The momentum copies follow the
online encoders by EMA and never get gradients. Attention runs on ``mome.ops.attention``.

Departures from the paper, for training from scratch on small data: every block is pre-norm (BERT is
post-norm) and the text encoder has no token-type embeddings; the temperature is ``ITCLoss``'s (learned
``exp`` parametrisation, scale capped at 1000, ALBEF's 0.001 floor on the temperature); ALBEF's warm-up of
the distillation weight over the first epoch is left to the training loop (``model.itc.alpha``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome import ops
from mome.models._vision_text import VisionTextConfig, check_text_inputs
from mome.models.coca import TransformerBlock
from mome.models.transformer import PatchEmbedding
from mome.nn._heads import merge_heads, split_heads
from mome.nn.decoder import CaptionDecoderLayer
from mome.nn.heads import IGNORE_INDEX, MIN_TEMPERATURE, ITMHead, MLMHead, itm_inputs, mask_tokens
from mome.nn.itc import ITCLoss
from mome.nn.training import copy_params, momentum_update
from mome.ops._validate import is_int, is_real


@dataclass(frozen=True)
class ALBEFConfig(VisionTextConfig):
    """Sizes and training constants of an ALBEF model.

    text_depth: unimodal text layers; fusion_depth: layers with cross-attention to the image (ALBEF: 6 + 6).
    embed_dim: the ITC embedding width. queue_size: momentum features kept as extra ITC negatives.
    momentum: the EMA rate of the momentum encoders; alpha: the distillation weight of ITC (and of MLM with
    ``mlm_distill``). mask_id: the [MASK] token; special_ids: tokens MLM never masks (pad, [CLS], ...).
    itm_random_negatives: the share of ITM negatives drawn uniformly among the pairs of other ids instead of by
    ITC similarity; itm_balanced: weight ITM's matches (1 in 3 pairs) and non-matches to count equally. ALBEF: 0
    and False; a model trained from scratch needs both, else ITM stays at the majority class (see the demo).
    The first text token is the [CLS] whose states give the text embedding and the ITM logits.
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vision_dim: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    text_dim: int = 768
    text_depth: int = 6
    fusion_depth: int = 6
    text_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 30522
    max_text_len: int = 512
    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    init_temperature: float = 0.07
    mlm_prob: float = 0.15
    mlm_distill: bool = True
    pad_id: int = 0
    mask_id: int = 103
    special_ids: tuple[int, ...] = (0, 100, 101, 102, 103)  # BERT's [PAD] [UNK] [CLS] [SEP] [MASK]
    itm_random_negatives: float = 0.0
    itm_balanced: bool = False
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "in_chans", "vision_dim", "vision_depth", "vision_heads", "text_dim",
                 "text_depth", "fusion_depth", "text_heads", "vocab_size", "max_text_len", "embed_dim")  # fmt: skip
        self.check_shapes(sizes)
        if not is_int(self.queue_size) or self.queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0 (0: no queue), got {self.queue_size!r}")
        for name in ("momentum", "alpha", "mlm_prob", "itm_random_negatives"):
            if not is_real(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        if not is_real(self.init_temperature) or not MIN_TEMPERATURE <= self.init_temperature <= 1.0:
            raise ValueError(f"init_temperature must lie in [{MIN_TEMPERATURE}, 1], got {self.init_temperature!r}")
        self.check_token_ids("pad_id", "mask_id")
        if not isinstance(self.special_ids, tuple) or not all(is_int(i) for i in self.special_ids):
            raise ValueError(f"special_ids must be a tuple of ints, got {self.special_ids!r}")
        self.check_weights("itc_weight", "itm_weight", "mlm_weight")
        for name in ("mlm_distill", "itm_balanced"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def albef_base(**overrides) -> ALBEFConfig:
    """ALBEF as the paper sizes it: a ViT-B/16 image encoder (224 px), BERT-base split into 6 unimodal and 6
    fusion layers, 256-d ITC embeddings, a 65,536-entry queue, momentum 0.995, distillation weight 0.4."""
    return ALBEFConfig().replace(**overrides)


def albef_tiny(**overrides) -> ALBEFConfig:
    """A tiny ALBEF for tests and the demo: 48 px images in 12 px patches, 64 wide, one text and one fusion layer."""
    config = ALBEFConfig(
        image_size=48,
        patch_size=12,
        vision_dim=64,
        vision_depth=2,
        vision_heads=4,
        text_dim=64,
        text_depth=1,
        fusion_depth=1,
        text_heads=4,
        vocab_size=32,
        max_text_len=12,
        embed_dim=64,
        queue_size=256,
        momentum=0.99,
        init_temperature=0.1,
        mask_id=3,
        special_ids=(0, 1, 2, 3),  # the demo tokenizer's [pad] [bos] [eos] [mask]; [bos] is the [CLS]
    )
    return config.replace(**overrides)


class VisionTransformer(nn.Module):
    """ViT: patches and a [CLS] token, learned positions, pre-norm blocks, a final LayerNorm: ``(B, 1 + P, D)``."""

    def __init__(self, c: ALBEFConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbedding(c.image_size, c.patch_size, c.in_chans, c.vision_dim)
        self.patch_embed.mask_token = None  # BEiT's masked-image-modelling token: ALBEF never masks patches
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.vision_dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(c.vision_dim, c.vision_heads, c.mlp_ratio, False, c.eps) for _ in range(c.vision_depth)
        )
        self.norm = nn.LayerNorm(c.vision_dim, eps=c.eps)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TextEncoder(nn.Module):
    """The unimodal half of the text encoder: token and position embeddings (BERT's embedding LayerNorm),
    bidirectional pre-norm blocks that skip padded keys, a final LayerNorm: ``(B, L) -> (B, L, D)``."""

    def __init__(self, c: ALBEFConfig) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(c.vocab_size, c.text_dim)
        self.pos_embed = nn.Parameter(torch.zeros(c.max_text_len, c.text_dim))
        self.embed_norm = nn.LayerNorm(c.text_dim, eps=c.eps)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.text_dim, c.text_heads, c.mlp_ratio, False, c.eps) for _ in range(c.text_depth)
        )
        self.norm = nn.LayerNorm(c.text_dim, eps=c.eps)

    def forward(self, text_ids: Tensor, text_padding_mask: Tensor | None) -> Tensor:
        x = self.embed_norm(self.token_embed(text_ids.long()) + self.pos_embed[: text_ids.shape[1]])
        for block in self.blocks:
            x = block(x, text_padding_mask)
        return self.norm(x)


class FusionLayer(CaptionDecoderLayer):
    """A BERT fusion layer: bidirectional self-attention over the text (padded keys skipped), cross-attention
    to the image tokens, FFN; ``CaptionDecoderLayer``'s weights and pre-norm order, without its causal mask."""

    def forward(self, x: Tensor, text_padding_mask: Tensor | None, image_k: Tensor, image_v: Tensor) -> Tensor:
        """``x`` ``(B, L, D)`` text states; ``image_k`` / ``image_v`` ``(B, H, M, Dh)`` from :meth:`image_kv`."""
        q, k, v = (split_heads(t, self.heads) for t in self.self_qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.self_out(merge_heads(ops.attention(q, k, v, key_padding_mask=text_padding_mask)))
        q = split_heads(self.cross_q(self.norm2(x)), self.heads)
        x = x + self.cross_out(merge_heads(ops.attention(q, image_k, image_v)))
        return x + self.ffn(self.norm3(x))

    def step(self, *args, **kwargs):
        raise TypeError("a FusionLayer is bidirectional: it has no one-token decoding step")


class FusionEncoder(nn.Module):
    """The multimodal half of the text encoder: fusion layers over the unimodal states, a final LayerNorm."""

    def __init__(self, c: ALBEFConfig) -> None:
        super().__init__()
        hidden = int(c.text_dim * c.mlp_ratio)
        self.layers = nn.ModuleList(
            FusionLayer(c.text_dim, c.text_heads, hidden, c.vision_dim, c.eps) for _ in range(c.fusion_depth)
        )
        self.norm = nn.LayerNorm(c.text_dim, eps=c.eps)

    def forward(self, text_states: Tensor, text_padding_mask: Tensor | None, image_states: Tensor) -> Tensor:
        x = text_states
        for layer in self.layers:
            x = layer(x, text_padding_mask, *layer.image_kv(image_states))
        return self.norm(x)


class ALBEF(nn.Module):
    """ALBEF: ``loss`` (ITC + ITM + MLM of one batch), ``encode_image`` / ``encode_text`` (unit-norm embeddings
    for retrieval), ``itm_logits`` (match / no-match of image-text pairs) and ``update_momentum`` (the EMA step).

    Text is ``(B, L)`` int ids, right-padded, starting with the [CLS] token; ``text_padding_mask`` ``(B, L)``
    bool (True = pad) keeps every layer from attending to the padding. Call ``update_momentum()`` after each
    optimizer step: ALBEF updates the momentum encoders at the start of each forward, the same sequence.
    """

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__()
        if not isinstance(config, ALBEFConfig):
            raise TypeError(f"config must be an ALBEFConfig, got {type(config).__name__}")
        self.config = c = config
        # encoders and fusion
        self.visual_encoder = VisionTransformer(c)
        self.text_encoder = TextEncoder(c)
        self.fusion_encoder = FusionEncoder(c)
        # heads
        self.vision_proj = nn.Linear(c.vision_dim, c.embed_dim)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim)
        self.itc = ITCLoss(init_temperature=c.init_temperature, max_scale=1.0 / MIN_TEMPERATURE,
                           queue_size=c.queue_size, embed_dim=c.embed_dim, alpha=c.alpha,
                           hard_negatives="sample")  # fmt: skip
        self.itm_head = ITMHead(c.text_dim)
        self.mlm_head = MLMHead(c.text_dim, c.vocab_size, eps=c.eps)
        self.apply(_init_weights)
        self.mlm_head.decoder.weight = self.text_encoder.token_embed.weight  # tied, as BERT's
        nn.init.trunc_normal_(self.visual_encoder.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.visual_encoder.patch_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.text_encoder.pos_embed, std=0.02)
        # momentum copies: start equal, move by EMA, no gradients
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.fusion_encoder_m = copy.deepcopy(self.fusion_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        self.mlm_head_m = copy.deepcopy(self.mlm_head)
        self.mlm_head_m.decoder.weight = self.text_encoder_m.token_embed.weight
        copy_params(*self._momentum_and_online())

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, momentum)`` module pairs."""
        names = ("visual_encoder", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "mlm_head")
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in names]

    def _momentum_and_online(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Both sides as one module each: the tied embedding / MLM decoder weight is then one parameter, moved once."""
        pairs = self.momentum_pairs()
        return nn.ModuleList(m for _, m in pairs), nn.ModuleList(o for o, _ in pairs)

    @torch.no_grad()
    def update_momentum(self) -> None:
        """``p_m = momentum · p_m + (1 - momentum) · p`` for every momentum parameter."""
        momentum_update(*self._momentum_and_online(), self.config.momentum)

    # -- encoders ---------------------------------------------------------------------------------
    def image_states(self, images: Tensor) -> Tensor:
        """images ``(B, C, H, W)`` -> the ViT's tokens ``(B, 1 + P, vision_dim)``, [CLS] first."""
        device = self.visual_encoder.pos_embed.device
        if isinstance(images, Tensor) and images.device != device:
            raise ValueError(f"images must be on the model's device {device}, got {images.device}")
        return self.visual_encoder(images)

    def text_states(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """The unimodal text layers' states ``(B, L, text_dim)``."""
        check_text_inputs(text_ids, text_padding_mask, self.config, self.text_encoder.token_embed.weight.device,
                          first_token_kept=True)  # fmt: skip
        return self.text_encoder(text_ids, text_padding_mask)

    def fused_states(self, text_states: Tensor, text_padding_mask: Tensor | None, image_states: Tensor) -> Tensor:
        """The fusion layers over unimodal text states, cross-attending to the image tokens: ``(B, L, text_dim)``."""
        if text_states.shape[0] != image_states.shape[0]:
            raise ValueError(f"images and texts must have the same batch, got {image_states.shape[0]} images and "
                             f"{text_states.shape[0]} texts")  # fmt: skip
        return self.fusion_encoder(text_states, text_padding_mask, image_states)

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``(B, embed_dim)`` from the image [CLS]."""
        return F.normalize(self.vision_proj(self.image_states(images)[:, 0]), dim=-1)

    def encode_text(self, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Unit-norm text embeddings ``(B, embed_dim)`` from the text [CLS] of the unimodal layers."""
        return F.normalize(self.text_proj(self.text_states(text_ids, text_padding_mask)[:, 0]), dim=-1)

    def itm_logits(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Match (class 1) / no-match (class 0) logits ``(B, 2)`` of the pairs ``(images[i], text_ids[i])``."""
        text = self.text_states(text_ids, text_padding_mask)
        return self.itm_head(self.fused_states(text, text_padding_mask, self.image_states(images))[:, 0])

    # -- training ---------------------------------------------------------------------------------
    def loss(
        self,
        images: Tensor,
        text_ids: Tensor,
        text_padding_mask: Tensor | None = None,
        *,
        positive_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """ALBEF's losses of one batch: ``{"itc", "itm", "mlm", "total"}`` (total: the weighted sum).

        ``positive_ids`` ``(B,)``: pairs with equal ids are each other's ITC positives and never each other's
        ITM negatives (default: only the diagonal). ``generator`` draws the hard negatives and the MLM masks.
        In training mode the momentum features of the batch enter the ITC queue.
        """
        c = self.config
        image = self.image_states(images)  # [B, 1 + P, Dv]
        text = self.text_states(text_ids, text_padding_mask)  # [B, L, Dt]
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"images and text_ids must have the same batch, got {image.shape[0]} images and "
                             f"{text.shape[0]} texts")  # fmt: skip
        # MLM's input: BERT's masking of the non-special tokens
        masked_ids, mlm_labels = mask_tokens(text_ids, text_padding_mask, c.mask_id, c.vocab_size, c.mlm_prob,
                                             generator, c.special_ids)  # fmt: skip
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        with torch.no_grad():
            image_m = self.visual_encoder_m(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(text_ids, text_padding_mask)[:, 0]), dim=-1)
        # ITC: momentum features (and the queue) as columns, distilled targets; hard negatives drawn by similarity
        itc = self.itc(image_feat, text_feat, image_feats_m=image_feat_m, text_feats_m=text_feat_m,
                       positive_ids=positive_ids, generator=generator)  # fmt: skip
        # ITM: the positive pairs, each image with a hard-negative text, each text with a hard-negative image
        # (itm_inputs indexes whatever it is given: here the encoded states, as ALBEF reuses them)
        neg_text, neg_image = itc.neg_text_idx, itc.neg_image_idx
        if c.itm_random_negatives > 0:
            neg_text = _mix_random_negatives(neg_text, positive_ids, c.itm_random_negatives, generator)
            neg_image = _mix_random_negatives(neg_image, positive_ids, c.itm_random_negatives, generator)
        pair_image, pair_text, pair_padding, labels = itm_inputs(image, text, text_padding_mask, neg_text, neg_image)
        fused = self.fused_states(pair_text, pair_padding, pair_image)
        itm = self._itm_loss(self.itm_head(fused[:, 0]), labels)
        # MLM: masked text through both halves of the text encoder, attending to the image
        hidden = self.fused_states(self.text_encoder(masked_ids, text_padding_mask), text_padding_mask, image)
        mlm = self._mlm_loss(hidden, masked_ids, text_padding_mask, image_m, mlm_labels)
        total = c.itc_weight * itc.loss + c.itm_weight * itm + c.mlm_weight * mlm
        return {"itc": itc.loss, "itm": itm, "mlm": mlm, "total": total}

    def _itm_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if not self.config.itm_balanced:
            return F.cross_entropy(logits, labels)
        matches = labels.sum()
        counts = torch.stack([labels.numel() - matches, matches]).clamp(min=1).to(logits.dtype)
        return F.cross_entropy(logits, labels, weight=1.0 / counts)  # a weighted mean: each class counts half

    def _mlm_loss(self, hidden, masked_ids, text_padding_mask, image_m, labels) -> Tensor:
        """Mean cross-entropy over the masked positions; with ``mlm_distill`` ``(1 - alpha) · CE + alpha · soft CE``
        against the momentum model's predictions on the same masked text. Logits at every position, as BERT
        computes them: no data-dependent shapes (torch.compile), and zero loss when nothing is masked."""
        logits = self.mlm_head(hidden)  # [B, L, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        chosen = labels != IGNORE_INDEX
        count = chosen.sum().clamp(min=1)
        hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        hard = hard / count
        alpha = self.itc.alpha
        if not self.config.mlm_distill or alpha == 0:
            return hard
        with torch.no_grad():
            hidden_m = self.fusion_encoder_m(self.text_encoder_m(masked_ids, text_padding_mask), text_padding_mask,
                                             image_m)  # fmt: skip
            soft = self.mlm_head_m(hidden_m).to(logits.dtype).softmax(dim=-1)
        distilled = -((soft * logits.log_softmax(dim=-1)).sum(dim=-1) * chosen).sum() / count
        return (1 - alpha) * hard + alpha * distilled


def _mix_random_negatives(
    hard: Tensor, positive_ids: Tensor | None, share: float, generator: torch.Generator | None
) -> Tensor:
    """Each negative index replaced with probability ``share`` by a pair drawn uniformly among those of another
    id (every other pair without ids); rows with no other id keep theirs (-1)."""
    batch, device = hard.shape[0], hard.device
    ids = torch.arange(batch, device=device) if positive_ids is None else positive_ids
    others = ids[:, None] != ids[None, :]  # [B, B]
    has_other = others.any(1)
    weights = (others | ~has_other[:, None]).to(torch.float32)  # a row without another id draws anything, unused
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    swap = has_other & (torch.rand(batch, generator=generator, device=device) < share)
    return torch.where(swap, drawn, hard)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal 0.02 for weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
