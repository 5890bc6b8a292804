"""Every ITC backend that loads here, in every dtype it declares, against a float64 formula written in this file
(not mome.reference): losses, gradients w.r.t. image/text features and scale, hard negatives; local rows; NaN
features; every option with the optional outputs off and on; ids that mean "no id"; declared limits."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mome.nn import ITCLoss
from mome.ops import BackendUnavailableError, itc_loss
from mome.ops.itc import BACKENDS, ITCOptions, itc_loss_rows, sample_seed
from tests.helpers import TOLERANCE, assert_close, declared_dtypes, declared_range, usable_backends

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

BACKEND_NAMES = usable_backends(BACKENDS)
BACKEND_DTYPES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in BACKEND_NAMES
    for dtype in declared_dtypes(BACKENDS, backend)
]
GRAD_WEIGHTS = (0.7, 1.3)  # d loss_i2t, d loss_t2i: unequal, so a swapped direction fails


def unit(rows, dim, gen):
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)


def make_case(
    batch, dim, *, queue=0, momentum=False, alpha=0.0, ids=None, queue_ids=False, no_ids=False, scale=9.0, seed=0
):
    """A whole batch in float64: features (B, d), optional momentum features, queue and ids."""
    gen = torch.Generator().manual_seed(seed)
    case = dict(image=unit(batch, dim, gen), text=unit(batch, dim, gen), scale=scale, alpha=alpha)
    if momentum:
        case.update(image_m=unit(batch, dim, gen), text_m=unit(batch, dim, gen))
    if queue:
        case.update(image_queue=unit(queue, dim, gen), text_queue=unit(queue, dim, gen))
    if ids is not None:
        case["ids"] = torch.randint(0, ids, (batch,), generator=gen)
        if no_ids:
            case["ids"][::3] = -1  # "no id": only the pair itself is positive
    if queue_ids:
        case["queue_ids"] = torch.randint(0, ids or batch, (queue,), generator=gen)
        if no_ids:
            case["queue_ids"][::2] = -1  # empty queue slots: positives of no row
    return case


def positives(case, start, stop):
    """[b, B + Q] bool, element by element from the rule: same pair, or equal ids that are not negative."""
    batch = case["image"].shape[0]
    ids = case.get("ids", torch.arange(batch))
    queue_ids = case.get("queue_ids")
    queue = 0 if "image_queue" not in case else case["image_queue"].shape[0]
    table = torch.zeros(stop - start, batch + queue, dtype=torch.bool)
    for i, row in enumerate(range(start, stop)):
        for j in range(batch):
            table[i, j] = row == j or (ids[row] >= 0 and ids[row] == ids[j])
        for q in range(queue if queue_ids is not None else 0):
            table[i, batch + q] = queue_ids[q] >= 0 and queue_ids[q] == ids[row]
    return table


def formula(case, image, text, scale, start, stop):
    """float64 ``(loss, batch logits, lse)`` per direction (i2t, t2i) of rows [start, stop) against the batch
    columns and the queue."""
    pos = positives(case, start, stop).double()
    alpha = case["alpha"]
    batch = image.shape[0]
    results = []
    for rows, rows_m, columns, queue in (
        (image, case.get("image_m"), case.get("text_m", text), case.get("text_queue")),
        (text, case.get("text_m"), case.get("image_m", image), case.get("image_queue")),
    ):
        columns = columns if queue is None else torch.cat([columns, queue])
        logits = scale * rows[start:stop] @ columns.T
        with torch.no_grad():
            target = pos / pos.sum(1, keepdim=True)
            if alpha > 0:
                target = alpha * torch.softmax(scale * rows_m[start:stop] @ columns.T, 1) + (1 - alpha) * target
        loss = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
        results.append((loss, logits[:, :batch].detach(), torch.logsumexp(logits.detach(), 1)))
    return results


def run_op(case, dtype, backend, start, stop, whole, mining=None, generator=None):
    """The op on ``case`` cast to ``dtype``: losses, picks and the gradients w.r.t. (image, text, scale)."""
    cast = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    image, text = cast["image"].requires_grad_(), cast["text"].requires_grad_()
    scale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    names = ("image_m", "text_m", "image_queue", "text_queue", "ids", "queue_ids", "alpha")
    options = ITCOptions(*(cast.get(name) for name in names))
    if whole:  # ITCOptions' fields are itc_loss's keyword arguments, but for the mining columns (rows form only)
        kwargs = {k: v for k, v in options._asdict().items() if not k.startswith("mining_")}
        out = itc_loss(image, text, scale, **kwargs, hard_negatives=mining, generator=generator, backend=backend)
    else:
        momentum_rows = {k: None if t is None else t[start:stop] for k, t in options._asdict().items() if "_m" in k}
        columns = cast.get("image_m", image), cast.get("text_m", text)
        out = itc_loss_rows(
            image[start:stop],
            text[start:stop],
            *columns,
            scale,
            row_offset=start,
            options=options._replace(**momentum_rows),
            hard_negatives=mining,
            backend=backend,
        )
    grads = torch.autograd.grad(GRAD_WEIGHTS[0] * out.loss_i2t + GRAD_WEIGHTS[1] * out.loss_t2i, [image, text, scale])
    return out, grads


CASES = {
    "clip": dict(batch=13, dim=20),
    "batch1": dict(batch=1, dim=16),
    "odd_sizes_queue": dict(batch=37, dim=7, queue=5),
    "albef": dict(batch=11, dim=16, queue=9, momentum=True, alpha=0.4, ids=4, queue_ids=True),
    "momentum_no_alpha": dict(batch=9, dim=16, queue=4, momentum=True),
    "duplicate_ids": dict(batch=17, dim=16, ids=5),
    "queue_ids": dict(batch=9, dim=16, queue=12, ids=4, queue_ids=True),
    "no_ids": dict(batch=12, dim=16, queue=7, ids=3, queue_ids=True, no_ids=True),
}
# (case, rows [start, stop) or None for the whole batch through itc_loss, hard negatives)
RUNS = {
    **{name: (name, None, None) for name in CASES},
    "clip_hardest": ("duplicate_ids", None, "hardest"),
    "albef_hardest": ("albef", None, "hardest"),
    "rows_clip_hardest": ("duplicate_ids", (5, 13), "hardest"),
    "rows_albef": ("albef", (7, 11), "hardest"),
    "rows_first": ("queue_ids", (0, 4), None),
    "rows_one_no_ids": ("no_ids", (11, 12), "hardest"),
}


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("run", list(RUNS))
def test_loss_gradients_and_hardest_negatives_match_the_formula(run, backend, dtype):
    name, rows, mining = RUNS[run]
    case = make_case(**CASES[name], seed=len(run))
    batch = case["image"].shape[0]
    start, stop = rows or (0, batch)
    out, grads = run_op(case, dtype, backend, start, stop, rows is None, mining)
    rounded = {
        k: (v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()
    }
    image, text = rounded["image"].requires_grad_(), rounded["text"].requires_grad_()
    scale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    (loss_i2t, logits_i2t, lse_i2t), (loss_t2i, logits_t2i, lse_t2i) = formula(rounded, image, text, scale, start, stop)
    expected = torch.autograd.grad(GRAD_WEIGHTS[0] * loss_i2t + GRAD_WEIGHTS[1] * loss_t2i, [image, text, scale])
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-10
    assert out.loss_i2t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.loss_i2t, loss_i2t, tol, "loss_i2t")
    assert_close(out.loss_t2i, loss_t2i, tol, "loss_t2i")
    assert_close(out.loss, (loss_i2t + loss_t2i) / 2, tol, "loss")
    for label, actual, wanted in zip(("d image_feats", "d text_feats", "d scale"), grads, expected, strict=True):
        assert_close(actual, wanted, tol, label)
    if rows is not None:  # the rows op also returns the per-row log-sum-exps (fp32)
        assert_close(out.lse_i2t.double(), lse_i2t, max(tol, 1e-7), "lse_i2t")
        assert_close(out.lse_t2i.double(), lse_t2i, max(tol, 1e-7), "lse_t2i")
    if mining is None:
        assert out.neg_text_idx is None and out.neg_image_idx is None
        return
    in_batch = positives(case, start, stop)[:, :batch]
    for picked, logits in ((out.neg_text_idx, logits_i2t), (out.neg_image_idx, logits_t2i)):
        assert picked.shape == (stop - start,) and picked.dtype == torch.int64
        has_negative = ~in_batch.all(1)
        assert (picked[~has_negative] == -1).all() and (picked[has_negative] >= 0).all()
        rows_ = has_negative.nonzero().flatten()
        assert not in_batch[rows_, picked[rows_]].any(), "a hard negative is a positive"
        best = logits.masked_fill(in_batch, -math.inf).max(1).values[rows_]
        slack = 0.0 if dtype == torch.float64 else 8 * torch.finfo(dtype).eps * case["scale"]
        assert (logits[rows_, picked[rows_]] >= best - slack).all(), "hardest is not the arg-max"


def sampled_rows(case, start, stop, seed, backend):
    momentum = dict(image_feats_m=case["image_m"][start:stop], text_feats_m=case["text_m"][start:stop])
    queue = dict(image_queue=case["image_queue"], text_queue=case["text_queue"], queue_ids=case["queue_ids"])
    args = dict(momentum, **queue, positive_ids=case["ids"], alpha=case["alpha"])
    out = itc_loss_rows(
        case["image"][start:stop],
        case["text"][start:stop],
        case["image_m"],
        case["text_m"],
        case["scale"],
        row_offset=start,
        options=ITCOptions(**args),
        hard_negatives="sample",
        seed=seed,
        backend=backend,
    )
    return torch.cat([out.neg_text_idx, out.neg_image_idx])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_sampled_negatives_are_keyed_by_seed_and_global_row(backend):
    """Slices reproduce the whole batch's draws; itc_loss with a generator draws what the rows op draws with the
    seed taken from that generator: one process equals any split among ranks, on every backend."""
    case = make_case(21, 16, queue=5, momentum=True, alpha=0.4, ids=9, queue_ids=True, seed=3)
    whole = sampled_rows(case, 0, 21, 1234, backend)
    parts = [sampled_rows(case, start, stop, 1234, backend) for start, stop in ((0, 8), (8, 9), (9, 21))]
    assert torch.equal(torch.cat([p[: len(p) // 2] for p in parts]), whole[:21])
    assert torch.equal(torch.cat([p[len(p) // 2 :] for p in parts]), whole[21:])
    assert not torch.equal(sampled_rows(case, 0, 21, 1235, backend), whole)
    full = itc_loss(
        case["image"],
        case["text"],
        case["scale"],
        image_feats_m=case["image_m"],
        text_feats_m=case["text_m"],
        image_queue=case["image_queue"],
        text_queue=case["text_queue"],
        alpha=case["alpha"],
        positive_ids=case["ids"],
        queue_ids=case["queue_ids"],
        hard_negatives="sample",
        generator=torch.Generator().manual_seed(5),
        backend=backend,
    )
    seed = int(sample_seed(torch.Generator().manual_seed(5)))
    assert torch.equal(torch.cat([full.neg_text_idx, full.neg_image_idx]), sampled_rows(case, 0, 21, seed, backend))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize("mining", ["sample", "hardest"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_nan_feature_gives_a_nan_loss_and_minus_one_where_weights_are_undefined(backend, mining):
    """Issue 12 (6): the reference crashed in torch.multinomial. Image 2 is NaN: its i2t row and every t2i row
    (all see image 2 as a column) have undefined weights; the other i2t rows pick as usual."""
    case = make_case(9, 16, seed=4)
    image = case["image"].clone()
    image[2, 5] = float("nan")
    out = itc_loss(
        image, case["text"], 5.0, hard_negatives=mining, backend=backend, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isnan(out.loss) and torch.isnan(out.loss_i2t) and torch.isnan(out.loss_t2i)
    assert out.neg_text_idx[2] == -1 and (out.neg_image_idx == -1).all()
    others = torch.tensor([i for i in range(9) if i != 2])
    assert ((out.neg_text_idx[others] >= 0) & (out.neg_text_idx[others] != others)).all()


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of one process: ITCLoss(gather=True) takes the rows path with b = B."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


OPTIONS = {
    "clip": {},
    "momentum": dict(momentum=True, alpha=0.4),
    "queue_ids": dict(queue=12, ids=3, queue_ids=True, momentum=True),
}


@pytest.mark.parametrize("mining", [None, "sample", "hardest"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_every_option_with_optional_outputs_off_and_on_and_gathered(backend, options, mining, one_rank_group):
    """Issue 12 (9): gather=True without mining crashed on the reference (one empty tensor returned as both
    index outputs). Each option, indices absent and present, gathered or not: the same results, backward runs."""
    case = make_case(10, 16, seed=7, **OPTIONS[options])
    results = []
    for gather in (False, True):
        queue = dict(queue_size=12, embed_dim=16) if "image_queue" in case else {}
        module = ITCLoss(gather=gather, hard_negatives=mining, alpha=case["alpha"], backend=backend, **queue).double()
        if queue:
            module.queue.image_queue.copy_(case["image_queue"])
            module.queue.text_queue.copy_(case["text_queue"])
            module.queue.ids.copy_(case["queue_ids"])
        image, text = case["image"].clone().requires_grad_(), case["text"].clone().requires_grad_()
        out = module(
            image,
            text,
            image_feats_m=case.get("image_m"),
            text_feats_m=case.get("text_m"),
            positive_ids=case.get("ids"),
            generator=torch.Generator().manual_seed(11),
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
        assert (out.neg_text_idx is None) == (mining is None) == (out.neg_image_idx is None)
        results.append((out, image.grad, text.grad, module.logit_scale.grad))
    (whole, *whole_grads), (gathered, *gathered_grads) = results
    assert_close(gathered.loss.detach(), whole.loss.detach(), 1e-12, "gathered loss")
    for label, a, e in zip(("d image", "d text", "d logit_scale"), gathered_grads, whole_grads, strict=True):
        assert_close(a, e, 1e-10, label)
    if mining is not None:
        assert torch.equal(gathered.neg_text_idx, whole.neg_text_idx)
        assert torch.equal(gathered.neg_image_idx, whole.neg_image_idx)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_minus_one_ids_do_not_match_the_queues_empty_slots(backend):
    """Issue 12 (10): FeatureQueue's -1 means "no id". A fresh queue is all -1; pairs with id -1 in the batch
    then get the loss of pairs with unique ids (their only positive is their own pair), not the queue's slots."""
    case = make_case(6, 16, seed=9)
    ids = torch.tensor([-1, -1, 0, 1, 1, 2])
    unique = torch.tensor([100, 101, 0, 1, 1, 2])

    def loss_with(positive_ids):
        module = ITCLoss(queue_size=8, embed_dim=16, backend=backend).double()
        torch.manual_seed(0)
        module.queue.image_queue.copy_(F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1))
        module.queue.text_queue.copy_(F.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1))
        return module(case["image"], case["text"], positive_ids=positive_ids).loss

    assert_close(loss_with(ids), loss_with(unique), 1e-12, "loss with -1 ids")
    # the op alone: a queue entry with id -1 is a negative of a pair whose id is -1
    queue = dict(image_queue=case["image"][:2], text_queue=case["text"][:2], queue_ids=torch.tensor([-1, 0]))
    with_minus_one = itc_loss(case["image"], case["text"], 7.0, positive_ids=ids, backend=backend, **queue)
    without_ids = itc_loss(case["image"], case["text"], 7.0, positive_ids=unique, backend=backend, **queue)
    assert_close(with_minus_one.loss, without_ids.loss, 1e-12, "queue id -1")


