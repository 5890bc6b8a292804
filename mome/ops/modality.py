"""``mome.ops.modality_linear`` / ``modality_ffn`` / ``modality_layer_norm``: per-token experts chosen by modality.

One op family, two backend contracts: :class:`ModalityBackend` (the expert linears, FFNs and LayerNorms) and
:class:`RoutingBackend`, the private op ``mome::modality_routing`` (a stable counting sort of the tokens by
expert). A linear or FFN call routes its tokens once, with the routing backend that goes with the backend chosen
for the call, and hands the routing to every launcher of that call; the reference launchers ignore it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from mome import settings
from mome.ops._backend import Family, OpBackends, check_backend
from mome.ops._functorch import transforms_active
from mome.ops._validate import (
    INT_DTYPES,
    check_choice,
    check_float,
    check_ids,
    check_positive_float,
    check_same,
    check_shape,
    check_tensor,
    ids_for_launch,
    poison_where,
)
from mome.reference._launch import compute_dtype
from mome.reference.modality import ACTIVATIONS, modality_ffn_ref, modality_layer_norm_ref, modality_linear_ref


class ExpertLinear(NamedTuple):
    """One linear layer per expert, as the launchers take it (contiguous)."""

    weight: Tensor  # [E, Dout, Din], nn.Linear's layout per expert
    bias: Tensor | None = None  # [E, Dout]


class ExpertNorm(NamedTuple):
    """One LayerNorm's affine parameters per expert (contiguous)."""

    weight: Tensor  # [E, D] gamma
    bias: Tensor | None = None  # [E, D] beta


class Routing(NamedTuple):
    """The stable expert-sorted order of the tokens, int32 on their device."""

    perm: Tensor  # [T] sorted row -> token
    inv_perm: Tensor  # [T] token -> sorted row
    offsets: Tensor  # [E + 1] expert e owns sorted rows offsets[e]:offsets[e + 1]


