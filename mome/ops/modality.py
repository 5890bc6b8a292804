"""``mome.ops.modality_linear`` / ``modality_ffn`` / ``modality_layer_norm``: per-token expert routing."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._dispatch import OpBackends, _import
from mome.ops._validate import check_choice, check_float, check_ids, check_same, check_shape, check_tensor
from mome.reference.modality import ACTIVATIONS

LINEAR_BACKENDS = OpBackends(
    "modality_linear",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.grouped_gemm"},
)
LAYER_NORM_BACKENDS = OpBackends(
    "modality_layer_norm",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.layer_norm"},
)
_NO_ACTIVATION = "none"  # custom-op schemas take str, not Optional[str]


def _activation_arg(activation: str) -> str | None:
    return None if activation == _NO_ACTIVATION else activation


@torch.library.custom_op("mome::modality_linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    module = _import(LINEAR_BACKENDS.modules[backend])
    return module.modality_linear_fwd(x, modality, weight, bias, activation=_activation_arg(activation))


@_linear_fwd.register_fake
def _(x, modality, weight, bias, activation, backend):
    out = x.new_empty(x.shape[0], weight.shape[1])
    return out, (torch.empty_like(out) if activation != _NO_ACTIVATION else x.new_empty(0))


@torch.library.custom_op("mome::modality_linear_bwd", mutates_args=())
def _linear_bwd(
    dy: Tensor,
    x: Tensor,
    modality: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pre: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = _import(LINEAR_BACKENDS.modules[backend])
    dx, dweight, dbias = module.modality_linear_bwd(
        dy, x, modality, weight, bias, pre, activation=_activation_arg(activation)
    )
    return dx, dweight, (x.new_empty(0) if dbias is None else dbias)


@_linear_bwd.register_fake
def _(dy, x, modality, weight, bias, pre, activation, backend):
    return torch.empty_like(x), torch.empty_like(weight), (x.new_empty(0) if bias is None else torch.empty_like(bias))


def _linear_setup(ctx, inputs, output):
    x, modality, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, modality, weight, bias, output[1])
    ctx.activation, ctx.backend = activation, backend


def _linear_backward(ctx, dy, _dpre):
    x, modality, weight, bias, pre = ctx.saved_tensors
    dx, dweight, dbias = _linear_bwd(dy.contiguous(), x, modality, weight, bias, pre, ctx.activation, ctx.backend)
    return dx, None, dweight, (None if bias is None else dbias), None, None


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("mome::modality_layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    module = _import(LAYER_NORM_BACKENDS.modules[backend])
    return module.modality_layer_norm_fwd(x, modality, weight, bias, eps=eps)


@_layer_norm_fwd.register_fake
def _(x, modality, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("mome::modality_layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    modality: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    module = _import(LAYER_NORM_BACKENDS.modules[backend])
    dx, dweight, dbias = module.modality_layer_norm_bwd(dy, x, modality, weight, bias, mean, rstd, eps=eps)
    return dx, dweight, (x.new_empty(0) if dbias is None else dbias)


@_layer_norm_bwd.register_fake
def _(dy, x, modality, weight, bias, mean, rstd, eps, backend):
    return torch.empty_like(x), torch.empty_like(weight), (x.new_empty(0) if bias is None else torch.empty_like(bias))


def _layer_norm_setup(ctx, inputs, output):
    x, modality, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, modality, weight, bias, output[1], output[2])
    ctx.eps, ctx.backend = eps, backend


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, modality, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy.contiguous(), x, modality, weight, bias, mean, rstd, ctx.eps, ctx.backend)
    return dx, None, dweight, (None if bias is None else dbias), None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _check_tokens(x: Tensor, modality: Tensor, num_experts: int, experts_from: str) -> Tensor:
    check_float("x", x, ndim=2)
    check_tensor("modality", modality, ndim=1)
    check_shape("modality", modality, (x.shape[0],), "(one id per token of x)")
    check_same("modality", modality, "x", x, dtype=False)
    check_ids("modality", modality, num_experts, f"E = {num_experts} experts in {experts_from}")
    return modality.to(torch.int64).contiguous()


def _check_expert_linear(weight_name: str, bias_name: str, x: Tensor, weight: Tensor, bias, din: int) -> None:
    check_float(weight_name, weight, ndim=3)
    check_same(weight_name, weight, "x", x)
    num_experts, dout = weight.shape[:2]
    check_shape(weight_name, weight, (None, None, din), f"(E, Dout, Din) with Din = {din}")
    if bias is not None:
        check_float(bias_name, bias, ndim=2)
        check_same(bias_name, bias, "x", x)
        check_shape(bias_name, bias, (num_experts, dout), f"(E, Dout) from {weight_name}")


def _run_linear(x, modality, weight, bias, activation, backend):
    inputs = dict(x=x, modality=modality, weight=weight, bias=bias, activation=activation)
    chosen, _ = LINEAR_BACKENDS.choose(backend, x.device, inputs)
    out, _pre = _linear_fwd(
        x.contiguous(),
        modality,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        _NO_ACTIVATION if activation is None else activation,
        chosen,
    )
    return out


def modality_linear(
    x: Tensor,
    modality: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """One linear layer per expert, chosen per token: row t is ``act(x[t] @ weight[e].T + bias[e])``, ``e = modality[t]``.

    Args:
        x: ``(T, Din)`` tokens in any modality order.
        modality: ``(T,)`` ints in ``[0, E)``.
        weight: ``(E, Dout, Din)`` (``nn.Linear`` layout per expert); bias: ``(E, Dout)`` or None.
        activation: ``None | "gelu" | "gelu_tanh" | "relu"``, applied after the bias.

    Returns ``(T, Dout)`` in x's dtype. Equivalent PyTorch::

        out = torch.stack([F.linear(x[t], weight[e], bias[e]) for t, e in enumerate(modality.tolist())])
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_float("weight", weight, ndim=3)
    modality = _check_tokens(x, modality, weight.shape[0], "weight")
    _check_expert_linear("weight", "bias", x, weight, bias, x.shape[1])
    return _run_linear(x, modality, weight, bias, activation, backend)


