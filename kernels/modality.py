"""Triton backend of the modality family (the ops layer's ``ModalityBackend`` contract): expert linears, expert
FFNs and the multiway LayerNorm.

The launchers only unpack the bundles the ops layer hands them and call the grouped GEMM
(``mome.kernels.modality_gemm``) and the LayerNorm (``mome.kernels.modality_norm``). ``routing`` is the stable
expert-sorted order that ``mome::modality_routing`` computed once for the op call (``perm``, ``inv_perm``,
``offsets``), or None with one expert: the GEMMs then run unrouted.

FFN: one routing for all GEMMs of a pass; the first GEMM writes only its pre-activation and the second applies
the activation as it loads it, so the hidden layer is never stored.
"""

from __future__ import annotations

import torch
from mome.kernels.modality_gemm import grouped_gemm, grouped_weight_grad
from mome.kernels.modality_norm import MAX_PARAMS, MAX_ROW, layer_norm_backward, layer_norm_forward
from mome.kernels.modality_routing import MAX_EXPERTS, MAX_TOKENS
from torch import Tensor

MAX_GRID_TILES = 65535  # the grid's second and third dimensions
MAX_FEATURES = MAX_GRID_TILES * 128  # Din, F, Dout: one grid dimension of 128-wide column tiles on a GPU

# What this backend runs: the ops layer reads it before any launch.
LIMITS = {
    "dtypes": (torch.float16, torch.bfloat16, torch.float32),
    "experts": (1, MAX_EXPERTS),
    "tokens": (0, MAX_TOKENS),
    "features": (0, MAX_FEATURES),
    "norm_width": (1, MAX_ROW),
    "norm_params": (1, MAX_PARAMS),
}


def _perm_offsets(routing, num_experts: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if routing is None:
        if num_experts != 1:
            raise ValueError(f"the Triton grouped GEMM needs the routing of E = {num_experts} experts, got None")
        empty = torch.empty(0, dtype=torch.int32, device=device)  # one expert: never read
        return empty, empty
    return routing.perm, routing.offsets


def modality_linear_fwd(x, modality, routing, linear, activation):
    """``(out, pre)``: pre is the pre-activation (empty without an activation)."""
    perm, offsets = _perm_offsets(routing, linear.weight.shape[0], x.device)
    save_pre = activation is not None
    return grouped_gemm(
        x, linear.weight, perm, offsets, b_transposed=True, bias=linear.bias, activation=activation, save_pre=save_pre
    )


def modality_linear_bwd(dy, x, modality, routing, linear, pre, activation):
    """``(dx, (dweight, dbias))``."""
    num_experts = linear.weight.shape[0]
    perm, offsets = _perm_offsets(routing, num_experts, x.device)
    saved_pre = pre if activation is not None else None
    dx, _ = grouped_gemm(
        dy, linear.weight, perm, offsets, b_transposed=False, a_pre=saved_pre, grad_activation=activation
    )
    dweight, dbias = grouped_weight_grad(
        dy, saved_pre, x, perm, offsets, num_experts, activation=activation, has_bias=linear.bias is not None
    )
    return dx, type(linear)(dweight, dbias)  # the gradients in the bundle type of the parameters


def modality_ffn_fwd(x, modality, routing, fc1, fc2, activation):
    """``(y, pre)``: pre ``(T, F)`` is the first GEMM's pre-activation, the only activation saved."""
    perm, offsets = _perm_offsets(routing, fc1.weight.shape[0], x.device)
    pre, _ = grouped_gemm(x, fc1.weight, perm, offsets, b_transposed=True, bias=fc1.bias)  # [T, F]
    y, _ = grouped_gemm(pre, fc2.weight, perm, offsets, b_transposed=True, bias=fc2.bias, a_activation=activation)
    return y, pre  # [T, Dout], [T, F]


def modality_ffn_bwd(dy, x, modality, routing, fc1, fc2, pre, activation):
    """``(dx, (dw1, db1), (dw2, db2))`` from the saved pre-activation."""
    num_experts = fc1.weight.shape[0]
    perm, offsets = _perm_offsets(routing, num_experts, x.device)
    d_hidden, _ = grouped_gemm(dy, fc2.weight, perm, offsets, b_transposed=False)  # [T, F], before act'
    has_b2 = fc2.bias is not None
    dw2, db2 = grouped_weight_grad(
        dy, None, pre, perm, offsets, num_experts, activation=None, has_bias=has_b2, x_activation=activation
    )
    dx, _ = grouped_gemm(d_hidden, fc1.weight, perm, offsets, b_transposed=False, a_pre=pre, grad_activation=activation)
    dw1, db1 = grouped_weight_grad(
        d_hidden, pre, x, perm, offsets, num_experts, activation=activation, has_bias=fc1.bias is not None
    )
    return dx, type(fc1)(dw1, db1), type(fc2)(dw2, db2)


def modality_layer_norm_fwd(x, modality, norm, eps):
    """``(y, mean, rstd)``, the statistics fp32."""
    return layer_norm_forward(x, modality, norm.weight, norm.bias, eps)


def modality_layer_norm_bwd(dy, x, modality, norm, mean, rstd, eps):
    """``(dx, (dweight, dbias))``."""
    dx, dweight, dbias = layer_norm_backward(dy, x, modality, norm.weight, norm.bias, mean, rstd)
    return dx, type(norm)(dweight, dbias)
