"""mome.nn.MultiheadAttention with float / non-structural masks (the op's attn_bias) and attention dropout, vs torch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import mome.nn.attention as attention_module
import mome.nn.masks as masks
from mome.nn import MultiheadAttention, replace_attention
from mome.reference.dropout import attention_keep, draw_seed, keep_scale
from tests.helpers import TOLERANCE, assert_close

E, HEADS, L, S, B = 24, 4, 7, 9, 3
NEG = float("-inf")


def _pair(dtype=torch.float64, **kwargs) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = MultiheadAttention.from_torch(theirs)
    return theirs, ours


def _inputs(tgt=L, src=S, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, n, E, dtype=dtype, generator=generator) for n in (tgt, src, src))


def _padding(src=S) -> torch.Tensor:
    padding = torch.zeros(B, src, dtype=torch.bool)
    padding[1, src - 3 :] = True
    padding[2, :2] = True
    return padding


def _compare(theirs, ours, inputs, mask_names=(), **kwargs):
    """Forward + backward through both (masks named in ``mask_names`` get gradients too); returns the op's kwargs."""
    tol = TOLERANCE[inputs[0].dtype]
    leaves = [[t.clone().requires_grad_() for t in inputs] for _ in range(2)]
    masks_of = [{n: kwargs[n].detach().clone().requires_grad_() for n in mask_names} for _ in range(2)]
    expected, _ = theirs(*leaves[0], **{**kwargs, **masks_of[0]})
    with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
        actual, weights = ours(*leaves[1], **{**kwargs, **masks_of[1]})
    assert spy.call_count == 1, "the fused op did not run"
    assert weights is None
    assert_close(actual, expected, tol, "attn_output")
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    for index, (a, b) in enumerate(zip(leaves[1], leaves[0], strict=True)):
        assert_close(a.grad, b.grad, tol, f"d input {index}")
    for name in mask_names:
        assert_close(masks_of[1][name].grad, masks_of[0][name].grad, tol, f"d {name}")
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p_ours.grad, p_theirs.grad, tol, f"d {name}")
    return spy.call_args.kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_2d_mask_runs_as_a_bias_with_its_gradient(dtype):
    theirs, ours = _pair(dtype)
    mask = torch.randn(L, S, dtype=dtype)
    mask[2, 3] = NEG
    call = _compare(theirs, ours, _inputs(dtype=dtype), ["attn_mask"], need_weights=False, attn_mask=mask)
    assert call["attn_bias"].shape == (1, 1, L, S) and not call["causal"] and call["key_padding_mask"] is None


def test_float_per_head_mask_is_a_view_not_a_copy():
    theirs, ours = _pair()
    mask = torch.randn(B * HEADS, L, S, dtype=torch.float64)
    mask[5, 1, :] = NEG  # one query of one head sees no key: zero output there, as torch's sdpa path gives
    call = _compare(theirs, ours, _inputs(), ["attn_mask"], need_weights=False, attn_mask=mask)
    ours(*_inputs(), need_weights=False, attn_mask=mask)
    with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
        ours(*_inputs(), need_weights=False, attn_mask=mask)
    bias = spy.call_args.kwargs["attn_bias"]
    assert bias.shape == (B, HEADS, L, S) and bias.data_ptr() == mask.data_ptr() and bias._base is mask
    assert call["attn_bias"].shape == (B, HEADS, L, S)


@pytest.mark.parametrize("per_head", [False, True], ids=["2d", "3d"])
def test_bool_mask_that_is_not_structure_runs_as_a_bias(per_head):
    theirs, ours = _pair()
    shape = (B * HEADS, L, S) if per_head else (L, S)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.4  # True = not allowed (torch's MHA)
    mask[..., 0] = False
    call = _compare(theirs, ours, _inputs(), need_weights=False, attn_mask=mask)
    bias = call["attn_bias"].reshape(shape)
    assert torch.equal(torch.isneginf(bias), mask) and (bias[~mask] == 0).all()


def _causal_padding_per_head(padding, dtype):
    """(B·H, L, L) causal + key padding, as open_clip's CoCa text tower and torch MHA users build it."""
    blocked = torch.ones(L, L, dtype=torch.bool).triu(1) | padding[:, None, :]  # [B, L, L]
    blocked = blocked.repeat_interleave(HEADS, 0)
    return blocked if dtype == torch.bool else torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, NEG)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
def test_per_head_causal_padding_mask_is_recognised_as_structure_once(mask_dtype, monkeypatch):
    theirs, ours = _pair()
    padding = _padding(L)
    mask = _causal_padding_per_head(padding, mask_dtype)
    reads = []
    recognise = masks.recognise
    monkeypatch.setattr(masks, "recognise", lambda *args: reads.append(1) or recognise(*args))
    call = _compare(theirs, ours, _inputs(src=L), need_weights=False, attn_mask=mask)
    assert call["attn_bias"] is None, "a structural mask reached the op as a dense bias"
    assert call["causal"] and torch.equal(call["key_padding_mask"], padding)
    call = _compare(theirs, ours, _inputs(src=L), need_weights=False, attn_mask=mask)  # same tensor: no read
    assert call["attn_bias"] is None and len(reads) == 1


