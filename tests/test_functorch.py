"""torch.func transforms over every op: reverse mode (grad, jacrev) and forward mode (jvp, jacfwd) give the
derivatives of the specification, checked against autograd of the op and against finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mome.ops import attention, decode_attention, itc_loss, modality_ffn, modality_layer_norm, modality_linear


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# constants made once: randomness inside a function that jacfwd vmaps over is refused
K = torch.randn(1, 1, 6, 8, generator=_gen(1), dtype=torch.float64)
CACHE = torch.randn(2, 1, 5, 8, generator=_gen(2), dtype=torch.float64)
W3 = torch.randn(3, 5, 4, generator=_gen(3), dtype=torch.float64)
W1 = torch.randn(3, 6, 4, generator=_gen(4), dtype=torch.float64)
W2 = torch.randn(3, 4, 6, generator=_gen(5), dtype=torch.float64)
NORM = torch.randn(3, 4, generator=_gen(6), dtype=torch.float64)
TEXT = F.normalize(torch.randn(4, 6, generator=_gen(7), dtype=torch.float64), dim=-1)


def _attention(q):
    k = K
    padding = torch.tensor([[False] * 5 + [True]])
    return attention(q, k, k * 0.5, causal=True, key_padding_mask=padding)


def _decode(q):
    return decode_attention(q.reshape(2, 2, 8), CACHE, CACHE.flip(2), torch.tensor([5, 3]))


def _ids(tokens):
    return torch.arange(tokens) % 3


def _modality_linear(x):
    return modality_linear(x, _ids(x.shape[0]), W3, activation="gelu")


def _modality_ffn(x):
    return modality_ffn(x, _ids(x.shape[0]), W1, None, W2, None)


def _modality_layer_norm(x):
    return modality_layer_norm(x, _ids(x.shape[0]), NORM, NORM.flip(0))


def _itc(image):
    return itc_loss(image, TEXT, 5.0).loss


OPS = {
    "attention": (_attention, (1, 1, 4, 8)),
    "decode_attention": (_decode, (4, 8)),
    "modality_linear": (_modality_linear, (5, 4)),
    "modality_ffn": (_modality_ffn, (5, 4)),
    "modality_layer_norm": (_modality_layer_norm, (5, 4)),
    "itc_loss": (_itc, (4, 6)),
}
DIFFERENTIABLE = [name for name in OPS if name != "decode_attention"]  # decode is forward-only for autograd


def _input(name):
    return torch.randn(OPS[name][1], generator=_gen(9), dtype=torch.float64)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_grad_and_jacrev_equal_autograd(name):
    fn, _ = OPS[name]
    x = _input(name)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    torch.testing.assert_close(torch.func.grad(lambda t: fn(t).sum())(x), expected)
    torch.testing.assert_close(torch.func.jacrev(fn)(x).reshape(-1, x.numel()).sum(0), expected.reshape(-1))


@pytest.mark.parametrize("name", sorted(OPS))
def test_jvp_and_jacfwd_are_the_real_directional_derivatives(name):
    fn, _ = OPS[name]
    x = _input(name)
    tangent = torch.randn(x.shape, generator=_gen(10), dtype=x.dtype)
    out, directional = torch.func.jvp(fn, (x,), (tangent,))
    torch.testing.assert_close(out, fn(x))
    eps = 1e-6
    finite_difference = (fn(x + eps * tangent) - fn(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(directional, finite_difference, rtol=1e-5, atol=1e-6)
    assert directional.abs().sum() > 0  # not the silent zeros of a transform that cannot see the op
    jacobian = torch.func.jacfwd(fn)(x)
    torch.testing.assert_close((jacobian.reshape(-1, x.numel()) @ tangent.reshape(-1)).reshape(out.shape), directional)
