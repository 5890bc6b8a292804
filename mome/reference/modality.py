"""Per-modality experts (linear, FFN, LayerNorm): the specification.

Written the way torchscale's MultiwayNetwork computes: split the tokens by expert,
run each expert's module on its tokens, put the rows back in place. Moves
``T·(Din + Dout)`` activations plus ``E·Dout·Din`` weights, and one gather and one
scatter copy of the activations per expert — what a fused grouped GEMM removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