def test_finfo_min_float_mask_is_a_bias_not_structure():
    """torch adds ``finfo.min``: a fully blocked row then averages all values; structure would give 0 there."""
    theirs, ours = _pair()
    mask = torch.zeros(L, S, dtype=torch.float64)
    mask[:, 4:] = torch.finfo(torch.float64).min
    call = _compare(theirs, ours, _inputs(), need_weights=False, attn_mask=mask)
    assert call["attn_bias"] is not None
    mask[3] = torch.finfo(torch.float64).min  # forward only: torch's sdpa backward is off there (x the key count)
    expected, actual = (m(*_inputs(), need_weights=False, attn_mask=mask)[0] for m in (theirs, ours))
    assert_close(actual, expected, TOLERANCE[torch.float64])
    zero_attention = theirs.out_proj.bias.expand(B, E)  # what structure would give the blocked row
    assert not torch.allclose(actual[:, 3], zero_attention)


def test_float_key_padding_bias_alone_and_with_masks():
    theirs, ours = _pair()
    kpm = torch.randn(B, S, dtype=torch.float64)
    kpm[0, 2] = NEG
    call = _compare(theirs, ours, _inputs(), ["key_padding_mask"], need_weights=False, key_padding_mask=kpm)
    assert call["attn_bias"].shape == (B, 1, L, S) and call["key_padding_mask"] is None
    mask = torch.randn(B * HEADS, L, S, dtype=torch.float64)
    call = _compare(theirs, ours, _inputs(), ["attn_mask", "key_padding_mask"], need_weights=False,
                    attn_mask=mask, key_padding_mask=kpm)  # fmt: skip
    assert call["attn_bias"].shape == (B, HEADS, L, S)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    call = _compare(theirs, ours, _inputs(src=L), need_weights=False, attn_mask=causal, key_padding_mask=kpm[:, :L])
    assert call["causal"] and call["attn_bias"].shape == (B, 1, L, L)


def test_learned_mask_gets_its_gradient_in_a_training_step():
    theirs, ours = _pair(torch.float32)
    learned = nn.Parameter(torch.randn(L, S) * 0.5)
    query, key, value = _inputs(dtype=torch.float32)
    with mock.patch.object(masks, "recognise", side_effect=AssertionError("a learned mask was read back")):
        out, _ = ours(query, key, value, attn_mask=learned, need_weights=False)
    out.square().sum().backward()
    expected_out, _ = theirs(query, key, value, attn_mask=learned.detach().requires_grad_(), need_weights=False)
    assert_close(out, expected_out, TOLERANCE[torch.float32])
    reference = learned.detach().clone().requires_grad_()
    theirs(query, key, value, attn_mask=reference, need_weights=False)[0].square().sum().backward()
    assert_close(learned.grad, reference.grad, TOLERANCE[torch.float32], "d attn_mask")


def test_masks_torch_refuses_still_reach_torch():
    _, ours = _pair()
    with pytest.raises(RuntimeError, match="shape of the 2D attn_mask"):
        ours(*_inputs(), need_weights=False, attn_mask=torch.zeros(L, L, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        ours(*_inputs(), need_weights=False, attn_mask=torch.zeros(L, S, dtype=torch.float16))


# --- attention dropout ---


def _dropout_pair(p):
    theirs, ours = _pair(dropout=p)
    return theirs.train(), ours.train()


def test_dropout_runs_fused_in_training_and_not_in_eval():
    _, ours = _dropout_pair(0.3)
    with mock.patch.object(nn.MultiheadAttention, "forward", side_effect=AssertionError("fell back")):
        with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
            ours(*_inputs(), need_weights=False)
            ours.eval()(*_inputs(), need_weights=False)
    assert [c.kwargs["dropout_p"] for c in spy.call_args_list] == [0.3, 0.0]


def test_dropout_in_eval_and_p0_in_training_match_torch_exactly():
    theirs, ours = _dropout_pair(0.4)
    _compare(theirs.eval(), ours.eval(), _inputs(), need_weights=False, key_padding_mask=_padding())
    theirs, ours = _dropout_pair(0.0)
    _compare(theirs, ours, _inputs(), need_weights=False, key_padding_mask=_padding())


def test_dropout_p1_drops_everything_as_torch_does():
    theirs, ours = _dropout_pair(1.0)
    _compare(theirs, ours, _inputs(), need_weights=False)


def test_dropout_follows_the_seed_and_p():
    _, ours = _dropout_pair(0.5)
    inputs = _inputs()

    def run(seed, p=0.5):
        ours.dropout = p
        torch.manual_seed(seed)
        return ours(*inputs, need_weights=False)[0]

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))
    assert not torch.allclose(run(7, 0.2), run(7, 0.5))
    assert not torch.allclose(run(7, 0.2), ours.eval()(*inputs, need_weights=False)[0])


