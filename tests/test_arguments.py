"""Every public argument is validated by type and range, with a TypeError/ValueError that names it (issue 12, 7-8);
meta tensors go through the ops' fake implementations without reading values."""

from __future__ import annotations

import re

import pytest
import torch

from mome.ops import attention, decode_attention, modality_ffn, modality_layer_norm, modality_linear

Q = torch.randn(1, 2, 5, 8)


def _raises(error, name, fn):
    with pytest.raises(error, match=re.escape(name)):
        fn()


@pytest.mark.parametrize(
    "error, name, kwargs",
    [
        (TypeError, "scale", dict(scale="0.5")),
        (TypeError, "scale", dict(scale=[0.5])),
        (TypeError, "scale", dict(scale=0.5j)),
        (TypeError, "scale", dict(scale=True)),
        (TypeError, "scale", dict(scale=torch.tensor([0.5, 0.5]))),
        (TypeError, "causal", dict(causal="no")),
        (TypeError, "causal", dict(causal=1)),
        (ValueError, "prefix_len", dict(causal=True, prefix_len=-1)),
        (ValueError, "prefix_len", dict(causal=True, prefix_len=torch.tensor([-2]))),
        (ValueError, "backend", dict(backend="fastest")),
    ],
)
def test_attention_arguments(error, name, kwargs):
    _raises(error, name, lambda: attention(Q, Q, Q, **kwargs))


def test_attention_head_dim_zero_is_a_clear_error():
    empty = torch.randn(1, 2, 5, 0)
    _raises(ValueError, "q must have a head dim of at least 1", lambda: attention(empty, empty, empty))


def test_a_learnable_scale_is_refused_not_dropped():
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(TypeError, match="scale is a tensor that requires grad"):
        attention(Q, Q, Q, scale=scale)
    q = Q.clone().requires_grad_()
    out = attention(q, Q, Q, scale=torch.tensor(0.3))  # a constant tensor scale is read as a number
    torch.testing.assert_close(out, attention(q, Q, Q, scale=0.3))


def test_decode_arguments():
    q, cache, lengths = torch.randn(2, 2, 8), torch.randn(2, 1, 4, 8), torch.tensor([4, 1])
    _raises(TypeError, "scale", lambda: decode_attention(q, cache, cache, lengths, scale="1"))
    _raises(
        TypeError, "scale", lambda: decode_attention(q, cache, cache, lengths, scale=torch.ones((), requires_grad=True))
    )  # noqa: E501
    empty_q, empty_cache = torch.randn(2, 2, 0), torch.randn(2, 1, 4, 0)
    _raises(ValueError, "head dim", lambda: decode_attention(empty_q, empty_cache, empty_cache, lengths))
    _raises(ValueError, "cache_seqlens", lambda: decode_attention(q, cache, cache, torch.tensor([5, 1])))
    _raises(ValueError, "cache_seqlens", lambda: decode_attention(q, cache, cache, torch.tensor([2**33, 1])))


def test_meta_tensors_go_through_the_fake_implementations():
    meta = Q.to("meta")
    assert attention(meta, meta, meta, causal=True, prefix_len=torch.tensor([2], device="meta")).shape == Q.shape
    q, cache = torch.empty(2, 4, 8, device="meta"), torch.empty(2, 2, 6, 8, device="meta")
    out = decode_attention(q, cache, cache, torch.empty(2, dtype=torch.int64, device="meta"))
    assert out.shape == q.shape and out.device.type == "meta"


@pytest.mark.parametrize("eps", ["0.5", None, True, float("nan"), 0.0, -1e-5])
def test_layer_norm_eps(eps):
    x, ids, weight = torch.randn(3, 4), torch.tensor([0, 1, 0]), torch.ones(2, 4)
    error = ValueError if isinstance(eps, float) else TypeError
    _raises(error, "eps", lambda: modality_layer_norm(x, ids, weight, eps=eps))


def test_modality_ops_on_meta_tensors():
    x, ids = torch.empty(5, 8, device="meta"), torch.empty(5, dtype=torch.int64, device="meta")
    w1, w2 = torch.empty(3, 6, 8, device="meta"), torch.empty(3, 4, 6, device="meta")
    assert modality_linear(x, ids, w1, activation="gelu").shape == (5, 6)
    assert modality_ffn(x, ids, w1, None, w2, None).shape == (5, 4)
    assert modality_layer_norm(x, ids, torch.empty(3, 8, device="meta")).shape == (5, 8)
