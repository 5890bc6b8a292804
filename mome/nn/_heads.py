"""The head layout every attention module converts to and from: ``(B, N, H·Dh)`` <-> ``(B, H, N, Dh)``."""

from __future__ import annotations

from torch import Tensor


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, H·Dh)`` -> ``(B, H, N, Dh)`` (a view when ``x``'s strides allow one)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, N, Dh)`` -> ``(B, N, H·Dh)``."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
