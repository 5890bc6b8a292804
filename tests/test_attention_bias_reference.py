"""attn_bias and dropout_p of mome.ops.attention on the reference (and native) backends: against an explicit
per-element formula, gradients by gradcheck, the dropout mask's statistics, and the arguments' errors."""

import math

import pytest
import torch

from mome.ops import attention
from mome.reference.dropout import attention_keep, keep_scale, threshold
from tests.helpers import assert_close
from tests.test_attention_reference import random_case


def naive_biased_attention(q, k, v, bias, *, causal=False, key_padding_mask=None, prefix_len=None, modality=None,
                           modality_mask=None, scale, keep=None, p=0.0):  # fmt: skip
    """Loops over (b, h, i): visibility from the op's docstring, the bias (4-D, broadcast) added to each visible
    score, -inf in the bias hiding the pair, then the kept weights of ``keep`` scaled by ``keep_scale(p)``."""
    batch, heads, nq, _ = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            term = bias[b % bias.shape[0], h % bias.shape[1]]
            for i in range(nq):
                position = i + nk - nq
                visible = []
                for j in range(nk):
                    ok = not (causal and j > position and not (prefix_len is not None and j < prefix_len[b]))
                    ok = ok and not (key_padding_mask is not None and key_padding_mask[b, j])
                    ok = ok and not (modality is not None and not modality_mask[modality[b, position], modality[b, j]])
                    if ok and term[i, j] != -math.inf:
                        visible.append(j)
                if not visible:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] * scale + term[i, j] for j in visible])
                weights = torch.softmax(scores, dim=0)
                if keep is not None:
                    weights = weights * torch.stack([keep[b, h, i, j] for j in visible]) * keep_scale(p)
                out[b, h, i] = sum(w * v[b, kv, j] for w, j in zip(weights, visible, strict=True))
    return out


BIAS_SHAPES = ["11", "1h", "b1", "bh"]
MASK_KINDS = {
    "none": dict(),
    "causal": dict(causal=True),
    "padding": dict(padding=True),
    "prefix": dict(causal=True, prefix=True),
    "modality": dict(padding=True, modalities=3),
}


def _bias(kind: str, batch: int, heads: int, nq: int, nk: int, seed: int, *, neg_inf: float = 0.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch if kind[0] == "b" else 1, heads if kind[1] == "h" else 1, nq, nk)
    bias = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    return bias.masked_fill(torch.rand(shape, generator=gen) < neg_inf, -math.inf)


def _case(mask_kind: str, seed: int, batch=2, heads=4, kv_heads=2, nq=5, nk=7, dim=6):
    options = MASK_KINDS[mask_kind]
    q, k, v, masks = random_case(batch, heads, kv_heads, nq, nk, dim, padding=options.get("padding", False),
                                 prefix=options.get("prefix", False), modalities=options.get("modalities", 0),
                                 seed=seed)  # fmt: skip
    masks["causal"] = options.get("causal", False)
    return q, k, v, masks


@pytest.mark.parametrize("bias_kind", BIAS_SHAPES)
@pytest.mark.parametrize("mask_kind", list(MASK_KINDS))
def test_reference_bias_matches_per_element_formula(bias_kind, mask_kind):
    q, k, v, masks = _case(mask_kind, seed=len(bias_kind) * 7 + len(mask_kind))
    bias = _bias(bias_kind, q.shape[0], q.shape[1], q.shape[2], k.shape[2], seed=3)
    bias[0, 0, 1] = -math.inf  # a query every key of which the bias hides: 0
    out = attention(q, k, v, attn_bias=bias, scale=0.4, backend="reference", **masks)
    expected = naive_biased_attention(q, k, v, bias, scale=0.4, **masks)
    assert_close(out, expected, 1e-12)
    assert torch.equal(out[0, 0, 1], torch.zeros_like(out[0, 0, 1]))


@pytest.mark.parametrize("bias_kind", BIAS_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "modality"])
def test_reference_gradients_pass_gradcheck_for_q_k_v_and_bias(bias_kind, mask_kind):
    q, k, v, masks = _case(mask_kind, seed=11, batch=2, heads=2, kv_heads=1, nq=3, nk=4, dim=3)
    bias = _bias(bias_kind, 2, 2, 3, 4, seed=5, neg_inf=0.15)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]

    def run(q_, k_, v_, bias_):
        return attention(q_, k_, v_, attn_bias=bias_, backend="reference", **masks)

    assert torch.autograd.gradcheck(run, inputs)


