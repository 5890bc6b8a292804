"""The Triton ITC kernels' options under the interpreter against the float64 specification: the sigmoid loss (SigLIP)
with its bias, label smoothing, hard negatives drawn against other columns (BLIP's online similarities), detached
columns; whole batch and rows, odd sizes, poisoned allocations."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.ops.itc import BACKENDS, ITCOptions, itc_loss_rows
from mome.reference.itc import itc_loss_ref, itc_loss_rows_ref, positive_mask
from tests.helpers import TOLERANCE, assert_close, usable_backends

pytestmark = [
    pytest.mark.skipif("triton" not in usable_backends(BACKENDS), reason="triton cannot run here"),
    pytest.mark.usefixtures("poisoned_allocations"),
]
GRAD_WEIGHTS = (0.7, 1.3)  # d loss_i2t, d loss_t2i: unequal, so a swapped direction fails


def features(rows, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)


def make_case(batch, dim, *, queue=0, momentum=False, ids=None, queue_ids=False, seed=0, **options):
    """float64 inputs: ``itc_loss`` keyword arguments plus image, text, scale and (sigmoid) bias."""
    case = dict(image=features(batch, dim, seed), text=features(batch, dim, seed + 1), scale=10.0, **options)
    if options.get("loss") == "sigmoid":
        case["bias"] = -4.0
    if momentum:
        case.update(image_feats_m=features(batch, dim, seed + 2), text_feats_m=features(batch, dim, seed + 3))
    if queue:
        case.update(image_queue=features(queue, dim, seed + 4), text_queue=features(queue, dim, seed + 5))
    gen = torch.Generator().manual_seed(seed + 6)
    if ids is not None:
        case["positive_ids"] = torch.randint(0, ids, (batch,), generator=gen)
    if queue_ids:
        case["queue_ids"] = torch.randint(0, ids, (queue,), generator=gen)
    return case


def cast(case, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}


def run(case, dtype, backend):
    """(loss_i2t, loss_t2i, picks..., gradients w.r.t. image, text, scale[, bias]) with features in ``dtype``."""
    args = cast(case, dtype)
    image, text = args.pop("image").requires_grad_(), args.pop("text").requires_grad_()
    small = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(args.pop("scale"), dtype=small, requires_grad=True)
    wrt = [image, text, scale]
    if "bias" in args:
        args["logit_bias"] = torch.tensor(args.pop("bias"), dtype=small, requires_grad=True)
        wrt.append(args["logit_bias"])
    if backend == "spec":
        out = itc_loss_ref(image, text, scale, **args)
    else:
        out = itc_loss(image, text, scale, backend=backend, **args)
    grads = torch.autograd.grad(GRAD_WEIGHTS[0] * out.loss_i2t + GRAD_WEIGHTS[1] * out.loss_t2i, wrt)
    return (out.loss_i2t, out.loss_t2i, *grads), (out.neg_text_idx, out.neg_image_idx)


def check(case, dtype, tol=None):
    tol = tol or TOLERANCE[dtype]
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    (expected, expected_picks), (actual, picks) = run(rounded, torch.float64, "spec"), run(case, dtype, "triton")
    names = ("loss_i2t", "loss_t2i", "d image", "d text", "d scale", "d bias")
    for name, a, e in zip(names, actual, expected, strict=False):
        assert_close(a, e, tol, name)
    return picks, expected_picks


CASES = {
    "sigmoid": dict(batch=37, dim=20, loss="sigmoid"),
    "sigmoid_ids_queue": dict(batch=23, dim=40, queue=45, ids=6, queue_ids=True, loss="sigmoid"),
    "sigmoid_momentum_columns": dict(batch=19, dim=16, queue=7, momentum=True, loss="sigmoid"),
    "sigmoid_detached": dict(batch=33, dim=24, ids=20, loss="sigmoid", detach_columns=True),
    "smooth": dict(batch=37, dim=16, label_smoothing=0.1),
    "smooth_queue_ids": dict(batch=23, dim=40, queue=45, ids=6, queue_ids=True, label_smoothing=0.3),
    "smooth_albef": dict(
        batch=29, dim=24, queue=11, momentum=True, alpha=0.4, ids=9, queue_ids=True, label_smoothing=0.2
    ),  # fmt: skip
    "smooth_detached": dict(batch=35, dim=20, label_smoothing=0.1, detach_columns=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_options_match_the_spec(name, dtype):
    check(make_case(**CASES[name]), dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_options_in_column_ranges_match_the_spec(name, column_ranges):
    """The sigmoid loss and label smoothing with row programs that each stream a range of the columns (32 more
    pairs than the case has: at least two 32-column tiles)."""
    check(make_case(**dict(CASES[name], batch=CASES[name]["batch"] + 32)), torch.float64, 1e-10)
    assert max(column_ranges) > 1, column_ranges


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16: widened in-kernel when interpreting
@pytest.mark.parametrize("name", ["sigmoid_ids_queue", "smooth_albef"])
def test_options_in_half_precision(name, dtype):
    check(make_case(**CASES[name]), dtype)


def test_sigmoid_loss_of_confident_pairs_keeps_its_small_terms():
    """Well separated pairs (scale 100, bias -10): every term is tiny, and a plain log(1 + exp(-|z|)) would
    round most of them to 0 in fp32; the kernel's softplus keeps them (relative error of the whole loss)."""
    case = make_case(37, 8, loss="sigmoid")
    case["text"] = case["image"].clone()
    case["scale"], case["bias"] = 100.0, -10.0
    check(case, torch.float32)


