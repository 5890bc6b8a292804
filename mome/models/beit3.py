"""BEiT-3 (Wang et al. 2022, "Image as a Foreign Language") from mome's modules, trained by masked data modelling.

The encoder is a :class:`~mome.models.MoMETransformer` in the BEiT-3 layout (torchscale's multiway transformer:
V and L experts for every per-token weight, shared softmax; fused input is ``[image, text]``). BEiT-3 has one
pre-training task, masked data modelling, on three kinds of input through the same network:

- image-only: ``mim_ratio`` of the patches replaced by the mask token, each predicting its visual token. BEiT-3
  predicts a VQ-KD token; here the token is the patch's quantised mean colour (:mod:`mome.models.masked_data`);
- text-only: ``text_mask_prob`` of the tokens (BEiT-3: 15%) masked, each predicting its word;
- image-text pairs: ``pair_text_mask_prob`` of the text (BEiT-3: 50%) and ``mim_ratio`` of the patches masked,
  both predicted from the fused input.

:meth:`BEiT3.loss` is the sum of the four mean cross-entropies. For retrieval BEiT-3 fine-tunes the encoder with
an image-text contrastive loss on the image and text [CLS] states, each modality encoded alone
(:meth:`BEiT3.retrieval_loss`, :meth:`BEiT3.embed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome.models.config import MoMEConfig, beit3_base, beit3_tiny
from mome.models.masked_data import DEMO_VALUE_RANGE, num_colour_codes, patch_colour_codes, random_patch_mask
from mome.models.transformer import MoMETransformer
from mome.nn.heads import IGNORE_INDEX, ITCHead, MLMHead, mask_tokens
from mome.ops.itc import ITCOutput

INPUTS = ("image", "text", "pair")
RETRIEVAL_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class BEiT3Config:
    """A BEiT-3: its encoder's config and its masked data modelling.

    mask_id, special_ids: the tokenizer's mask token and the ids never masked (defaults: the demo tokenizer's pad,
    bos, eos, mask; set them for another tokenizer). text_mask_prob / pair_text_mask_prob: share of text tokens
    masked in text-only input and in image-text pairs (BEiT-3: 0.15 and 0.5). mim_ratio: share of patches masked
    (BEiT-3: 0.4). colour_levels, colour_range: the visual token (:func:`~mome.models.masked_data.
    patch_colour_codes`). embed_dim, init_temperature: the retrieval heads; retrieval_pool: their input, the
    [CLS] state (BEiT-3) or the mean of the unpadded tokens.
    """

    encoder: MoMEConfig = field(default_factory=beit3_base)
    mask_id: int = 3
    special_ids: tuple[int, ...] = (0, 1, 2, 3)
    text_mask_prob: float = 0.15
    pair_text_mask_prob: float = 0.5
    mim_ratio: float = 0.4
    colour_levels: int = 4
    colour_range: tuple[float, float] = DEMO_VALUE_RANGE
    embed_dim: int = 768
    init_temperature: float = 0.07
    retrieval_pool: str = "cls"

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, MoMEConfig) or self.encoder.layout != "beit3":
            raise ValueError(f"encoder must be a MoMEConfig with layout='beit3', got {self.encoder!r}")
        vocab = self.encoder.vocab_size
        if isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int) or not 0 <= self.mask_id < vocab:
            raise ValueError(f"mask_id must be an int in [0, encoder.vocab_size={vocab}), got {self.mask_id!r}")
        for name in ("text_mask_prob", "pair_text_mask_prob"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.mim_ratio < 1.0:
            raise ValueError(f"mim_ratio must lie in (0, 1), got {self.mim_ratio!r}")
        if isinstance(self.colour_levels, bool) or not isinstance(self.colour_levels, int) or self.colour_levels < 2:
            raise ValueError(f"colour_levels must be an int >= 2, got {self.colour_levels!r}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.retrieval_pool not in RETRIEVAL_POOLS:
            raise ValueError(f"retrieval_pool must be one of {RETRIEVAL_POOLS}, got {self.retrieval_pool!r}")

    @property
    def num_codes(self) -> int:
        return num_colour_codes(self.colour_levels, self.encoder.in_chans)

    def replace(self, **overrides) -> BEiT3Config:
        return replace(self, **overrides)


def beit3_base_recipe(**overrides) -> BEiT3Config:
    """BEiT-3 base (:func:`~mome.models.beit3_base`) with 768-d retrieval embeddings."""
    return BEiT3Config().replace(**overrides)


def beit3_tiny_recipe(**overrides) -> BEiT3Config:
    """A tiny BEiT-3 for tests and the demo: :func:`~mome.models.beit3_tiny` (2 layers of 64, 32 px images in 8 px
    patches), 64-d retrieval embeddings."""
    encoder = overrides.pop("encoder", None) or beit3_tiny()
    return BEiT3Config(encoder=encoder, embed_dim=encoder.dim, init_temperature=0.1).replace(**overrides)


class BEiT3Losses(NamedTuple):
    loss: Tensor  # the sum of the parts that ran
    image: Tensor | None  # masked patches of image-only input
    text: Tensor | None  # masked tokens of text-only input
    pair_image: Tensor | None  # masked patches of image-text input
    pair_text: Tensor | None  # masked tokens of image-text input


class BEiT3(nn.Module):
    """BEiT-3: ``encoder`` (a MoMETransformer, BEiT-3 layout), the masked-patch head ``mim``, the masked-token head
    ``mlm`` and the retrieval head ``itc``. Text is ``(B, L)`` int ids (the first token is the [CLS]),
    ``text_padding_mask`` True = pad."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        if not isinstance(config, BEiT3Config):
            raise TypeError(f"config must be a BEiT3Config, got {type(config).__name__}")
        self.config = c = config
        dim = c.encoder.dim
        self.encoder = MoMETransformer(c.encoder)
        self.mim = nn.Linear(dim, c.num_codes)
        self.mlm = MLMHead(dim, c.encoder.vocab_size)
        self.itc = ITCHead(dim, c.embed_dim, init_temperature=c.init_temperature)
        for module in (self.mim, self.mlm, self.itc):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)

    # -- masks ------------------------------------------------------------------------------------------------------
    def mask_patches(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``(batch, P)`` bool, ``mim_ratio`` of each image's patches True (masked)."""
        device = self.mim.weight.device
        return random_patch_mask(batch, self.config.encoder.num_patches, self.config.mim_ratio, generator=generator,
                                 device=device)  # fmt: skip

    def mask_text(self, text_ids: Tensor, padding: Tensor | None, prob: float, generator=None):
        """BERT masking of ``prob`` of the non-special tokens: ``(masked_ids, labels)``, labels -100 where unmasked."""
        c = self.config
        return mask_tokens(text_ids, padding, c.mask_id, c.encoder.vocab_size, prob=prob, generator=generator,
                           special_ids=c.special_ids)  # fmt: skip

    # -- predictions ------------------------------------------------------------------------------------------------
    def _patch_targets(self, images: Tensor) -> Tensor:
        c = self.config
        return patch_colour_codes(images, c.encoder.patch_size, c.colour_levels, c.colour_range)  # [B, P]

    def image_logits(self, images: Tensor, masked_position: Tensor) -> tuple[Tensor, Tensor]:
        """Image-only input: logits ``(M, num_codes)`` of the ``M`` masked patches and their target codes ``(M,)``."""
        hidden = self.encoder.encode_image(images, masked_position).hidden[:, 1:]  # [B, P, D] past the [CLS]
        return self.mim(hidden[masked_position]), self._patch_targets(images)[masked_position]

    def text_logits(self, masked_ids: Tensor, labels: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Text-only input: logits ``(M, vocab_size)`` of the positions with a label, and those labels."""
        hidden = self.encoder.encode_text(masked_ids, padding).hidden
        selected = labels != IGNORE_INDEX
        return self.mlm(hidden[selected]), labels[selected]

    def pair_logits(self, images: Tensor, masked_position: Tensor, masked_ids: Tensor, labels: Tensor,
                    padding: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """Image-text input (``[image, text]``): patch logits and codes, then token logits and labels."""
        hidden = self.encoder.encode_pair(images, masked_ids, padding, masked_position).hidden
        patches, text = hidden[:, 1 : 1 + masked_position.shape[1]], hidden[:, 1 + masked_position.shape[1] :]
        selected = labels != IGNORE_INDEX
        patch_out = self.mim(patches[masked_position]), self._patch_targets(images)[masked_position]
        return (*patch_out, self.mlm(text[selected]), labels[selected])

    # -- objectives -------------------------------------------------------------------------------------------------
    def loss(
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        *,
        inputs: tuple[str, ...] = INPUTS,
        generator: torch.Generator | None = None,
    ) -> BEiT3Losses:
        """Masked data modelling over the ``inputs`` kinds (``"image"``, ``"text"``, ``"pair"``) built from one batch:
        image-only from ``images``, text-only from the texts, and the pairs ``(images[i], text_ids[i])``. Each kind
        draws its own masks from ``generator``. The loss is the sum of the parts' mean cross-entropies."""
        if not inputs or any(kind not in INPUTS for kind in inputs) or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct kinds among {INPUTS}, got {inputs!r}")
        if images is None and ("image" in inputs or "pair" in inputs):
            raise ValueError(f"inputs {inputs!r} need images")
        if text_ids is None and ("text" in inputs or "pair" in inputs):
            raise ValueError(f"inputs {inputs!r} need text_ids")
        c, parts = self.config, {}
        if "image" in inputs:
            parts["image"] = _cross_entropy(*self.image_logits(images, self.mask_patches(images.shape[0], generator)))
        if "text" in inputs:
            masked = self.mask_text(text_ids, text_padding_mask, c.text_mask_prob, generator)
            parts["text"] = _cross_entropy(*self.text_logits(*masked, text_padding_mask))
        if "pair" in inputs:
            masked_position = self.mask_patches(images.shape[0], generator)
            masked = self.mask_text(text_ids, text_padding_mask, c.pair_text_mask_prob, generator)
            patch_logits, codes, token_logits, labels = self.pair_logits(images, masked_position, *masked,
                                                                         text_padding_mask)  # fmt: skip
            parts["pair_image"] = _cross_entropy(patch_logits, codes)
            parts["pair_text"] = _cross_entropy(token_logits, labels)
        return BEiT3Losses(sum(parts.values()), *(parts.get(name) for name in BEiT3Losses._fields[1:]))

    def embed(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Unit-norm ``(B, embed_dim)`` retrieval embeddings from the image and text [CLS] states (or the mean of the
        unpadded tokens, ``retrieval_pool="mean"``), each modality encoded alone."""
        image = self.encoder.encode_image(images)
        text = self.encoder.encode_text(text_ids, text_padding_mask)
        if self.config.retrieval_pool == "cls":
            return self.itc(image.image_cls, text.text_cls)
        keep = (
            torch.ones_like(text.hidden[..., 0]) if text_padding_mask is None else (~text_padding_mask).to(text.hidden)
        )
        text_mean = (text.hidden * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
        return self.itc(image.hidden.mean(1), text_mean)

    def retrieval_loss(self, images: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None, *,
                       positive_ids: Tensor | None = None) -> ITCOutput:  # fmt: skip
        """BEiT-3's retrieval fine-tuning objective: the image-text contrastive loss of :meth:`embed`'s embeddings
        (``positive_ids`` ``(B,)``: pairs with equal ids are positives of each other)."""
        return self.itc.loss(*self.embed(images, text_ids, text_padding_mask), positive_ids=positive_ids)


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (half-precision logits in fp32); a zero still in the graph when nothing was masked."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in fp32
    return F.cross_entropy(logits, targets)
