"""``mome.ops.decode_attention``: one new token per sequence against a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._dispatch import BACKENDS as BACKEND_NAMES
from mome.ops._dispatch import OpBackends
from mome.ops._validate import (
    INT_DTYPES,
    check_choice,
    check_device,
    check_float,
    check_int_range,
    check_same,
    check_shape,
    check_tensor,
)

BACKENDS = OpBackends(
    "decode_attention",
    {
        "reference": "mome.ops._reference_backend",
        "triton": "mome.kernels.decode",
        "cuda": "mome.cuda.decode",
    },
)


@torch.library.custom_op("mome::decode_attention", mutates_args=())
def _decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, backend: str
) -> Tensor:
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    module = BACKENDS.module(backend, q.device, inputs)
    return module.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale=scale)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, backend):
    return torch.empty_like(q)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of one new query per sequence over the valid prefix of a KV cache (forward only).

    Args:
        q: ``(B, H, D)``.
        k_cache, v_cache: ``(B, Hkv, Nmax, D)``, ``H % Hkv == 0``; same dtype and device as q.
        cache_seqlens: ``(B,)`` ints in ``[0, Nmax]``; entries at positions ``>= cache_seqlens[b]``
            are ignored. A sequence of length 0 gives zeros.
        scale: defaults to ``D ** -0.5``.

    Returns ``(B, H, D)``. Equivalent PyTorch: :func:`mome.reference.decode_attention_ref`.
    """
    check_float("q", q, ndim=3)
    check_float("k_cache", k_cache, ndim=4)
    check_float("v_cache", v_cache, ndim=4)
    batch, heads, head_dim = q.shape
    check_same("k_cache", k_cache, "q", q)
    check_same("v_cache", v_cache, "q", q)
    check_shape("k_cache", k_cache, (batch, None, None, head_dim), "(batch and head_dim of q)")
    check_shape("v_cache", v_cache, k_cache.shape, "(the shape of k_cache)")
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q's heads ({heads}) must be a multiple of the cache's heads ({kv_heads})")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=INT_DTYPES)
    check_shape("cache_seqlens", cache_seqlens, (batch,), "(one length per sequence)")
    check_device("cache_seqlens", cache_seqlens, q.device, "q")
    check_int_range("cache_seqlens", cache_seqlens, 0, nmax, "the cache holds Nmax entries")
    scale = float(head_dim**-0.5 if scale is None else scale)
    cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
    check_choice("backend", backend, ("auto", *BACKEND_NAMES))
    return _decode_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), cache_seqlens, scale, backend)
