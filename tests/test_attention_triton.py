"""mome.ops.attention on the Triton backend vs the float64 reference: output, log-sum-exp and every gradient.

Under TRITON_INTERPRET=1 (no GPU) the kernels run on CPU tensors with the launch configurations of the GPU, so
shapes stay small. The interpreter computes bf16 arithmetic wrongly, so there the kernels widen bf16 tiles to fp32;
bf16 tensor-core numerics are checked by the `gpu` tests.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mome.ops import BackendUnavailableError, attention
from mome.ops.attention import AttentionMasks
from mome.reference import attention_ref
from mome.reference.attention import attention_fwd as reference_fwd
from tests.helpers import TOLERANCE, assert_close

triton_attention = pytest.importorskip("mome.kernels.attention")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),  # interpreter
    pytest.mark.usefixtures("poisoned_allocations"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The backward rounds P and dS to the input dtype before its matmuls. fp16 gradients measure ~3e-4 (interpreter),
# well inside the fp16 bound; bf16 (8-bit mantissa, not yet measured on a GPU) gets twice the forward's bound.
GRAD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2e-2}


def make_case(batch, heads, kv_heads, nq, nk, dim, dtype, *, causal=False, padding=None, prefix=None, modality=None,
              seed=0):  # fmt: skip
    """Random q/k/v and masks. padding: 'ragged' (suffix per batch, the last batch element fully padded) or
    'random'; prefix: a list of per-batch lengths; modality: 'split' (image then text, VLMo-style visibility)
    or 'interleaved' (random ids among 3 modalities)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen) for h, n in ((heads, nq), (kv_heads, nk), (kv_heads, nk)))
    masks = dict(causal=causal)
    if padding == "ragged":
        lengths = torch.randint(1, nk + 1, (batch,), generator=gen)
        lengths[-1] = 0
        masks["key_padding_mask"] = torch.arange(nk)[None, :] >= lengths[:, None]
    elif padding == "random":
        masks["key_padding_mask"] = torch.rand(batch, nk, generator=gen) < 0.4
    if prefix is not None:
        masks["prefix_len"] = torch.tensor(prefix)
    if modality == "split":  # image tokens see images; text tokens see images and text (modality 0 = vision)
        image_tokens = torch.randint(0, nk + 1, (batch, 1), generator=gen)
        masks["modality"] = (torch.arange(nk)[None, :] >= image_tokens).long()
        masks["modality_mask"] = torch.tensor([[True, False], [True, True]])
    elif modality == "interleaved":
        masks["modality"] = torch.randint(0, 3, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])
    on_device = {name: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for name, m in masks.items()}
    return [t.to(DEVICE, dtype) for t in (q, k, v)], on_device


def check_against_reference(tensors, masks, dtype, seed=1):
    q, k, v = (t.detach().requires_grad_() for t in tensors)
    out = attention(q, k, v, backend="triton", **masks)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in tensors)
    ref_masks = dict(masks)
    if "prefix_len" in ref_masks:
        ref_masks["prefix_len"] = ref_masks["prefix_len"].long()
    expected = attention_ref(q64, k64, v64, **ref_masks)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), dout.double())

    assert out.dtype == dtype
    assert_close(out, expected, TOLERANCE[dtype], "out")
    for name, actual, wanted in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads, strict=True):
        assert_close(actual, wanted, GRAD_TOLERANCE[dtype], name)
    return out, (dq, dk, dv)


INTERPRETER_DTYPES = [torch.float32, torch.float16]