def test_forced_triton_outside_a_declared_limit_raises_and_the_reference_runs():
    if "triton" not in BACKEND_NAMES:
        pytest.skip("triton cannot run here")
    _, high = declared_range(BACKENDS, "triton", "feature_dim")
    image = torch.zeros(1, high + 1, dtype=torch.float16)
    image[0, 0] = 1
    inputs = dict(image_rows=image, image_columns=image, options=ITCOptions())
    assert "feature_dim" in BACKENDS.reason("triton", inputs)
    assert BACKENDS.reason("reference", inputs) is None
    with pytest.raises(BackendUnavailableError, match="feature_dim"):
        itc_loss(image, image, 1.0, backend="triton")
    assert torch.float64 not in BACKENDS.limits("triton").dtypes_on("cuda")  # fp64 on a GPU: the reference's


@pytest.mark.parametrize("backend", ["auto", *BACKEND_NAMES])
def test_meta_tensors_give_meta_outputs_through_the_fake(backend):
    """Issue 12 (8): shapes without data, like attention: the fake implementations, forward and backward."""
    image = torch.empty(6, 8, device="meta").requires_grad_()
    text = torch.empty(6, 8, device="meta").requires_grad_()
    queue = torch.empty(4, 8, device="meta")
    out = itc_loss(
        image,
        text,
        3.0,
        image_feats_m=torch.empty(6, 8, device="meta"),
        text_feats_m=torch.empty(6, 8, device="meta"),
        image_queue=queue,
        text_queue=queue,
        alpha=0.4,
        positive_ids=torch.empty(6, dtype=torch.int64, device="meta"),
        hard_negatives="sample",
        backend=backend,
    )
    assert out.loss.device.type == "meta" and out.loss.shape == () and out.neg_text_idx.shape == (6,)
    out.loss.backward()
    assert image.grad.shape == (6, 8) and image.grad.device.type == "meta"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_torch_func_transforms_see_through_the_op(backend):
    """torch.func.jvp / grad run the specification (a custom op would give silent zero tangents)."""
    case = make_case(7, 12, queue=3, momentum=True, alpha=0.3, ids=4, queue_ids=True, seed=12)
    extra = dict(
        image_feats_m=case["image_m"],
        text_feats_m=case["text_m"],
        image_queue=case["image_queue"],
        text_queue=case["text_queue"],
        alpha=case["alpha"],
        positive_ids=case["ids"],
        queue_ids=case["queue_ids"],
        backend=backend,
    )

    def op(image, text):
        return itc_loss(image, text, case["scale"], **extra).loss

    def wanted(image, text):
        (loss_i2t, *_), (loss_t2i, *_) = formula(case, image, text, case["scale"], 0, 7)
        return (loss_i2t + loss_t2i) / 2

    primals = (case["image"], case["text"])
    tangents = tuple(
        torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in (1, 2)
    )
    assert_close(torch.func.jvp(op, primals, tangents)[1], torch.func.jvp(wanted, primals, tangents)[1], 1e-10, "jvp")
    for got, want in zip(torch.func.grad(op, (0, 1))(*primals), torch.func.grad(wanted, (0, 1))(*primals), strict=True):
        assert_close(got, want, 1e-10, "torch.func.grad")