def test_sigmoid_hardest_negatives_are_the_argmax_of_the_similarity():
    """Mining ignores the bias: the picks are those of the softmax loss (rows' arg-max over their negatives)."""
    case = make_case(45, 16, ids=15, loss="sigmoid", hard_negatives="hardest")
    picks, expected = check(case, torch.float64)
    assert torch.equal(picks[0], expected[0]) and torch.equal(picks[1], expected[1])


@pytest.mark.parametrize("mining", ["hardest", "sample"])
def test_similarity_source_mines_the_online_batch(mining):
    """Momentum columns (ALBEF's loss) with BLIP's mining from the online similarities: one more pass over the
    online batch. Hardest: the spec's picks; sample: never a positive, and not the loss-source draws."""
    case = make_case(45, 16, queue=10, momentum=True, alpha=0.4, ids=15, queue_ids=True)
    case.update(hard_negatives=mining, hard_negative_source="similarity", generator=torch.Generator().manual_seed(2))
    image, text = case["image"], case["text"]
    positives = positive_mask(case["positive_ids"], None, 45, 0, "cpu")
    if mining == "hardest":
        case["generator"] = None
        picks, expected = check(case, torch.float64)
        assert torch.equal(picks[0], expected[0]) and torch.equal(picks[1], expected[1])
        online = (image @ text.T).masked_fill(positives, -torch.inf)
        assert torch.equal(picks[0], online.argmax(1)) and torch.equal(picks[1], online.T.argmax(1))
        return
    picks = run(case, torch.float32, "triton")[1]
    for picked in picks:
        assert ((picked >= 0) & (picked < 45)).all() and not positives[torch.arange(45), picked].any()
    loss_source = run(case | dict(hard_negative_source="loss", generator=torch.Generator().manual_seed(2)),
                      torch.float32, "triton")[1]  # fmt: skip
    assert not torch.equal(picks[0], loss_source[0])


# --- the rows form (one rank's share): online columns get their gradient from the column kernels ---

ROWS_BATCH = 45


def rows_args(case, start, stop, dtype):
    args = cast(case, dtype)
    small = torch.float64 if dtype == torch.float64 else torch.float32
    image, text = args.pop("image"), args.pop("text")
    options = {k: args.pop(k) for k in ("image_queue", "text_queue", "positive_ids", "queue_ids") if k in args}
    options.update(label_smoothing=args.pop("label_smoothing", 0.0), loss=args.pop("loss", "softmax"))
    result = dict(
        image_rows=image[start:stop].clone().requires_grad_(),
        text_rows=text[start:stop].clone().requires_grad_(),
        image_columns=image.clone().requires_grad_(),
        text_columns=text.clone().requires_grad_(),
        scale=torch.tensor(args.pop("scale"), dtype=small, requires_grad=True),
        row_offset=start,
        options=ITCOptions(**options),
    )
    if "bias" in args:
        result["logit_bias"] = torch.tensor(args.pop("bias"), dtype=small, requires_grad=True)
    return result


DIFFERENTIABLE = ("image_rows", "text_rows", "image_columns", "text_columns", "scale", "logit_bias")


def rows_run(args, backend):
    wrt = [args[name] for name in DIFFERENTIABLE if name in args]
    if backend == "spec":
        kwargs = dict(args)
        options = kwargs.pop("options")._asdict()
        out = itc_loss_rows_ref(**kwargs, **options)
    else:
        out = itc_loss_rows(**args, backend=backend)
    grads = torch.autograd.grad(GRAD_WEIGHTS[0] * out.loss_i2t + GRAD_WEIGHTS[1] * out.loss_t2i, wrt)
    return out.loss_i2t, out.loss_t2i, *grads


@pytest.mark.parametrize(
    "options",
    [dict(loss="sigmoid"), dict(label_smoothing=0.15, queue=9, ids=14, queue_ids=True)],
    ids=["sigmoid", "smooth_queue_ids"],
)
@pytest.mark.parametrize("start, stop", [(13, 32), (44, 45)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_with_options_match_the_spec(options, start, stop, dtype):
    case = make_case(ROWS_BATCH, 24, **options)
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    expected = rows_run(rows_args(rounded, start, stop, torch.float64), "spec")
    actual = rows_run(rows_args(case, start, stop, dtype), "triton")
    names = ("loss_i2t", "loss_t2i", *(f"d {n}" for n in DIFFERENTIABLE))
    assert len(actual) == (8 if options.get("loss") == "sigmoid" else 7)
    for name, a, e in zip(names, actual, expected, strict=False):
        assert_close(a, e, TOLERANCE[dtype], name)


def test_sigmoid_rows_return_no_log_sum_exp():
    args = rows_args(make_case(12, 8, loss="sigmoid"), 3, 7, torch.float32)
    out = itc_loss_rows(**args, backend="triton")
    assert out.lse_i2t.shape == (0,) and out.lse_t2i.shape == (0,)
