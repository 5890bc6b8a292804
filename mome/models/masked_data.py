"""Masked image modelling parts shared by the VLMo and BEiT-3 recipes: which patches to mask, and what to predict.

BEiT predicts a DALL-E token per masked patch, BEiT-3 a VQ-KD token; both tokenizers are large trained networks.
The recipes predict a cheap fixed "visual token" instead: the patch's mean colour, each channel quantised into
``levels`` equal bins over ``value_range``, read as one code in ``[0, levels ** channels)``. Like a VQ token it is
a fixed function of the patch that the encoder never sees for a masked patch; unlike raw pixel regression it is a
classification over a small codebook, the form BEiT's loss takes. On the demo's shapes a masked patch's code says
whether a shape covers it and in which colour, which the unmasked patches of the same shape reveal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The demo's images are (pixel - 0.4) / 0.3 for pixels in [0, 1]: background near -0.83, colours up to 1.93; a
# shape covering part of a patch moves its mean by a fraction of that, so the bins span [-1, 1] (more saturate).
DEMO_VALUE_RANGE = (-1.0, 1.0)


def num_colour_codes(levels: int, channels: int = 3) -> int:
    """Size of the codebook :func:`patch_colour_codes` draws from."""
    return levels**channels


def patch_colour_codes(
    images: Tensor, patch_size: int, levels: int = 4, value_range: tuple[float, float] = DEMO_VALUE_RANGE
) -> Tensor:
    """Per patch, its quantised mean colour: ``(B, C, H, W)`` float -> ``(B, P)`` int64 in ``[0, levels ** C)``.

    Patches in the order ``PatchEmbedding`` gives them (row by row). Channel ``c``'s mean ``m`` falls in bin
    ``floor((m - low) / (high - low) · levels)`` clamped to ``[0, levels)``; the code is those bins read as the
    digits of a base-``levels`` number, the first channel the most significant. Equivalent PyTorch::

        bins = ((F.avg_pool2d(images, patch_size) - low) / (high - low) * levels).floor().clamp(0, levels - 1)
        code = sum(bins[:, c] * levels ** (C - 1 - c) for c in range(C)).flatten(1)
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) float tensor, got {got}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if images.shape[2] % patch_size or images.shape[3] % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the images' {tuple(images.shape[2:])} pixels")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    low, high = value_range
    if not low < high:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    means = F.avg_pool2d(images.float(), patch_size)  # [B, C, H / p, W / p]
    bins = ((means - low) / (high - low) * levels).floor().clamp(0, levels - 1).long()
    weights = levels ** torch.arange(images.shape[1] - 1, -1, -1, device=images.device)  # [C]
    return (bins * weights[None, :, None, None]).sum(1).flatten(1)  # [B, P]


def random_patch_mask(
    batch: int, num_patches: int, ratio: float, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """``(batch, num_patches)`` bool, True = masked: per image exactly ``max(1, round(ratio · P))`` patches, drawn
    uniformly without replacement. BEiT masks blocks of patches; on the recipes' 4 x 4 patch grids a block is most
    of the image, so single patches are drawn instead."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1) (some patches masked, some seen), got {ratio!r}")
    count = min(max(1, round(ratio * num_patches)), num_patches - 1)
    draw_device = "cpu" if generator is None else generator.device
    chosen = torch.rand(batch, num_patches, generator=generator, device=draw_device).topk(count, dim=1).indices
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=draw_device).scatter_(1, chosen, True)
    return mask.to(device) if device is not None else mask