CASES = {
    # name: (batch, heads, kv_heads, nq, nk, dim, mask options)
    "single_token": (2, 2, 1, 1, 1, 32, {}),
    "n17_d80": (1, 2, 2, 17, 17, 80, {}),
    "n250_d64": (1, 2, 1, 250, 250, 64, {}),
    "cross_nq17_nk64_d128": (1, 2, 2, 17, 64, 128, {}),
    "causal_n64_d128_gqa": (1, 4, 2, 64, 64, 128, dict(causal=True)),
    "causal_nq17_nk237": (1, 2, 2, 17, 237, 64, dict(causal=True)),
    "causal_nq40_nk20_rows_see_nothing": (1, 2, 1, 40, 20, 32, dict(causal=True)),
    "padding_ragged_n237": (3, 1, 1, 237, 237, 64, dict(padding="ragged")),
    "padding_random_n17": (2, 2, 2, 17, 17, 32, dict(padding="random")),
    "prefix_lm_197_40": (2, 1, 1, 237, 237, 64, dict(causal=True, prefix=[197, 30])),
    "prefix_lm_n64_gqa": (2, 4, 1, 64, 64, 32, dict(causal=True, prefix=[0, 100])),
    "modality_split_n250": (2, 1, 1, 250, 250, 64, dict(modality="split")),
    "modality_interleaved_n17": (2, 2, 1, 17, 17, 80, dict(modality="interleaved")),
    "prefix_padding_modality_gqa": (
        2,
        2,
        1,
        64,
        81,
        32,
        dict(causal=True, prefix=[20, 81], padding="random", modality="interleaved"),
    ),  # fmt: skip
    "causal_padding_n64": (2, 2, 2, 64, 64, 64, dict(causal=True, padding="ragged")),
}
# fp32 (smaller tiles, more interpreter steps) on the shapes up to 81 tokens; fp16 on all of them.
FP32_CASES = [name for name, case in CASES.items() if max(case[3], case[4]) <= 81]


# bf16 under the interpreter checks the plumbing (the kernels widen bf16 tiles to fp32 there); its rounding in the
# tensor-core matmuls is checked by the GPU tests below.
BF16_CASES = ["causal_n64_d128_gqa", "prefix_padding_modality_gqa", "n17_d80"]


@pytest.mark.parametrize(
    "name, dtype",
    [(name, torch.float16) for name in CASES]
    + [(name, torch.float32) for name in FP32_CASES]
    + [(name, torch.bfloat16) for name in BF16_CASES],
)
def test_matches_reference(name, dtype):
    batch, heads, kv_heads, nq, nk, dim, options = CASES[name]
    tensors, masks = make_case(batch, heads, kv_heads, nq, nk, dim, dtype, **options)
    check_against_reference(tensors, masks, dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_rows_that_see_nothing_get_zeros_and_zero_gradient(dtype):
    tensors, masks = make_case(2, 2, 2, 33, 33, 32, dtype, causal=True, padding="ragged")
    masks["key_padding_mask"][0, :] = False
    masks["key_padding_mask"][0, :5] = True  # batch 0: queries 0..4 see only padded keys
    out, (dq, dk, dv) = check_against_reference(tensors, masks, dtype)
    for name, rows in (("out", out[0, :, :5]), ("dq", dq[0, :, :5]), ("out", out[1]), ("dq", dq[1])):
        assert torch.equal(rows, torch.zeros_like(rows)), f"{name} of a query that sees no key is not 0"
    for name, grad in (("dk", dk), ("dv", dv)):
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), f"{name} of a fully padded sequence is not 0"
        assert torch.equal(grad[0, :, :5], torch.zeros_like(grad[0, :, :5])), f"{name} of padded keys is not 0"


@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_is_natural_log_and_minus_inf_when_nothing_is_visible(causal):
    (q, k, v), masks = make_case(2, 2, 1, 40, 20, 64, torch.float32, causal=causal, padding="ragged")
    bundle = AttentionMasks(**masks)
    _, lse = triton_attention.attention_fwd(q, k, v, bundle, 0.3, None, None)
    _, expected = reference_fwd(q.double(), k.double(), v.double(), bundle, 0.3, None, None)
    hidden = torch.isneginf(expected)
    assert hidden.any() and torch.equal(torch.isneginf(lse), hidden.to(lse.device))
    assert_close(lse[~hidden], expected[~hidden], 1e-5, "lse")


