"""mome.integrations._sdpa.attention_like_sdpa against F.scaled_dot_product_attention: masks as structure or as the
op's attn_bias, attention dropout, and the reasons for what does not map."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import mome.integrations._sdpa as sdpa_module
import mome.nn.masks as masks
from mome.integrations._sdpa import SdpaOnMome, attention_like_sdpa
from mome.integrations._tally import Tally
from tests.helpers import TOLERANCE, assert_close

B, H, NQ, NK, D = 2, 3, 5, 7, 8
NEG = float("-inf")


def _qkv(dtype=torch.float64, nq=NQ):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, dtype=dtype, generator=generator) for n in (nq, NK, NK)]


def _compare(mask, dtype=torch.float64, **kwargs):
    """Ours vs sdpa, forward and the gradients of q, k, v (and of a float mask); returns the op's kwargs."""
    tol = TOLERANCE[dtype]
    runs = []
    for _ in range(2):
        leaves = [t.requires_grad_() for t in _qkv(dtype)]
        m = mask
        if mask is not None and mask.is_floating_point():
            m = mask.detach().clone().requires_grad_()
        runs.append((leaves, m))
    expected = F.scaled_dot_product_attention(*runs[0][0], attn_mask=runs[0][1], **kwargs)
    with mock.patch.object(sdpa_module.ops, "attention", wraps=sdpa_module.ops.attention) as spy:
        actual = attention_like_sdpa(*runs[1][0], attn_mask=runs[1][1], **kwargs)
    assert not isinstance(actual, str), actual
    assert_close(actual, expected, tol)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    for name, a, b in zip("qkv", runs[1][0], runs[0][0], strict=True):
        assert_close(a.grad, b.grad, tol, f"d{name}")
    if runs[0][1] is not None and runs[0][1].is_floating_point():
        assert_close(runs[1][1].grad, runs[0][1].grad, tol, "d attn_mask")
    return spy.call_args.kwargs


@pytest.mark.parametrize(
    "shape", [(NQ, NK), (B, 1, NQ, NK), (1, H, NQ, NK), (B, H, NQ, NK), (H, NQ, NK), (B, 1, 1, NK)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_masks_run_as_a_bias_with_their_gradient(shape, dtype):
    mask = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    mask[..., 0, 2] = NEG
    call = _compare(mask, dtype)
    assert call["attn_bias"] is not None and call["key_padding_mask"] is None and not call["causal"]


@pytest.mark.parametrize("shape", [(NQ, NK), (B, H, NQ, NK), (1, 1, NQ, 1)], ids=str)
def test_bool_masks_that_are_not_structure_run_as_a_bias(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.7  # True = take part
    mask[..., 0] = True
    call = _compare(mask)
    assert torch.equal(torch.isneginf(call["attn_bias"]), ~mask.expand_as(call["attn_bias"]))


def test_a_padding_mask_stays_structure():
    keep = torch.ones(B, 1, 1, NK, dtype=torch.bool)
    keep[1, ..., 4:] = False
    call = _compare(keep)
    assert call["attn_bias"] is None and torch.equal(call["key_padding_mask"], ~keep[:, 0, 0])


def test_a_learned_mask_is_never_read_back():
    mask = torch.randn(1, H, NQ, NK, dtype=torch.float64)
    with mock.patch.object(masks, "recognise", side_effect=AssertionError("a learned bias was read back")):
        call = _compare(mask)
    assert call["attn_bias"].requires_grad


def test_dropout_runs_fused():
    q, k, v = _qkv()
    torch.manual_seed(3)
    first = attention_like_sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    assert torch.equal(attention_like_sdpa(q, k, v, dropout_p=0.4), first)
    assert not torch.allclose(first, attention_like_sdpa(q, k, v, dropout_p=0.4))
    assert not torch.allclose(first, attention_like_sdpa(q, k, v))
    _compare(None, dropout_p=1.0)  # everything dropped: exactly sdpa's zeros
    _compare(None, dropout_p=0.0, is_causal=False)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(attn_mask=torch.zeros(NQ, NK, dtype=torch.float16)), "dtype torch.float16"),
        (dict(attn_mask=torch.zeros(NQ, NK, dtype=torch.int64)), "not a bool or float tensor"),
        (dict(attn_mask=torch.zeros(4, 1, NQ, NK)), "does not broadcast to (2, 3, ...)"),
        (dict(attn_mask=torch.zeros(NQ + 1, NK)), "for 5 queries and 7 keys"),
        (dict(dropout_p=1.5), "dropout_p of 1.5"),
        (dict(attn_mask=torch.zeros(NQ, NK), is_causal=True), "together with is_causal"),
    ],
    ids=["dtype", "int-mask", "batch", "shape", "dropout", "mask+causal"],
)
def test_what_does_not_map_says_why(kwargs, reason):
    out = attention_like_sdpa(*_qkv(), **kwargs)
    assert isinstance(out, str) and reason in out


def test_the_mode_tallies_biases_and_dropout_as_fused():
    tally = Tally("test")
    q, k, v = _qkv()
    with SdpaOnMome(tally):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(NQ, NK, dtype=torch.float64), dropout_p=0.1)
        with pytest.raises(RuntimeError, match="attn_mask dtype"):  # sdpa's own error, on the fallback
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(NQ, NK, dtype=torch.float16))
    assert tally.fused == 1 and list(tally.fallbacks) == [
        "attn_mask of dtype torch.float16 with q of dtype torch.float64"
    ]
