"""VLMo (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts") from mome's
modules, with its stagewise pre-training.

The encoder is a :class:`~mome.models.MoMETransformer` in the VLMo layout: shared self-attention, V / L experts
in every layer, a VL expert in the top ``vl_layers`` layers for fused image-text input, VLMo's relative position
bias. Heads: ITC on the image and text [CLS] states, ITM on the fused [CLS] with ALBEF-style hard negatives drawn
from the ITC similarities, MLM on fused input, and a masked-image head for the image-only stage.

Stagewise pre-training (:data:`STAGES`, :func:`start_stage`):

1. ``"image"``: image-only masked image modelling trains the attention and the V expert. VLMo runs BEiT's MIM
   with DALL-E tokens; here the target of a masked patch is its quantised mean colour
   (:mod:`mome.models.masked_data`), a fixed cheap tokenizer with the same form of loss.
2. ``"text"``: text-only MLM with the self-attention and the V expert frozen: the L expert (and the text
   embeddings) learn to use the attention trained on images.
3. ``"image-text"``: everything trains on ITC + ITM + fused MLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome.models.config import MoMEConfig, vlmo_base, vlmo_tiny
from mome.models.masked_data import DEMO_VALUE_RANGE, num_colour_codes, patch_colour_codes, random_patch_mask
from mome.models.transformer import MoMEOutput, MoMETransformer
from mome.nn.freeze import freeze_experts, unfreeze_experts
from mome.nn.heads import IGNORE_INDEX, ITCHead, ITMHead, MLMHead, itm_inputs, mask_tokens

STAGES = ("image", "text", "image-text")
ITC_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class VLMoConfig:
    """A VLMo: its encoder's config and its pre-training objectives.

    mask_id, special_ids: the tokenizer's [MASK] and the ids MLM never masks (BERT's by default).
    mlm_prob: share of text tokens MLM masks (VLMo: 0.15). mim_ratio: share of patches the image stage masks
    (BEiT: 0.4); colour_levels, colour_range: the masked-patch target (:func:`~mome.models.masked_data.
    patch_colour_codes`). itc_pool: the ITC feature, the [CLS] state (VLMo) or the mean of the unpadded tokens.
    itm_pairs, mlm_pairs: run ITM on at most this many positives (and as many negative texts and images) and MLM
    on at most this many pairs of the batch (None: all, as VLMo). itm_random_share: the share of ITM negatives
    drawn uniformly among other pairs instead of hard by ITC (VLMo: 0). itm_class_balance: weight ITM's match
    and non-match classes equally (VLMo: off, one match per two non-matches). itm_weight: of the ITM loss.
    """

    encoder: MoMEConfig = field(default_factory=vlmo_base)
    embed_dim: int = 768
    init_temperature: float = 0.07
    mask_id: int = 103
    special_ids: tuple[int, ...] = (0, 101, 102, 103)
    mlm_prob: float = 0.15
    mim_ratio: float = 0.4
    colour_levels: int = 4
    colour_range: tuple[float, float] = DEMO_VALUE_RANGE
    itc_pool: str = "cls"
    itm_pairs: int | None = None
    mlm_pairs: int | None = None
    itm_random_share: float = 0.0
    itm_class_balance: bool = False
    itm_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, MoMEConfig) or self.encoder.layout != "vlmo":
            raise ValueError(f"encoder must be a MoMEConfig with layout='vlmo', got {self.encoder!r}")
        if self.encoder.num_experts != 3:
            raise ValueError(f"encoder must have 3 experts (V, L, VL), got num_experts={self.encoder.num_experts}")
        vocab = self.encoder.vocab_size
        for name in ("embed_dim", "colour_levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "colour_levels" else 1):
                raise ValueError(f"{name} must be a positive int (colour_levels >= 2), got {value!r}")
        if isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int) or not 0 <= self.mask_id < vocab:
            raise ValueError(f"mask_id must be an int in [0, encoder.vocab_size={vocab}), got {self.mask_id!r}")
        if not 0.0 < self.mlm_prob <= 1.0:
            raise ValueError(f"mlm_prob must lie in (0, 1], got {self.mlm_prob!r}")
        if not 0.0 < self.mim_ratio < 1.0:
            raise ValueError(f"mim_ratio must lie in (0, 1), got {self.mim_ratio!r}")
        if self.itc_pool not in ITC_POOLS:
            raise ValueError(f"itc_pool must be one of {ITC_POOLS}, got {self.itc_pool!r}")
        for name in ("itm_pairs", "mlm_pairs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None (all) or a positive int, got {value!r}")
        if not 0.0 <= self.itm_random_share <= 1.0:
            raise ValueError(f"itm_random_share must lie in [0, 1], got {self.itm_random_share!r}")
        if not self.itm_weight >= 0:
            raise ValueError(f"itm_weight must be >= 0, got {self.itm_weight!r}")

    @property
    def num_codes(self) -> int:
        return num_colour_codes(self.colour_levels, self.encoder.in_chans)

    def replace(self, **overrides) -> VLMoConfig:
        return replace(self, **overrides)


def vlmo_base_recipe(**overrides) -> VLMoConfig:
    """VLMo-Base: :func:`~mome.models.vlmo_base` with 768-d ITC embeddings and BERT's special ids."""
    return VLMoConfig().replace(**overrides)