def test_scale_and_empty_key_sequence():
    (q, k, v), _ = make_case(1, 2, 2, 17, 17, 64, torch.float32)
    assert_close(attention(q, k, v, scale=0.05, backend="triton"), attention_ref(q, k, v, scale=0.05), 1e-5)
    out = attention(q, k[:, :, :0], v[:, :, :0], backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("scale", [-0.3, float("inf")])
def test_a_scale_that_is_not_positive_and_finite_takes_the_plain_product(scale):
    (q, k, v), masks = make_case(1, 2, 2, 40, 70, 32, torch.float32, causal=True, padding="random")
    out = attention(q, k, v, scale=scale, backend="triton", **masks)
    expected = attention_ref(q.double(), k.double(), v.double(), scale=scale, **masks)
    assert torch.equal(torch.isnan(out), torch.isnan(expected).to(out.device))
    finite = ~torch.isnan(expected)
    assert_close(out[finite], expected[finite], 1e-5, "out")


# (multiprocessors, which sm_90 variant): none at all makes every grid "big enough"; a huge count makes every grid
# too small, so the 64-row variants run.
HOPPER_TARGETS = {"128-row tiles, 8 warps": 0, "64-row tiles, 4 warps": 10**6}


@pytest.mark.parametrize("target", HOPPER_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "name", ["causal_padding_n64", "prefix_padding_modality_gqa", "cross_nq17_nk64_d128", "modality_split_n250"]
)
def test_the_sm90_plan_matches_reference(monkeypatch, name, dtype, target):
    """The sm_90 launch plan (tensor descriptors, 128-row or 64-row tiles) run by the interpreter."""
    monkeypatch.setattr(triton_attention, "target", lambda device: (90, HOPPER_TARGETS[target]))
    batch, heads, kv_heads, nq, nk, dim, options = CASES[name]
    tensors, masks = make_case(batch, heads, kv_heads, nq, nk, dim, dtype, **options)
    shape = triton_attention._shape(*tensors)
    assert shape.use_tma and shape.arch == 90
    check_against_reference(tensors, masks, dtype)


def test_visible_keys_only_in_partial_tiles():
    """Every key tile holds a padded key, so no tile is full: the whole result comes from the masked loop."""
    (q, k, v), masks = make_case(2, 2, 1, 70, 150, 64, torch.float16)
    masks["key_padding_mask"] = (torch.arange(150) % 7 == 3).expand(2, -1).contiguous().to(DEVICE)
    pointers, flags = triton_attention._mask_arguments(q, AttentionMasks(**masks))
    shape = triton_attention._shape(q, k)
    plan = triton_attention.forward_plan(shape, dict(flags, HAS_BIAS=False, HAS_DROPOUT=False), 0.125)
    _full, _partial, counts = triton_attention._run_schedule(plan["schedule"], pointers, q.device, shape)
    assert counts[..., 0].sum() == 0 and (counts[..., 1] > 0).all()
    check_against_reference((q, k, v), masks, torch.float16)


def test_declines_what_it_cannot_run_with_a_reason():
    (q, k, v), _ = make_case(1, 1, 1, 4, 4, 16, torch.float64)
    with pytest.raises(BackendUnavailableError, match="got float64; the reference( and native)? backends? can"):
        attention(q, k, v, backend="triton")
    (q, k, v), _ = make_case(1, 1, 1, 4, 4, 160, torch.float32)
    with pytest.raises(BackendUnavailableError, match=r"head_dim \(D, the last dim of q\) in \[1, 128\], got 160"):
        attention(q, k, v, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_matches_reference_on_gpu(name):
    batch, heads, kv_heads, nq, nk, dim, options = CASES[name]
    tensors, masks = make_case(batch, heads, kv_heads, nq, nk, dim, torch.bfloat16, **options)
    check_against_reference(tensors, masks, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, causal", [(torch.float16, False), (torch.bfloat16, True)])
def test_long_sequence_on_gpu(dtype, causal):
    tensors, masks = make_case(2, 4, 2, 1000, 1000, 128, dtype, causal=causal, padding="ragged")
    check_against_reference(tensors, masks, dtype)


def test_aot_compiles_for_sm80_and_sm90():
    """One variant with every mask, compiled with the interpreter off (the suite-wide AOT check compiles them all)."""
    script = textwrap.dedent(
        """
        from mome.kernels import attention
        from mome.kernels.aot import compile_spec
        for spec in attention.AOT_SPECS:
            if spec.name.startswith("attention_fwd_bf16_d64_ckpm_"):
                for arch, shared_limit in ((80, 163 * 1024), (90, 227 * 1024)):
                    row = compile_spec(spec, arch)
                    assert row["shared_bytes"] <= shared_limit, row
                    print(row)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared_bytes") == 2, result.stdout
