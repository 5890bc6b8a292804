"""mome.nn.MultiheadAttention as a drop-in for torch's, and the MoME self-attentions vs plain torch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mome.nn.attention as attention_module
from mome.nn import MultiheadAttention, MultiwaySelfAttention, SharedSelfAttention, replace_attention
from tests.helpers import TOLERANCE, assert_close

E, HEADS, L, S, B = 24, 4, 7, 9, 3


def _pair(dtype=torch.float64, **kwargs) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, dtype=dtype, **kwargs)
    with torch.no_grad():  # non-zero biases so a swapped bias chunk shows
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = MultiheadAttention(E, HEADS, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(batch_first: bool, kdim=E, vdim=E, tgt=L, src=S, dtype=torch.float64):
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    return (torch.randn(*shape(tgt, E), dtype=dtype), torch.randn(*shape(src, kdim), dtype=dtype),
            torch.randn(*shape(src, vdim), dtype=dtype))  # fmt: skip


def _run_both(theirs, ours, inputs, expect_fused: bool, **kwargs):
    """Forward and backward through both; assert ours matches and whether the fused op ran."""
    tol = TOLERANCE[inputs[0].dtype]
    leaves_theirs = [t.clone().requires_grad_() for t in inputs]
    leaves_ours = [t.clone().requires_grad_() for t in inputs]
    out_theirs, w_theirs = theirs(*leaves_theirs, **kwargs)
    with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
        out_ours, w_ours = ours(*leaves_ours, **kwargs)
    assert spy.called == expect_fused, f"fused op {'not ' if expect_fused else ''}used"
    assert_close(out_ours, out_theirs, tol, "attn_output")
    if w_theirs is None:
        assert w_ours is None
    else:
        assert_close(w_ours, w_theirs, tol, "attn_weights")
    grad = torch.randn_like(out_theirs)
    out_theirs.backward(grad)
    out_ours.backward(grad)
    for index, (a, b) in enumerate(zip(leaves_ours, leaves_theirs, strict=True)):
        assert_close(a.grad, b.grad, tol, f"d input {index}")
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p_ours.grad, p_theirs.grad, tol, f"d {name}")


def test_state_dict_keys_and_round_trip():
    theirs, ours = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_mask_fused_matches_torch(batch_first, dtype):
    theirs, ours = _pair(dtype, batch_first=batch_first)
    _run_both(theirs, ours, _inputs(batch_first, dtype=dtype), True, need_weights=False)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_key_padding_fused_matches_torch(batch_first, mask_kind):
    theirs, ours = _pair(batch_first=batch_first)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 5:] = True
    padding[2, :2] = True
    if mask_kind == "float":
        padding = torch.zeros(B, S, dtype=torch.float64).masked_fill(padding, float("-inf"))
    _run_both(theirs, ours, _inputs(batch_first), True, need_weights=False, key_padding_mask=padding)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "hint"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_causal_masks_fused_match_torch(mask_kind, with_padding):
    theirs, ours = _pair(batch_first=True)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)  # 0 / -inf
    if mask_kind == "bool":
        mask = torch.isneginf(mask)
    padding = None
    if with_padding:
        padding = torch.zeros(B, L, dtype=torch.bool)
        padding[0, 5:] = True
        if mask.is_floating_point():  # torch warns when the two masks' types differ
            padding = torch.zeros(B, L, dtype=torch.float64).masked_fill(padding, float("-inf"))
    kwargs = dict(need_weights=False, attn_mask=mask, is_causal=mask_kind == "hint", key_padding_mask=padding)
    _run_both(theirs, ours, _inputs(True, src=L), True, **kwargs)


def test_need_weights_falls_back_exactly_and_other_masks_run_fused():
    theirs, ours = _pair(batch_first=True)
    inputs = _inputs(True)
    _run_both(theirs, ours, inputs, False, need_weights=True)
    _run_both(theirs, ours, inputs, False, need_weights=True, average_attn_weights=False)
    bias = torch.randn(L, S, dtype=torch.float64)  # arbitrary additive float mask: the op's attn_bias
    _run_both(theirs, ours, inputs, True, need_weights=False, attn_mask=bias)
    per_head = torch.rand(B * HEADS, L, S) < 0.3  # 3-D bool mask
    per_head[..., 0] = False
    _run_both(theirs, ours, inputs, True, need_weights=False, attn_mask=per_head)


def test_separate_kv_dims_no_bias_and_unbatched():
    theirs, ours = _pair(kdim=10, vdim=6, bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _run_both(theirs, ours, _inputs(False, kdim=10, vdim=6), True, need_weights=False)
    theirs, ours = _pair()
    unbatched = tuple(t[:, 0] for t in _inputs(False))
    _run_both(theirs, ours, unbatched, True, need_weights=False)


def test_bias_kv_and_zero_attn_fall_back():
    theirs, ours = _pair(add_bias_kv=True)
    _run_both(theirs, ours, _inputs(False), False, need_weights=False)
    theirs, ours = _pair(add_zero_attn=True)
    _run_both(theirs, ours, _inputs(False), False, need_weights=False)


def test_is_causal_without_mask_raises_like_torch():
    _, ours = _pair()
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(*_inputs(False, src=L), need_weights=False, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_self_attention_matches_vlmo_formula(dtype):
    torch.manual_seed(1)
    attn = SharedSelfAttention(E, HEADS).to(dtype)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(B, S, E, dtype=dtype, requires_grad=True)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, 6:] = True
    out = attn(x, padding)
    # VLMo's Attention.forward, written out
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(B, S, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (E // HEADS) ** -0.5, qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)).masked_fill(padding[:, None, None, :], float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, E))
    assert_close(out, expected, TOLERANCE[dtype])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, attn.qkv.weight, attn.q_bias, attn.v_bias], grad)
    want = torch.autograd.grad(expected, [x, attn.qkv.weight, attn.q_bias, attn.v_bias], grad)
    for name, a, b in zip(["x", "qkv", "q_bias", "v_bias"], got, want, strict=True):
        assert_close(a, b, TOLERANCE[dtype], f"d{name}")


def test_multiway_self_attention_matches_per_expert_projections():
    torch.manual_seed(2)
    attn = MultiwaySelfAttention(E, HEADS, 2, subln=True).double()
    with torch.no_grad():
        attn.inner_attn_ln.weight.normal_()
    x = torch.randn(B, S, E, dtype=torch.float64, requires_grad=True)
    split = 4
    out = attn(x, torch.tensor([0] * split + [1] * (S - split)).expand(B, S))

    def proj(module, t):  # torchscale: split, run A and B, concatenate
        first = F.linear(t[:, :split], module.weight[0], module.bias[0])
        return torch.cat([first, F.linear(t[:, split:], module.weight[1], module.bias[1])], dim=1)

    def heads(t):
        return t.reshape(B, S, HEADS, -1).transpose(1, 2)

    q, k, v = heads(proj(attn.q_proj, x)), heads(proj(attn.k_proj, x)), heads(proj(attn.v_proj, x))
    mixed = ((q @ k.transpose(-2, -1)) * (E // HEADS) ** -0.5).softmax(-1) @ v
    mixed = mixed.transpose(1, 2).reshape(B, S, E)
    ln = attn.inner_attn_ln
    normed = torch.cat(
        [F.layer_norm(mixed[:, :split], (E,), ln.weight[0], ln.bias[0], ln.eps),
         F.layer_norm(mixed[:, split:], (E,), ln.weight[1], ln.bias[1], ln.eps)], dim=1)  # fmt: skip
    expected = proj(attn.out_proj, normed)
    assert_close(out, expected, TOLERANCE[torch.float64])
    grad = torch.randn_like(out)
    params = [x, attn.q_proj.weight, attn.k_proj.bias, attn.inner_attn_ln.weight, attn.out_proj.weight]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad), strict=True):
        assert_close(a, b, TOLERANCE[torch.float64], "gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.float16, 5e-3)])
def test_fused_path_on_gpu_matches_torch_float64(dtype, tol):
    theirs, ours = _pair(torch.float64, batch_first=True)
    ours = ours.to("cuda", dtype)
    query, key, value = _inputs(True)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 6:] = True
    expected, _ = theirs(query, key, value, key_padding_mask=padding, need_weights=False)
    got, _ = ours(
        *(t.to("cuda", dtype) for t in (query, key, value)), key_padding_mask=padding.cuda(), need_weights=False
    )
    assert_close(got.double().cpu(), expected, tol)


def test_replace_attention_in_a_torch_transformer():
    torch.manual_seed(3)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 40, dropout=0.0, batch_first=True), 2)
    model = model.double()
    x = torch.randn(B, S, E, dtype=torch.float64)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[2, 5:] = True
    expected = model(x, src_key_padding_mask=padding)
    assert replace_attention(model) == 2
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.layers)
    with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
        got = model(x, src_key_padding_mask=padding)  # training mode: the layers call self_attn
    assert spy.call_count == 2
    assert_close(got, expected, TOLERANCE[torch.float64])
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiheadAttention.from_torch(nn.Linear(2, 2))
