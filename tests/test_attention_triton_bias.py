"""The Triton attention launchers with an additive bias (and its gradient) and in-kernel dropout, against the float64
reference launchers: out, lse, dq, dk, dv and dbias, for every bias broadcast shape, each mask kind, -inf entries,
rows that see nothing, a bias dtype other than q's, NaN behind a -inf bias, and dropout's mask bit for bit.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors with the GPU's launch plans (the sm_90 one, TMA included,
through a monkeypatched target), so shapes stay small and odd.
"""

import math

import pytest
import torch

from mome.ops.attention import AttentionDropout, AttentionMasks
from mome.reference import attention as reference
from mome.reference import dropout as reference_dropout
from tests.helpers import TOLERANCE, assert_close

triton_attention = pytest.importorskip("mome.kernels.attention")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter
    pytest.mark.usefixtures("poisoned_allocations"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2e-2}
SCALE = 0.17


def make_inputs(batch, heads, kv_heads, nq, nk, dim, dtype, bias_planes, bias_dtype, mask, seed=0):
    """q, k, v, dout, a bias of ``bias_planes + (Nq, Nk)`` with -inf entries (one query row of every plane sees
    nothing through the bias, plus scattered pairs), and the masks of ``mask``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, nk, dim, generator=gen) for _ in range(2))
    dout = torch.randn(batch, heads, nq, dim, generator=gen)
    bias = None
    if bias_planes is not None:
        bias = 2 * torch.randn(*bias_planes, nq, nk, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) < 0.1] = float("-inf")
        bias[..., nq // 2, :] = float("-inf")  # a row hidden by the bias alone
    masks = dict(causal=mask in ("causal", "prefix"))
    if mask in ("padding", "prefix"):
        masks["key_padding_mask"] = torch.rand(batch, nk, generator=gen) < 0.3
    if mask == "prefix":
        masks["prefix_len"] = torch.randint(0, nk + 1, (batch,), generator=gen)
    if mask == "modality":
        masks["modality"] = torch.randint(0, 3, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])
    tensors = [t.to(DEVICE, dtype) for t in (q, k, v, dout)]
    bias = None if bias is None else bias.to(DEVICE, bias_dtype)
    return tensors, bias, AttentionMasks(**{n: m.to(DEVICE) if torch.is_tensor(m) else m for n, m in masks.items()})


def dropout_of(p, seed=2024):
    return None if p is None else AttentionDropout(p, torch.tensor([seed], dtype=torch.int64, device=DEVICE))


def run_triton(tensors, bias, masks, dropout, bias_grad=True):
    q, k, v, dout = tensors
    out, lse = triton_attention.attention_fwd(q, k, v, masks, SCALE, bias, dropout)
    grads = triton_attention.attention_bwd(dout, q, k, v, out, lse, masks, SCALE, bias, dropout,
                                           bias_grad and bias is not None)  # fmt: skip
    return out, lse, grads


def run_reference(tensors, bias, masks, dropout):
    q, k, v, dout = (t.double() for t in tensors)
    bias = None if bias is None else bias.double()
    out, lse = reference.attention_fwd(q, k, v, masks, SCALE, bias, dropout)
    grads = reference.attention_bwd(dout, q, k, v, out, lse, masks, SCALE, bias, dropout, bias is not None)
    return out, lse, grads


def check(tensors, bias, masks, dropout=None):
    dtype = tensors[0].dtype
    out, lse, (dq, dk, dv, dbias) = run_triton(tensors, bias, masks, dropout)
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv, ref_dbias) = run_reference(tensors, bias, masks, dropout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, TOLERANCE[dtype], "out")
    hidden = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), hidden), "lse is -inf exactly where a row sees nothing"
    assert_close(lse[~hidden], ref_lse[~hidden], 1e-5, "lse")
    for name, actual, expected in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert actual.dtype == dtype
        assert_close(actual, expected, GRAD_TOLERANCE[dtype], name)
    if bias is None:
        assert dbias is None
    else:
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape
        # computed from q's dtype, stored in the bias's: the looser of the two bounds
        assert_close(dbias, ref_dbias, max(GRAD_TOLERANCE[dtype], GRAD_TOLERANCE[bias.dtype]), "dbias")
    return out, lse, (dq, dk, dv, dbias)


# name: (batch, heads, kv_heads, nq, nk, dim, bias planes (B|1, H|1), mask)
CASES = {
    "shared_bias_no_mask": (2, 2, 2, 19, 37, 32, (1, 1), "none"),
    "per_head_causal_gqa": (2, 4, 2, 33, 33, 32, (1, 4), "causal"),
    "per_batch_padding": (3, 2, 1, 21, 45, 16, (3, 1), "padding"),
    "per_batch_head_modality_aligned_rows": (2, 2, 2, 27, 48, 64, (2, 2), "modality"),  # Nk: no padded copy
    "per_head_prefix_padding_cross": (2, 2, 1, 17, 70, 32, (1, 2), "prefix"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CASES)
def test_bias_matches_reference(name, dtype):
    *sizes, planes, mask = CASES[name]
    tensors, bias, masks = make_inputs(*sizes, dtype, planes, dtype, mask)
    out, lse, (dq, _dk, _dv, _dbias) = check(tensors, bias, masks)
    row = sizes[3] // 2  # hidden by the bias in every plane: zeros and zero gradients, not NaN
    assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
    assert torch.equal(dq[:, :, row], torch.zeros_like(dq[:, :, row]))
    assert torch.isneginf(lse[:, :, row]).all()


@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_bias_dtype_other_than_q(dtype, bias_dtype):
    tensors, bias, masks = make_inputs(2, 2, 1, 23, 41, 32, dtype, (1, 2), bias_dtype, "causal")
    check(tensors, bias, masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_dropout_padding_together(dtype):
    tensors, bias, masks = make_inputs(2, 2, 1, 29, 51, 32, dtype, (2, 1), dtype, "padding", seed=3)
    _out, _lse, (*_grads, dbias) = check(tensors, bias, masks, dropout_of(0.35))
    again = run_triton(tensors, bias, masks, dropout_of(0.35))[2][3]
    assert torch.equal(dbias, again), "dBias sums its broadcast pairs in a fixed order: bitwise repeatable"


@pytest.mark.parametrize("mask", ["none", "causal"])
def test_dropout_without_bias_matches_reference(mask):
    tensors, _bias, masks = make_inputs(2, 2, 2, 31, 43, 16, torch.float32, None, None, mask, seed=4)
    check(tensors, None, masks, dropout_of(0.2, seed=-77))


# (multiprocessors, which sm_90 variant): none makes every grid "big enough"; a huge count makes every grid small.
HOPPER_TARGETS = {"128-row tiles, 8 warps": 0, "64-row tiles, 4 warps": 10**6}


@pytest.mark.parametrize("target", HOPPER_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_sm90_plan_with_bias_and_dropout(monkeypatch, dtype, target):
    monkeypatch.setattr(triton_attention, "target", lambda device: (90, HOPPER_TARGETS[target]))
    tensors, bias, masks = make_inputs(2, 2, 1, 70, 70, 32, dtype, (1, 2), dtype, "prefix", seed=5)
    assert triton_attention._shape(*tensors[:3]).use_tma
    check(tensors, bias, masks, dropout_of(0.25))


def test_nan_at_keys_hidden_only_by_the_bias_reaches_nothing():
    tensors, bias, masks = make_inputs(2, 2, 1, 40, 50, 32, torch.float32, (1, 2), torch.float32, "none", seed=6)
    q, k, v, dout = tensors
    hidden_keys = [3, 17, 49]
    bias[..., hidden_keys] = float("-inf")
    k[:, :, hidden_keys[:2]] = float("nan")
    v[:, :, hidden_keys[1:]] = float("nan")
    out, _lse, grads = check((q, k, v, dout), bias, masks)
    for name, value in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), strict=True):
        assert not value.isnan().any(), f"a NaN behind a -inf bias reached {name}"


def test_dropout_mask_is_the_reference_mask_bit_for_bit():
    """With q = 0 every visible key gets P = 1/Nk, and V = the identity puts key j's weight in output column j:
    out[.., i, j] = keep(i, j) · keep_scale / Nk, the kernel's mask read back exactly."""
    batch, heads, nq, nk, dim, p = 2, 3, 45, 61, 64, 0.3
    q = torch.zeros(batch, heads, nq, dim, device=DEVICE)
    v = torch.eye(nk, dim, device=DEVICE).expand(batch, heads, nk, dim).contiguous()
    seed = torch.tensor([987654321123], dtype=torch.int64, device=DEVICE)
    out, _ = triton_attention.attention_fwd(q, torch.randn_like(v), v, AttentionMasks(), 0.0, None,
                                            AttentionDropout(p, seed))  # fmt: skip
    kept = out[..., :nk] > 0
    assert torch.equal(kept, reference_dropout.attention_keep(seed, batch, heads, nq, nk, p))
    weight = reference_dropout.keep_scale(p) / nk  # 1 / (1 - p rounded to 2^-16) over Nk
    assert_close(out[..., :nk][kept], torch.full_like(out[..., :nk][kept], weight), 1e-6, "kept weight")
    elements = kept.numel()
    bound = 5 * math.sqrt(p * (1 - p) / elements)  # five binomial standard deviations
    assert abs(kept.float().mean().item() - (1 - p)) < bound


