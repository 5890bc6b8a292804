"""Per-modality experts on CPU tensors: one GEMM per expert on the tokens sorted by expert, LayerNorm in one pass.

Linear and FFN: the call's routing sorts the tokens once (one gather); each expert's tokens are then one block of
rows, multiplied by ``torch.addmm`` (bias fused) straight into the output buffer; the activation runs once over all
rows, and one gather puts the rows back in token order. The FFN keeps its hidden layer sorted between its GEMMs.
The backward is written out: per expert the weight and bias gradients of its block and one GEMM for the input
gradient, the activation's derivative with the op torch's autograd uses for it. (``torch._grouped_mm`` would
make one call of the loop, but it has no fp64 and needs 16-byte row strides; with 2-3 experts the loop is cheap.)

LayerNorm: torch's ``native_layer_norm`` without affine over all tokens, then gamma and beta gathered per token.

fp16/bf16 are computed in fp32 and rounded back, as the reference does (CPU matmuls have no fast fp16 path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype, widen
from mome.reference.modality import apply_activation

LIMITS = {"dtypes": {"cpu": ALL_FLOAT_DTYPES}}


def _blocks(routing, tokens: int) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` of every expert that has tokens, in the sorted rows (all rows: one expert)."""
    if routing is None:
        return [(0, 0, tokens)] if tokens else []
    bounds = routing.offsets.tolist()  # [E + 1]
    blocks = [(expert, bounds[expert], bounds[expert + 1]) for expert in range(len(bounds) - 1)]
    return [(expert, start, stop) for expert, start, stop in blocks if stop > start]


def _sorted(t: Tensor, routing) -> Tensor:
    return t if routing is None else t.index_select(0, routing.perm)


def _in_token_order(t: Tensor, routing) -> Tensor:
    return t if routing is None else t.index_select(0, routing.inv_perm)


def _wide(linear, dtype: torch.dtype):
    return type(linear)(linear.weight.to(dtype), widen(linear.bias, dtype))


def _gemm(rows: Tensor, blocks, linear) -> Tensor:
    """``rows @ weight[e].T + bias[e]`` for each expert's block of sorted rows ``(T, Din)`` -> ``(T, Dout)``."""
    out = rows.new_empty(rows.shape[0], linear.weight.shape[1])
    for expert, start, stop in blocks:
        weight = linear.weight[expert].T
        if linear.bias is None:
            torch.mm(rows[start:stop], weight, out=out[start:stop])
        else:
            torch.addmm(linear.bias[expert], rows[start:stop], weight, out=out[start:stop])
    return out


def _gemm_grads(grad: Tensor, rows: Tensor, blocks, linear):
    """The gradients of ``_gemm`` given the output's ``grad`` (sorted): ``(d rows, (d weight, d bias))``."""
    weight, bias = linear
    d_rows = rows.new_empty(rows.shape)
    d_weight = torch.zeros_like(weight)  # an expert without tokens gets 0
    d_bias = None if bias is None else torch.zeros_like(bias)
    for expert, start, stop in blocks:
        block = grad[start:stop]
        torch.mm(block.T, rows[start:stop], out=d_weight[expert])
        if d_bias is not None:
            torch.sum(block, dim=0, out=d_bias[expert])
        torch.mm(block, weight[expert], out=d_rows[start:stop])
    return d_rows, (d_weight, d_bias)


def _activation_grad(grad: Tensor, pre: Tensor, activation: str | None) -> Tensor:
    """``grad · act'(pre)``, with the backward ops torch's autograd runs for F.gelu and F.relu."""
    if activation is None:
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0.0)  # relu(pre) > 0 exactly where pre > 0
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def _cast(grads, like):
    """A ``(weight, bias)`` gradient pair in the dtypes of ``like``'s parameters, as ``like``'s bundle type."""
    d_weight, d_bias = grads
    return type(like)(d_weight.to(like.weight.dtype), None if d_bias is None else d_bias.to(like.bias.dtype))


def _pre_activation(xs: Tensor, blocks, linear, pre: Tensor, routing, like: Tensor) -> Tensor:
    """The sorted pre-activation for a backward: the saved one, or recomputed when it was saved rounded (fp16/bf16)."""
    if like.dtype == xs.dtype:
        return _sorted(pre, routing)
    return _gemm(xs, blocks, linear)


