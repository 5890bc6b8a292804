"""``mome.ops.decode_attention``: one new token per sequence against a KV cache."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mome.ops._backend import Family, OpBackends, check_backend
from mome.ops._functorch import transforms_active
from mome.ops._validate import (
    INT_DTYPES,
    check_device,
    check_float,
    check_int_range,
    check_same,
    check_scale,
    check_shape,
    check_tensor,
    describe,
    ids_for_launch,
    poison_where,
)
from mome.reference.decode import decode_attention_fwd as reference_decode_fwd


class DecodeBackend(Protocol):
    """The launcher of the decode family: ``(B, H, D)`` outputs, forward only."""

    def decode_attention_fwd(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float
    ) -> Tensor: ...


FAMILY = Family(
    "decode",
    DecodeBackend,
    sizes={
        "head_dim": "D, the last dim of q",
        "group": "H / Hkv, query heads per cache head",
        "batch": "B, sequences",
        "kv_heads": "Hkv, cache heads",
        "batch_kv_heads": "B * Hkv, one grid row each",
    },
)


def _measure(inputs: dict):
    q, k_cache = inputs["q"], inputs["k_cache"]
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    sizes = dict(head_dim=head_dim, group=heads // kv_heads, batch=batch, kv_heads=kv_heads,
                 batch_kv_heads=batch * kv_heads)  # fmt: skip
    return q.dtype, q.device, sizes


BACKENDS = OpBackends(
    "decode_attention",
    FAMILY,
    {
        "reference": "mome.reference.decode",
        "native": "mome.native.decode",
        "triton": "mome.kernels.decode",
        "cuda": "mome.cuda.decode",
    },
    _measure,
)


@torch.library.custom_op("mome::decode_attention", mutates_args=())
def _decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, backend: str
) -> Tensor:
    # here, not in decode_attention(): this runs eagerly even in compiled code
    nmax = k_cache.shape[2]
    cache_seqlens, bad = ids_for_launch("cache_seqlens", cache_seqlens, 0, nmax, "the cache holds Nmax entries")
    cache_seqlens = cache_seqlens.to(torch.int32)  # after the check: a cast first could wrap a huge length
    module = BACKENDS.module(backend, dict(q=q, k_cache=k_cache))
    out = module.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale)
    return poison_where(out, None if bad is None else bad[:, None, None])


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
    if head_dim == 0:
        raise ValueError(f"q must have a head dim of at least 1, got {describe(q)}")
    scale = check_scale("scale", scale, default=head_dim**-0.5)
    cache_seqlens = cache_seqlens.contiguous()
    check_backend(backend)
    if transforms_active():  # torch.func: the specification (see mome/ops/_functorch.py)
        check_int_range("cache_seqlens", cache_seqlens, 0, nmax, "the cache holds Nmax entries")
        return reference_decode_fwd(q, k_cache, v_cache, cache_seqlens, scale)
    return _decode_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), cache_seqlens, scale, backend)
