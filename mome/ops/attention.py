"""``mome.ops.attention``: shared self-attention with structured masks."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._dispatch import BACKENDS as BACKEND_NAMES
from mome.ops._dispatch import OpBackends
from mome.ops._validate import (
    INT_DTYPES,
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_ids,
    check_same,
    check_shape,
    check_tensor,
)

BACKENDS = OpBackends(
    "attention",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.attention"},
)


def _module(backend: str, q, k, v, causal, key_padding_mask, prefix_len, modality, modality_mask):
    inputs = dict(q=q, k=k, v=v, causal=causal, key_padding_mask=key_padding_mask, prefix_len=prefix_len,
                  modality=modality, modality_mask=modality_mask)  # fmt: skip
    return BACKENDS.module(backend, q.device, inputs)


@torch.library.custom_op("mome::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    key_padding_mask: Tensor | None,
    prefix_len: Tensor | None,
    modality: Tensor | None,
    modality_mask: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _module(backend, q, k, v, causal, key_padding_mask, prefix_len, modality, modality_mask).attention_fwd(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        prefix_len=prefix_len,
        modality=modality,
        modality_mask=modality_mask,
        scale=scale,
    )


@_attention_fwd.register_fake
def _(q, k, v, causal, key_padding_mask, prefix_len, modality, modality_mask, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("mome::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    key_padding_mask: Tensor | None,
    prefix_len: Tensor | None,
    modality: Tensor | None,
    modality_mask: Tensor | None,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = _module(backend, q, k, v, causal, key_padding_mask, prefix_len, modality, modality_mask)
    return module.attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        causal=causal,
        key_padding_mask=key_padding_mask,
        prefix_len=prefix_len,
        modality=modality,
        modality_mask=modality_mask,
        scale=scale,
    )


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, key_padding_mask, prefix_len, modality, modality_mask, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, key_padding_mask, prefix_len, modality, modality_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, prefix_len, modality, modality_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, prefix_len, modality, modality_mask = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        ctx.causal,
        key_padding_mask,
        prefix_len,
        modality,
        modality_mask,
        ctx.scale,
        ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _per_batch_ints(name: str, value, batch: int, device: torch.device) -> Tensor:
    """An int or ``(B,)`` int tensor as a ``(B,)`` int64 tensor on ``device``."""
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise TypeError(f"{name} must be an int or a (B,) int tensor, got {type(value).__name__}")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    check_tensor(name, value, dtypes=INT_DTYPES)
    if value.dim() == 0:
        value = value.expand(batch)
    check_shape(name, value, (batch,), "(one entry per batch element)")
    check_device(name, value, device, "q")
    return value.to(torch.int64).contiguous()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    prefix_len: int | Tensor | None = None,
    modality: Tensor | None = None,
    modality_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with masks given as structure.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (grouped-query).
            fp16/bf16/fp32 (fp64 on the reference backend), one dtype and device for all three.
        causal: query i (at absolute position ``i + Nk - Nq``, bottom-right aligned) sees keys
            ``j <= i + Nk - Nq``.
        key_padding_mask: ``(B, Nk)`` bool, True = ignore that key (torch convention).
        prefix_len: int or ``(B,)`` ints, with ``causal=True`` only: keys ``j < prefix_len`` are
            visible to every query (prefix-LM: bidirectional image prefix, causal text).
        modality: ``(B, Nk)`` int ids of the key positions; queries take the ids of the last Nq
            positions. With ``modality_mask`` ``(E, E)`` bool: a query of modality i sees a key
            of modality j iff ``modality_mask[i, j]``.
        scale: multiplies ``q kᵀ``; defaults to ``D ** -0.5``.
        backend: ``"auto" | "reference" | "triton" | "cuda"`` (``MOME_BACKEND`` overrides auto).

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. A query that sees no key gets zeros and zero gradient.

    Equivalent PyTorch (no GQA)::

        allowed = ...  # (B, 1, Nq, Nk) bool built from the masks above
        p = torch.softmax((q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, -inf), -1)
        out = p.nan_to_num(0) @ v
    """
    check_float("q", q, ndim=4)
    check_float("k", k, ndim=4)
    check_float("v", v, ndim=4)
    batch, heads, nq, head_dim = q.shape
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    check_shape("k", k, (batch, None, None, head_dim), "(batch and head_dim of q)")
    check_shape("v", v, k.shape, "(the shape of k)")
    kv_heads, nk = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"q's heads ({heads}) must be a multiple of k's heads ({kv_heads}) for grouped-query attention"
        )
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        check_bool("key_padding_mask", key_padding_mask)
        check_shape("key_padding_mask", key_padding_mask, (batch, nk), "(batch, keys)")
        check_device("key_padding_mask", key_padding_mask, q.device, "q")
        key_padding_mask = key_padding_mask.contiguous()
    if prefix_len is not None:
        if not causal:
            raise ValueError("prefix_len only has a meaning with causal=True (keys before it bypass the causal mask)")
        prefix_len = _per_batch_ints("prefix_len", prefix_len, batch, q.device)
    if (modality is None) != (modality_mask is None):
        raise ValueError("modality and modality_mask go together: pass both or neither")
    if modality is not None:
        check_tensor("modality_mask", modality_mask, ndim=2)
        check_bool("modality_mask", modality_mask)
        num_modalities = modality_mask.shape[0]
        check_shape("modality_mask", modality_mask, (num_modalities, num_modalities), "(square: query x key modality)")
        check_tensor("modality", modality, ndim=2)
        check_shape("modality", modality, (batch, nk), "(batch, keys)")
        if nq > nk:
            raise ValueError(f"modality masks need Nq <= Nk so queries take the last Nq ids (got Nq={nq}, Nk={nk})")
        check_ids("modality", modality, num_modalities, "rows of modality_mask")
        check_device("modality", modality, q.device, "q")
        check_device("modality_mask", modality_mask, q.device, "q")
        modality = modality.to(torch.int64).contiguous()
        modality_mask = modality_mask.contiguous()
    scale = float(head_dim**-0.5 if scale is None else scale)
    check_choice("backend", backend, ("auto", *BACKEND_NAMES))
    out, _lse = _attention_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        bool(causal),
        key_padding_mask,
        prefix_len,
        modality,
        modality_mask,
        scale,
        backend,
    )
    return out