def test_dropout_p0_is_no_dropout_and_p1_gives_zeros():
    tensors, bias, masks = make_inputs(1, 2, 2, 25, 33, 32, torch.float32, (1, 2), torch.float32, "causal", seed=8)
    plain = run_triton(tensors, bias, masks, None)
    zero = run_triton(tensors, bias, masks, dropout_of(0.0))
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, a, b in zip(names, (*plain[:2], *plain[2]), (*zero[:2], *zero[2]), strict=True):
        assert torch.equal(a, b), f"p = 0 changed {name}"
    out, lse, grads = run_triton(tensors, bias, masks, dropout_of(1.0))
    assert torch.equal(lse, plain[1]), "the softmax statistics are those of the undropped probabilities"
    for name, value in zip(("out", "dq", "dk", "dv", "dbias"), (out, *grads), strict=True):
        assert torch.equal(value, torch.zeros_like(value)), f"p = 1 left {name} nonzero"


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.999999, 1.0])
def test_threshold_and_scale_match_the_reference(p):
    assert triton_attention.dropout_threshold(p) == reference_dropout.threshold(p)
    assert triton_attention.dropout_keep_scale(p) == reference_dropout.keep_scale(p)


def test_plans_name_bias_and_dropout_and_plan_dbias_only_when_asked():
    shape = triton_attention.Shape(4, 12, 12, 237, 237, 64, torch.bfloat16, 90, 132, bias_planes=(1, 12))
    flags = triton_attention.GATE_MASKS["padding_bias_dropout"]
    forward = triton_attention.forward_plan(shape, flags, 0.125)
    assert not forward["fwd"].constexprs["SCALE_FMA"], "the bias comes after the scale: no scale in the max's FMA"
    assert "fwd_safe" in forward, "a -inf bias can hide a real key in any tile"
    assert "_kbd_" in triton_attention.launch_tag(forward["fwd"], "bf16")
    assert "dbias" not in triton_attention.backward_plan(shape, flags)
    dbias = triton_attention.backward_plan(shape, flags, bias_grad=True)["dbias"]
    assert dbias.constexprs["BATCH_BROADCAST"] and not dbias.constexprs["HEAD_BROADCAST"]
    tiles = math.ceil(237 / dbias.constexprs["BLOCK_M"]) * math.ceil(237 / dbias.constexprs["BLOCK_N"])
    assert dbias.grid == (tiles, 12)


def test_a_bias_of_the_wrong_shape_is_refused_by_name():
    tensors, bias, masks = make_inputs(2, 2, 2, 9, 11, 16, torch.float32, (1, 2), torch.float32, "none")
    q, k, v, _ = tensors
    expected = r"bias must be a contiguous \(1\|2, 1\|2, Nq=9, Nk=11\) tensor, got shape \(1, 2, 5, 11\)"
    with pytest.raises(ValueError, match=expected):
        triton_attention.attention_fwd(q, k, v, masks, SCALE, bias[:, :, :5], None)
