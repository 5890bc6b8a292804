"""``mome.ops.attention``: shared self-attention with structured masks."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from mome.ops._backend import Family, OpBackends, check_backend
from mome.ops._functorch import transforms_active
from mome.ops._validate import (
    INT_DTYPES,
    check_bool,
    check_bool_flag,
    check_device,
    check_float,
    check_same,
    check_scale,
    check_shape,
    check_tensor,
    describe,
    ids_for_launch,
    poison_where,
)
from mome.reference._launch import compute_dtype
from mome.reference.attention import attention_ref
from mome.reference.dropout import draw_seed

BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class AttentionMasks(NamedTuple):
    """The mask structure of one attention call, as the launchers take it (validated, contiguous)."""

    causal: bool = False
    key_padding_mask: Tensor | None = None  # [B, Nk] bool, True = ignore
    prefix_len: Tensor | None = None  # [B] int64
    modality: Tensor | None = None  # [B, Nk] int64
    modality_mask: Tensor | None = None  # [E, E] bool


class AttentionDropout(NamedTuple):
    """Dropout on the attention probabilities: the mask of :mod:`mome.reference.dropout`, drawn from ``seed``."""

    p: float  # in (0, 1]
    seed: Tensor  # [1] int64 on q's device, read there (no host sync)


class AttentionBackend(Protocol):
    """Launchers of the attention family. ``lse`` is the fp32 log-sum-exp of the scaled scores plus the bias per
    query (natural log; -inf where a query sees no key). ``bias`` is None or a contiguous ``(1|B, 1|H, Nq, Nk)``
    tensor in its own dtype; ``dbias`` is None unless ``bias_grad``, else the bias's shape and dtype."""

    def attention_fwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        masks: AttentionMasks,
        scale: float,
        bias: Tensor | None,
        dropout: AttentionDropout | None,
    ) -> tuple[Tensor, Tensor]: ...

    def attention_bwd(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        masks: AttentionMasks,
        scale: float,
        bias: Tensor | None,
        dropout: AttentionDropout | None,
        bias_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...


FAMILY = Family(
    "attention",
    AttentionBackend,
    sizes={
        "head_dim": "D, the last dim of q",
        "batch_heads": "B * H, one grid row each",
        "modalities": "E, the rows of modality_mask",
        "dropout": "1 with attention dropout (dropout_p > 0), else 0",
        "bias_grad": "1 when attn_bias needs a gradient, else 0",
    },
)


def _measure(inputs: dict):
    q, masks = inputs["q"], inputs["masks"]
    sizes = {
        "head_dim": q.shape[-1],
        "batch_heads": q.shape[0] * q.shape[1],
        "dropout": int(inputs.get("dropout", False)),
        "bias_grad": int(inputs.get("bias_grad", False)),
    }
    if masks.modality_mask is not None:
        sizes["modalities"] = masks.modality_mask.shape[0]
    return q.dtype, q.device, sizes


BACKENDS = OpBackends(
    "attention",
    FAMILY,
    {"reference": "mome.reference.attention", "native": "mome.native.attention", "triton": "mome.kernels.attention"},
    _measure,
)


def _module(backend: str, q: Tensor, masks: AttentionMasks, dropout: bool, bias_grad: bool):
    return BACKENDS.module(backend, dict(q=q, masks=masks, dropout=dropout, bias_grad=bias_grad))


def _dropout(p: float, seed: Tensor | None) -> AttentionDropout | None:
    return None if seed is None else AttentionDropout(p, seed)


# The custom ops take the masks flattened (their schema has no structs); everything else takes AttentionMasks.


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
    attn_bias: Tensor | None,
    dropout_p: float,
    dropout_seed: Tensor | None,
    bias_grad: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    bad_batch = None  # the id checks run here, not in attention(): this runs eagerly even in compiled code
    if prefix_len is not None:  # a negative length would only mean "no prefix": with checks off it becomes 0
        prefix_len, _ = ids_for_launch("prefix_len", prefix_len, 0, 2**62, "a number of keys")
    if modality is not None:
        modality, bad = ids_for_launch("modality", modality, 0, modality_mask.shape[0] - 1, "rows of modality_mask")
        bad_batch = None if bad is None else bad.any(dim=1)[:, None, None, None]  # [B, 1, 1, 1]
    masks = AttentionMasks(causal, key_padding_mask, prefix_len, modality, modality_mask)
    dropout = _dropout(dropout_p, dropout_seed)
    module = _module(backend, q, masks, dropout is not None, bias_grad)
    out, lse = module.attention_fwd(q, k, v, masks, scale, attn_bias, dropout)
    return poison_where(out, bad_batch), lse


@_attention_fwd.register_fake
def _(q, k, v, *masks_scale_backend):
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
    attn_bias: Tensor | None,
    dropout_p: float,
    dropout_seed: Tensor | None,
    bias_grad: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; dbias is an empty tensor unless ``bias_grad`` (a custom op returns no None)."""
    if modality is not None:  # checked by the forward; the backward only needs ids that index the table
        modality = modality.clamp(0, modality_mask.shape[0] - 1)
    masks = AttentionMasks(causal, key_padding_mask, prefix_len, modality, modality_mask)
    dropout = _dropout(dropout_p, dropout_seed)
    module = _module(backend, q, masks, dropout is not None, bias_grad)
    dq, dk, dv, dbias = module.attention_bwd(dout, q, k, v, out, lse, masks, scale, attn_bias, dropout, bias_grad)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, key_padding_mask, prefix_len, modality, modality_mask, attn_bias, dropout_p,
      dropout_seed, bias_grad, scale, backend):  # fmt: skip
    dbias = torch.empty_like(attn_bias) if bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_MASK_INPUTS = len(AttentionMasks._fields)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, *mask_tensors = inputs[: 3 + _MASK_INPUTS]
    attn_bias, dropout_p, dropout_seed, bias_grad, scale, backend = inputs[3 + _MASK_INPUTS :]
    ctx.save_for_backward(q, k, v, *output, *mask_tensors, attn_bias, dropout_seed)
    ctx.causal, ctx.dropout_p, ctx.bias_grad, ctx.scale, ctx.backend = causal, dropout_p, bias_grad, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *mask_tensors, attn_bias, dropout_seed = ctx.saved_tensors
    dq, dk, dv, dbias = _attention_bwd(
        dout.contiguous(), q, k, v, out, lse, ctx.causal, *mask_tensors, attn_bias, ctx.dropout_p, dropout_seed,
        ctx.bias_grad, ctx.scale, ctx.backend,
    )  # fmt: skip
    return dq, dk, dv, *([None] * _MASK_INPUTS), dbias if ctx.bias_grad else None, *([None] * 5)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _per_batch_ints(name: str, value, batch: int, device: torch.device) -> Tensor:
    """An int or ``(B,)`` int tensor as a ``(B,)`` int64 tensor on ``device``."""
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise TypeError(f"{name} must be an int or a (B,) int tensor, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    check_tensor(name, value, dtypes=INT_DTYPES)  # its values are checked inside the custom op
    if value.dim() == 0:
        value = value.expand(batch)
    check_shape(name, value, (batch,), "(one entry per batch element)")
    check_device(name, value, device, "q")
    return value.to(torch.int64).contiguous()


def _checked_bias(attn_bias, q: Tensor, nk: int) -> Tensor:
    """``attn_bias`` as a ``(1|B, 1|H, Nq, Nk)`` view: leading dims added, an expanded (stride 0) batch or head dim
    taken once (no copy: the op broadcasts it itself, and the gradient still reaches every expanded entry)."""
    batch, heads, nq, _ = q.shape
    check_tensor("attn_bias", attn_bias)
    allowed = BIAS_DTYPES + ((torch.float64,) if q.dtype == torch.float64 else ())
    if attn_bias.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(
            f"attn_bias must be a float tensor of dtype ({names}) (an additive score bias; a boolean mask goes as "
            f"key_padding_mask, or as a bias with -inf where masked), got {describe(attn_bias)}"
        )

    def wrong_shape() -> ValueError:
        expected = f"(1|B, 1|H, Nq, Nk) = (1|{batch}, 1|{heads}, {nq}, {nk}), leading dims optional"
        return ValueError(f"attn_bias must have shape {expected}, got {describe(attn_bias)}")

    if not 2 <= attn_bias.dim() <= 4:
        raise wrong_shape()
    bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    for dim in (0, 1):
        if bias.shape[dim] > 1 and bias.stride(dim) == 0:
            bias = bias.narrow(dim, 0, 1)
    if bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads) or tuple(bias.shape[2:]) != (nq, nk):
        raise wrong_shape()
    check_device("attn_bias", attn_bias, q.device, "q")
    return bias.contiguous()


def _checked_dropout(dropout_p, generator, device: torch.device) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a real number in [0, 1], got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator must be on q's device type ({device.type}), got one on {generator.device}")
    return float(dropout_p)


def _specification(
    q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks, scale: float, bias: Tensor | None, p: float, seed
) -> Tensor:
    """The plain-PyTorch path under torch.func transforms (see mome/ops/_functorch.py)."""
    dtype = compute_dtype(q)
    bias = None if bias is None else bias.to(dtype)
    out = attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale, attn_bias=bias, dropout_p=p,
                        dropout_seed=seed, **masks._asdict())  # fmt: skip
    return out.to(q.dtype)


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
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention with masks given as structure.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (grouped-query).
            fp16/bf16/fp32 (fp64 on the reference backend), one dtype and device for all three.
        causal: query i (at absolute position ``i + Nk - Nq``, bottom-right aligned to the padded shapes) sees
            keys ``j <= i + Nk - Nq``. SDPA's ``is_causal`` is top-left aligned when Nq != Nk; flash-attn's
            varlen aligns per sequence: for right-padded sequences of different lengths with Nq != Nk, pad them
            on the left instead (keys masked by ``key_padding_mask``) to get that rule.
        key_padding_mask: ``(B, Nk)`` bool, True = ignore that key (torch convention).
        prefix_len: int or ``(B,)`` ints, with ``causal=True`` only: keys ``j < prefix_len`` are
            visible to every query (prefix-LM: bidirectional image prefix, causal text).
        modality: ``(B, Nk)`` int ids of the key positions; queries take the ids of the last Nq
            positions. With ``modality_mask`` ``(E, E)`` bool: a query of modality i sees a key
            of modality j iff ``modality_mask[i, j]``.
        scale: a number multiplying ``q kᵀ``; defaults to ``D ** -0.5``. A one-element tensor is read as a number
            when it does not require grad; a learnable scale is refused (fold it into q instead).
        attn_bias: a float tensor ``(1|B, 1|H, Nq, Nk)`` (leading dims optional; fp16, bf16 or fp32, any of them
            whatever q's dtype) added to the scaled scores before the softmax: a relative position bias, T5's
            ``position_bias``, a float mask. The structural masks above still apply (a bias never unmasks a key);
            ``-inf`` masks a pair too. Differentiable when it requires grad (the gradient is summed over the
            broadcast dims, in a fixed order: deterministic). The kernels read it per tile: pass the broadcast
            shape, not an expanded copy (an expanded batch or head dim is read once all the same).
        dropout_p: dropout on the attention probabilities, 0 for none: p is rounded to a multiple of 2⁻¹⁶ and kept
            probabilities are scaled by ``1 / (1 - rounded p)``. Turn it off in eval yourself, as with
            ``F.scaled_dot_product_attention``. The mask comes from a counter-based
            generator (:mod:`mome.reference.dropout`): a seed drawn from ``generator`` (or torch's default generator
            of q's device) and each element's position, regenerated in the backward, never stored; the same seed
            gives the same mask on every backend that runs dropout (reference and triton).
        generator: where the dropout seed comes from; on q's device type.
        backend: ``"auto" | "reference" | "native" | "triton" | "cuda"`` (``MOME_BACKEND`` overrides auto).

    Returns:
        ``(B, H, Nq, D)`` in q's dtype. A query that sees no key (structure and ``-inf`` bias together) gets zeros
        and zero gradient. A key a query does not see never reaches it, whatever the key holds (NaN in padding is
        harmless); a real NaN propagates.

    Equivalent PyTorch (no GQA)::

        allowed = ...  # (B, 1, Nq, Nk) bool built from the masks above
        p = torch.softmax((q @ k.transpose(-2, -1) * scale + attn_bias).masked_fill(~allowed, -inf), -1)
        out = dropout(p.nan_to_num(0)) @ v
    """
    check_float("q", q, ndim=4)
    check_float("k", k, ndim=4)
    check_float("v", v, ndim=4)
    batch, heads, nq, head_dim = q.shape
    if head_dim == 0:
        raise ValueError(f"q must have a head dim of at least 1, got {describe(q)}")
    causal = check_bool_flag("causal", causal)
    scale = check_scale("scale", scale, default=head_dim**-0.5)
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
        check_tensor("modality", modality, dtypes=INT_DTYPES)
        check_device("modality", modality, q.device, "q")
        check_device("modality_mask", modality_mask, q.device, "q")
        modality = modality.to(torch.int64).contiguous()
        modality_mask = modality_mask.contiguous()
    bias = None if attn_bias is None else _checked_bias(attn_bias, q, nk)
    dropout_p = _checked_dropout(dropout_p, generator, q.device)
    check_backend(backend)
    masks = AttentionMasks(causal, key_padding_mask, prefix_len, modality, modality_mask)
    seed = draw_seed(q.device, generator) if dropout_p > 0 else None
    if transforms_active():
        return _specification(q, k, v, masks, scale, bias, dropout_p, seed)
    bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    out, _lse = _attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), *masks, bias, dropout_p, seed,
                               bias_grad, scale, backend)  # fmt: skip
    return out
