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
from mome.kernels.modality_gemm import gemm_plan, grouped_gemm, grouped_weight_grad, weight_grad_plan
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


# ---------------------------------------------------------------------------------------------------------------------
# The gate (``python -m mome.kernels.aot --check``): the GEMMs the launchers above run for real models, planned by
# the same ``gemm_plan`` / ``weight_grad_plan`` that ``grouped_gemm`` / ``grouped_weight_grad`` launch.

GATE_MODELS = (  # (label, D, F): BEiT-3 / VLMo base and large
    ("base", 768, 3072),
    ("large", 1024, 4096),
)
GATE_BATCHES = (32, 256)  # images per step; each carries 197 image + 64 text tokens
GATE_EXPERTS = 3  # vision, language, vision-language
# Which launches each (arch, dtype) compiles: all of them in bf16 (sm_90: the rules; sm_80: that the plans compile);
# fp16 lowers to the same instructions and fp32 is outside the rules, so their rows are spot checks.
GATE_DTYPES = {
    (90, torch.bfloat16): None,
    (90, torch.float16): ("ffn fc2, GELU on load", "linear + GELU epilogue"),
    (90, torch.float32): ("ffn fc1",),
    (80, torch.bfloat16): None,
}


def _gate_launches(arch: int, dtype: torch.dtype, tokens: int, d: int, f: int):
    """``(use, launch)`` for an expert FFN's forward and backward and a linear with a GELU epilogue, as above."""
    e, plan, grad = GATE_EXPERTS, gemm_plan, weight_grad_plan
    return (
        ("ffn fc1", plan(arch, dtype, tokens, f, d, e, b_transposed=True, has_bias=True)),
        ("ffn fc2, GELU on load", plan(arch, dtype, tokens, d, f, e, b_transposed=True, has_bias=True,
                                       a_activation="gelu")),
        ("ffn d hidden", plan(arch, dtype, tokens, f, d, e, b_transposed=False, has_bias=False)),
        ("ffn dx, GELU' on load", plan(arch, dtype, tokens, d, f, e, b_transposed=False, has_bias=False,
                                       grad_activation="gelu")),
        ("ffn dW2, GELU on load", grad(arch, dtype, tokens, d, f, e, has_bias=True, activation=None,
                                       x_activation="gelu")),
        ("ffn dW1, GELU'", grad(arch, dtype, tokens, f, d, e, has_bias=True, activation="gelu")),
        ("linear + GELU epilogue", plan(arch, dtype, tokens, f, d, e, b_transposed=True, has_bias=True,
                                        activation="gelu", save_pre=True)),
    )  # fmt: skip


def gate_cases() -> list:
    cases = []
    for (arch, dtype), uses in GATE_DTYPES.items():
        for label, d, f in GATE_MODELS:
            for batch in GATE_BATCHES:
                tokens = batch * (197 + 64)
                for use, launch in _gate_launches(arch, dtype, tokens, d, f):
                    if uses is None or use in uses:
                        cases.append(launch.gate_case(arch, dtype, f"{label} x{batch}: {use}"))
    return cases
