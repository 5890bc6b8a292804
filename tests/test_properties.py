"""Property suite (issue 12): every op on every backend that runs here, on random valid inputs, against float64
formulas written in this file from the documented semantics (README, op docstrings), never from mome.reference.

Inputs: random shapes (0-sized batch / tokens in their own tests, Nq = 1, head dims 1, 3, 40, 80, 96, 112,
grouped-query heads, many and empty experts), int8 ... int64 / uint8 ids, transposed / step-sliced / stride-0
expanded tensors, every subset of inputs requiring grad. Outputs and gradients are compared by relative norm
(DESIGN.md, Testing); NaN never passes. The NaN / Inf placement tests poison one entry of k or v that a mask
hides (padding, causal, prefix-LM, modality blocks; decode: beyond ``cache_seqlens``) and require it not to
reach the output, while a NaN that a query does see must reach it.

Hypothesis profiles: ``ci`` (the default, and always when ``CI`` is set) is derandomized: the same examples
on every run; ``HYPOTHESIS_PROFILE=dev`` draws fresh examples, ten times as many. Triton runs under
``TRITON_INTERPRET=1`` on CPU (tests/conftest.py) with tiny shapes: the interpreter costs ~3 ms per tile step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from mome import ops

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
PROFILE = "ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = 10 if PROFILE == "dev" else 1


def examples(n: int, backend: str = "reference") -> settings:
    """``n`` examples in CI (``10 n`` in dev), on top of the chosen profile (not loaded globally). In CI a failure
    under the Triton interpreter is reported as found, unshrunk (shrinking there takes minutes): rerun with
    ``HYPOTHESIS_PROFILE=dev`` for the minimal example."""
    profile = settings.get_profile(PROFILE)
    if PROFILE == "ci" and backend != "reference" and not torch.cuda.is_available():
        return settings(profile, max_examples=n, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    return settings(profile, max_examples=n * SCALE)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
HEAD_DIMS = (1, 3, 40, 80, 96, 112)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}
# Gradients are looser (xformers does the same): backward sums over Nq·D products and attention's
# dS = P∘(dP − rowsum(dO∘O)) cancels; the reference (torch's own fp32 autograd) reaches 1.1e-5 on random cases.
# fp16 flash backward also forms rowsum(dO∘O) from the fp16-rounded output and feeds fp16 probabilities to the dots.
GRAD_TOLERANCE = {**TOLERANCE, torch.float32: 5e-5, torch.float16: 1e-2}
pytestmark = pytest.mark.usefixtures("poisoned_allocations")  # an unwritten output element is NaN and fails


def _declined(error: RuntimeError) -> bool:
    return type(error).__name__ == "BackendUnavailableError"


def _loaded(probe) -> list[str]:
    """The backends for which ``probe(backend)`` runs here (reference always; native on CPU tensors; triton under the
    interpreter)."""
    names = []
    for backend in ("reference", "native", "triton", "cuda"):
        try:
            probe(backend)
        except RuntimeError as error:
            if not _declined(error):
                raise
            continue
        names.append(backend)
    return names


def _t(*shape):
    return torch.ones(*shape, device=DEVICE)


ATTENTION_BACKENDS = _loaded(lambda b: ops.attention(_t(1, 1, 2, 4), _t(1, 1, 3, 4), _t(1, 1, 3, 4), backend=b))
DECODE_BACKENDS = _loaded(
    lambda b: ops.decode_attention(
        _t(1, 1, 4), _t(1, 1, 3, 4), _t(1, 1, 3, 4), torch.ones(1, dtype=torch.int32, device=DEVICE), backend=b
    )
)
_IDS = torch.zeros(2, dtype=torch.int64, device=DEVICE)
LINEAR_BACKENDS = _loaded(lambda b: ops.modality_linear(_t(2, 4), _IDS, _t(1, 3, 4), backend=b))
NORM_BACKENDS = _loaded(lambda b: ops.modality_layer_norm(_t(2, 4), _IDS, _t(1, 4), backend=b))
ITC_BACKENDS = _loaded(lambda b: ops.itc_loss(_t(2, 4), _t(2, 4), 1.0, backend=b))


def dtypes_of(backend: str) -> tuple[torch.dtype, ...]:
    return (torch.float64, torch.float32) if backend in ("reference", "native") else (torch.float32, torch.float16)


# --- comparison --------------------------------------------------------------------------------------------


def check(name: str, got, expected, tol: float) -> None:
    """Relative-norm comparison against float64; a missing gradient, a shape mismatch or a NaN fails.

    The norm is floored at an RMS of 0.1 per element: a quantity that cancels to ~0 (dk when every value
    is the same) is compared absolutely; inputs are O(1), so 0.1 still is far above rounding noise."""
    assert got is not None, f"{name}: no gradient (None) although the input requires grad"
    got, expected = got.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    bad = ~torch.isfinite(got)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{got.numel()} non-finite, first at {where}: "
            f"{got[where].item()} vs {expected[where].item():.6g}"
        )
    norm = max(expected.norm().item(), 0.1 * math.sqrt(expected.numel()), 1e-30)
    error = (got - expected).norm().item() / norm
    if error > tol:
        diff = (got - expected).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        off = int((diff > tol * max(expected.abs().max().item(), 1e-30)).sum())
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tol:.0e}; {off}/{diff.numel()} elements off, "
            f"worst at {worst}: {got[worst].item():.8g} vs {expected[worst].item():.8g}"
        )


def snapshot(inputs: dict) -> dict:
    return {name: t.detach().clone() for name, t in inputs.items() if isinstance(t, torch.Tensor)}


def assert_unchanged(before: dict, inputs: dict) -> None:
    """An op never writes into its inputs."""
    for name, old in before.items():
        assert torch.equal(inputs[name].detach(), old), f"the op modified its input {name}"


def grads(out, inputs: dict, grad_out) -> dict:
    wanted = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    if not wanted:
        return {}
    found = torch.autograd.grad(out, list(wanted.values()), grad_out, allow_unused=True)
    return dict(zip(wanted, found, strict=True))


def check_with_grads(got_out, got_inputs: dict, want_out, want_inputs: dict, dtype, seed: int) -> None:
    """Output, ``requires_grad`` of the output, and the gradient of every input that requires grad, at the
    tolerances of the inputs' ``dtype``."""
    check("output", got_out, want_out, TOLERANCE[dtype])
    assert got_out.requires_grad == want_out.requires_grad, f"output.requires_grad is {got_out.requires_grad}"
    if not want_out.requires_grad:
        return
    grad_out = torch.randn(want_out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    got = grads(got_out, got_inputs, grad_out.to(DEVICE, got_out.dtype))
    want = grads(want_out, want_inputs, grad_out)
    assert set(got) == set(want)
    for name in want:
        check(f"d{name}", got[name], want[name], GRAD_TOLERANCE[dtype])


# --- inputs ------------------------------------------------------------------------------------------------


def tensor(gen, shape, dtype, layout: str, requires_grad: bool = False, expand_dims=None, std: float = 1.0):
    """Normal values in ``layout``: a transposed view, a step-2 slice, or a stride-0 expansion along one dim
    (the values are then constant along it); the leaf that requires grad is the storage behind the view."""
    shape = tuple(shape)

    def leaf(storage_shape):
        values = torch.randn(storage_shape, generator=gen, dtype=F64) * std
        return values.to(DEVICE, dtype).requires_grad_(requires_grad)

    dims = [d for d in (range(len(shape)) if expand_dims is None else expand_dims) if shape[d] > 1]
    if layout == "expanded" and dims:
        dim = dims[int(torch.randint(len(dims), (), generator=gen))]
        return leaf(shape[:dim] + (1,) + shape[dim + 1 :]).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return leaf(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "sliced":
        dim = int(torch.randint(len(shape), (), generator=gen))
        storage = leaf(shape[:dim] + (2 * shape[dim],) + shape[dim + 1 :])
        return storage[(slice(None),) * dim + (slice(None, None, 2),)]
    return leaf(shape)


def as_f64(t, requires_grad: bool | None = None):
    """The same values in float64 on the CPU, a fresh leaf (the formula's input)."""
    if t is None:
        return None
    wide = t.detach().to("cpu", F64).clone()
    return wide.requires_grad_(t.requires_grad if requires_grad is None else requires_grad)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """An id or mask tensor in ``layout`` (``expanded``: its first row broadcast along dim 0, stride 0)."""
    if layout == "expanded" and t.dim() and t.shape[0] > 1:
        return t[:1].expand_as(t)
    if layout == "transposed" and t.dim() == 2:
        return t.T.contiguous().T
    if layout == "sliced" and t.dim():
        return t.repeat_interleave(2, dim=-1)[..., ::2]
    return t


def ids(gen, shape, num: int, dtype, used: int | None = None) -> torch.Tensor:
    """Ids in ``[0, num)`` drawn from a random subset of ``used`` values (the other experts stay empty)."""
    pool = torch.randperm(num, generator=gen)[: max(1, num if used is None else used)]
    picked = pool[torch.randint(len(pool), shape, generator=gen)]
    return picked.to(DEVICE, dtype)


# --- the formulas ------------------------------------------------------------------------------------------


def visibility(batch, nq, nk, causal=False, padding=None, prefix=None, modality=None, modality_mask=None):
    """``(B, Nq, Nk)`` bool, the README's mask semantics written as loops: query i sits at position
    ``i + Nk - Nq``; causal keeps keys at or before it, and keys before ``prefix[b]`` stay visible; padding
    (True) hides a key; a query of modality a sees a key of modality c iff ``modality_mask[a][c]``."""
    padding = None if padding is None else padding.tolist()
    prefix = None if prefix is None else [int(p) for p in prefix]
    modality = None if modality is None else modality.long().tolist()
    allowed = None if modality_mask is None else modality_mask.tolist()
    table = torch.zeros(batch, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for i in range(nq):
            position = i + nk - nq
            for j in range(nk):
                ok = not causal or j <= position or (prefix is not None and j < prefix[b])
                ok = ok and not (padding is not None and padding[b][j])
                ok = ok and (modality is None or allowed[modality[b][position]][modality[b][j]])
                table[b, i, j] = ok
    return table


def softmax_attention(q, k, v, visible, scale):
    """float64 ``softmax(q kᵀ·scale over visible keys) v``; head h reads kv head ``h // (H / Hkv)``; a query
    that sees no key gives 0."""
    batch, heads, nq, _ = q.shape
    kv_of_head = torch.arange(heads) // max(heads // max(k.shape[1], 1), 1)
    k, v = k[:, kv_of_head], v[:, kv_of_head]  # [B, H, Nk, D]
    if k.shape[2] == 0:
        return q * 0 + (k.sum() + v.sum()) * 0  # zeros that depend on q, k and v (zero gradients)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    top = scores.detach().amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", weights / torch.where(total > 0, total, 1.0), v)


def activation(z, name):
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return torch.where(z > 0, z, 0.0)
    return z


def expert_linear(x, modality, weight, bias, act=None):
    """Row t: ``act(weight[e] @ x[t] + bias[e])`` with ``e = modality[t]``."""
    e = modality.long().cpu()
    z = torch.einsum("ti,toi->to", x, weight[e])
    return activation(z if bias is None else z + bias[e], act)


def expert_layer_norm(x, modality, weight, bias, eps):
    e = modality.long().cpu()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight[e]
    return y if bias is None else y + bias[e]


def positives(batch: int, queue: int, positive_ids, queue_ids) -> torch.Tensor:
    """``(B, B + Q)``: column j is a positive of row i iff their ids agree (default: only j == i)."""
    row = list(range(batch)) if positive_ids is None else positive_ids.long().tolist()
    columns = row + ([None] * queue if queue_ids is None else queue_ids.long().tolist())
    return torch.tensor([[c is not None and r == c for c in columns] for r in row], dtype=torch.bool)


def contrastive(image, text, scale, image_m, text_m, image_queue, text_queue, alpha, positive_ids, queue_ids):
    """ALBEF's ITA / open_clip's ClipLoss: per direction ``-sum(targets · log_softmax(scale · rows @ colsᵀ))``
    averaged over rows; columns are the momentum features when given, then the queue; targets uniform over
    the positives, mixed with ``alpha · softmax(scale · rows_m @ colsᵀ)`` (no gradient through targets)."""
    queue = 0 if image_queue is None else image_queue.shape[0]
    pos = positives(image.shape[0], queue, positive_ids, queue_ids)

    def direction(rows, rows_m, columns, extra):
        columns = columns if extra is None else torch.cat([columns, extra])
        logits = scale * rows @ columns.T
        with torch.no_grad():
            targets = pos.to(logits.dtype) / pos.sum(1, keepdim=True)
            if alpha > 0:
                targets = alpha * torch.softmax(scale * rows_m @ columns.T, 1) + (1 - alpha) * targets
        return -(torch.log_softmax(logits, 1) * targets).sum(1).mean(), logits

    i2t, logits_i2t = direction(image, image_m, text if text_m is None else text_m, text_queue)
    t2i, logits_t2i = direction(text, text_m, image if image_m is None else image_m, image_queue)
    return i2t, t2i, logits_i2t.detach(), logits_t2i.detach(), pos


# --- attention ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    kv_heads: int
    group: int
    nq: int
    nk: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    prefix: str | None  # None, "int" or "tensor"
    padding: bool
    modalities: int  # 0: no modality mask
    id_dtype: torch.dtype
    mask_layout: str  # of key_padding_mask, prefix_len and modality
    layouts: tuple[str, str, str]
    requires_grad: tuple[bool, bool, bool]
    scale: float | None  # None: the default D^-1/2; else this multiple of it (logits stay O(1) for any D)
    seed: int


@st.composite
def attention_cases(draw, backend: str, empty: bool = False, masks=None):
    tiny = backend != "reference"
    batch, nq = draw(st.integers(1, 2 if tiny else 3)), draw(st.integers(1, 9 if tiny else 20))
    nk = draw(st.integers(1, 12 if tiny else 24))
    if draw(st.booleans()):
        nq = 1  # a decoding-shaped query block
    if empty:
        which = draw(st.sampled_from(["batch", "nq", "nk"]))
        batch, nq, nk = (0 if which == "batch" else batch), (0 if which == "nq" else nq), (0 if which == "nk" else nk)
    kinds = draw(st.sets(st.sampled_from(["causal", "prefix", "padding", "modality"]))) if masks is None else masks
    causal = "causal" in kinds or "prefix" in kinds
    modalities = draw(st.integers(1, 4)) if "modality" in kinds else 0
    if modalities:
        nq = min(nq, nk)  # queries take the ids of the last Nq keys
    kv_heads, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    return AttentionCase(
        batch=batch,
        kv_heads=kv_heads,
        group=group,
        nq=nq,
        nk=nk,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(dtypes_of(backend))),
        causal=causal,
        prefix=draw(st.sampled_from(["int", "tensor"])) if "prefix" in kinds else None,
        padding="padding" in kinds,
        modalities=modalities,
        id_dtype=draw(st.sampled_from(INT_DTYPES)),
        mask_layout=draw(st.sampled_from(LAYOUTS)),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        requires_grad=tuple(draw(st.booleans()) for _ in range(3)),
        scale=draw(st.sampled_from([None, 0.37, 1.5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_attention(case: AttentionCase):
    """The op's tensors and keyword masks, and the visibility table the formula uses."""
    gen = torch.Generator().manual_seed(case.seed)
    heads, d = case.kv_heads * case.group, case.head_dim
    q_shape, kv_shape = (case.batch, heads, case.nq, d), (case.batch, case.kv_heads, case.nk, d)
    # Stride 0 along B, H or N. Not along D for q, k: q·k = D·a·b gives logits of ~100 and an ill-conditioned
    # softmax gradient. Not along Nk for k, v in fp16: equal keys make dq (equal values: dk) exactly 0, and fp16
    # backward's rowsum(dO∘O) rounding then is all that remains of it.
    kv_dims = [0, 1] if case.dtype == torch.float16 else [0, 1, 2]
    q, k, v = (
        tensor(gen, shape, case.dtype, layout, rg, expand)
        for shape, layout, rg, expand in zip(
            (q_shape, kv_shape, kv_shape), case.layouts, case.requires_grad, ([0, 1, 2], kv_dims, kv_dims), strict=True
        )
    )
    masks, padding, prefix, modality, modality_mask = {"causal": case.causal}, None, None, None, None
    if case.padding:
        padding = torch.rand(case.batch, case.nk, generator=gen) < 0.3
        if case.batch and torch.rand((), generator=gen) < 0.3:
            padding[0] = True  # a batch element whose queries see nothing
        masks["key_padding_mask"] = relayout(padding.to(DEVICE), case.mask_layout)
        padding = masks["key_padding_mask"].cpu()
    if case.prefix is not None:
        prefix = torch.randint(0, case.nk + 1, (case.batch,), generator=gen)
        if case.prefix == "int" or case.batch == 0:
            prefix[:] = case.nk // 2
            masks["prefix_len"] = case.nk // 2
        else:
            masks["prefix_len"] = relayout(prefix.to(DEVICE, case.id_dtype), case.mask_layout)
            prefix = masks["prefix_len"].cpu()
    if case.modalities:
        modality = torch.randint(0, case.modalities, (case.batch, case.nk), generator=gen)
        modality_mask = torch.rand(case.modalities, case.modalities, generator=gen) < 0.6
        masks.update(modality=relayout(modality.to(DEVICE, case.id_dtype), case.mask_layout))
        masks["modality_mask"] = relayout(modality_mask.to(DEVICE), case.mask_layout)
        modality, modality_mask = masks["modality"].cpu(), masks["modality_mask"].cpu()
    if case.scale is not None:
        masks["scale"] = case.scale * case.head_dim**-0.5
    visible = visibility(case.batch, case.nq, case.nk, case.causal, padding, prefix, modality, modality_mask)
    return dict(q=q, k=k, v=v), masks, visible


def run_attention(case: AttentionCase, backend: str) -> None:
    inputs, masks, visible = build_attention(case)
    before = snapshot(inputs)
    out = ops.attention(**inputs, **masks, backend=backend)
    assert_unchanged(before, inputs)
    assert out.dtype == case.dtype and out.device.type == DEVICE.type
    wide = {name: as_f64(t) for name, t in inputs.items()}
    scale = masks.get("scale", case.head_dim**-0.5)
    expected = softmax_attention(wide["q"], wide["k"], wide["v"], visible, scale)
    check_with_grads(out, inputs, expected, wide, case.dtype, case.seed)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_matches_formula(backend):
    @examples(60 if backend == "reference" else 16, backend)
    @given(case=attention_cases(backend))
    def prop(case):
        run_attention(case, backend)

    prop()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_empty_batch_or_tokens(backend):
    """B = 0, Nq = 0 or Nk = 0 (every query sees nothing: zeros and zero gradients)."""

    @examples(12, backend)
    @given(case=attention_cases(backend, empty=True))
    def prop(case):
        run_attention(case, backend)

    prop()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("scale_given", [False, True])
def test_attention_head_dim_zero(backend, scale_given):
    """D = 0: an empty output, or a clear ValueError naming the head dim (never a ZeroDivisionError)."""
    q, k = torch.randn(1, 2, 3, 0, device=DEVICE), torch.randn(1, 2, 4, 0, device=DEVICE)
    try:
        out = ops.attention(q, k, k, scale=0.5 if scale_given else None, backend=backend)
    except ValueError as error:
        assert "head dim" in str(error) or "head_dim" in str(error), error
        return
    assert out.shape == (1, 2, 3, 0)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_scale_tensor_gradient(backend):
    """A scale tensor that requires grad gets its gradient (or a clear error naming scale, never a silent drop)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (tensor(gen, (1, 2, 5, 8), torch.float32, "contiguous", True) for _ in range(3))
    scale = torch.tensor(0.4, device=DEVICE, requires_grad=True)
    try:
        out = ops.attention(q, k, v, causal=True, scale=scale, backend=backend)
    except (TypeError, ValueError) as error:
        assert "scale" in str(error), error
        return
    wide_scale = as_f64(scale)
    wide = dict(q=as_f64(q), k=as_f64(k), v=as_f64(v), scale=wide_scale)
    expected = softmax_attention(wide["q"], wide["k"], wide["v"], visibility(1, 5, 5, causal=True), wide_scale)
    check_with_grads(out, dict(q=q, k=k, v=v, scale=scale), expected, wide, torch.float32, 0)


POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
POISON_NAMES = sorted(POISONS)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("mask", ["padding", "causal", "prefix", "modality"])
def test_attention_masked_nan_inf_never_reaches_output(backend, mask):
    """A NaN / ±Inf stored in a key or value that some queries cannot see: their outputs equal the formula on
    clean inputs; a poisoned entry hidden from every query leaves all gradients clean too."""

    @examples(14 if backend == "reference" else 8, backend)
    @given(
        case=attention_cases(backend, masks={mask}),
        target=st.sampled_from("kv"),
        poison=st.sampled_from(POISON_NAMES),
        pick=st.integers(0, 10**6),
    )
    def prop(case, target, poison, pick):
        assume(case.batch > 0 and case.nk > 0 and case.nq > 0)
        inputs, masks, visible = build_attention(case)
        hidden = [(b, j) for b in range(case.batch) for j in range(case.nk) if not visible[b, :, j].all()]
        assume(hidden)
        b, j = hidden[pick % len(hidden)]
        h, d = pick % case.kv_heads, pick % case.head_dim
        wide = {name: as_f64(t) for name, t in inputs.items()}
        scale = masks.get("scale", case.head_dim**-0.5)
        expected = softmax_attention(wide["q"], wide["k"], wide["v"], visible, scale)
        poisoned = dict(inputs)
        storage = inputs[target].detach().clone()  # contiguous: the poison lands in one element only
        storage[b, h, j, d] = POISONS[poison]
        poisoned[target] = storage.requires_grad_(inputs[target].requires_grad)
        out = ops.attention(**poisoned, **masks, backend=backend)
        sees = visible[b, :, j]  # [Nq] queries of batch b that see the poisoned key
        group = slice(h * case.group, (h + 1) * case.group)
        clean = torch.ones(out.shape, dtype=torch.bool)
        clean[b, group] &= ~sees[None, :, None]
        got = out.detach().cpu()
        check(
            f"output of the queries that cannot see {target}[{b}, {h}, {j}, {d}] = {poison}",
            got[clean],
            expected.detach()[clean],
            TOLERANCE[case.dtype],
        )
        if poison == "nan" and sees.any():
            reached = got[b, group][:, sees] if target == "k" else got[b, group][:, sees][..., d]
            assert reached.isnan().all(), f"a NaN in a visible {target} must reach the queries that see it"
        if not sees.any() and expected.requires_grad:
            check_with_grads(out, poisoned, expected, wide, case.dtype, case.seed)

    prop()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_nan_in_visible_entries_reaches_output(backend):
    """A NaN in q reaches its row (when the row sees a key); in a visible key, every query that sees it."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (tensor(gen, (2, 2, 6, 8), torch.float32, "contiguous") for _ in range(3))
    padding = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    padding[1] = True  # batch 1 sees nothing: zeros whatever q holds
    q[0, 1, 2, 3] = q[1, 0, 0, 0] = float("nan")
    out = ops.attention(q, k, v, key_padding_mask=padding, backend=backend).cpu()
    assert out[0, 1, 2].isnan().all() and torch.isfinite(out[0, 0]).all() and (out[1] == 0).all(), out[:, :, :3, 0]
    k2 = k.clone()
    k2[0, 0, 4, 5] = float("nan")
    out = ops.attention(q.nan_to_num(), k2, v, causal=True, backend=backend).cpu()
    assert out[0, 0, 4:].isnan().all(), "queries 4 and 5 of head 0 see key 4"
    assert torch.isfinite(out[0, 0, :4]).all() and torch.isfinite(out[0, 1]).all() and torch.isfinite(out[1]).all()


# --- decode ------------------------------------------------------------------------------------------------


@st.composite
def decode_cases(draw, backend: str, empty: bool = False):
    tiny = backend != "reference"
    batch, nmax = draw(st.integers(0 if empty else 1, 3)), draw(st.integers(1, 24 if tiny else 40))
    if empty:
        batch, nmax = (0, nmax) if draw(st.booleans()) else (batch, 0)
    return dict(
        batch=batch,
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 4])),
        nmax=nmax,
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(dtypes_of(backend))),
        len_dtype=draw(st.sampled_from(INT_DTYPES)),
        len_layout=draw(st.sampled_from(LAYOUTS)),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        scale=draw(st.sampled_from([None, 0.6])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_decode(c):
    gen = torch.Generator().manual_seed(c["seed"])
    heads, cache = c["kv_heads"] * c["group"], (c["batch"], c["kv_heads"], c["nmax"], c["head_dim"])
    q = tensor(gen, (c["batch"], heads, c["head_dim"]), c["dtype"], c["layouts"][0])
    k, v = (tensor(gen, cache, c["dtype"], layout) for layout in c["layouts"][1:])
    lengths = relayout(torch.randint(0, c["nmax"] + 1, (c["batch"],), generator=gen), c["len_layout"])
    visible = torch.arange(c["nmax"])[None, None, :] < lengths[:, None, None]  # [B, 1, Nmax]
    return q, k, v, lengths, visible


def run_decode(c, backend):
    q, k, v, lengths, visible = build_decode(c)
    before = snapshot(dict(q=q, k=k, v=v))
    out = ops.decode_attention(q, k, v, lengths.to(DEVICE, c["len_dtype"]), scale=c["scale"], backend=backend)
    assert_unchanged(before, dict(q=q, k=k, v=v))
    scale = c["head_dim"] ** -0.5 if c["scale"] is None else c["scale"]
    expected = softmax_attention(as_f64(q)[:, :, None], as_f64(k), as_f64(v), visible, scale)[:, :, 0]
    check("output", out, expected, TOLERANCE[c["dtype"]])


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_matches_formula(backend):
    @examples(40 if backend == "reference" else 14, backend)
    @given(c=decode_cases(backend))
    def prop(c):
        run_decode(c, backend)

    prop()


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_empty_batch_or_cache(backend):
    @examples(6, backend)
    @given(c=decode_cases(backend, empty=True))
    def prop(c):
        run_decode(c, backend)

    prop()


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_head_dim_zero(backend):
    q, cache = torch.randn(2, 2, 0, device=DEVICE), torch.randn(2, 1, 3, 0, device=DEVICE)
    try:
        out = ops.decode_attention(q, cache, cache, torch.tensor([1, 3], device=DEVICE), backend=backend)
    except ValueError as error:
        assert "head dim" in str(error) or "head_dim" in str(error), error
        return
    assert out.shape == (2, 2, 0)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_backward_is_right_or_refused(backend):
    """decode_attention is documented forward only: backward raises, or gives the formula's gradient, never
    an output cut from the graph (a silently dropped gradient)."""
    gen = torch.Generator().manual_seed(8)
    q = tensor(gen, (2, 2, 4), torch.float32, "contiguous", True)
    k, v = (tensor(gen, (2, 1, 5, 4), torch.float32, "contiguous", True) for _ in range(2))
    lengths = torch.tensor([3, 5])
    out = ops.decode_attention(q, k, v, lengths.to(DEVICE), backend=backend)
    assert out.requires_grad, "an output cut from the graph although q, k and v require grad"
    try:
        got = torch.autograd.grad(out.sum(), [q, k, v])
    except RuntimeError:
        return  # refused: a clear answer
    wide = [as_f64(t) for t in (q, k, v)]
    visible = torch.arange(5)[None, None, :] < lengths[:, None, None]
    expected = softmax_attention(wide[0][:, :, None], wide[1], wide[2], visible, 0.5)[:, :, 0]
    for name, g, w in zip("qkv", got, torch.autograd.grad(expected.sum(), wide), strict=True):
        check(f"d{name}", g, w, GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_nan_inf_beyond_cache_seqlens_is_ignored(backend):
    @examples(14 if backend == "reference" else 8, backend)
    @given(
        c=decode_cases(backend),
        target=st.sampled_from("kv"),
        poison=st.sampled_from(POISON_NAMES),
        pick=st.integers(0, 10**6),
    )
    def prop(c, target, poison, pick):
        q, k, v, lengths, visible = build_decode(c)
        stale = [(b, j) for b in range(c["batch"]) for j in range(int(lengths[b]), c["nmax"])]
        assume(stale)
        b, j = stale[pick % len(stale)]
        scale = c["head_dim"] ** -0.5 if c["scale"] is None else c["scale"]
        expected = softmax_attention(as_f64(q)[:, :, None], as_f64(k), as_f64(v), visible, scale)[:, :, 0]
        caches = {"k": k.clone(), "v": v.clone()}
        caches[target][b, pick % c["kv_heads"], j, pick % c["head_dim"]] = POISONS[poison]
        out = ops.decode_attention(
            q, caches["k"], caches["v"], lengths.to(DEVICE, c["len_dtype"]), scale=c["scale"], backend=backend
        )
        check(
            f"output with {target}_cache[{b}, :, {j}] = {poison} beyond cache_seqlens[{b}] = {int(lengths[b])}",
            out,
            expected,
            TOLERANCE[c["dtype"]],
        )

    prop()


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_nan_in_query_or_valid_cache_reaches_output(backend):
    """A real NaN is not masked: in q it reaches that head; in a valid key, every head of its group."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (tensor(gen, shape, torch.float32, "contiguous") for shape in [(3, 4, 8), (3, 2, 6, 8), (3, 2, 6, 8)])
    lengths = torch.tensor([6, 3, 0], device=DEVICE)
    q[0, 1, 2] = float("nan")
    out = ops.decode_attention(q, k, v, lengths, backend=backend).cpu()
    assert out[0, 1].isnan().all() and torch.isfinite(out[0, [0, 2, 3]]).all(), out[0, :, 0]
    k[1, 1, 2, 0] = float("nan")  # valid: position 2 < 3; kv head 1 serves query heads 2 and 3
    out = ops.decode_attention(q.nan_to_num(), k, v, lengths, backend=backend).cpu()
    assert out[1, 2:].isnan().all() and torch.isfinite(out[1, :2]).all(), out[1, :, 0]
    assert (out[2] == 0).all(), "an empty cache gives zeros"


# --- modality ops ------------------------------------------------------------------------------------------


@st.composite
def modality_cases(draw, backend: str, op: str, empty: bool = False):
    experts = draw(st.sampled_from([1, 2, 3, 5, 17, 33]))
    names = ("x", "w1", "b1", "w2", "b2") if op == "ffn" else ("x", "weight", "bias")
    return dict(
        # LayerNorm over D < 4 is ill-conditioned (D = 1: var = 0, rstd = eps^-1/2): torch's own fp32 dweight is off
        tokens=0 if empty else draw(st.integers(1, 40)),
        din=draw(st.integers(4 if op == "norm" else 1, 24)),
        dout=draw(st.integers(1, 24)),
        hidden=draw(st.integers(1, 20)),
        experts=experts,
        used=draw(st.integers(1, experts)),
        id_dtype=draw(st.sampled_from(INT_DTYPES)),
        id_layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from(dtypes_of(backend))),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        layouts={name: draw(st.sampled_from(LAYOUTS)) for name in names},
        requires_grad={name: draw(st.booleans()) for name in names},
        eps=draw(st.sampled_from([1e-5, 1e-2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_modality(c, backend: str, op: str) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    e, t, din, dout, f = c["experts"], c["tokens"], c["din"], c["dout"], c["hidden"]
    shapes = {
        "linear": dict(x=(t, din), weight=(e, dout, din), bias=(e, dout)),
        "ffn": dict(x=(t, din), w1=(e, f, din), b1=(e, f), w2=(e, dout, f), b2=(e, dout)),
        "norm": dict(x=(t, din), weight=(e, din), bias=(e, din)),
    }[op]
    inputs = {}
    for name, shape in shapes.items():
        if name.startswith("b") and not c["bias"]:
            inputs[name] = None
            continue
        expand = [0] if (op == "norm" and name == "x") else None  # a constant row is LayerNorm's ill-conditioned case
        std = 1.0 if name == "x" or op == "norm" else shape[-1] ** -0.5
        inputs[name] = tensor(gen, shape, c["dtype"], c["layouts"][name], c["requires_grad"][name], expand, std)
    modality = relayout(ids(gen, (t,), e, c["id_dtype"], c["used"]), c["id_layout"])
    wide = {name: as_f64(value) for name, value in inputs.items()}
    before = snapshot(inputs)
    act = c["activation"]
    if op == "linear":
        out = ops.modality_linear(
            inputs["x"], modality, inputs["weight"], inputs["bias"], activation=act, backend=backend
        )
        expected = expert_linear(wide["x"], modality, wide["weight"], wide["bias"], act)
    elif op == "ffn":
        out = ops.modality_ffn(
            inputs["x"],
            modality,
            inputs["w1"],
            inputs["b1"],
            inputs["w2"],
            inputs["b2"],
            activation=act,
            backend=backend,
        )
        hidden = expert_linear(wide["x"], modality, wide["w1"], wide["b1"], act)
        expected = expert_linear(hidden, modality, wide["w2"], wide["b2"])
    else:
        out = ops.modality_layer_norm(
            inputs["x"], modality, inputs["weight"], inputs["bias"], c["eps"], backend=backend
        )
        expected = expert_layer_norm(wide["x"], modality, wide["weight"], wide["bias"], c["eps"])
    assert out.dtype == c["dtype"]
    assert_unchanged(before, inputs)
    check_with_grads(out, inputs, expected, wide, c["dtype"], c["seed"])


MODALITY_OPS = [(op, backend) for op in ("linear", "ffn") for backend in LINEAR_BACKENDS]
MODALITY_OPS += [("norm", backend) for backend in NORM_BACKENDS]


@pytest.mark.parametrize("op,backend", MODALITY_OPS)
def test_modality_ops_match_formula(op, backend):
    @examples(40 if backend == "reference" else 12, backend)
    @given(c=modality_cases(backend, op))
    def prop(c):
        run_modality(c, backend, op)

    prop()


@pytest.mark.parametrize("op,backend", MODALITY_OPS)
def test_modality_ops_zero_tokens(op, backend):
    """T = 0: an empty output, and zero (not missing) weight gradients."""

    @examples(5, backend)
    @given(c=modality_cases(backend, op, empty=True))
    def prop(c):
        run_modality(c, backend, op)

    prop()


# --- ITC ---------------------------------------------------------------------------------------------------


@st.composite
def itc_cases(draw, backend: str):
    momentum = draw(st.booleans())
    return dict(
        batch=draw(st.integers(1, 6)),
        dim=draw(st.integers(1, 16)),
        queue=draw(st.sampled_from([None, 1, 5])),
        momentum=momentum,
        alpha=draw(st.sampled_from([0.0, 0.4])) if momentum else 0.0,
        positive_ids=draw(st.booleans()),
        queue_ids=draw(st.booleans()),
        id_dtype=draw(st.sampled_from(INT_DTYPES)),
        scale=draw(st.sampled_from(["float", "0-d", "(1,)"])),
        mining=draw(st.sampled_from([None, "sample", "hardest"])),
        dtype=draw(st.sampled_from(dtypes_of(backend))),
        layouts=(draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS))),
        requires_grad=tuple(draw(st.booleans()) for _ in range(3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", ITC_BACKENDS)
def test_itc_loss_matches_formula(backend):
    @examples(30 if backend == "reference" else 10, backend)
    @given(c=itc_cases(backend))
    def prop(c):
        gen = torch.Generator().manual_seed(c["seed"])
        b, d, dtype, rg = c["batch"], c["dim"], c["dtype"], c["requires_grad"]
        image, text = (tensor(gen, (b, d), dtype, layout, g) for layout, g in zip(c["layouts"], rg, strict=False))
        extra = dict(image_feats_m=None, text_feats_m=None, image_queue=None, text_queue=None)
        if c["momentum"]:
            extra.update(
                image_feats_m=tensor(gen, (b, d), dtype, "contiguous"),
                text_feats_m=tensor(gen, (b, d), dtype, "contiguous"),
            )
        if c["queue"]:
            extra.update(
                image_queue=tensor(gen, (c["queue"], d), dtype, "contiguous"),
                text_queue=tensor(gen, (c["queue"], d), dtype, "contiguous"),
            )
        pos_ids = ids(gen, (b,), 3, c["id_dtype"]) if c["positive_ids"] else None
        queue_ids = ids(gen, (c["queue"],), 3, c["id_dtype"]) if c["queue"] and c["queue_ids"] else None
        value = 2.0 + 3.0 * torch.rand((), generator=gen).item()
        if c["scale"] == "float":
            scale = value
        else:
            shape = () if c["scale"] == "0-d" else (1,)
            scale_dtype = F64 if dtype == F64 else torch.float32  # its gradient has its dtype's precision
            scale = torch.full(shape, value, dtype=scale_dtype, device=DEVICE).requires_grad_(rg[2])
        out = ops.itc_loss(
            image,
            text,
            scale,
            **extra,
            alpha=c["alpha"],
            positive_ids=pos_ids,
            queue_ids=queue_ids,
            hard_negatives=c["mining"],
            generator=torch.Generator(DEVICE).manual_seed(1),
            backend=backend,
        )
        wide_scale = as_f64(scale) if isinstance(scale, torch.Tensor) else scale
        wide = dict(image=as_f64(image), text=as_f64(text), scale=wide_scale)
        i2t, t2i, logits_i2t, logits_t2i, pos = contrastive(
            wide["image"], wide["text"], wide_scale, *(as_f64(extra[n]) for n in extra), c["alpha"], pos_ids, queue_ids
        )
        tol = TOLERANCE[dtype]
        check("loss_i2t", out.loss_i2t, i2t, tol)
        check("loss_t2i", out.loss_t2i, t2i, tol)
        got_inputs = dict(image=image, text=text, scale=scale if isinstance(scale, torch.Tensor) else None)
        check_with_grads(out.loss, got_inputs, (i2t + t2i) / 2, wide, dtype, c["seed"])
        for name, picked, logits in (
            ("neg_text_idx", out.neg_text_idx, logits_i2t),
            ("neg_image_idx", out.neg_image_idx, logits_t2i),
        ):
            if c["mining"] is None:
                assert picked is None, f"{name} without hard_negatives"
                continue
            batch_pos, picked = pos[:, :b], picked.cpu()
            none = batch_pos.all(1)
            assert ((picked == -1) == none).all(), f"{name}: -1 exactly where every in-batch column is positive"
            rows = (~none).nonzero()[:, 0]
            assert not batch_pos[rows, picked[rows]].any(), f"{name} picked a positive: {picked.tolist()}"
            if c["mining"] == "hardest":
                best = logits[:, :b].masked_fill(batch_pos, float("-inf")).amax(1)
                slack = 1e-6 + 10 * tol * logits.abs().max()
                assert (logits[rows, picked[rows]] >= best[rows] - slack).all(), f"{name} is not the hardest"

    prop()


# --- forward-mode AD and the canary ------------------------------------------------------------------------


def _jvp_cases():
    gen = torch.Generator().manual_seed(21)

    def rand(*shape):
        return tensor(gen, shape, torch.float32, "contiguous")

    q, k, v = rand(1, 2, 4, 8), rand(1, 1, 5, 8), rand(1, 1, 5, 8)
    x, m = rand(6, 4), torch.tensor([0, 2, 2, 1, 0, 2], device=DEVICE)
    w, bias, w2, b2, lw = rand(3, 5, 4), rand(3, 5), rand(3, 3, 5), rand(3, 3), rand(3, 4)
    img, txt = rand(4, 6), rand(4, 6)
    bias64, b2_64 = as_f64(bias), as_f64(b2)
    vis = visibility(1, 4, 5, causal=True)
    return {
        "attention": (
            ATTENTION_BACKENDS,
            (q, k, v),
            lambda be, q, k, v: ops.attention(q, k, v, causal=True, backend=be),
            lambda q, k, v: softmax_attention(q, k, v, vis, 8**-0.5),
        ),
        "modality_linear": (
            LINEAR_BACKENDS,
            (x, w, bias),
            lambda be, x, w, b: ops.modality_linear(x, m, w, b, activation="gelu", backend=be),
            lambda x, w, b: expert_linear(x, m, w, b, "gelu"),
        ),
        "modality_ffn": (
            LINEAR_BACKENDS,
            (x, w, w2),
            lambda be, x, w, w2: ops.modality_ffn(x, m, w, bias, w2, b2, backend=be),
            lambda x, w, w2: expert_linear(expert_linear(x, m, w, bias64, "gelu"), m, w2, b2_64),
        ),
        "modality_layer_norm": (
            NORM_BACKENDS,
            (x, lw),
            lambda be, x, w: ops.modality_layer_norm(x, m, w, backend=be),
            lambda x, w: expert_layer_norm(x, m, w, None, 1e-5),
        ),
        "itc_loss": (
            ITC_BACKENDS,
            (img, txt),
            lambda be, i, t: ops.itc_loss(i, t, 3.0, backend=be).loss,
            lambda i, t: sum(contrastive(i, t, 3.0, None, None, None, None, 0.0, None, None)[:2]) / 2,
        ),
    }


JVP_CASES = [(name, backend) for name, case in _jvp_cases().items() for backend in case[0]]


@pytest.mark.parametrize("name,backend", JVP_CASES)
def test_forward_mode_ad_is_right_or_refused(name, backend):
    """``torch.func.jvp`` through an op gives the formula's tangent, or raises; silent zeros are a wrong answer."""
    _, primals, op, formula = _jvp_cases()[name]
    tangents = tuple(
        torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p) for i, p in enumerate(primals)
    )
    try:
        _, got = torch.func.jvp(lambda *args: op(backend, *args), primals, tangents)
    except (RuntimeError, NotImplementedError):
        return  # refusing forward-mode AD is a clear answer
    _, want = torch.func.jvp(
        formula, tuple(as_f64(p, False) for p in primals), tuple(as_f64(t, False) for t in tangents)
    )
    check(f"jvp of {name}", got, want, 1e-5)


def test_canary_comparison_catches_a_0_1_percent_error():
    """The comparison the properties use fails on a 0.1% error of the output (fp32 / fp64), and on one NaN."""
    case = AttentionCase(
        batch=2, kv_heads=1, group=2, nq=7, nk=9, head_dim=40, dtype=torch.float32, causal=True, prefix="tensor",
        padding=True, modalities=2, id_dtype=torch.int8, mask_layout="sliced", requires_grad=(True, True, True),
        layouts=("transposed", "sliced", "contiguous"), scale=None, seed=4,
    )  # fmt: skip
    inputs, masks, visible = build_attention(case)
    out = ops.attention(**inputs, **masks, backend="reference").detach()
    wide = {name: as_f64(t) for name, t in inputs.items()}
    expected = softmax_attention(wide["q"], wide["k"], wide["v"], visible, 40**-0.5)
    check("output", out, expected, TOLERANCE[torch.float32])
    with pytest.raises(AssertionError, match="relative error"):
        check("output", out * 1.001, expected, TOLERANCE[torch.float32])
    with pytest.raises(AssertionError, match="relative error"):
        one = out.clone()
        one[1, 1, 3, 7] += 1e-3 * out.norm()
        check("output", one, expected, TOLERANCE[torch.float32])
    with pytest.raises(AssertionError, match="non-finite"):
        one = out.clone()
        one[0, 0, 0, 0] = float("nan")
        check("output", one, expected, TOLERANCE[torch.float32])
    with pytest.raises(AssertionError, match="no gradient"):
        check("dq", None, expected, TOLERANCE[torch.float32])
