"""modality_linear / modality_ffn / modality_layer_norm (reference backend) vs a per-token loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mome.ops import modality_ffn, modality_layer_norm, modality_linear
from tests.helpers import assert_close

SCALAR_ACTIVATIONS = {
    None: lambda z: z,
    "gelu": lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: max(z, 0.0),
}

LAYOUTS = {
    "vision_only": lambda t: [0] * t,
    "language_only": lambda t: [1] * t,
    "split": lambda t: [0] * (t // 2) + [1] * (t - t // 2),
    "interleaved": lambda t: [(7 * i + 3) % 3 for i in range(t)],
    "empty_expert": lambda t: [2 * (i % 2) for i in range(t)],  # expert 1 gets no token
}


def per_token_linear(x, modality, weight, bias, activation):
    rows = []
    for t, e in enumerate(modality.tolist()):
        z = weight[e] @ x[t] + (0 if bias is None else bias[e])
        rows.append(torch.tensor([SCALAR_ACTIVATIONS[activation](float(value)) for value in z], dtype=x.dtype))
    return torch.stack(rows)


def linear_case(tokens, din, dout, experts, layout, *, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, din, generator=gen, dtype=torch.float64)
    weight = torch.randn(experts, dout, din, generator=gen, dtype=torch.float64)
    b = torch.randn(experts, dout, generator=gen, dtype=torch.float64) if bias else None
    modality = torch.tensor(LAYOUTS[layout](tokens)) % experts
    return x, modality, weight, b


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu"])
def test_linear_matches_per_token_loop(layout, activation):
    x, modality, weight, bias = linear_case(37, 7, 5, 3, layout)
    expected = per_token_linear(x, modality, weight, bias, activation)
    assert_close(
        modality_linear(x, modality, weight, bias, activation=activation, backend="reference"), expected, 1e-12
    )


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    din=st.integers(1, 9),
    dout=st.integers(1, 9),
    experts=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_any_layout(tokens, din, dout, experts, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, din, generator=gen, dtype=torch.float64)
    weight = torch.randn(experts, dout, din, generator=gen, dtype=torch.float64)
    b = torch.randn(experts, dout, generator=gen, dtype=torch.float64) if bias else None
    modality = torch.randint(0, experts, (tokens,), generator=gen)
    expected = per_token_linear(x, modality, weight, b, None)
    assert_close(modality_linear(x, modality, weight, b, backend="reference"), expected, 1e-12)


def test_ffn_is_two_linears_with_activation():
    x, modality, w1, b1 = linear_case(23, 6, 11, 3, "interleaved", seed=1)
    _, _, w2, b2 = linear_case(23, 11, 4, 3, "interleaved", seed=2)
    hidden = per_token_linear(x, modality, w1, b1, "gelu")
    expected = per_token_linear(hidden, modality, w2, b2, None)
    assert_close(modality_ffn(x, modality, w1, b1, w2, b2, backend="reference"), expected, 1e-12)


@pytest.mark.parametrize("layout", ["split", "interleaved", "empty_expert"])
def test_layer_norm_matches_per_token_loop(layout):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(19, 13, generator=gen, dtype=torch.float64) * 3 + 1
    modality = torch.tensor(LAYOUTS[layout](19))
    weight = torch.randn(3, 13, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, 13, generator=gen, dtype=torch.float64)
    expected = torch.stack(
        [F.layer_norm(x[t], (13,), weight[e], bias[e], 1e-6) for t, e in enumerate(modality.tolist())]
    )
    assert_close(modality_layer_norm(x, modality, weight, bias, 1e-6, backend="reference"), expected, 1e-12)
    no_bias = torch.stack([F.layer_norm(x[t], (13,), weight[e], None, 1e-6) for t, e in enumerate(modality.tolist())])
    assert_close(modality_layer_norm(x, modality, weight, None, 1e-6, backend="reference"), no_bias, 1e-12)


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu"])
def test_linear_gradcheck(activation):
    x, modality, weight, bias = linear_case(9, 4, 3, 3, "empty_expert", seed=4)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, w, b: modality_linear(a, modality, w, b, activation=activation, backend="reference"), inputs
    )


def test_ffn_and_layer_norm_gradcheck():
    x, modality, w1, b1 = linear_case(8, 4, 6, 2, "split", seed=5)
    _, _, w2, b2 = linear_case(8, 6, 3, 2, "split", seed=6)
    params = tuple(t.requires_grad_() for t in (x, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(
        lambda *p: modality_ffn(p[0], modality, *p[1:], activation="gelu_tanh", backend="reference"), params
    )
    gamma = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, g, b: modality_layer_norm(a, modality, g, b, backend="reference"), (params[0], gamma, beta)
    )


def test_fp16_inputs_are_computed_in_fp32_and_returned_in_fp16():
    x, modality, weight, bias = linear_case(17, 8, 8, 2, "split", seed=7)
    expected = per_token_linear(x, modality, weight, bias, "gelu")
    actual = modality_linear(x.half(), modality, weight.half(), bias.half(), activation="gelu", backend="reference")
    assert actual.dtype == torch.float16
    assert_close(actual, expected, 2e-3)
