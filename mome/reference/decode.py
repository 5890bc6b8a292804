"""One-token decoding against a KV cache: the specification."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype


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
    prefix). A sequence of length 0 gives zeros; entries beyond a sequence's length are never read
    into a product (a NaN stored there does not matter), while a NaN in q, a valid entry or the scale propagates.
    """
    batch, heads, head_dim = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads // kv_heads
    k = k_cache.repeat_interleave(group, dim=1)  # [B, H, Nmax, D]
    v = v_cache.repeat_interleave(group, dim=1)
    valid = torch.arange(nmax, device=q.device)[None, :] < cache_seqlens.reshape(batch, 1)  # [B, Nmax]
    # entries beyond a sequence's length never enter a product, whatever they hold (often uninitialised memory)
    k = torch.where(valid[:, None, :, None], k, 0.0)
    v = torch.where(valid[:, None, :, None], v, 0.0)
    scores = torch.einsum("bhd,bhnd->bhn", q, k) * scale  # [B, H, Nmax]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~valid.any(dim=1)[:, None, None], 0.0)  # empty cache: zeros; a real NaN stays NaN
    return torch.einsum("bhn,bhnd->bhd", probs, v)


# --- the launcher of the decode backend contract (mome.ops.decode.DecodeBackend) ---

LIMITS = {"dtypes": ALL_FLOAT_DTYPES}


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale):
    dtype = compute_dtype(q)
    out = decode_attention_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens, scale=scale)
    return out.to(q.dtype)
