"""The native backend (``mome/native``: torch's own fused CPU kernels) beyond the cross-backend suites: the mask
structures it hands to the kernel in different ways, the cases it gives to the reference launcher (inputs the
kernel would not compute exactly like the spec), the spec's own random draws, and empty inputs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import mome.reference.attention as reference_attention
import mome.reference.decode as reference_decode
from mome.ops import attention, decode_attention, itc_loss, modality_ffn, modality_layer_norm, modality_linear
from tests.helpers import TOLERANCE, assert_close

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

DTYPES = [torch.float64, torch.float32]

# name -> (B, H, Hkv, Nq, Nk, D, masks): each a different way the masks reach the kernel
ATTENTION_CASES = {
    "causal_square": (2, 4, 4, 19, 19, 12, dict(causal=True)),  # the kernel's own is_causal
    "causal_more_queries": (1, 2, 1, 23, 9, 8, dict(causal=True)),  # queries before the first key see nothing
    "padding_only": (3, 6, 2, 11, 17, 16, dict(padding=[17, 3, 0])),  # a (B, 1, 1, Nk) bias; one batch sees nothing
    "modality_gqa": (2, 4, 1, 13, 13, 7, dict(modality=True, padding=[13, 6])),
}


def _attention_inputs(case: str, dtype: torch.dtype):
    batch, heads, kv_heads, nq, nk, dim, spec = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(batch, heads, nq, dim, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, nk, dim, generator=gen, dtype=dtype) for _ in range(2))
    masks = {"causal": spec.get("causal", False)}
    if "padding" in spec:
        masks["key_padding_mask"] = torch.arange(nk)[None, :] >= torch.tensor(spec["padding"])[:, None]
    if spec.get("modality"):
        masks["modality"] = torch.randint(0, 2, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.tensor([[True, False], [True, True]])
    return [q, k, v], masks


def _step(backend: str, tensors, masks):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = attention(*leaves, **masks, scale=0.6 / tensors[0].shape[-1] ** 0.5, backend=backend)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_equals_the_reference_and_blind_queries_get_exact_zeros(case, dtype):
    tensors, masks = _attention_inputs(case, dtype)
    native, reference = _step("native", tensors, masks), _step("reference", tensors, masks)
    for name, got, want in zip(("out", "dq", "dk", "dv"), native, reference, strict=True):
        assert_close(got, want, TOLERANCE[dtype], name)
    blind = reference[0].abs().amax(dim=-1) == 0  # queries that see no key: the spec's exact zeros
    assert torch.equal(native[0][blind], torch.zeros_like(native[0][blind]))
    assert torch.equal(native[1].abs().amax(dim=-1)[blind], torch.zeros_like(native[1].abs().amax(dim=-1)[blind]))


def _counting(monkeypatch, module, name: str) -> list:
    """Counts the calls of ``module.name`` (a reference launcher) while letting them run; ``wraps`` keeps its
    signature, which the backend contract check reads."""
    calls, launcher = [], getattr(module, name)

    @functools.wraps(launcher)
    def counted(*args):
        calls.append(name)
        return launcher(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


NAN, INF = float("nan"), float("inf")


# (what the hidden keys hold, what their values hold, whether the call goes to the reference launchers)
@pytest.mark.parametrize(
    "key, value, to_reference", [(NAN, NAN, True), (INF, -INF, True), (1e38, 1.0, True), (1e30, 1e30, False)]
)
def test_attention_gives_what_the_kernel_cannot_compute_exactly_to_the_reference(monkeypatch, key, value, to_reference):
    """A NaN, an Inf or a product that overflows (1e38 · q) in a hidden key would poison the kernel's queries
    (NaN + -inf): those calls run the reference launchers, forward and backward. Large keys whose products stay
    finite (1e30) and clean inputs run the kernel, which computes what the spec does."""
    forward = _counting(monkeypatch, reference_attention, "attention_fwd")
    backward = _counting(monkeypatch, reference_attention, "attention_bwd")
    tensors, masks = _attention_inputs("padding_only", torch.float32)
    clean = _step("native", tensors, masks)
    assert not forward and not backward
    tensors[1][1, :, 3:], tensors[2][1, :, 3:] = key, value  # batch 1 sees keys 0-2 only
    poisoned = _step("native", tensors, masks)
    assert bool(forward) == bool(backward) == to_reference
    for name, got, want in zip(("out", "dq"), poisoned[:2], clean[:2], strict=True):  # dk, dv: the poison's own
        assert_close(got, want, 1e-6, name)


def test_decode_equals_the_reference_for_equal_and_mixed_lengths(monkeypatch):
    calls = _counting(monkeypatch, reference_decode, "decode_attention_fwd")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(5, 6, 16, generator=gen, dtype=torch.float64)
    k_cache, v_cache = (torch.randn(5, 3, 21, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    for lengths in ([9, 9, 9, 9, 9], [21, 4, 0, 4, 13], [0, 0, 0, 0, 0]):
        seqlens = torch.tensor(lengths)
        want = decode_attention(q, k_cache, v_cache, seqlens, backend="reference")
        calls.clear()
        got = decode_attention(q, k_cache, v_cache, seqlens, backend="native")
        assert not calls  # finite inputs: SDPA every time
        assert_close(got, want, 1e-12, f"lengths {lengths}")


def test_sampled_hard_negatives_are_the_references_draws():
    gen = torch.Generator().manual_seed(8)
    image, text = (F.normalize(torch.randn(19, 12, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2))
    ids = torch.randint(0, 6, (19,), generator=gen)
    picks = {
        backend: itc_loss(image, text, 8.0, positive_ids=ids, hard_negatives="sample",
                          generator=torch.Generator().manual_seed(3), backend=backend)
        for backend in ("native", "reference")
    }  # fmt: skip
    assert torch.equal(picks["native"].neg_text_idx, picks["reference"].neg_text_idx)
    assert torch.equal(picks["native"].neg_image_idx, picks["reference"].neg_image_idx)
    assert_close(picks["native"].loss, picks["reference"].loss, 1e-12, "loss")


@pytest.mark.parametrize("tokens", [0, 1])
def test_experts_with_no_tokens_or_one(tokens):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 6, generator=gen, dtype=torch.float64)
    ids = torch.full((tokens,), 2)
    w1, w2 = torch.randn(3, 10, 6, generator=gen, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    b1, gamma = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    runs = {
        "linear": lambda x_, b: modality_linear(x_, ids, w1, b1, activation="relu", backend=b),
        "ffn": lambda x_, b: modality_ffn(x_, ids, w1, b1, w2, None, backend=b),
        "layer_norm": lambda x_, b: modality_layer_norm(x_, ids, gamma, None, backend=b),
    }
    for name, run in runs.items():
        results = []
        for backend in ("native", "reference"):
            leaf = x.clone().requires_grad_()
            out = run(leaf, backend)
            out.sum().backward()
            results.append((out.detach(), leaf.grad))
        (out, grad), (want_out, want_grad) = results
        assert out.shape == want_out.shape and grad.shape == x.shape, name
        assert_close(out, want_out, 1e-12, f"{name} out")
        assert_close(grad, want_grad, 1e-12, f"{name} grad")


def test_itc_options_that_native_does_not_declare_go_to_the_reference():
    """mome.ops.itc hands an ITC option only to a backend whose LIMITS name it: native declines them by name."""
    from mome.ops import BackendUnavailableError
    from mome.ops.itc import BACKENDS, ITCOptions

    if "label_smoothing" not in ITCOptions._fields:
        pytest.skip("this ITC op has no label_smoothing option")
    rows = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    inputs = dict(image_rows=rows, image_columns=rows, options=ITCOptions(label_smoothing=0.1))
    assert BACKENDS.choose("auto", inputs)[0] == "reference"
    with pytest.raises(BackendUnavailableError, match="backend 'native' cannot run these inputs: .*label_smoothing"):
        BACKENDS.choose("native", inputs)
