"""mome.ops.attention: the same cases on every backend that loads here, generated from their declared limits.

The expected values come from a dense float64 formula written here (not mome.reference), so the reference
backend is tested like any other. A backend that appears (CUDA on a GPU, a new kernel) is tested the day it
loads, in every dtype it declares.
"""

from __future__ import annotations

import pytest
import torch

from mome.ops import BackendUnavailableError, attention
from mome.ops.attention import BACKENDS, AttentionMasks
from tests.helpers import TOLERANCE, assert_close, declared_dtypes, declared_range, usable_backends

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND_DTYPES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in usable_backends(BACKENDS, DEVICE)
    for dtype in declared_dtypes(BACKENDS, backend, DEVICE)
]
GRAD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2e-2}

# name -> (B, H, Hkv, Nq, Nk, D, masks): sizes that are not multiples of any tile
CASES = {
    "plain": (2, 2, 2, 17, 23, 16, {}),
    "gqa_causal_nq_lt_nk": (1, 4, 2, 9, 30, 24, {"causal": True}),
    "ragged_padding": (3, 2, 1, 20, 20, 16, {"padding": [20, 7, 0]}),
    "prefix_lm": (2, 2, 2, 26, 26, 16, {"causal": True, "prefix": [5, 26]}),
    "modality_blocks": (2, 2, 2, 21, 21, 8, {"modality": True}),
    "everything": (2, 2, 1, 19, 19, 16, {"causal": True, "padding": [19, 11], "prefix": [3, 0], "modality": True}),
}


