"""itc_loss and itc_loss_rows, Triton backend: loss, every gradient and the hard negatives against the float64
reference; the rows form (one rank's share of a gathered batch) on slices of a batch."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.ops.itc import ITCOptions, itc_loss_rows
from mome.reference.itc import itc_loss_ref, itc_loss_rows_ref, positive_mask
from tests.helpers import TOLERANCE, assert_close

GRAD_WEIGHTS = (0.7, 1.3)  # d loss_i2t, d loss_t2i: unequal, so a swapped direction fails


def features(rows, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def make_case(batch, dim, *, queue=0, momentum=False, alpha=0.0, ids=None, queue_ids=False, scale=14.0, seed=0):
    """Inputs in float64 (a dict of itc_loss keyword arguments plus the three differentiable ones)."""
    case = dict(image_feats=features(batch, dim, seed), text_feats=features(batch, dim, seed + 1), scale=scale)
    if momentum:
        case.update(image_feats_m=features(batch, dim, seed + 2), text_feats_m=features(batch, dim, seed + 3))
    if queue:
        case.update(image_queue=features(queue, dim, seed + 4), text_queue=features(queue, dim, seed + 5))
    gen = torch.Generator().manual_seed(seed + 6)
    if ids is not None:
        case["positive_ids"] = torch.randint(0, ids, (batch,), generator=gen)
    if queue_ids:
        case["queue_ids"] = torch.randint(0, max(ids or batch, 1), (queue,), generator=gen)
    return dict(case, alpha=alpha)


def run(case, dtype, backend, weights=GRAD_WEIGHTS, **extra):
    """(loss_i2t, loss_t2i, d image, d text, d scale) with features cast to ``dtype``."""
    args = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    image = args.pop("image_feats").requires_grad_()
    text = args.pop("text_feats").requires_grad_()
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(args.pop("scale"), dtype=scale_dtype, device=image.device, requires_grad=True)
    if backend == "spec":
        out = itc_loss_ref(image, text, scale, **args, **extra)
    else:
        out = itc_loss(image, text, scale, backend=backend, **args, **extra)
    grads = torch.autograd.grad(weights[0] * out.loss_i2t + weights[1] * out.loss_t2i, [image, text, scale])
    return (out.loss_i2t, out.loss_t2i, *grads)


def rounded(case, dtype):
    """The float64 case with its features rounded through ``dtype``: the oracle sees the kernel's exact inputs."""
    return {k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}


def check_against_reference(case, dtype, tol, weights=GRAD_WEIGHTS):
    expected = run(rounded(case, dtype), torch.float64, "spec", weights)
    actual = run(case, dtype, "triton", weights)
    names = ("loss_i2t", "loss_t2i", "d image_feats", "d text_feats", "d scale")
    for name, a, e in zip(names, actual, expected, strict=True):
        if name.startswith("loss"):
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{name}: {a.dtype}"
        assert_close(a, e, tol, name)


