"""Per-modality experts (linear, FFN, LayerNorm) and their routing: the specification.

Written the way torchscale's MultiwayNetwork computes: split the tokens by expert,
run each expert's module on its tokens, put the rows back in place. Moves
``T·(Din + Dout)`` activations plus ``E·Dout·Din`` weights, and one gather and one
scatter copy of the activations per expert — what a fused grouped GEMM removes.

Below the specification: the reference launchers of the family's two backend contracts,
``mome.ops.modality.ModalityBackend`` and ``RoutingBackend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mome.reference._launch import ALL_FLOAT_DTYPES, compute_dtype, vjp, widen

ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")


def apply_activation(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def modality_linear_ref(
    x: Tensor,
    modality: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
) -> Tensor:
    """Row t is ``act(x[t] @ weight[modality[t]].T + bias[modality[t]])``.

    x ``(T, Din)``, modality ``(T,)`` ints in ``[0, E)``, weight ``(E, Dout, Din)``,
    bias ``(E, Dout)``.
    """
    out = x.new_empty(x.shape[0], weight.shape[1])  # [T, Dout]
    for expert in range(weight.shape[0]):
        rows = (modality == expert).nonzero().squeeze(1)  # this expert's tokens, in order
        expert_bias = None if bias is None else bias[expert]
        out = out.index_copy(0, rows, F.linear(x[rows], weight[expert], expert_bias))
    return apply_activation(out, activation)


def modality_ffn_ref(
    x: Tensor,
    modality: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str | None = "gelu",
) -> Tensor:
    """``fc2(act(fc1(x)))`` with both linears chosen per token by modality."""
    hidden = modality_linear_ref(x, modality, w1, b1, activation=activation)  # [T, F]
    return modality_linear_ref(hidden, modality, w2, b2)  # [T, Dout]


def modality_layer_norm_ref(
    x: Tensor,
    modality: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm over the last dim with gamma/beta ``(E, D)`` chosen per token."""
    out = torch.empty_like(x)  # [T, D]
    for expert in range(weight.shape[0] if weight is not None else bias.shape[0]):
        rows = (modality == expert).nonzero().squeeze(1)
        expert_weight = None if weight is None else weight[expert]
        expert_bias = None if bias is None else bias[expert]
        normed = F.layer_norm(x[rows], x.shape[-1:], expert_weight, expert_bias, eps)
        out = out.index_copy(0, rows, normed)
    return out


def modality_routing_ref(modality: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The stable expert-sorted order of the tokens, what a counting sort by expert id gives: ``(perm, inv_perm,
    offsets)``, int32.

    ``perm[k]`` is the token at sorted row k (tokens of one expert keep their order), ``inv_perm[t]`` the sorted
    row of token t, and expert e owns sorted rows ``offsets[e]:offsets[e + 1]`` (``offsets[E] = T``).
    """
    counts = torch.bincount(modality, minlength=num_experts)  # [E] tokens per expert
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E + 1]
    perm = torch.sort(modality, stable=True).indices  # [T]
    inv_perm = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return perm.to(torch.int32), inv_perm.to(torch.int32), offsets.to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Reference launchers. ``routing`` is ignored: the specification routes by itself. The int64 dtype is the routing
# contract's (its ids); the modality contract's inputs are floats.

LIMITS = {"dtypes": (*ALL_FLOAT_DTYPES, torch.int64)}


def modality_linear_fwd(x, modality, routing, linear, activation):
    dtype = compute_dtype(x)
    pre = modality_linear_ref(x.to(dtype), modality, linear.weight.to(dtype), widen(linear.bias, dtype))
    out = apply_activation(pre, activation).to(x.dtype)
    return out, (pre.to(x.dtype) if activation is not None else x.new_empty(0))


def modality_linear_bwd(dy, x, modality, routing, linear, pre, activation):
    def forward(x_, weight_, bias_):
        return modality_linear_ref(x_, modality, weight_, bias_, activation=activation)

    dx, dweight, dbias = vjp(forward, [x, linear.weight, linear.bias], [dy])
    return dx, type(linear)(dweight, dbias)


def _hidden(pre: Tensor, activation: str | None) -> Tensor:
    """``act(pre)`` as the forward computed it (half precision through fp32)."""
    return apply_activation(pre.to(compute_dtype(pre)), activation).to(pre.dtype)


def modality_ffn_fwd(x, modality, routing, fc1, fc2, activation):
    """The two linear launchers in a row; saves the first one's pre-activation (the hidden layer without one)."""
    hidden, pre = modality_linear_fwd(x, modality, routing, fc1, activation)
    out, _ = modality_linear_fwd(hidden, modality, routing, fc2, None)
    return out, (hidden if activation is None else pre)


def modality_ffn_bwd(dy, x, modality, routing, fc1, fc2, pre, activation):
    hidden = _hidden(pre, activation)
    d_hidden, dfc2 = modality_linear_bwd(dy, hidden, modality, routing, fc2, x.new_empty(0), None)
    dx, dfc1 = modality_linear_bwd(d_hidden, x, modality, routing, fc1, pre, activation)
    return dx, dfc1, dfc2


def modality_layer_norm_fwd(x, modality, norm, eps):
    dtype = compute_dtype(x)
    x_wide = x.to(dtype)
    out = modality_layer_norm_ref(x_wide, modality, norm.weight.to(dtype), widen(norm.bias, dtype), eps)
    wide = x_wide.float()
    mean = wide.mean(dim=-1)  # [T] fp32 (NaN for D = 0: nothing to normalise)
    var = (wide - mean[:, None]).square().mean(dim=-1)
    return out.to(x.dtype), mean, torch.rsqrt(var + eps)


def modality_layer_norm_bwd(dy, x, modality, norm, mean, rstd, eps):
    def forward(x_, weight_, bias_):
        return modality_layer_norm_ref(x_, modality, weight_, bias_, eps)

    dx, dweight, dbias = vjp(forward, [x, norm.weight, norm.bias], [dy])
    return dx, type(norm)(dweight, dbias)


def modality_routing(modality, num_experts):
    return modality_routing_ref(modality, num_experts)
