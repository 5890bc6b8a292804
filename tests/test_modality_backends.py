"""Every backend of the modality family that loads here, in every dtype it declares, on the same cases.

Forward and every gradient of modality_linear / modality_ffn / modality_layer_norm against a float64 formula
written below (per-token parameters gathered by id: no routing, no mome.reference), with outputs poisoned. The
backends and dtypes come from the declared contract (``usable_backends``, ``declared_dtypes``): a new backend is
tested the day it exists.
"""

from __future__ import annotations

import pytest
import torch

from mome.ops import modality_ffn, modality_layer_norm, modality_linear
from mome.ops.modality import LINEAR_BACKENDS
from tests.helpers import TOLERANCE, assert_close, declared_dtypes, usable_backends
from tests.test_modality_routing import make_ids

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

FORMULA_ACTIVATIONS = {
    None: lambda z: z,
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5)),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))),
    "relu": lambda z: z.clamp_min(0),
}


def _backend_dtypes() -> list:
    return [
        pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
        for backend in usable_backends(LINEAR_BACKENDS)
        for dtype in declared_dtypes(LINEAR_BACKENDS, backend)
        if dtype.is_floating_point
    ]


BACKEND_DTYPES = _backend_dtypes()


def linear_formula(x, ids, weight, bias, activation):
    """``act(x[t] @ weight[e]ᵀ + bias[e])`` row by row with the parameters gathered per token."""
    out = torch.einsum("ti,toi->to", x, weight[ids])
    if bias is not None:
        out = out + bias[ids]
    return FORMULA_ACTIVATIONS[activation](out)


def layer_norm_formula(x, ids, weight, bias, eps):
    centered = x - x.mean(-1, keepdim=True)
    out = centered / torch.sqrt(centered.square().mean(-1, keepdim=True) + eps) * weight[ids]
    return out if bias is None else out + bias[ids]


def _random(generator, dtype, *shapes_and_scales):
    return [
        None if shape is None else (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        for shape, scale in shapes_and_scales
    ]


def _check(run, formula, inputs, dtype):
    """The op's forward and the gradient of every tensor input against the formula in float64."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    assert out.dtype == dtype
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(cotangent.to(dtype))
    wide = [None if t is None else t.double().requires_grad_() for t in inputs]
    expected = formula(*wide)
    expected.backward(cotangent)
    tol = TOLERANCE[dtype]
    assert_close(out.detach(), expected.detach(), tol, "forward")
    for index, (leaf, ref) in enumerate(zip(leaves, wide, strict=True)):
        if leaf is not None:
            assert_close(leaf.grad, ref.grad, tol, f"gradient of input {index}")


LINEAR_CASES = [
    # name, tokens, experts, din, dout, layout, activation, bias
    ("odd_interleaved_gelu", 29, 3, 13, 19, "interleaved", "gelu", True),
    ("empty_expert_tanh", 24, 3, 17, 9, "empty", "gelu_tanh", True),
    ("all_in_one_relu", 21, 3, 8, 11, "one", "relu", False),
    ("one_expert_plain", 17, 1, 10, 7, "interleaved", None, True),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c[0])
def test_linear(backend, dtype, case):
    _, tokens, experts, din, dout, layout, activation, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens))
    inputs = _random(
        torch.Generator().manual_seed(din),
        dtype,
        ((tokens, din), 1.0),
        ((experts, dout, din), din**-0.5),
        ((experts, dout) if has_bias else None, 0.5),
    )
    _check(
        lambda x, w, b: modality_linear(x, ids, w, b, activation=activation, backend=backend),
        lambda x, w, b: linear_formula(x, ids, w, b, activation),
        inputs,
        dtype,
    )


FFN_CASES = [
    # name, tokens, experts, dim, hidden, dout, layout, activation, biases
    ("odd_interleaved_gelu", 27, 3, 11, 21, 13, "interleaved", "gelu", True),
    ("empty_expert_relu", 22, 3, 9, 15, 9, "empty", "relu", True),
    ("split_no_activation", 19, 2, 8, 12, 6, "split", None, False),
    ("one_expert_tanh", 15, 1, 12, 18, 12, "one", "gelu_tanh", True),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: c[0])
def test_ffn(backend, dtype, case):
    _, tokens, experts, dim, hidden, dout, layout, activation, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens + 1))
    inputs = _random(
        torch.Generator().manual_seed(hidden),
        dtype,
        ((tokens, dim), 1.0),
        ((experts, hidden, dim), dim**-0.5),
        ((experts, hidden) if has_bias else None, 0.5),
        ((experts, dout, hidden), hidden**-0.5),
        ((experts, dout) if has_bias else None, 0.5),
    )

    def formula(x, w1, b1, w2, b2):
        return linear_formula(linear_formula(x, ids, w1, b1, activation), ids, w2, b2, None)

    _check(lambda *t: modality_ffn(t[0], ids, *t[1:], activation=activation, backend=backend), formula, inputs, dtype)


LAYER_NORM_CASES = [
    # name, tokens, experts, dim, layout, bias
    ("odd_interleaved", 31, 3, 23, "interleaved", True),
    ("empty_expert_no_bias", 26, 3, 40, "empty", False),
    ("all_in_one", 12, 2, 7, "one", True),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=lambda c: c[0])
def test_layer_norm(backend, dtype, case):
    _, tokens, experts, dim, layout, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens + 2))
    x, weight, bias = _random(
        torch.Generator().manual_seed(dim),
        dtype,
        ((tokens, dim), 2.0),
        ((experts, dim), 1.0),
        ((experts, dim) if has_bias else None, 1.0),
    )
    x = x + 0.75  # a mean away from zero exercises the centring
    _check(
        lambda x_, w, b: modality_layer_norm(x_, ids, w, b, 1e-5, backend=backend),
        lambda x_, w, b: layer_norm_formula(x_, ids, w, b, 1e-5),
        [x, weight, bias],
        dtype,
    )


def test_the_backends_under_test_are_what_the_contract_declares():
    backends = usable_backends(LINEAR_BACKENDS)
    assert "reference" in backends
    assert {torch.float16, torch.bfloat16, torch.float32, torch.float64} <= set(
        declared_dtypes(LINEAR_BACKENDS, "reference")
    )
    if "triton" in backends:
        assert set(declared_dtypes(LINEAR_BACKENDS, "triton")) == {torch.float16, torch.bfloat16, torch.float32}


def test_torch_func_transforms_see_through_the_ops():
    """Under torch.func the ops run their specification: forward-mode tangents are right, not silent zeros."""
    generator = torch.Generator().manual_seed(11)
    ids = make_ids(9, 3, "interleaved", generator)
    x, w1, w2, gamma = _random(generator, torch.float64, ((9, 4), 1.0), ((3, 5, 4), 1.0), ((3, 4, 5), 1.0), ((3, 4), 1))
    tangents = tuple(torch.randn_like(t) for t in (x, w1, w2, gamma))

    def block(x, w1, w2, gamma):
        return modality_layer_norm(x, ids, gamma) + modality_ffn(x, ids, w1, None, w2, None, activation="gelu_tanh")

    def formula(x, w1, w2, gamma):
        hidden = linear_formula(x, ids, w1, None, "gelu_tanh")
        return layer_norm_formula(x, ids, gamma, None, 1e-5) + linear_formula(hidden, ids, w2, None, None)

    _, got = torch.func.jvp(block, (x, w1, w2, gamma), tangents)
    _, want = torch.func.jvp(formula, (x, w1, w2, gamma), tangents)
    assert_close(got, want, 1e-10, "jvp")