class ModalityBackend(Protocol):
    """Launchers of the modality family: contiguous tensors in, tensors out; ``modality`` ``(T,)`` int64.

    ``routing`` is the call's :class:`Routing`, or None with one expert (every token is expert 0's, in order).
    ``activation`` is None or one of ``"gelu"``, ``"gelu_tanh"``, ``"relu"``. ``pre`` is the pre-activation of a
    linear (``(0,)`` without an activation); the FFN's is that of its first linear ``(T, F)``, the one activation
    it saves. Gradients come back in the bundle of their parameters, a bias gradient None without a bias.
    """

    def modality_linear_fwd(
        self, x: Tensor, modality: Tensor, routing: Routing | None, linear: ExpertLinear, activation: str | None
    ) -> tuple[Tensor, Tensor]: ...

    def modality_linear_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        modality: Tensor,
        routing: Routing | None,
        linear: ExpertLinear,
        pre: Tensor,
        activation: str | None,
    ) -> tuple[Tensor, ExpertLinear]: ...

    def modality_ffn_fwd(
        self,
        x: Tensor,
        modality: Tensor,
        routing: Routing | None,
        fc1: ExpertLinear,
        fc2: ExpertLinear,
        activation: str | None,
    ) -> tuple[Tensor, Tensor]: ...

    def modality_ffn_bwd(
        self,
        dy: Tensor,
        x: Tensor,
        modality: Tensor,
        routing: Routing | None,
        fc1: ExpertLinear,
        fc2: ExpertLinear,
        pre: Tensor,
        activation: str | None,
    ) -> tuple[Tensor, ExpertLinear, ExpertLinear]: ...

    def modality_layer_norm_fwd(
        self, x: Tensor, modality: Tensor, norm: ExpertNorm, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def modality_layer_norm_bwd(
        self, dy: Tensor, x: Tensor, modality: Tensor, norm: ExpertNorm, mean: Tensor, rstd: Tensor, eps: float
    ) -> tuple[Tensor, ExpertNorm]: ...


class RoutingBackend(Protocol):
    """The launcher of the routing op: ``modality`` ``(T,)`` int64 ids in ``[0, num_experts)`` (not re-checked:
    that would sync) -> :class:`Routing`'s three int32 tensors."""

    def modality_routing(self, modality: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]: ...


FAMILY = Family(
    "modality",
    ModalityBackend,
    sizes={
        "experts": "E, the experts of the parameters",
        "tokens": "T, the rows of x",
        "features": "the widest of Din, F and Dout, one grid dimension of GEMM tiles",
        "norm_width": "D, the LayerNorm's row (one row is one tile)",
        "norm_params": "E * D, the per-expert gamma table that the LayerNorm backward accumulates per program",
    },
)
ROUTING_FAMILY = Family(
    "modality_routing",
    RoutingBackend,
    sizes={"experts": "E, the number of experts", "tokens": "T, the ids routed"},
)

_MODULES = {"reference": "mome.reference.modality", "native": "mome.native.modality", "triton": "mome.kernels.modality"}


def _measure_linears(inputs: dict):
    x, layers = inputs["x"], inputs["layers"]
    features = max([x.shape[1], *(layer.weight.shape[1] for layer in layers)])
    sizes = {"experts": layers[0].weight.shape[0], "tokens": x.shape[0], "features": features}
    return x.dtype, x.device, sizes


def _measure_layer_norm(inputs: dict):
    x, norm = inputs["x"], inputs["norm"]
    experts, width = norm.weight.shape
    sizes = {"experts": experts, "tokens": x.shape[0], "norm_width": width, "norm_params": experts * width}
    return x.dtype, x.device, sizes


def _measure_routing(inputs: dict):
    modality = inputs["modality"]
    return modality.dtype, modality.device, {"experts": inputs["num_experts"], "tokens": modality.shape[0]}


LINEAR_BACKENDS = OpBackends("modality_linear", FAMILY, _MODULES, _measure_linears)
FFN_BACKENDS = OpBackends("modality_ffn", FAMILY, _MODULES, _measure_linears)
LAYER_NORM_BACKENDS = OpBackends("modality_layer_norm", FAMILY, _MODULES, _measure_layer_norm)
ROUTING_BACKENDS = OpBackends(
    "modality_routing",
    ROUTING_FAMILY,
    {"reference": "mome.reference.modality", "triton": "mome.kernels.modality_routing", "cuda": "mome.cuda.modality"},
    _measure_routing,
)

# ---------------------------------------------------------------------------------------------------------------------
# Routing: one private op, computed once per linear / FFN call.


def route(modality: Tensor, num_experts: int, backend: str = "auto") -> Routing:
    """The stable expert-sorted order of ``modality`` ``(T,)`` int64 (ids in ``[0, num_experts)``, unchecked)."""
    module = ROUTING_BACKENDS.module(backend, dict(modality=modality, num_experts=num_experts))
    return Routing(*module.modality_routing(modality, num_experts))


@torch.library.custom_op("mome::modality_routing", mutates_args=())
def _modality_routing(modality: Tensor, num_experts: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(route(modality, num_experts, backend))


@_modality_routing.register_fake
def _(modality, num_experts, backend):
    tokens = modality.new_empty(modality.shape[0], dtype=torch.int32)
    return tokens, torch.empty_like(tokens), modality.new_empty(num_experts + 1, dtype=torch.int32)


def _routing_backend(chosen: str, inputs: dict) -> str:
    """The routing that goes with the modality backend ``chosen``: the specification's own for the reference and the
    native backend (CPU tensors), else the CUDA kernel where it runs these ids, else Triton's, else the reference."""
    if chosen in ("reference", "native"):
        return "reference"
    for candidate in ("cuda", "triton"):
        if ROUTING_BACKENDS.reason(candidate, inputs) is None:
            return candidate
    return "reference"


def _prepare(op_backends: OpBackends, backend: str, x: Tensor, modality: Tensor, layers: tuple[ExpertLinear, ...]):
    """The chosen backend's module and the call's routing (None with one expert: the tokens are in order)."""
    chosen, module = op_backends.choose(backend, dict(x=x, layers=layers))
    num_experts = layers[0].weight.shape[0]
    if num_experts == 1:
        return module, None
    inputs = dict(modality=modality, num_experts=num_experts)
    return module, route(modality, num_experts, _routing_backend(chosen, inputs))


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops. Their schemas take tensors, not bundles or Optional[str]: the bundles are flattened here and only here.

_NO_ACTIVATION = "none"


def _checked_ids(modality: Tensor, num_experts: int) -> tuple[Tensor, Tensor | None]:
    """The forward's id check, here inside the custom op: it runs eagerly even in compiled code. With
    ``MOME_CHECK_IDS=0`` a bad id becomes expert 0 and its mask comes back, to poison that token's row."""
    modality, bad = ids_for_launch("modality", modality, 0, num_experts - 1, f"E = {num_experts} experts")
    return modality, None if bad is None else bad[:, None]


def _ids_for_backward(modality: Tensor, num_experts: int) -> Tensor:
    """The forward checked the ids, or (checks off) replaced bad ones: the backward uses ids that index."""
    return modality if settings.check_ids() else modality.clamp(0, max(num_experts - 1, 0))


def _activation(name: str) -> str | None:
    return None if name == _NO_ACTIVATION else name


def _tensor(grad: Tensor | None, like: Tensor) -> Tensor:
    """A bias gradient for a schema that has no Optional outputs: ``(0,)`` when there is no bias."""
    return like.new_empty(0) if grad is None else grad


def _bias_grad(bias: Tensor | None, grad: Tensor) -> Tensor | None:
    return None if bias is None else grad


def _like(bias: Tensor | None, x: Tensor) -> Tensor:
    return x.new_empty(0) if bias is None else torch.empty_like(bias)


@torch.library.custom_op("mome::modality_linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    linear = ExpertLinear(weight, bias)
    modality, bad = _checked_ids(modality, weight.shape[0])
    module, routing = _prepare(LINEAR_BACKENDS, backend, x, modality, (linear,))
    out, pre = module.modality_linear_fwd(x, modality, routing, linear, _activation(activation))
    return poison_where(out, bad), pre


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
    linear = ExpertLinear(weight, bias)
    modality = _ids_for_backward(modality, weight.shape[0])
    module, routing = _prepare(LINEAR_BACKENDS, backend, x, modality, (linear,))
    dx, (dweight, dbias) = module.modality_linear_bwd(dy, x, modality, routing, linear, pre, _activation(activation))
    return dx, dweight, _tensor(dbias, x)


@_linear_bwd.register_fake
def _(dy, x, modality, weight, bias, pre, activation, backend):
    return torch.empty_like(x), torch.empty_like(weight), _like(bias, x)


def _linear_setup(ctx, inputs, output):
    x, modality, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, modality, weight, bias, output[1])
    ctx.activation, ctx.backend = activation, backend


def _linear_backward(ctx, dy, _dpre):
    x, modality, weight, bias, pre = ctx.saved_tensors
    dx, dweight, dbias = _linear_bwd(dy.contiguous(), x, modality, weight, bias, pre, ctx.activation, ctx.backend)
    return dx, None, dweight, _bias_grad(bias, dbias), None, None


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
    """Returns ``(y, pre)``: pre is the first linear's pre-activation."""
    fc1, fc2 = ExpertLinear(w1, b1), ExpertLinear(w2, b2)
    modality, bad = _checked_ids(modality, w1.shape[0])
    module, routing = _prepare(FFN_BACKENDS, backend, x, modality, (fc1, fc2))
    out, pre = module.modality_ffn_fwd(x, modality, routing, fc1, fc2, _activation(activation))
    return poison_where(out, bad), pre


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
    pre: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fc1, fc2 = ExpertLinear(w1, b1), ExpertLinear(w2, b2)
    modality = _ids_for_backward(modality, w1.shape[0])
    module, routing = _prepare(FFN_BACKENDS, backend, x, modality, (fc1, fc2))
    dx, dfc1, dfc2 = module.modality_ffn_bwd(dy, x, modality, routing, fc1, fc2, pre, _activation(activation))
    return dx, dfc1.weight, _tensor(dfc1.bias, x), dfc2.weight, _tensor(dfc2.bias, x)


@_ffn_bwd.register_fake
def _(dy, x, modality, w1, b1, w2, b2, pre, activation, backend):
    return torch.empty_like(x), torch.empty_like(w1), _like(b1, x), torch.empty_like(w2), _like(b2, x)


def _ffn_setup(ctx, inputs, output):
    x, modality, w1, b1, w2, b2, activation, backend = inputs
    ctx.save_for_backward(x, modality, w1, b1, w2, b2, output[1])
    ctx.activation, ctx.backend = activation, backend


def _ffn_backward(ctx, dy, _dpre):
    x, modality, w1, b1, w2, b2, pre = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _ffn_bwd(dy.contiguous(), x, modality, w1, b1, w2, b2, pre, ctx.activation, ctx.backend)
    return dx, None, dw1, _bias_grad(b1, db1), dw2, _bias_grad(b2, db2), None, None


_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup)


@torch.library.custom_op("mome::modality_layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    norm = ExpertNorm(weight, bias)
    modality, bad = _checked_ids(modality, weight.shape[0])
    module = LAYER_NORM_BACKENDS.module(backend, dict(x=x, norm=norm))
    out, mean, rstd = module.modality_layer_norm_fwd(x, modality, norm, eps)
    return poison_where(out, bad), mean, rstd


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
    norm = ExpertNorm(weight, bias)
    modality = _ids_for_backward(modality, weight.shape[0])
    module = LAYER_NORM_BACKENDS.module(backend, dict(x=x, norm=norm))
    dx, (dweight, dbias) = module.modality_layer_norm_bwd(dy, x, modality, norm, mean, rstd, eps)
    return dx, dweight, _tensor(dbias, x)


@_layer_norm_bwd.register_fake
def _(dy, x, modality, weight, bias, mean, rstd, eps, backend):
    return torch.empty_like(x), torch.empty_like(weight), _like(bias, x)


def _layer_norm_setup(ctx, inputs, output):
    x, modality, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, modality, weight, bias, output[1], output[2])
    ctx.eps, ctx.backend = eps, backend


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, modality, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy.contiguous(), x, modality, weight, bias, mean, rstd, ctx.eps, ctx.backend)
    return dx, None, dweight, _bias_grad(bias, dbias), None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---------------------------------------------------------------------------------------------------------------------
