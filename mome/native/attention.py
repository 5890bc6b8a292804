"""Attention on CPU tensors through torch's flash-attention CPU kernel (the one behind SDPA), forward and backward.

The masks are built once per launch as one additive ``(B, 1, Nq|1, Nk)`` bias (0 where a query sees a key, -inf
where not), or left to the kernel's own ``is_causal`` where that is the same rule (Nq == Nk). The kernel saves the
log-sum-exp, so the backward does not recompute the forward (for fp32; see ``attention_bwd``).

Exactness to the specification: the kernel runs only where it computes what the spec computes (finite values,
no product that can overflow: ``mome.native._exact``); any other input runs the reference launcher in the same
call, forward and backward alike.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mome.native._exact import kernel_is_exact
from mome.reference import attention as reference
from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype

# The CPU kernel's dropout draws its own mask (not mome's Philox one) and its backward gives no gradient for the mask:
# dropout and a bias that needs a gradient run on the reference.
LIMITS = {"dtypes": {"cpu": ALL_FLOAT_DTYPES}, "dropout": (0, 0), "bias_grad": (0, 0)}

_FORWARD = "_scaled_dot_product_flash_attention_for_cpu"
_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


@functools.cache
def _missing_kernel() -> str | None:
    for name in (_FORWARD, _BACKWARD):
        if not hasattr(torch.ops.aten, name) or "attn_mask" not in str(getattr(torch.ops.aten, name).default._schema):
            return f"this torch ({torch.__version__}) has no aten.{name} with an attn_mask argument"
    return None


def available(device: torch.device) -> str | None:
    return _missing_kernel()


def _structure(
    q: Tensor, k: Tensor, masks, attn_bias: Tensor | None, dtype: torch.dtype
) -> tuple[bool, Tensor | None, Tensor | None]:
    """``(is_causal, bias, blind)`` for the kernel: the masks and ``attn_bias`` as one additive bias
    ``(B|1, H|1, Nq|1, Nk)`` or None; blind ``(B, H|1, Nq)`` bool, True for a query that sees no key (None when none
    can be)."""
    batch, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    structured = masks.prefix_len is not None or masks.modality is not None
    plain = not structured and masks.key_padding_mask is None
    if plain and attn_bias is None and (not masks.causal or nq == nk):
        return masks.causal, None, None  # the kernel's top-left causal rule is the bottom-right one when Nq == Nk
    if plain and not masks.causal:
        visible = None
    elif not structured and not masks.causal:
        visible = ~masks.key_padding_mask[:, None, None, :]  # [B, 1, 1, Nk]
    else:
        visible = reference.attention_visibility(batch, nq, nk, device=q.device, **masks._asdict())[:, None]
    if attn_bias is None:
        bias = torch.zeros(visible.shape, dtype=dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    else:
        bias = attn_bias.to(dtype)
        if visible is not None:
            bias = bias.masked_fill(~visible, float("-inf"))
    blind = torch.isneginf(bias).all(dim=-1)  # [B|1, H|1, Nq|1]
    if not blind.any():
        return False, bias, None
    return False, bias, blind.expand(batch, blind.shape[1], nq)


def _widened(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in ``dtype``, k and v repeated per query head (grouped-query: head h reads kv head h // group)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.to(dtype), v.to(dtype)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return q.to(dtype), k, v


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = getattr(torch.ops.aten, _FORWARD)(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    return out, lse  # [B, H, Nq, D], [B, H, Nq]


def _exact(q: Tensor, k: Tensor, v: Tensor, scale: float, attn_bias: Tensor | None, dtype: torch.dtype) -> bool:
    if attn_bias is None:
        return kernel_is_exact(q, k, v, scale, dtype)
    # a -inf entry masks; any other bias must be finite and small enough not to overflow with the products
    bias_bound = float(attn_bias.masked_fill(torch.isneginf(attn_bias), 0.0).abs().amax()) if attn_bias.numel() else 0.0
    return bias_bound < torch.finfo(dtype).max / 16 and kernel_is_exact(q, k, v, scale, dtype)


def attention_fwd(q, k, v, masks, scale, bias, dropout):
    dtype = compute_dtype(q)
    if not _exact(q, k, v, scale, bias, dtype):
        return reference.attention_fwd(q, k, v, masks, scale, bias, dropout)
    causal, bias, blind = _structure(q, k, masks, bias, dtype)
    out, lse = _flash(*_widened(q, k, v, dtype), causal, bias, scale)
    if blind is not None:  # the kernel gives such a query 0 and a log-sum-exp of 0; the contract's is -inf
        out = out.masked_fill(blind[..., None], 0.0)
        lse = lse.masked_fill(blind, float("-inf"))
    # the kernel's outputs are views of (B, Nq, H, ...) buffers: the contract's (and the fake's) layout is contiguous
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def attention_bwd(dout, q, k, v, out, lse, masks, scale, bias, dropout, bias_grad):
    dtype = compute_dtype(q)
    if not _exact(q, k, v, scale, bias, dtype):
        return reference.attention_bwd(dout, q, k, v, out, lse, masks, scale, bias, dropout, bias_grad)
    causal, bias, blind = _structure(q, k, masks, bias, dtype)
    q_, k_, v_ = _widened(q, k, v, dtype)
    if q.dtype == torch.float32:
        out_, lse_ = out, lse
        if blind is not None:  # any finite value: every weight of such a query is exp(-inf - lse) = 0
            lse_ = lse.masked_fill(blind, 0.0)
    else:  # saved rounded (an fp16/bf16 output, an fp32 log-sum-exp of fp64 scores): recompute in the compute dtype
        out_, lse_ = _flash(q_, k_, v_, causal, bias, scale)
    dq, dk, dv = getattr(torch.ops.aten, _BACKWARD)(
        dout.to(dtype), q_, k_, v_, out_, lse_, 0.0, causal, attn_mask=bias, scale=scale
    )
    kv_heads = k.shape[1]
    if q.shape[1] != kv_heads:  # each kv head gets the sum over the query heads that read it
        dk, dv = (g.unflatten(1, (kv_heads, -1)).sum(dim=2) for g in (dk, dv))
    return (*(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v))), None)
