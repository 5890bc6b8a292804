"""``mome.ops.modality_linear`` / ``modality_ffn`` / ``modality_layer_norm``: per-token expert routing."""

from __future__ import annotations

import torch
from torch import Tensor

from mome.ops._dispatch import BACKENDS, OpBackends
from mome.ops._validate import check_choice, check_float, check_ids, check_same, check_shape, check_tensor
from mome.reference.modality import ACTIVATIONS, apply_activation

LINEAR_BACKENDS = OpBackends(
    "modality_linear",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.grouped_gemm"},
)
LAYER_NORM_BACKENDS = OpBackends(
    "modality_layer_norm",
    {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.layer_norm"},
)
_NO_ACTIVATION = "none"  # custom-op schemas take str, not Optional[str]


def _cuda_routing(module, modality: Tensor, num_experts: int) -> dict:
    """``{"routing": (perm, offsets)}`` from mome._C's routing kernel for the Triton grouped GEMM on CUDA tensors
    when the extension can run it (it is the CUDA twin of ``mome.kernels.routing``); else ``{}``, and the Triton
    launchers route with their own kernels."""
    if module.__name__ != LINEAR_BACKENDS.modules["triton"] or modality.device.type != "cuda" or num_experts == 1:
        return {}
    from mome.cuda import routing

    if routing.unsupported_reason("modality_routing", modality=modality, num_experts=num_experts) is not None:
        return {}
    perm, _inv_perm, offsets = routing.modality_routing(modality, num_experts)
    return {"routing": (perm, offsets)}


def _linear_inputs(x, modality, weight, bias, activation: str) -> dict:
    """What the backends' ``unsupported_reason`` sees of a linear (or the first linear of an FFN)."""
    return dict(x=x, modality=modality, weight=weight, bias=bias, activation=_activation_arg(activation))


def _activation_arg(activation: str) -> str | None:
    return None if activation == _NO_ACTIVATION else activation


def _recompute_hidden(pre: Tensor, activation: str) -> Tensor:
    """``act(pre)`` as the forward computed it (half precision through fp32)."""
    wide = pre.float() if pre.dtype in (torch.float16, torch.bfloat16) else pre
    return apply_activation(wide, activation).to(pre.dtype)


@torch.library.custom_op("mome::modality_linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    module = LINEAR_BACKENDS.module(backend, x.device, _linear_inputs(x, modality, weight, bias, activation))
    routed = _cuda_routing(module, modality, weight.shape[0])
    return module.modality_linear_fwd(x, modality, weight, bias, activation=_activation_arg(activation), **routed)


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
    module = LINEAR_BACKENDS.module(backend, x.device, _linear_inputs(x, modality, weight, bias, activation))
    routed = _cuda_routing(module, modality, weight.shape[0])
    dx, dweight, dbias = module.modality_linear_bwd(
        dy, x, modality, weight, bias, pre, activation=_activation_arg(activation), **routed
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


@torch.library.custom_op("mome::modality_ffn_fwd", mutates_args=())
def _ffn_fwd(
    x: Tensor,
    modality: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, saved)``: saved is the first linear's pre-activation (the hidden layer when no activation)."""
    module = LINEAR_BACKENDS.module(backend, x.device, _linear_inputs(x, modality, w1, b1, activation))
    act = _activation_arg(activation)
    if hasattr(module, "modality_ffn_fwd"):  # one routing for both GEMMs, hidden layer never stored
        return module.modality_ffn_fwd(
            x, modality, w1, b1, w2, b2, activation=act, **_cuda_routing(module, modality, w1.shape[0])
        )
    hidden, pre = module.modality_linear_fwd(x, modality, w1, b1, activation=act)
    out, _ = module.modality_linear_fwd(hidden, modality, w2, b2, activation=None)
    return out, (hidden if act is None else pre)


@_ffn_fwd.register_fake
def _(x, modality, w1, b1, w2, b2, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[1]), x.new_empty(x.shape[0], w1.shape[1])


@torch.library.custom_op("mome::modality_ffn_bwd", mutates_args=())
def _ffn_bwd(
    dy: Tensor,
    x: Tensor,
    modality: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    saved: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    module = LINEAR_BACKENDS.module(backend, x.device, _linear_inputs(x, modality, w1, b1, activation))
    act = _activation_arg(activation)
    if hasattr(module, "modality_ffn_bwd"):
        routed = _cuda_routing(module, modality, w1.shape[0])
        dx, dw1, db1, dw2, db2 = module.modality_ffn_bwd(
            dy, x, modality, w1, b1, w2, b2, saved, activation=act, **routed
        )
    else:
        hidden = saved if act is None else _recompute_hidden(saved, act)
        d_hidden, dw2, db2 = module.modality_linear_bwd(dy, hidden, modality, w2, b2, x.new_empty(0), activation=None)
        pre = saved if act is not None else x.new_empty(0)
        dx, dw1, db1 = module.modality_linear_bwd(d_hidden, x, modality, w1, b1, pre, activation=act)
    return dx, dw1, (x.new_empty(0) if db1 is None else db1), dw2, (x.new_empty(0) if db2 is None else db2)


@_ffn_bwd.register_fake
def _(dy, x, modality, w1, b1, w2, b2, saved, activation, backend):
    def like(bias):
        return x.new_empty(0) if bias is None else torch.empty_like(bias)

    return torch.empty_like(x), torch.empty_like(w1), like(b1), torch.empty_like(w2), like(b2)


def _ffn_setup(ctx, inputs, output):
    x, modality, w1, b1, w2, b2, activation, backend = inputs
    ctx.save_for_backward(x, modality, w1, b1, w2, b2, output[1])
    ctx.activation, ctx.backend = activation, backend


def _ffn_backward(ctx, dy, _dsaved):
    x, modality, w1, b1, w2, b2, saved = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _ffn_bwd(dy.contiguous(), x, modality, w1, b1, w2, b2, saved, ctx.activation, ctx.backend)
    return dx, None, dw1, (None if b1 is None else db1), dw2, (None if b2 is None else db2), None, None


_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup)


@torch.library.custom_op("mome::modality_layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    module = LAYER_NORM_BACKENDS.module(backend, x.device, dict(x=x, modality=modality, weight=weight, bias=bias))
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
    module = LAYER_NORM_BACKENDS.module(backend, x.device, dict(x=x, modality=modality, weight=weight, bias=bias))
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
    check_choice("backend", backend, ("auto", *BACKENDS))
    out, _pre = _linear_fwd(
        x.contiguous(),
        modality,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        _NO_ACTIVATION if activation is None else activation,
        backend,
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
    """One linear layer per expert, chosen per token: row t is ``act(x[t] @ weight[e].T + bias[e])``, e = modality[t].

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

    Returns ``(T, Dout)``. Equivalent PyTorch::

        modality_linear(modality_linear(x, m, w1, b1, activation=act), m, w2, b2)

    One custom op: the Triton backend routes the tokens once for both GEMMs (and once in backward), and saves only
    the first linear's pre-activation; the hidden layer ``act(pre)`` is recomputed as the second GEMM loads it.
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_float("w1", w1, ndim=3)
    modality = _check_tokens(x, modality, w1.shape[0], "w1")
    _check_expert_linear("w1", "b1", x, w1, b1, x.shape[1])
    check_float("w2", w2, ndim=3)
    check_shape("w2", w2, (w1.shape[0], None, w1.shape[1]), "(E, Dout, F) with E and F from w1")
    _check_expert_linear("w2", "b2", x, w2, b2, w1.shape[1])
    check_choice("backend", backend, ("auto", *BACKENDS))
    out, _saved = _ffn_fwd(
        x.contiguous(),
        modality,
        w1.contiguous(),
        None if b1 is None else b1.contiguous(),
        w2.contiguous(),
        None if b2 is None else b2.contiguous(),
        _NO_ACTIVATION if activation is None else activation,
        backend,
    )
    return out  # [T, Dout]


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
    check_choice("backend", backend, ("auto", *BACKENDS))
    out, _mean, _rstd = _layer_norm_fwd(
        x.contiguous(),
        modality,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        float(eps),
        backend,
    )
    return out
