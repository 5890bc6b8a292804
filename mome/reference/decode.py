"""One-token decoding against a KV cache: the specification."""

from __future__ import annotations

import torch
from torch import Tensor


def decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Attention of q ``(B, H, D)`` over the first ``cache_seqlens[b]`` entries of the caches.

    Caches are ``(B, Hkv, Nmax, D)``; ``H`` is a multiple of ``Hkv`` (grouped-query).
    Bytes: reads ``2·B·Hkv·Nmax·D`` cache elements (a fused kernel reads only the valid
    prefix). A sequence of length 0 gives zeros.
    """
    batch, heads, head_dim = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads // kv_heads
    k = k_cache.repeat_interleave(group, dim=1)  # [B, H, Nmax, D]
    v = v_cache.repeat_interleave(group, dim=1)
    valid = torch.arange(nmax, device=q.device)[None, :] < cache_seqlens.reshape(batch, 1)  # [B, Nmax]
    scores = torch.einsum("bhd,bhnd->bhn", q, k) * scale  # [B, H, Nmax]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty cache: all -inf -> NaN -> 0
    return torch.einsum("bhn,bhnd->bhd", probs, v)