def modality_linear_fwd(x, modality, routing, linear, activation):
    dtype = compute_dtype(x)
    blocks = _blocks(routing, x.shape[0])
    pre = _in_token_order(_gemm(_sorted(x.to(dtype), routing), blocks, _wide(linear, dtype)), routing)
    out = apply_activation(pre, activation).to(x.dtype)
    return out, (pre.to(x.dtype) if activation is not None else x.new_empty(0))


def modality_linear_bwd(dy, x, modality, routing, linear, pre, activation):
    dtype = compute_dtype(x)
    blocks, wide = _blocks(routing, x.shape[0]), _wide(linear, dtype)
    xs = _sorted(x.to(dtype), routing)
    grad = _sorted(dy.to(dtype), routing)
    if activation is not None:
        grad = _activation_grad(grad, _pre_activation(xs, blocks, wide, pre, routing, x), activation)
    d_rows, grads = _gemm_grads(grad, xs, blocks, wide)
    return _in_token_order(d_rows, routing).to(x.dtype), _cast(grads, linear)


def modality_ffn_fwd(x, modality, routing, fc1, fc2, activation):
    dtype = compute_dtype(x)
    blocks = _blocks(routing, x.shape[0])
    pre = _gemm(_sorted(x.to(dtype), routing), blocks, _wide(fc1, dtype))  # sorted [T, F]
    hidden = apply_activation(pre, activation)
    out = _gemm(hidden, blocks, _wide(fc2, dtype))
    return _in_token_order(out, routing).to(x.dtype), _in_token_order(pre, routing).to(x.dtype)


def modality_ffn_bwd(dy, x, modality, routing, fc1, fc2, pre, activation):
    dtype = compute_dtype(x)
    blocks, wide1, wide2 = _blocks(routing, x.shape[0]), _wide(fc1, dtype), _wide(fc2, dtype)
    xs = _sorted(x.to(dtype), routing)
    pre_sorted = _pre_activation(xs, blocks, wide1, pre, routing, x)
    hidden = apply_activation(pre_sorted, activation)
    d_hidden, grads2 = _gemm_grads(_sorted(dy.to(dtype), routing), hidden, blocks, wide2)
    d_rows, grads1 = _gemm_grads(_activation_grad(d_hidden, pre_sorted, activation), xs, blocks, wide1)
    return _in_token_order(d_rows, routing).to(x.dtype), _cast(grads1, fc1), _cast(grads2, fc2)


def _normalized(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - mean) · rstd`` over the last dim, with mean and rstd ``(T, 1)``, in x's dtype."""
    return torch.native_layer_norm(x, x.shape[-1:], None, None, eps)


def _per_expert_sum(rows: Tensor, modality: Tensor, like: Tensor) -> Tensor:
    """``(E, D)``: row e is the sum of the rows of expert e's tokens (0 for an expert without tokens)."""
    return torch.zeros(like.shape, dtype=rows.dtype, device=rows.device).index_add_(0, modality, rows)


def modality_layer_norm_fwd(x, modality, norm, eps):
    dtype = compute_dtype(x)
    normed, mean, rstd = _normalized(x.to(dtype), eps)
    out = normed * norm.weight.to(dtype)[modality]  # per-token gamma [T, D]
    if norm.bias is not None:
        out = out + norm.bias.to(dtype)[modality]
    return out.to(x.dtype), mean.squeeze(-1).float(), rstd.squeeze(-1).float()


def modality_layer_norm_bwd(dy, x, modality, norm, mean, rstd, eps):
    dtype = compute_dtype(x)
    x_wide, grad = x.to(dtype), dy.to(dtype)
    normed, mean_, rstd_ = _normalized(x_wide, eps)  # recomputed in the compute dtype: the saved stats are fp32
    gamma = norm.weight.to(dtype)[modality]
    d_x = torch.ops.aten.native_layer_norm_backward(
        grad * gamma, x_wide, x.shape[-1:], mean_, rstd_, None, None, [True, False, False]
    )[0]
    d_weight = _per_expert_sum(grad * normed, modality, norm.weight)
    d_bias = None if norm.bias is None else _per_expert_sum(grad, modality, norm.bias)
    return d_x.to(x.dtype), _cast((d_weight, d_bias), norm)