CASES = {
    "clip_d16": dict(batch=37, dim=16),
    "clip_batch1": dict(batch=1, dim=16),
    "clip_d256_queue": dict(batch=5, dim=256, queue=7),
    "clip_scale100": dict(batch=33, dim=40, scale=100.0),
    "duplicate_ids": dict(batch=37, dim=40, ids=9),
    "queue_ids": dict(batch=23, dim=40, queue=45, ids=6, queue_ids=True),
    "albef": dict(batch=37, dim=40, queue=29, momentum=True, alpha=0.4, ids=12, queue_ids=True),
    "momentum_no_alpha": dict(batch=19, dim=16, queue=13, momentum=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradients_match_reference(name, dtype, poisoned_allocations):
    check_against_reference(make_case(**CASES[name]), dtype, TOLERANCE[dtype] if dtype != torch.float64 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: widened in-kernel when interpreting
@pytest.mark.parametrize("name", ["clip_d16", "albef"])
def test_half_features_under_interpreter(name, dtype):
    check_against_reference(make_case(**CASES[name]), dtype, TOLERANCE[dtype])


def test_plain_clip_is_one_forward_pass_at_any_width(monkeypatch):
    """Plain CLIP runs one forward pass for both directions (the column partials give t2i's log-sum-exp), however
    narrow the features (B = 300 at d = 2: partials larger than the features); ids take the two-pass path."""
    from mome.kernels import itc as kernels

    passes = []
    for name in ("_clip_fwd", "_direction_stats"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: passes.append(_n) or _f(*a, **k))
    for batch, dim in ((45, 24), (300, 2)):
        check_against_reference(make_case(batch, dim), torch.float32, TOLERANCE[torch.float32])  # fp32: no re-run
        assert passes == ["_clip_fwd"], (batch, dim, passes)
        passes.clear()
    check_against_reference(make_case(45, 24, ids=9), torch.float32, TOLERANCE[torch.float32])
    assert passes == ["_direction_stats", "_direction_stats"], passes


def sm90_case(kind, dim):
    if kind == "column_kernel":  # image momentum only (alpha = 0): the texts' column gradient from the column kernel
        case = make_case(45, dim, queue=11)
        return dict(case, image_feats_m=features(45, dim, 99))
    return make_case(**dict(CASES[kind], dim=dim))


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans a CPU launch as sm_90")
@pytest.mark.parametrize("dim", [200, 300], ids=["whole_d", "sliced"])
@pytest.mark.parametrize("kind", ["clip_d16", "albef", "column_kernel"])
def test_sm90_plans_under_interpreter(kind, dim, monkeypatch):
    """sm_90's 16-bit tiles run by the interpreter: features held whole (d 200, a 256-wide tile) and in feature
    slices (d 300), for the one-pass forward and the transposed row kernel (CLIP), distillation (ALBEF) and the
    column kernel."""
    from mome.kernels import itc, itc_configs

    monkeypatch.setattr(itc, "target", lambda device: (90, 132))
    monkeypatch.setattr(itc_configs, "interpreting", lambda: False)
    flags = dict(has_queue_ids=False, distill=False, transposed=True, smooth=False, sigmoid=False)
    plan = itc.bwd_rows_plan(90, torch.float16, itc.Sizes(45, 45, 0, dim), multiprocessors=132, **flags)
    assert plan.constexprs["WHOLE_D"] == (dim == 200) and plan.constexprs["BLOCK_M"] == (128 if dim == 200 else 64)
    check_against_reference(sm90_case(kind, dim), torch.float16, TOLERANCE[torch.float16])


def test_one_online_column_side():
    """Only image momentum given (alpha = 0): texts are columns of i2t and get both gradients, images one."""
    case = make_case(29, 16, queue=11)
    case["image_feats_m"] = features(29, 16, 99)
    check_against_reference(case, torch.float64, 1e-10)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_gradient_of_one_direction_only(weights):
    """CLIP mode serves both directions in each row kernel: a zero gradient on one side must not leak."""
    check_against_reference(make_case(21, 16, queue=5, ids=8), torch.float32, TOLERANCE[torch.float32], weights)


def picks(case, mode, generator=None, dtype=torch.float64):
    args = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    image, text, scale = args.pop("image_feats"), args.pop("text_feats"), args.pop("scale")
    out = itc_loss(image, text, scale, hard_negatives=mode, generator=generator, backend="triton", **args)
    return out.neg_text_idx, out.neg_image_idx


def batch_logits(case):
    text_columns = case.get("text_feats_m", case["text_feats"])
    image_columns = case.get("image_feats_m", case["image_feats"])
    return case["scale"] * case["image_feats"] @ text_columns.T, case["scale"] * case["text_feats"] @ image_columns.T


@pytest.mark.parametrize("mode", ["sample", "hardest"])
def test_hard_negatives_are_never_positive(mode, poisoned_allocations):
    case = make_case(45, 16, queue=10, momentum=True, ids=15, queue_ids=True)
    case["positive_ids"][40:] = 99  # rows 40..44: one id, several positives each
    positives = positive_mask(case["positive_ids"], None, 45, 0, "cpu")
    for picked in picks(case, mode, torch.Generator().manual_seed(3)):
        assert picked.shape == (45,) and picked.dtype == torch.int64
        assert ((picked >= 0) & (picked < 45)).all()
        assert not positives[torch.arange(45), picked].any()


def test_rows_whose_whole_batch_is_positive_get_minus_one():
    case = make_case(3, 16, ids=1)
    for mode in ("sample", "hardest"):
        for picked in picks(case, mode, torch.Generator().manual_seed(0)):
            assert picked.tolist() == [-1, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hardest_is_the_argmax_over_negatives(dtype):
    case = make_case(70, 40, queue=9, momentum=True, ids=30)
    positives = positive_mask(case["positive_ids"], None, 70, 0, "cpu")
    for picked, logits in zip(picks(case, "hardest", dtype=dtype), batch_logits(case), strict=True):
        assert torch.equal(picked, logits.masked_fill(positives, -torch.inf).argmax(dim=1))


def chi_square_p_value(counts, expected):
    statistic = ((counts - expected) ** 2 / expected).sum()
    degrees = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item(), statistic


def test_sampled_negatives_follow_the_softmax_weights_per_row():
    """Repeated draws at a tiny size: per row, the pick frequencies against softmax over its negatives."""
    batch, draws = 4, 60
    case = make_case(batch, 8, scale=3.0, seed=50)
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(2, batch, batch, dtype=torch.float64)
    for _ in range(draws):
        for direction, picked in enumerate(picks(case, "sample", generator)):
            counts[direction, torch.arange(batch), picked] += 1
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    for direction, logits in enumerate(batch_logits(case)):
        assert (counts[direction].diagonal() == 0).all()
        weights = torch.softmax(logits.masked_fill(~off_diagonal, -torch.inf), dim=1)
        expected = weights[off_diagonal] * draws
        # rows are independent multinomials: sum of per-row statistics, batch · (batch - 2) degrees of freedom
        statistic = ((counts[direction][off_diagonal] - expected) ** 2 / expected).sum()
        degrees = batch * (batch - 2)
        p_value = torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2).item()
        assert p_value > 1e-3, f"direction {direction}: chi-square {statistic:.1f}, {degrees} dof, p = {p_value:.2e}"


def test_sampled_negatives_across_tiles():
    """One call, three column tiles: all images equal, so every row shares weights w_j over its negatives j != i;
    the column counts summed over rows are compared with Σ_i w_j / (W - w_i)."""
    batch, calls = 70, 6
    case = make_case(batch, 16, scale=4.0, seed=70)
    case["image_feats"] = case["image_feats"][:1].expand(batch, -1).contiguous()
    generator = torch.Generator().manual_seed(99)
    counts = torch.zeros(batch, dtype=torch.float64)
    for _ in range(calls):
        neg_text, neg_image = picks(case, "sample", generator)
        assert not (neg_text == torch.arange(batch)).any()
        counts += torch.bincount(neg_text, minlength=batch)
    weights = torch.exp(batch_logits(case)[0][0])  # [B]: identical rows
    others = weights.sum() - weights  # W - w_i
    expected = calls * (weights[None, :] / others[:, None]).masked_fill(torch.eye(batch, dtype=torch.bool), 0).sum(0)
    p_value, statistic = chi_square_p_value(counts, expected)
    assert p_value > 1e-3, f"chi-square {statistic:.1f} on {batch - 1} dof, p = {p_value:.2e}"


def test_sampling_is_reproducible_with_a_generator():
    case = make_case(40, 16, scale=2.0, seed=60)

    def draw(seed):
        return torch.cat(picks(case, "sample", torch.Generator().manual_seed(seed)))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


# --- the rows form: rows [start, stop) of a batch against all its columns (ITCLoss(gather=True)) ---

ROWS_BATCH, ROWS_DIM, ROWS_QUEUE = 45, 24, 7
SLICES = {"start": (0, 37), "middle": (13, 32), "end": (ROWS_BATCH - 1, ROWS_BATCH), "whole": (0, ROWS_BATCH)}
DIFFERENTIABLE = ("image_rows", "text_rows", "image_columns", "text_columns", "scale")


def make_batch(mode, batch=ROWS_BATCH, dim=ROWS_DIM, queue=ROWS_QUEUE, device="cpu"):
    """The global batch in float64: online features, and in ALBEF mode momentum features, a queue and ids."""
    gen = torch.Generator().manual_seed(0)

    def unit(rows):
        return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1).to(device)

    case = dict(image=unit(batch), text=unit(batch), scale=11.0)
    if mode == "albef":
        case.update(image_m=unit(batch), text_m=unit(batch), image_queue=unit(queue), text_queue=unit(queue))
        ids = (
            torch.randint(0, batch // 3, (batch,), generator=gen),
            torch.randint(0, batch // 3, (queue,), generator=gen),
        )
        case.update(positive_ids=ids[0].to(device), queue_ids=ids[1].to(device), alpha=0.4)
    return case


def rows_args(case, start, stop, dtype):
    """itc_loss_rows arguments for rows [start, stop): online rows, and columns online (CLIP) or momentum (ALBEF)."""
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    image, text = cast["image"], cast["text"]
    albef = "image_m" in cast
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        image_rows=image[start:stop].clone().requires_grad_(),
        text_rows=text[start:stop].clone().requires_grad_(),
        image_columns=cast["image_m"] if albef else image.clone().requires_grad_(),
        text_columns=cast["text_m"] if albef else text.clone().requires_grad_(),
        scale=torch.tensor(case["scale"], dtype=scale_dtype, device=image.device, requires_grad=True),
        row_offset=start,
    )
    if albef:
        shared = {k: cast[k] for k in ("image_queue", "text_queue", "positive_ids", "queue_ids", "alpha")}
        momentum = dict(image_feats_m=cast["image_m"][start:stop], text_feats_m=cast["text_m"][start:stop])
        args["options"] = ITCOptions(**momentum, **shared)
    return args


def spec(args, **extra):
    """itc_loss_rows_ref on itc_loss_rows arguments."""
    args = dict(args)
    options = args.pop("options", ITCOptions())
    return itc_loss_rows_ref(**args, **options._asdict(), **extra)


def losses_and_grads(args, run):
    out = run(args)
    wrt = [args[name] for name in DIFFERENTIABLE if args[name].requires_grad]
    grads = torch.autograd.grad(GRAD_WEIGHTS[0] * out.loss_i2t + GRAD_WEIGHTS[1] * out.loss_t2i, wrt)
    return out, grads


def check_rows_against_spec(case, start, stop, dtype, tol, mining=None):
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    expected_args = rows_args(rounded, start, stop, torch.float64)
    expected, expected_grads = losses_and_grads(expected_args, lambda a: spec(a, hard_negatives=mining))
    actual, actual_grads = losses_and_grads(
        rows_args(case, start, stop, dtype), lambda a: itc_loss_rows(**a, hard_negatives=mining, backend="triton")
    )
    assert_close(actual.loss_i2t, expected.loss_i2t, tol, "loss_i2t")
    assert_close(actual.loss_t2i, expected.loss_t2i, tol, "loss_t2i")
    names = [name for name in DIFFERENTIABLE if expected_args[name].requires_grad]
    assert len(names) == (3 if "image_m" in case else 5)
    for name, a, e in zip(names, actual_grads, expected_grads, strict=True):
        assert a.dtype == (torch.float32 if name == "scale" and dtype != torch.float64 else dtype), f"d {name}"
        assert_close(a, e, tol, f"d {name}")
    return actual, expected, expected_args


@pytest.mark.parametrize("where", list(SLICES))
@pytest.mark.parametrize("mode", ["clip", "albef"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_match_the_spec(dtype, mode, where, poisoned_allocations):
    """Rows losses, per-row lse, every gradient (rows, online columns, scale) and the hardest picks."""
    start, stop = SLICES[where]
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-10
    actual, expected, r = check_rows_against_spec(make_batch(mode), start, stop, dtype, tol, "hardest")
    assert actual.lse_i2t.shape == (stop - start,) and actual.neg_text_idx.shape == (stop - start,)
    options = r.get("options", ITCOptions())
    text_all = torch.cat([t for t in (r["text_columns"], options.text_queue) if t is not None])
    lse = torch.logsumexp(r["scale"] * r["image_rows"] @ text_all.T, dim=1).detach()
    assert_close(actual.lse_i2t.double(), lse, max(tol, 1e-7), "lse_i2t")  # saved in fp32
    if dtype == torch.float64:  # fp32 rounding may flip near-ties of the arg-max
        assert torch.equal(actual.neg_text_idx, expected.neg_text_idx)
        assert torch.equal(actual.neg_image_idx, expected.neg_image_idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: widened in-kernel when interpreting
@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_rows_in_half_precision_match_the_spec(dtype, mode):
    start, stop = SLICES["middle"]
    check_rows_against_spec(make_batch(mode), start, stop, dtype, TOLERANCE[dtype])


def test_momentum_columns_without_alpha_get_no_gradient():
    """alpha = 0 with momentum columns (constants): the op differentiates only rows and scale."""
    args = rows_args(make_batch("albef"), 5, 17, torch.float64)
    args["options"] = args["options"]._replace(alpha=0.0)
    out, grads = losses_and_grads(args, lambda a: itc_loss_rows(**a, backend="triton"))
    expected, expected_grads = losses_and_grads(args, spec)
    assert_close(out.loss, expected.loss, 1e-10, "loss")
    for name, a, e in zip(("d image_rows", "d text_rows", "d scale"), grads, expected_grads, strict=True):
        assert_close(a, e, 1e-10, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["clip", "albef"])
def test_gpu_matches_reference(dtype, name):
    shape = dict(batch=300, dim=256, scale=100.0)
    if name == "albef":
        shape.update(queue=1000, momentum=True, alpha=0.4, ids=100, queue_ids=True, scale=1 / 0.07)
    case = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in make_case(**shape).items()}
    expected = run(rounded(case, dtype), torch.float64, "spec")
    actual = run(case, dtype, "triton")
    tol = TOLERANCE[dtype] if dtype != torch.float32 else 1e-4
    for name_, a, e in zip(("loss_i2t", "loss_t2i", "d image", "d text", "d scale"), actual, expected, strict=True):
        assert_close(a, e, tol, name_)


@pytest.mark.gpu
@pytest.mark.parametrize("multiprocessors", [None, 1], ids=["column_ranges", "one_range"])
@pytest.mark.parametrize("dim", [256, 512], ids=["whole_d", "sliced"])
@pytest.mark.parametrize("name", ["clip", "albef"])
def test_gpu_tilings_match_reference(name, dim, multiprocessors, monkeypatch):
    """sm_90's four ways through a launch, bf16: features held whole (d 256) or sliced (d 512), with the column
    ranges that 300 rows get on the real GPU, and without them (planned as if for one multiprocessor)."""
    from mome.kernels import itc

    if multiprocessors is not None:
        real = itc.target
        monkeypatch.setattr(itc, "target", lambda device: (real(device)[0], multiprocessors))
    shape = dict(batch=300, dim=dim, scale=100.0)
    if name == "albef":
        shape.update(queue=1000, momentum=True, alpha=0.4, ids=100, queue_ids=True, scale=1 / 0.07)
    case = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in make_case(**shape).items()}
    expected = run(rounded(case, torch.bfloat16), torch.float64, "spec")
    actual = run(case, torch.bfloat16, "triton")
    for name_, a, e in zip(("loss_i2t", "loss_t2i", "d image", "d text", "d scale"), actual, expected, strict=True):
        assert_close(a, e, TOLERANCE[torch.bfloat16], name_)


@pytest.mark.gpu
def test_gpu_hard_negatives_never_positive_and_deterministic_gradients():
    case = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in make_case(2000, 256, ids=700).items()}
    positives = positive_mask(case["positive_ids"], None, 2000, 0, "cuda")
    for picked in picks(case, "sample", torch.Generator("cuda").manual_seed(0), dtype=torch.bfloat16):
        keep = picked >= 0
        assert not positives[torch.arange(2000, device="cuda")[keep], picked[keep]].any()
    first, second = run(case, torch.bfloat16, "triton"), run(case, torch.bfloat16, "triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_gpu_second_half_of_the_batch_matches_the_spec(dtype, mode):
    """Rank 1 of 2 at a real size: b = 300 rows from offset 300 against B = 600 columns (ALBEF: + 1000 queue)."""
    case = make_batch(mode, batch=600, dim=256, queue=1000, device="cuda")
    case["scale"] = 100.0 if mode == "clip" else 1 / 0.07
    check_rows_against_spec(case, 300, 600, dtype, TOLERANCE[dtype] if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_ranges_match_reference(name, dtype, column_ranges, poisoned_allocations):
    """Row programs that each stream a range of the columns (the launch for few rows against many columns:
    ALBEF's queue, one rank's rows), their statistics and row gradients combined by the launcher."""
    case = make_case(**CASES[name])
    check_against_reference(case, dtype, TOLERANCE[dtype] if dtype != torch.float64 else 1e-10)
    columns = case["image_feats"].shape[0] + case.get("image_queue", case["image_feats"][:0]).shape[0]
    assert max(column_ranges) == -(-columns // 32), column_ranges  # one range per 32-column tile


@pytest.mark.parametrize("mode", ["sample", "hardest"])
def test_column_ranges_pick_what_one_range_picks(mode, monkeypatch):
    """The picks do not depend on the split: the arg-max over ranges takes the first range on ties, and the Gumbel
    noise is keyed by the column, not by the program."""
    from mome.kernels import itc_configs

    case = make_case(70, 16, queue=50, ids=30, queue_ids=True, momentum=True, alpha=0.3)
    whole = picks(case, mode, torch.Generator().manual_seed(5))
    monkeypatch.setattr(itc_configs, "MIN_SPLIT_TILES", 1)
    split = picks(case, mode, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True)), (whole, split)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy meets the NaN
def test_a_nan_feature_in_one_column_range_makes_the_pick_minus_one(column_ranges):
    """Image 2 is NaN: every t2i row meets it in the first of three ranges only, and still gets -1."""
    case = make_case(70, 16, queue=10)
    case["image_feats"] = case["image_feats"].clone()
    case["image_feats"][2, 5] = float("nan")
    neg_text, neg_image = picks(case, "hardest")
    assert neg_text[2] == -1 and (neg_image == -1).all()
    others = torch.tensor([i for i in range(70) if i != 2])
    assert ((neg_text[others] >= 0) & (neg_text[others] != others)).all()
    assert max(column_ranges) == 3


@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_rows_in_column_ranges_match_the_spec(mode, column_ranges):
    """One rank's rows, each row program streaming a range of the columns."""
    start, stop = SLICES["middle"]
    check_rows_against_spec(make_batch(mode), start, stop, torch.float64, 1e-10, "hardest")
    assert max(column_ranges) > 1, column_ranges
