"""One-token decoding on CPU tensors: torch's ``scaled_dot_product_attention`` over each sequence's valid prefix.

Sequences of equal length go through one SDPA call on the cache sliced to that length, so no entry beyond a
sequence's length is ever read into a product and no mask is needed. Generation, where every sequence has the same
length, is one call on views of the caches; a sequence of length 0 gets zeros. Inputs on which SDPA could differ
from the spec (``mome.native._exact``: a NaN or Inf in q or a valid entry, a non-finite scale) run the reference
launcher. fp16/bf16 are computed in fp32 and rounded back, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mome.native._exact import kernel_is_exact
from mome.reference import decode as reference
from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype

LIMITS = {"dtypes": {"cpu": ALL_FLOAT_DTYPES}}


def _groups(q, k_cache, v_cache, cache_seqlens):
    """Per distinct length > 0: ``(rows, q, k, v)`` of the sequences of that length, caches cut to it."""
    lengths = cache_seqlens.tolist()
    groups = []
    for length in sorted(set(lengths) - {0}):
        if lengths.count(length) == len(lengths):
            rows = slice(None)  # every sequence: views of the caches, no copy
        else:
            rows = torch.tensor([b for b, n in enumerate(lengths) if n == length], device=q.device)
        groups.append((rows, q[rows], k_cache[rows, :, :length], v_cache[rows, :, :length]))
    return groups


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale):
    dtype = compute_dtype(q)
    groups = _groups(q, k_cache, v_cache, cache_seqlens)
    if not all(kernel_is_exact(*group[1:], scale, dtype) for group in groups):
        return reference.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale)
    gqa = q.shape[1] != k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)  # [B, H, D]; length 0 stays 0
    for rows, query, keys, values in groups:
        query, keys, values = query.unsqueeze(2).to(dtype), keys.to(dtype), values.to(dtype)  # [b, H, 1, D]...
        out[rows] = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=gqa).squeeze(2)
    return out.to(q.dtype)
