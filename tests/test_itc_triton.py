"""itc_loss, Triton backend: loss, every gradient and the hard negatives against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.reference.itc import itc_loss_ref, positive_mask
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: upcast in-kernel when interpreting
@pytest.mark.parametrize("name", ["clip_d16", "albef"])
def test_half_features_under_interpreter(name, dtype):
    check_against_reference(make_case(**CASES[name]), dtype, TOLERANCE[dtype])


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
def test_gpu_hard_negatives_never_positive_and_deterministic_gradients():
    case = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in make_case(2000, 256, ids=700).items()}
    positives = positive_mask(case["positive_ids"], None, 2000, 0, "cuda")
    for picked in picks(case, "sample", torch.Generator("cuda").manual_seed(0), dtype=torch.bfloat16):
        keep = picked >= 0
        assert not positives[torch.arange(2000, device="cuda")[keep], picked[keep]].any()
    first, second = run(case, torch.bfloat16, "triton"), run(case, torch.bfloat16, "triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