def test_dropout_mask_is_the_specified_one_forward_and_backward():
    """The output with dropout against the formula with mome.reference.dropout's mask for the seed the op draws."""
    p = 0.3
    theirs, ours = _dropout_pair(p)
    query, key, value = (t.requires_grad_() for t in _inputs())
    padding = _padding()
    torch.manual_seed(11)
    out, _ = ours(query, key, value, key_padding_mask=padding, need_weights=False)
    torch.manual_seed(11)
    keep = attention_keep(draw_seed(torch.device("cpu"), None), B, HEADS, L, S, p)
    w_q, w_k, w_v = theirs.in_proj_weight.chunk(3)
    b_q, b_k, b_v = theirs.in_proj_bias.chunk(3)

    def heads(x, w, b):
        return (x @ w.T + b).reshape(B, x.shape[1], HEADS, -1).transpose(1, 2)

    q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
    scores = (q @ k.transpose(-2, -1) * (E // HEADS) ** -0.5).masked_fill(padding[:, None, None, :], NEG)
    probs = scores.softmax(-1) * keep * keep_scale(p)  # 1 / (1 - p rounded to 2^-16)
    expected = theirs.out_proj((probs @ v).transpose(1, 2).reshape(B, L, E))
    assert_close(out, expected, TOLERANCE[torch.float64])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [query, key, value, ours.in_proj_weight], grad)
    want = torch.autograd.grad(expected, [query, key, value, theirs.in_proj_weight], grad)
    for name, a, b in zip(["query", "key", "value", "in_proj_weight"], got, want, strict=True):
        assert_close(a, b, TOLERANCE[torch.float64], f"d {name}")


def test_unbatched_and_sequence_first_layouts_with_biases():
    torch.manual_seed(4)
    theirs = nn.MultiheadAttention(E, HEADS, dtype=torch.float64)
    ours = MultiheadAttention.from_torch(theirs)
    query, key, value = (t[0] for t in _inputs())  # (L, E), (S, E): unbatched
    mask = torch.randn(HEADS, L, S, dtype=torch.float64)
    kpm = torch.randn(S, dtype=torch.float64)
    call = _compare(theirs, ours, (query, key, value), ["attn_mask"], need_weights=False, attn_mask=mask,
                    key_padding_mask=kpm)  # fmt: skip
    assert call["attn_bias"].shape == (1, HEADS, L, S)
    sequence_first = tuple(t.transpose(0, 1) for t in _inputs())  # (L, B, E)
    blocked = torch.rand(B * HEADS, L, S, generator=torch.Generator().manual_seed(5)) < 0.3
    _compare(theirs, ours, sequence_first, need_weights=False, attn_mask=blocked, key_padding_mask=_padding())


def test_causal_hint_with_unequal_lengths_is_left_to_torch():
    theirs, ours = _pair()
    mask = torch.ones(L, S, dtype=torch.bool).triu(1)
    with mock.patch.object(attention_module.ops, "attention") as spy:
        actual = ours(*_inputs(), need_weights=False, attn_mask=mask, is_causal=True)[0]
    assert not spy.called
    assert_close(actual, theirs(*_inputs(), need_weights=False, attn_mask=mask, is_causal=True)[0], 1e-12)


def test_torch_encoder_trains_fused_and_reads_its_masks_once_per_forward(monkeypatch):
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(E, HEADS, 40, dropout=0.2, batch_first=True, dtype=torch.float64)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    assert replace_attention(model) == 2
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    padding = torch.zeros(B, L, dtype=torch.float64).masked_fill(_padding(L), NEG)
    x = torch.randn(B, L, E, dtype=torch.float64)
    reads = []
    recognise = masks.recognise
    monkeypatch.setattr(masks, "recognise", lambda *args: reads.append(1) or recognise(*args))
    with mock.patch.object(nn.MultiheadAttention, "forward", side_effect=AssertionError("fell back")):
        with mock.patch.object(attention_module.ops, "attention", wraps=attention_module.ops.attention) as spy:
            model.train()(x, mask=causal, src_key_padding_mask=padding).sum().backward()
    assert [c.kwargs["dropout_p"] for c in spy.call_args_list] == [0.2, 0.2]
    assert all(c.kwargs["causal"] and c.kwargs["attn_bias"] is None for c in spy.call_args_list)
    assert len(reads) == 1, "the layers share one read of the causal mask"