def test_a_structurally_hidden_key_stays_hidden_whatever_the_bias_holds():
    q, k, v, masks = _case("padding", seed=2)
    bias = _bias("bh", 2, 4, 5, 7, seed=4, neg_inf=0.0)
    hidden = masks["key_padding_mask"][:, None, :, None]  # [B, 1, Nk, 1]
    k, v = k.masked_fill(hidden, math.nan), v.masked_fill(hidden, math.nan)
    loud = bias.masked_fill(masks["key_padding_mask"][:, None, None, :], math.inf)  # +inf on hidden keys only
    out = attention(q, k, v, attn_bias=loud, backend="reference", **masks)
    expected = naive_biased_attention(q, k.nan_to_num(0), v.nan_to_num(0), bias, scale=6**-0.5, **masks)
    assert_close(out, expected, 1e-12)


def test_a_minus_inf_bias_hides_a_key_whose_values_are_nan():
    q, k, v, masks = _case("none", seed=8)
    bias = _bias("11", 2, 4, 5, 7, seed=9, neg_inf=0.0)
    bias[..., 3] = -math.inf
    k[:, :, 3], v[:, :, 3] = math.nan, math.nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*leaves[:3], attn_bias=leaves[3], backend="reference")
    out.sum().backward()
    for t in (out, *(leaf.grad for leaf in leaves)):
        assert torch.isfinite(t).all()
    assert torch.equal(leaves[3].grad[..., 3], torch.zeros_like(leaves[3].grad[..., 3]))


def test_an_expanded_bias_is_read_once_and_its_gradient_reaches_every_copy():
    q, k, v, _ = _case("none", seed=12)
    table = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    expanded = table.expand(2, 4, 5, 7)
    out = attention(q, k, v, attn_bias=expanded, backend="reference")
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    grad_expanded = table.grad.clone()
    table.grad = None
    (attention(q, k, v, attn_bias=expanded.contiguous(), backend="reference") * weights).sum().backward()
    assert_close(grad_expanded, table.grad, 1e-12, "bias gradient")


def test_bias_of_another_dtype_than_q_is_computed_in_the_compute_dtype():
    q, k, v, _ = _case("causal", seed=13)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    bias = _bias("1h", 2, 4, 5, 7, seed=14).half()
    out = attention(q32, k32, v32, attn_bias=bias, causal=True, backend="reference")
    expected = naive_biased_attention(q, k, v, bias.double(), causal=True, scale=6**-0.5)
    assert out.dtype == torch.float32
    assert_close(out, expected, 1e-6)


# --- dropout ------------------------------------------------------------------------------------------------------


def test_dropout_output_and_gradients_follow_the_seeds_mask():
    q, k, v, masks = _case("padding", seed=20)
    bias = _bias("1h", 2, 4, 5, 7, seed=21, neg_inf=0.1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attention(*leaves[:3], attn_bias=leaves[3], dropout_p=0.3, generator=torch.Generator().manual_seed(5),
                    backend="reference", **masks)  # fmt: skip
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(5))
    keep = attention_keep(seed, 2, 4, 5, 7, 0.3)
    expected_leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    expected = naive_biased_attention(*expected_leaves, scale=6**-0.5, keep=keep, p=0.3, **masks)
    assert_close(out, expected, 1e-12)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, got, want in zip("q k v bias".split(), leaves, expected_leaves, strict=True):
        assert_close(got.grad, want.grad, 1e-11, f"d{name}")


def test_dropout_is_reproducible_and_draws_from_the_generator():
    q, k, v, _ = _case("none", seed=22)

    def run(generator_seed):
        gen = torch.Generator().manual_seed(generator_seed)
        return attention(q, k, v, dropout_p=0.5, generator=gen, backend="reference")

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    gen = torch.Generator().manual_seed(1)
    first = attention(q, k, v, dropout_p=0.5, generator=gen, backend="reference")
    assert not torch.equal(first, attention(q, k, v, dropout_p=0.5, generator=gen, backend="reference"))


def test_dropout_with_p_zero_is_no_dropout_and_p_one_gives_zeros():
    q, k, v, masks = _case("causal", seed=23)
    plain = attention(q, k, v, backend="reference", **masks)
    assert torch.equal(attention(q, k, v, dropout_p=0.0, backend="reference", **masks), plain)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, dropout_p=1.0, backend="reference", **masks)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf.grad))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_kept_fraction_is_one_minus_p_within_a_binomial_bound(p):
    keep = attention_keep(torch.tensor([987654321987]), 3, 5, 61, 67, p)
    n = keep.numel()
    bound = 5 * math.sqrt(n * p * (1 - p))  # five standard deviations
    assert abs(int(keep.sum()) - n * (1 - p)) < bound
    rounded = threshold(p) / 2**16  # p rounded to a multiple of 2^-16
    assert abs(rounded - p) <= 2**-17 and keep_scale(p) == 1 / (1 - rounded)
    per_key_column = keep.float().mean(dim=(0, 1, 2))  # every key position (all four words of a call) is used
    assert (per_key_column - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (3 * 5 * 61))


