"""What the ViT + text-transformer recipe configs (ALBEF, BLIP, CoCa) share: their checks and derived sizes."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from mome.ops._validate import check_ids, is_int, is_real

HEAD_PAIRS = (("vision_dim", "vision_heads"), ("text_dim", "text_heads"))


class VisionTextConfig:
    """Mixin of a frozen config dataclass with ``image_size``, ``patch_size``, ``vision_*``, ``text_*``,
    ``vocab_size``, ``pad_id`` and ``mlp_ratio`` fields."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **overrides) -> VisionTextConfig:
        return replace(self, **overrides)

    def check_shapes(self, sizes: tuple[str, ...], head_pairs: tuple[tuple[str, str], ...] = HEAD_PAIRS) -> None:
        """The ``sizes`` are positive ints, every width divides by its heads, the image by its patches, and
        ``mlp_ratio`` is a positive number."""
        for name in sizes:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for dim, heads in head_pairs:
            if getattr(self, dim) % getattr(self, heads) != 0:
                raise ValueError(f"{dim} ({getattr(self, dim)}) must be divisible by {heads} ({getattr(self, heads)})")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not is_real(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")

    def check_token_ids(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}")

    def check_weights(self, *names: str) -> None:
        """Loss weights: numbers >= 0."""
        for name in names:
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")

    def check_caption_length(self) -> None:
        if not is_int(self.max_text_len) or self.max_text_len < 2:
            raise ValueError(f"max_text_len must be an int >= 2 (bos and one token), got {self.max_text_len!r}")

    def check_label_smoothing(self) -> None:
        if not is_real(self.label_smoothing) or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing!r}")


def check_text_inputs(text_ids: Tensor, text_padding_mask: Tensor | None, config, device: torch.device, *,
                      first_token_kept: bool = False) -> None:  # fmt: skip
    """Token ids ``(B, 1 <= L <= config.max_text_len)`` of int64 or int32 in ``[0, config.vocab_size)`` on
    ``device``, and an optional bool padding mask of their shape (``first_token_kept``: it must not mask the first
    token, the [CLS] a recipe reads). The id range costs one host sync, skipped under torch.compile and with
    ``MOME_CHECK_IDS=0``."""
    integer = isinstance(text_ids, Tensor) and text_ids.dtype in (torch.int64, torch.int32)
    if not integer or text_ids.dim() != 2:
        got = f"{tuple(text_ids.shape)} {text_ids.dtype}" if isinstance(text_ids, Tensor) else type(text_ids)
        raise TypeError(f"text_ids must be an int64 (or int32) tensor (B, L), got {got}")
    if not 1 <= text_ids.shape[1] <= config.max_text_len:
        raise ValueError(
            f"text_ids must be (B, 1 <= L <= config.max_text_len = {config.max_text_len}), got {tuple(text_ids.shape)}"
        )
    if text_ids.device != device:
        raise ValueError(f"text_ids must be on the model's device {device}, got {text_ids.device}")
    check_ids("text_ids", text_ids, config.vocab_size, f"token ids of config.vocab_size = {config.vocab_size}")
    if text_padding_mask is None:
        return
    if not isinstance(text_padding_mask, Tensor) or text_padding_mask.dtype != torch.bool:
        got = text_padding_mask.dtype if isinstance(text_padding_mask, Tensor) else type(text_padding_mask)
        raise TypeError(f"text_padding_mask must be a bool tensor (True = pad), got {got}")
    if text_padding_mask.shape != text_ids.shape or text_padding_mask.device != device:
        raise ValueError(f"text_padding_mask must have text_ids' shape {tuple(text_ids.shape)} on {device}, got "
                         f"{tuple(text_padding_mask.shape)} on {text_padding_mask.device}")  # fmt: skip
    if first_token_kept and not torch.compiler.is_compiling() and bool(text_padding_mask[:, 0].any()):
        raise ValueError("text_padding_mask must not mask the first token: it is the [CLS] of every text")