# Validation and the public functions.


def _check_tokens(x: Tensor, modality: Tensor, num_experts: int, experts_from: str) -> Tensor:
    check_float("x", x, ndim=2)
    check_tensor("modality", modality, ndim=1)
    check_shape("modality", modality, (x.shape[0],), "(one id per token of x)")
    check_same("modality", modality, "x", x, dtype=False)
    check_tensor("modality", modality, dtypes=INT_DTYPES)
    if transforms_active():  # the specification runs, not the custom op that checks the ids
        check_ids("modality", modality, num_experts, f"E = {num_experts} experts in {experts_from}")
    return modality.to(torch.int64).contiguous()


def _expert_linear(weight_name: str, bias_name: str, x: Tensor, weight, bias, din: int) -> ExpertLinear:
    """The checked, contiguous parameters of one expert linear with ``din`` inputs."""
    check_float(weight_name, weight, ndim=3)
    check_same(weight_name, weight, "x", x)
    num_experts, dout = weight.shape[:2]
    check_shape(weight_name, weight, (None, None, din), f"(E, Dout, Din) with Din = {din}")
    if bias is not None:
        check_float(bias_name, bias, ndim=2)
        check_same(bias_name, bias, "x", x)
        check_shape(bias_name, bias, (num_experts, dout), f"(E, Dout) from {weight_name}")
        bias = bias.contiguous()
    return ExpertLinear(weight.contiguous(), bias)


