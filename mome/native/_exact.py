"""When torch's attention kernels compute exactly what the specification computes.

The kernels multiply every (query, key) pair they are given and add -inf for a hidden pair, so a product that is
NaN or Inf would reach its query (NaN + -inf is NaN), where the spec never multiplies a hidden pair at all; and
their online softmax need not treat an infinite score the way the spec's softmax does. With finite values whose
products cannot overflow, every step is finite arithmetic and a hidden pair's weight is exactly 0: the two agree.
Every other input runs the reference launcher; the check costs one pass over q, k and v.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _magnitude(t: Tensor) -> float:
    """The largest |element|; NaN when one is NaN."""
    return float(t.abs().amax())


def kernel_is_exact(q: Tensor, k: Tensor, v: Tensor, scale: float, dtype: torch.dtype) -> bool:
    """True when q, k, v are finite and non-empty and no scaled product ``q·k·scale`` (nor any partial sum of one)
    can overflow ``dtype``, the dtype the kernel accumulates in."""
    if q.numel() == 0 or k.numel() == 0 or not math.isfinite(scale):
        return False  # nothing to compute (the spec's shapes and zeros), or a scale whose NaN the spec propagates
    bound = _magnitude(q) * _magnitude(k) * q.shape[-1] * abs(scale)
    return bound < torch.finfo(dtype).max / 16 and math.isfinite(_magnitude(v))