def modality_ffn(
    x: Tensor,
    modality: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str | None = "gelu",
    backend: str = "auto",
) -> Tensor:
    """Expert feed-forward network per token: ``fc2_e(act(fc1_e(x)))``, ``e = modality[t]``.

    Args:
        x: ``(T, D)``; modality: ``(T,)`` ints in ``[0, E)``.
        w1: ``(E, F, D)``, b1: ``(E, F)``; w2: ``(E, Dout, F)``, b2: ``(E, Dout)``.
        activation: between the two linears (default exact GELU).

    Returns ``(T, Dout)``. Equivalent PyTorch: ``modality_linear(modality_linear(x, m, w1, b1, activation=act), m, w2, b2)``.
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_float("w1", w1, ndim=3)
    modality = _check_tokens(x, modality, w1.shape[0], "w1")
    _check_expert_linear("w1", "b1", x, w1, b1, x.shape[1])
    check_float("w2", w2, ndim=3)
    check_shape("w2", w2, (w1.shape[0], None, w1.shape[1]), "(E, Dout, F) with E and F from w1")
    _check_expert_linear("w2", "b2", x, w2, b2, w1.shape[1])
    hidden = _run_linear(x, modality, w1, b1, activation, backend)  # [T, F]
    return _run_linear(hidden, modality, w2, b2, None, backend)  # [T, Dout]


def modality_layer_norm(
    x: Tensor,
    modality: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """LayerNorm over the last dim with gamma/beta chosen per token by modality.

    Args:
        x: ``(T, D)``; modality: ``(T,)`` ints in ``[0, E)``; weight, bias: ``(E, D)``.

    Returns ``(T, D)``. Statistics in fp32. Equivalent PyTorch: per token
    ``F.layer_norm(x[t], (D,), weight[e], bias[e], eps)``.
    """
    check_float("weight", weight, ndim=2)
    modality = _check_tokens(x, modality, weight.shape[0], "weight")
    check_same("weight", weight, "x", x)
    check_shape("weight", weight, (None, x.shape[1]), f"(E, D) with D = {x.shape[1]} from x")
    if bias is not None:
        check_float("bias", bias, ndim=2)
        check_same("bias", bias, "x", x)
        check_shape("bias", bias, weight.shape, "(the shape of weight)")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    inputs = dict(x=x, modality=modality, weight=weight, bias=bias)
    chosen, _ = LAYER_NORM_BACKENDS.choose(backend, x.device, inputs)
    out, _mean, _rstd = _layer_norm_fwd(
        x.contiguous(),
        modality,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        float(eps),
        chosen,
    )
    return out