def vlmo_tiny_recipe(**overrides) -> VLMoConfig:
    """A tiny VLMo for tests and the demo: :func:`~mome.models.vlmo_tiny` (4 layers of 64, VL-FFN in the top 2,
    relative position bias), 64-d ITC embeddings, the demo tokenizer's special ids (pad, bos, eos, mask = 0..3)."""
    encoder = overrides.pop("encoder", None) or vlmo_tiny()
    config = VLMoConfig(encoder=encoder, embed_dim=encoder.dim, init_temperature=0.1, mask_id=3,
                        special_ids=(0, 1, 2, 3))  # fmt: skip
    return config.replace(**overrides)


class VLMoLosses(NamedTuple):
    loss: Tensor  # what the stage trains on: mim (image), mlm (text), itc + itm_weight · itm + mlm (image-text)
    itc: Tensor | None
    itm: Tensor | None
    mlm: Tensor | None
    mim: Tensor | None


class VLMo(nn.Module):
    """VLMo: ``encoder`` (a MoMETransformer) and its heads ``itc``, ``itm``, ``mlm``, ``mim``.

    ``loss(stage, ...)`` gives the objective of a pre-training stage; ``embed(images, text_ids, padding)`` the
    unit-norm retrieval embeddings; ``match_logits(images, text_ids, padding)`` ITM's ``(B, 2)`` logits.
    Text is ``(B, L)`` int ids whose first token is the [CLS] (the demo's bos), ``text_padding_mask`` True = pad.
    """

    def __init__(self, config: VLMoConfig) -> None:
        super().__init__()
        if not isinstance(config, VLMoConfig):
            raise TypeError(f"config must be a VLMoConfig, got {type(config).__name__}")
        self.config = c = config
        dim = c.encoder.dim
        self.encoder = MoMETransformer(c.encoder)
        self.itc = ITCHead(dim, c.embed_dim, init_temperature=c.init_temperature)
        self.itm = ITMHead(dim)
        self.mlm = MLMHead(dim, c.encoder.vocab_size)
        self.mim = nn.Linear(dim, c.num_codes)  # on the final (normed) patch states, as BEiT's lm_head
        for module in (self.itc, self.itm, self.mlm, self.mim):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)

    # -- retrieval and matching ------------------------------------------------------------------------------------
    def _pooled(self, output: MoMEOutput, padding: Tensor | None, which: str) -> Tensor:
        if self.config.itc_pool == "cls":
            return output.image_cls if which == "image" else output.text_cls
        if padding is None:
            return output.hidden.mean(1)
        keep = (~padding).unsqueeze(-1).to(output.hidden.dtype)  # [B, L, 1]
        return (output.hidden * keep).sum(1) / keep.sum(1)

    def embed(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Unit-norm ``(B, embed_dim)`` image and text embeddings, each from its own modality alone."""
        image = self._pooled(self.encoder.encode_image(images), None, "image")
        text = self._pooled(self.encoder.encode_text(text_ids, text_padding_mask), text_padding_mask, "text")
        return self.itc(image, text)

    def match_logits(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """ITM logits ``(B, 2)`` (class 1 = match) of each image with its text, from the fused [CLS]."""
        return self.itm(self.encoder.fused_cls(self.encoder.encode_pair(images, text_ids, text_padding_mask)))

    # -- masked modelling ------------------------------------------------------------------------------------------
    def mim_logits(self, images: Tensor, masked_position: Tensor) -> tuple[Tensor, Tensor]:
        """Image-only masked image modelling: logits ``(M, num_codes)`` of the ``M`` masked patches and their
        target codes ``(M,)``. ``masked_position`` ``(B, P)`` bool, True = replaced by the mask token."""
        hidden = self.encoder.encode_image(images, masked_position).hidden[:, 1:]  # [B, P, D] past the [CLS]
        codes = patch_colour_codes(images, self.config.encoder.patch_size, self.config.colour_levels,
                                   self.config.colour_range)  # fmt: skip
        return self.mim(hidden[masked_position]), codes[masked_position]

    def mlm_logits(self, masked_ids: Tensor, labels: Tensor, text_padding_mask: Tensor | None = None,
                   images: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """MLM logits ``(M, vocab_size)`` of the ``M`` positions with a label and those labels: text-only input,
        or fused with ``images`` (VLMo puts the text first)."""
        if images is None:
            hidden = self.encoder.encode_text(masked_ids, text_padding_mask).hidden
        else:
            hidden = self.encoder.encode_pair(images, masked_ids, text_padding_mask).hidden[:, : masked_ids.shape[1]]
        selected = labels != IGNORE_INDEX
        return self.mlm(hidden[selected]), labels[selected]

    def mask_text(self, text_ids: Tensor, padding: Tensor | None, generator: torch.Generator | None = None):
        """BERT masking of ``mlm_prob`` of the non-special tokens: ``(masked_ids, labels)``."""
        c = self.config
        return mask_tokens(text_ids, padding, c.mask_id, c.encoder.vocab_size, prob=c.mlm_prob, generator=generator,
                           special_ids=c.special_ids)  # fmt: skip

    def mask_patches(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        device = self.encoder.text_embed.weight.device
        return random_patch_mask(batch, self.config.encoder.num_patches, self.config.mim_ratio, generator=generator,
                                 device=device)  # fmt: skip

    # -- the stages' objectives ------------------------------------------------------------------------------------
    def loss(
        self,
        stage: str,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        *,
        positive_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> VLMoLosses:
        """The objective of ``stage``: ``"image"`` (needs images), ``"text"`` (needs text) or ``"image-text"``
        (pairs; ``positive_ids`` ``(B,)`` marks pairs that are positives of each other, e.g. the same caption).
        ``generator`` draws the masks and ITM's negatives."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage != "text" and images is None:
            raise ValueError(f"stage {stage!r} needs images")
        if stage != "image" and text_ids is None:
            raise ValueError(f"stage {stage!r} needs text_ids")
        if stage == "image":
            mim = F.cross_entropy(*self.mim_logits(images, self.mask_patches(images.shape[0], generator)))
            return VLMoLosses(mim, None, None, None, mim)
        if stage == "text":
            logits, labels = self.mlm_logits(*self.mask_text(text_ids, text_padding_mask, generator), text_padding_mask)
            mlm = _masked_cross_entropy(logits, labels)
            return VLMoLosses(mlm, None, None, mlm, None)
        return self._image_text_losses(images, text_ids, text_padding_mask, positive_ids, generator)

    def _image_text_losses(self, images, text_ids, padding, positive_ids, generator) -> VLMoLosses:
        c = self.config
        image_embed, text_embed = self.embed(images, text_ids, padding)
        itc = self.itc.loss(image_embed, text_embed, positive_ids=positive_ids, hard_negatives="sample",
                            generator=generator)  # fmt: skip
        neg_text, neg_image = itc.neg_text_idx, itc.neg_image_idx
        if c.itm_random_share > 0:
            ids = torch.arange(images.shape[0], device=images.device) if positive_ids is None else positive_ids
            neg_text = _mix_random(neg_text, ids, c.itm_random_share, generator)
            neg_image = _mix_random(neg_image, ids, c.itm_random_share, generator)
        itm = self._itm_loss(images, text_ids, padding, neg_text, neg_image)
        few = slice(0, c.mlm_pairs)
        masked_ids, labels = self.mask_text(text_ids[few], None if padding is None else padding[few], generator)
        mlm_padding = None if padding is None else padding[few]
        mlm = _masked_cross_entropy(*self.mlm_logits(masked_ids, labels, mlm_padding, images[few]))
        return VLMoLosses(itc.loss + c.itm_weight * itm + mlm, itc.loss, itm, mlm, None)

    def _itm_loss(self, images, text_ids, padding, neg_text_idx, neg_image_idx) -> Tensor:
        """Cross-entropy of ITM on the positives, each image with its negative text and each text with its negative
        image (at most ``itm_pairs`` of each kind)."""
        pair_images, pair_ids, pair_padding, labels = itm_inputs(images, text_ids, padding, neg_text_idx, neg_image_idx)
        if self.config.itm_pairs is not None:
            groups = (images.shape[0], neg_text_idx >= 0, neg_image_idx >= 0)
            rows = _first_rows_of_groups(groups, self.config.itm_pairs, images.device)
            pair_images, pair_ids, labels = pair_images[rows], pair_ids[rows], labels[rows]
            pair_padding = None if pair_padding is None else pair_padding[rows]
        logits = self.match_logits(pair_images, pair_ids, pair_padding)
        weight = None
        if self.config.itm_class_balance:
            matches = labels.float().mean().clamp(1e-6, 1 - 1e-6)
            weight = torch.stack([0.5 / (1 - matches), 0.5 / matches]).to(logits.dtype)
        return F.cross_entropy(logits, labels, weight=weight)


def _masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, and a zero still connected to the graph when nothing was masked."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in fp32
    return F.cross_entropy(logits, labels)


def _first_rows_of_groups(groups, count: int, device) -> Tensor:
    """Rows of ``itm_inputs``' output keeping the first ``count`` of each group: positives, negative texts,
    negative images (the two negative groups hold the rows whose index is >= 0)."""
    batch, has_text, has_image = groups
    rows, start = [], 0
    for size in (batch, int(has_text.sum()), int(has_image.sum())):
        rows.append(torch.arange(start, start + min(size, count), device=device))
        start += size
    return torch.cat(rows)


def _mix_random(hard: Tensor, ids: Tensor, share: float, generator: torch.Generator | None) -> Tensor:
    """Each hard negative replaced, with probability ``share``, by a pair of another id drawn uniformly."""
    others = (ids[:, None] != ids[None, :]).double().cpu()  # [B, B]
    has = others.any(1)
    drawn = torch.full((ids.shape[0],), -1, dtype=torch.int64)
    if bool(has.any()):
        drawn[has] = torch.multinomial(others[has], 1, generator=_cpu(generator))[:, 0]
    swap = (torch.rand(ids.shape, generator=_cpu(generator)) < share) & (drawn >= 0)
    return torch.where(swap.to(hard.device), drawn.to(hard.device), hard)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    return generator if generator is None or generator.device.type == "cpu" else None


# -- stagewise pre-training ----------------------------------------------------------------------------------------
_STAGE_MODULES = {  # what each stage trains (parameter name prefixes); experts are further frozen by row
    "image": ("encoder.vision_embed.", "encoder.modality_embed.", "encoder.layers.", "encoder.relative_position.",
              "encoder.norm.", "mim."),
    "text": ("encoder.text_embed.", "encoder.text_embed_norm.", "encoder.modality_embed.", "encoder.relative_position.",
             "mlm."),
    "image-text": ("encoder.", "itc.", "itm.", "mlm."),
}  # fmt: skip
_TEXT_STAGE_LAYER_PARTS = (".norm2.", ".ffn.")  # in the text stage only these of each layer, and only the L expert
_FROZEN_EXPERTS = {"image": ("language", "vision-language"), "text": ("vision", "vision-language"), "image-text": ()}
_NO_DECAY = ("norm", "gamma_", "relative_position", "pos_embed", "cls_token", "mask_token", "modality_embed",
             "temperature")  # fmt: skip


def stage_trainable(model: VLMo, stage: str) -> list[str]:
    """Names of the parameters ``stage`` trains (before its frozen experts are masked out row by row)."""
    if not isinstance(model, VLMo):
        raise TypeError(f"model must be a VLMo, got {type(model).__name__}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    names = []
    for name, _ in model.named_parameters():
        if name.startswith(_STAGE_MODULES[stage]):
            names.append(name)
        elif stage == "text" and name.startswith("encoder.layers.") and any(p in name for p in _TEXT_STAGE_LAYER_PARTS):
            names.append(name)
    return names


def parameter_groups(named_parameters, weight_decay: float) -> list[dict]:
    """AdamW groups as BEiT / VLMo make them: no weight decay on biases, norms, layer scales, position tables and
    special tokens. (A frozen row with no decay and no gradient keeps its value exactly under Adam.)"""
    decay, no_decay = [], []
    for name, param in named_parameters:
        skip = name.endswith("bias") or param.dim() <= 1 or any(key in name for key in _NO_DECAY)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_stage(model: VLMo, stage: str, *, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """Set ``model`` up for pre-training ``stage`` and return the AdamW that trains it.

    ``requires_grad`` is switched on for what the stage trains and off for the rest (the shared self-attention,
    its norm and layer scales are frozen this way in the text stage), every earlier expert freeze is undone, and
    the experts the stage does not train are frozen row by row with :func:`mome.nn.freeze_experts` tied to the
    returned optimizer: ``"image"`` trains only the V expert, ``"text"`` only the L expert (the V expert frozen,
    as VLMo does, and the VL expert kept for the last stage), ``"image-text"`` all three. After each
    ``optimizer.step()`` the frozen parts are bit-identical.
    """
    trainable = set(stage_trainable(model, stage))
    unfreeze_experts(model.encoder)
    named = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        if name in trainable:
            named.append((name, param))
    optimizer = torch.optim.AdamW(parameter_groups(named, weight_decay), lr=lr)
    if _FROZEN_EXPERTS[stage]:
        freeze_experts(model.encoder, _FROZEN_EXPERTS[stage], optimizer=optimizer)
    return optimizer