def test_neighbouring_elements_get_independent_words():
    keep = attention_keep(torch.tensor([3]), 1, 2, 40, 64, 0.5).float()
    pairs = (keep[..., 0::2] == keep[..., 1::2]).float().mean()  # keys sharing a Philox call
    assert abs(float(pairs) - 0.5) < 0.05
    assert not torch.equal(keep[0, 0], keep[0, 1])  # heads get their own counters


# --- the native backend --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "modality"])
def test_native_runs_a_bias_without_gradient_and_matches_the_reference(mask_kind, monkeypatch):
    from mome.reference import attention as reference_attention

    q, k, v, masks = _case(mask_kind, seed=30)
    q, k, v = (t.float() for t in (q, k, v))
    bias = _bias("1h", 2, 4, 5, 7, seed=31).float()
    expected = attention(q, k, v, attn_bias=bias, backend="reference", **masks)
    calls = []
    monkeypatch.setattr(reference_attention, "attention_fwd", lambda *a: calls.append(a) or None)
    out = attention(q, k, v, attn_bias=bias, backend="native", **masks)
    assert not calls
    assert_close(out, expected, 2e-6)


def test_native_declines_dropout_and_a_bias_that_needs_a_gradient():
    from mome.ops.attention import BACKENDS, AttentionMasks

    q = torch.randn(1, 1, 2, 4)
    masks = AttentionMasks()
    assert "dropout" in BACKENDS.reason("native", dict(q=q, masks=masks, dropout=True, bias_grad=False))
    assert "bias_grad" in BACKENDS.reason("native", dict(q=q, masks=masks, dropout=False, bias_grad=True))
    q, k, v, _ = _case("none", seed=32)
    bias = _bias("11", 2, 4, 5, 7, seed=33).requires_grad_()
    out = attention(q, k, v, attn_bias=bias, dropout_p=0.2, generator=torch.Generator().manual_seed(0))
    expected = attention(q, k, v, attn_bias=bias, dropout_p=0.2, generator=torch.Generator().manual_seed(0),
                         backend="reference")  # fmt: skip
    assert torch.equal(out, expected)


# --- the arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias, error, words",
    [
        (torch.zeros(2, 4, 5, 7, dtype=torch.int32), TypeError, "attn_bias must be a float tensor"),
        (torch.zeros(2, 4, 5, 7, dtype=torch.bool), TypeError, "attn_bias must be a float tensor"),
        (torch.zeros(2, 4, 5, 7, dtype=torch.float64), TypeError, "attn_bias must be a float tensor"),
        (torch.zeros(3, 4, 5, 7), ValueError, "(1|2, 1|4, 5, 7)"),
        (torch.zeros(2, 2, 5, 7), ValueError, "(1|2, 1|4, 5, 7)"),
        (torch.zeros(5, 6), ValueError, "(1|2, 1|4, 5, 7)"),
        (torch.zeros(7), ValueError, "attn_bias must have shape"),
        (torch.zeros(1, 2, 4, 5, 7), ValueError, "attn_bias must have shape"),
        ([[0.0]], TypeError, "attn_bias must be a torch.Tensor"),
    ],
)
def test_a_bad_bias_is_refused_with_its_name(bias, error, words):
    q, k, v = (torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8))
    with pytest.raises(error, match="attn_bias") as raised:
        attention(q, k, v, attn_bias=bias)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1]"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in [0, 1]"),
        (dict(dropout_p=math.nan), ValueError, "dropout_p must be in [0, 1]"),
        (dict(dropout_p=True), TypeError, "dropout_p must be a real number"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
        (dict(dropout_p=0.1, generator=0), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_dropout_arguments_are_refused(options, error, words):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(error) as raised:
        attention(q, q, q, **options)
    assert words in str(raised.value)


def test_a_generator_on_another_device_type_is_refused():
    q = torch.randn(1, 2, 3, 4, device="meta")
    with pytest.raises(ValueError, match=r"generator must be on q's device type \(meta\)"):
        attention(q, q, q, dropout_p=0.1, generator=torch.Generator())


def test_torch_func_transforms_see_the_bias_and_the_dropout():
    q, k, v, masks = _case("causal", seed=40)
    bias = _bias("1h", 2, 4, 5, 7, seed=41)

    def loss(bias_):
        gen = torch.Generator().manual_seed(3)
        return attention(q, k, v, attn_bias=bias_, dropout_p=0.25, generator=gen, **masks).square().sum()

    grad = torch.func.grad(loss)(bias)
    leaf = bias.clone().requires_grad_()
    loss(leaf).backward()
    assert_close(grad, leaf.grad, 1e-12, "bias gradient")