def _specification(spec, x: Tensor, *args, **kwargs) -> Tensor:
    """The plain-PyTorch path under torch.func transforms (see mome/ops/_functorch.py): half precision through fp32."""
    dtype = compute_dtype(x)
    wide = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    return spec(x.to(dtype), *wide, **kwargs).to(x.dtype)


def _activation_arg(activation: str | None) -> str:
    check_choice("activation", activation, ACTIVATIONS)
    return _NO_ACTIVATION if activation is None else activation


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
        backend: ``"auto" | "reference" | "native" | "triton" | "cuda"`` (``MOME_BACKEND`` overrides auto).

    Returns ``(T, Dout)`` in x's dtype. Equivalent PyTorch::

        out = torch.stack([F.linear(x[t], weight[e], bias[e]) for t, e in enumerate(modality.tolist())])
    """
    activation = _activation_arg(activation)
    check_float("weight", weight, ndim=3)
    modality = _check_tokens(x, modality, weight.shape[0], "weight")
    linear = _expert_linear("weight", "bias", x, weight, bias, x.shape[1])
    check_backend(backend)
    if transforms_active():
        return _specification(modality_linear_ref, x, modality, *linear, activation=_activation(activation))
    out, _pre = _linear_fwd(x.contiguous(), modality, *linear, activation, backend)
    return out  # [T, Dout]


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

    One custom op: the tokens are routed once for both GEMMs (and once in backward), and only the first linear's
    pre-activation is saved; the Triton backend recomputes the hidden layer ``act(pre)`` as the second GEMM loads it.
    """
    activation = _activation_arg(activation)
    check_float("w1", w1, ndim=3)
    modality = _check_tokens(x, modality, w1.shape[0], "w1")
    fc1 = _expert_linear("w1", "b1", x, w1, b1, x.shape[1])
    check_float("w2", w2, ndim=3)
    check_shape("w2", w2, (w1.shape[0], None, w1.shape[1]), "(E, Dout, F) with E and F from w1")
    fc2 = _expert_linear("w2", "b2", x, w2, b2, w1.shape[1])
    check_backend(backend)
    if transforms_active():
        return _specification(modality_ffn_ref, x, modality, *fc1, *fc2, activation=_activation(activation))
    out, _pre = _ffn_fwd(x.contiguous(), modality, *fc1, *fc2, activation, backend)
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
        bias = bias.contiguous()
    eps = check_positive_float("eps", eps)
    check_backend(backend)
    if transforms_active():
        return _specification(modality_layer_norm_ref, x, modality, weight, bias, eps)
    out, _mean, _rstd = _layer_norm_fwd(x.contiguous(), modality, weight.contiguous(), bias, eps, backend)
    return out  # [T, D]