def _masks(batch: int, nq: int, nk: int, spec: dict, gen: torch.Generator) -> dict:
    masks = {"causal": spec.get("causal", False)}
    if "padding" in spec:
        masks["key_padding_mask"] = torch.arange(nk)[None, :] >= torch.tensor(spec["padding"])[:, None]
    if "prefix" in spec:
        masks["prefix_len"] = torch.tensor(spec["prefix"])
    if spec.get("modality"):
        masks["modality"] = torch.randint(0, 3, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    return masks


def _visible(batch: int, nq: int, nk: int, masks: dict) -> torch.Tensor:
    """(B, Nq, Nk): query i (absolute position i + Nk - Nq) sees key j."""
    rows = torch.arange(nq)[:, None] + (nk - nq)
    cols = torch.arange(nk)[None, :]
    seen = torch.ones(batch, nq, nk, dtype=torch.bool)
    if masks["causal"]:
        allowed = (cols <= rows)[None].expand(batch, nq, nk)
        if "prefix_len" in masks:
            allowed = allowed | (cols[None] < masks["prefix_len"][:, None, None])
        seen &= allowed
    if "key_padding_mask" in masks:
        seen &= ~masks["key_padding_mask"][:, None, :]
    if "modality" in masks:
        ids, table = masks["modality"], masks["modality_mask"]
        for b in range(batch):
            seen[b] &= table[ids[b, nk - nq :]][:, ids[b]]
    return seen


def _expected(q, k, v, masks, scale):
    """Dense float64 attention; a query that sees nothing gets 0."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    seen = _visible(q.shape[0], q.shape[2], k.shape[2], masks)[:, None]
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_and_gradients_against_a_dense_formula(backend, dtype, case):
    batch, heads, kv_heads, nq, nk, dim, spec = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen) for h, n in ((heads, nq), (kv_heads, nk), (kv_heads, nk)))
    masks = _masks(batch, nq, nk, spec, gen)
    scale = 0.7 / dim**0.5
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    on_device = {name: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for name, m in masks.items()}
    out = attention(*leaves, **on_device, scale=scale, backend=backend)
    reference_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    expected = _expected(*reference_leaves, masks, scale)
    assert out.dtype == dtype
    assert_close(out.cpu(), expected, TOLERANCE[dtype], "out")
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout.to(DEVICE, dtype))
    expected.backward(dout.double())
    for name, leaf, reference in zip("qkv", leaves, reference_leaves, strict=True):
        assert_close(leaf.grad.cpu(), reference.grad, GRAD_TOLERANCE[dtype], f"d{name}")


@pytest.mark.parametrize("backend", [b for b in usable_backends(BACKENDS, DEVICE) if b != "reference"])
def test_inputs_beyond_a_declared_head_dim_are_declined_and_the_reference_takes_them(backend):
    bounds = declared_range(BACKENDS, backend, "head_dim")
    if bounds is None or bounds[1] is None:
        pytest.skip(f"{backend} declares no upper head_dim bound")  # nothing to exceed: not a hidden failure
    dtype = declared_dtypes(BACKENDS, backend, DEVICE)[0]
    q = torch.randn(1, 1, 3, bounds[1] + 1, device=DEVICE, dtype=dtype)
    with pytest.raises(
        BackendUnavailableError, match=rf"head_dim .* got {bounds[1] + 1}; the reference( and native)? backends? can"
    ):
        attention(q, q, q, backend=backend)
    assert BACKENDS.reason("reference", dict(q=q, masks=AttentionMasks())) is None


def _declines(backend: str, size: str) -> bool:
    bounds = declared_range(BACKENDS, backend, size)
    return bounds is not None and bounds[1] == 0


BIAS_CASES = {  # name -> (case of CASES, bias shape letters: b/1 for the batch dim, h/1 for the head dim)
    "1h_causal": ("gqa_causal_nq_lt_nk", "1h"),
    "b1_padding": ("ragged_padding", "b1"),
    "bh_everything": ("everything", "bh"),
    "11_plain": ("plain", "11"),
}


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("bias_grad", [False, True], ids=["fixed_bias", "learned_bias"])
@pytest.mark.parametrize("bias_case", sorted(BIAS_CASES))
def test_bias_output_and_gradients_against_a_dense_formula(backend, dtype, bias_grad, bias_case):
    case, letters = BIAS_CASES[bias_case]
    batch, heads, kv_heads, nq, nk, dim, spec = CASES[case]
    gen = torch.Generator().manual_seed(len(bias_case))
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen) for h, n in ((heads, nq), (kv_heads, nk), (kv_heads, nk)))
    masks = _masks(batch, nq, nk, spec, gen)
    bias_shape = (batch if letters[0] == "b" else 1, heads if letters[1] == "h" else 1, nq, nk)
    bias = (torch.randn(bias_shape, generator=gen) * 3).masked_fill(torch.rand(bias_shape, generator=gen) < 0.1,
                                                                     float("-inf"))  # fmt: skip
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    bias_leaf = bias.to(DEVICE).requires_grad_(bias_grad)  # fp32 whatever q's dtype
    on_device = {name: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for name, m in masks.items()}
    if bias_grad and _declines(backend, "bias_grad"):
        with pytest.raises(BackendUnavailableError, match="bias_grad"):
            attention(*leaves, **on_device, attn_bias=bias_leaf, backend=backend)
        return
    out = attention(*leaves, **on_device, attn_bias=bias_leaf, scale=0.5, backend=backend)
    reference_leaves = [t.detach().double().cpu().requires_grad_() for t in (*leaves, bias_leaf)]
    group = heads // kv_heads
    rq, rk, rv, rbias = reference_leaves
    rk, rv = (t.repeat_interleave(group, dim=1) for t in (rk, rv))
    seen = _visible(batch, nq, nk, masks)[:, None] & ~torch.isneginf(rbias.detach())
    scores = torch.where(seen, rq @ rk.transpose(-1, -2) * 0.5 + rbias, float("-inf"))
    expected = torch.softmax(scores, dim=-1).nan_to_num(0.0) @ rv
    assert_close(out.cpu(), expected, TOLERANCE[dtype], "out")
    dout = torch.randn(out.shape, generator=gen)
    out.backward(dout.to(DEVICE, dtype))
    expected.backward(dout.double())
    for name, leaf, reference in zip("qkv", leaves, reference_leaves, strict=False):
        assert_close(leaf.grad.cpu(), reference.grad, GRAD_TOLERANCE[dtype], f"d{name}")
    if bias_grad:
        assert bias_leaf.grad.dtype == torch.float32
        tolerance = max(GRAD_TOLERANCE[dtype], TOLERANCE[torch.float32])  # rounded to the bias's own fp32
        assert_close(bias_leaf.grad.cpu(), reference_leaves[3].grad, tolerance, "dbias")


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_dropout_is_the_same_on_every_backend_that_runs_it(backend, dtype):
    batch, heads, kv_heads, nq, nk, dim, spec = CASES["everything"]
    gen = torch.Generator().manual_seed(99)
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen) for h, n in ((heads, nq), (kv_heads, nk), (kv_heads, nk)))
    masks = {name: m.to(DEVICE) if isinstance(m, torch.Tensor) else m for name, m in _masks(batch, nq, nk, spec,
                                                                                           gen).items()}  # fmt: skip
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]

    def run(backend_, inputs):
        generator = torch.Generator(device=DEVICE).manual_seed(1234)
        return attention(*inputs, **masks, dropout_p=0.3, generator=generator, backend=backend_)

    if _declines(backend, "dropout"):
        with pytest.raises(BackendUnavailableError, match="dropout"):
            run(backend, leaves)
        return
    out = run(backend, leaves)
    reference_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expected = run("reference", reference_leaves)
    assert_close(out.double(), expected, TOLERANCE[dtype], "out")
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(dout.to(dtype))
    expected.backward(dout.double())
    for name, leaf, reference in zip("qkv", leaves, reference_leaves, strict=True):
        assert_close(leaf.grad.double(), reference.grad, GRAD_TOLERANCE[dtype], f"d{name}")
