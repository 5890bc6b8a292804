"""itc_loss (reference backend) vs open_clip's ClipLoss formula, ALBEF's ITA formula and explicit targets; the
spec's rows form against its whole-batch form; argument validation; torch.compile of the rows op."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.ops.itc import ITCOptions, itc_loss_rows
from mome.reference.itc import itc_loss_ref, itc_loss_rows_ref, sample_seed
from tests.helpers import assert_close


def features(rows, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)


def clip_loss_formula(image, text, logit_scale):
    """open_clip ClipLoss, single process: cross-entropy of both logit directions against arange labels."""
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def albef_ita_formula(image, text, image_m, text_m, image_queue, text_queue, idx, idx_queue, temp, alpha):
    """ALBEF's ITA with ids (retrieval form): columns are momentum features then the queue, dims as in its code."""
    idx_all = torch.cat([idx.view(1, -1), idx_queue.view(1, -1)], dim=1)
    pos_idx = torch.eq(idx.view(-1, 1), idx_all).double()
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    image_feat_m_all = torch.cat([image_m.t(), image_queue.t()], dim=1)  # d × (B + Q)
    text_feat_m_all = torch.cat([text_m.t(), text_queue.t()], dim=1)
    sim_i2t_targets = alpha * F.softmax(image_m @ text_feat_m_all / temp, dim=1) + (1 - alpha) * sim_targets
    sim_t2i_targets = alpha * F.softmax(text_m @ image_feat_m_all / temp, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image @ text_feat_m_all / temp
    sim_t2i = text @ image_feat_m_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("batch, dim", [(1, 8), (7, 16), (37, 40)])
def test_clip_mode_equals_open_clip_formula(batch, dim):
    image, text = features(batch, dim, 0), features(batch, dim, 1)
    logit_scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    result = itc_loss(image, text, logit_scale, backend="reference")
    assert_close(result.loss, clip_loss_formula(image, text, logit_scale), 1e-14)
    assert result.neg_text_idx is None and result.neg_image_idx is None


def test_albef_mode_equals_albef_formula():
    batch, queue, dim, temp, alpha = 6, 11, 16, 0.07, 0.4
    image, text, image_m, text_m = (features(batch, dim, seed) for seed in range(4))
    image_queue, text_queue = features(queue, dim, 4), features(queue, dim, 5)
    idx = torch.tensor([0, 1, 0, 2, 3, 3])
    idx_queue = torch.randint(0, 6, (queue,), generator=torch.Generator().manual_seed(6))
    expected = albef_ita_formula(image, text, image_m, text_m, image_queue, text_queue, idx, idx_queue, temp, alpha)
    momentum = dict(image_feats_m=image_m, text_feats_m=text_m, image_queue=image_queue, text_queue=text_queue)
    result = itc_loss(
        image, text, 1 / temp, **momentum, alpha=alpha, positive_ids=idx, queue_ids=idx_queue, backend="reference"
    )
    assert_close(result.loss, expected, 1e-13)


def explicit_direction(rows, columns, scale, positives, soft_rows=None, alpha=0.0):
    """Row by row: -sum_j target_j · log_softmax(logits)_j with targets built element by element."""
    total = 0.0
    for i in range(rows.shape[0]):
        logits = torch.stack([scale * rows[i] @ c for c in columns])
        count = sum(bool(p) for p in positives[i])
        targets = torch.tensor([float(p) / count for p in positives[i]], dtype=torch.float64)
        if alpha > 0:
            targets = (
                alpha * torch.softmax(torch.stack([scale * soft_rows[i] @ c for c in columns]), 0)
                + (1 - alpha) * targets
            )
        total = total - (targets * (logits - torch.logsumexp(logits, 0))).sum()
    return total / rows.shape[0]


def test_duplicate_ids_queue_and_distillation_match_explicit_targets():
    batch, queue, dim, scale, alpha = 5, 4, 8, 9.0, 0.3
    image, text, image_m, text_m = (features(batch, dim, seed) for seed in range(10, 14))
    image_queue, text_queue = features(queue, dim, 14), features(queue, dim, 15)
    ids, queue_ids = torch.tensor([3, 1, 3, 3, 0]), torch.tensor([1, 7, 3, 0])
    positives = [[ids[i] == ids[j] for j in range(batch)] + [ids[i] == q for q in queue_ids] for i in range(batch)]
    text_columns, image_columns = torch.cat([text_m, text_queue]), torch.cat([image_m, image_queue])
    loss_i2t = explicit_direction(image, text_columns, scale, positives, image_m, alpha)
    loss_t2i = explicit_direction(text, image_columns, scale, positives, text_m, alpha)
    momentum = dict(image_feats_m=image_m, text_feats_m=text_m, image_queue=image_queue, text_queue=text_queue)
    result = itc_loss(
        image, text, scale, **momentum, alpha=alpha, positive_ids=ids, queue_ids=queue_ids, backend="reference"
    )
    assert_close(result.loss_i2t, loss_i2t, 1e-13, "loss_i2t")
    assert_close(result.loss_t2i, loss_t2i, 1e-13, "loss_t2i")


@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_gradcheck(mode):
    image, text = features(5, 6, 20).requires_grad_(), features(5, 6, 21).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    if mode == "clip":
        assert torch.autograd.gradcheck(
            lambda i, t, s: itc_loss(i, t, s, backend="reference").loss, (image, text, scale)
        )
        return
    # ALBEF: the soft targets are constants (no gradient reaches scale through them), so the numerical
    # check runs with the scale fixed; its gradient is checked against the frozen-target formula below.
    extra = dict(
        image_feats_m=features(5, 6, 22),
        text_feats_m=features(5, 6, 23),
        image_queue=features(3, 6, 24),
        text_queue=features(3, 6, 25),
        alpha=0.4,
        positive_ids=torch.tensor([0, 1, 1, 2, 3]),
    )
    assert torch.autograd.gradcheck(lambda i, t: itc_loss(i, t, 4.0, backend="reference", **extra).loss, (image, text))
    itc_loss(image, text, scale, backend="reference", **extra).loss.backward()
    epsilon = 1e-6
    with torch.no_grad():
        targets = [_frozen_targets(image, text, 4.0, extra, direction) for direction in ("i2t", "t2i")]
        plus = _loss_with_targets(image, text, 4.0 + epsilon, extra, targets)
        minus = _loss_with_targets(image, text, 4.0 - epsilon, extra, targets)
    assert abs(scale.grad.item() - (plus - minus).item() / (2 * epsilon)) < 1e-7


def _columns(image, text, extra, direction):
    if direction == "i2t":
        return torch.cat([extra["text_feats_m"], extra["text_queue"]])
    return torch.cat([extra["image_feats_m"], extra["image_queue"]])


def _frozen_targets(image, text, scale, extra, direction):
    ids = extra["positive_ids"]
    hard = torch.cat([(ids[:, None] == ids[None, :]).double(), torch.zeros(len(ids), 3, dtype=torch.float64)], 1)
    hard = hard / hard.sum(1, keepdim=True)
    rows_m = extra["image_feats_m"] if direction == "i2t" else extra["text_feats_m"]
    soft = torch.softmax(scale * rows_m @ _columns(image, text, extra, direction).T, dim=1)
    return extra["alpha"] * soft + (1 - extra["alpha"]) * hard


def _loss_with_targets(image, text, scale, extra, targets):
    total = 0.0
    for rows, direction, target in ((image, "i2t", targets[0]), (text, "t2i", targets[1])):
        logits = scale * rows @ _columns(image, text, extra, direction).T
        total = total - (target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    return total / 2


def test_hard_negatives_are_never_positive_and_hardest_is_argmax():
    batch = 9
    image, text = features(batch, 8, 30), features(batch, 8, 31)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5])
    for mode in ("sample", "hardest"):
        for seed in range(5):
            result = itc_loss(
                image,
                text,
                10.0,
                positive_ids=ids,
                hard_negatives=mode,
                generator=torch.Generator().manual_seed(seed),
                backend="reference",
            )
            for picked in (result.neg_text_idx, result.neg_image_idx):
                assert picked.shape == (batch,) and picked.dtype == torch.int64
                assert (ids[picked] != ids).all()
    logits = 10.0 * image @ text.T
    hardest = itc_loss(image, text, 10.0, positive_ids=ids, hard_negatives="hardest", backend="reference")
    assert torch.equal(hardest.neg_text_idx, logits.masked_fill(ids[:, None] == ids[None, :], -1e9).argmax(1))
    assert torch.equal(hardest.neg_image_idx, logits.T.masked_fill(ids[:, None] == ids[None, :], -1e9).argmax(1))


def test_rows_without_a_negative_get_minus_one():
    image, text = features(3, 4, 40), features(3, 4, 41)
    result = itc_loss(
        image, text, 5.0, positive_ids=torch.tensor([7, 7, 7]), hard_negatives="sample", backend="reference"
    )
    assert result.neg_text_idx.tolist() == [-1, -1, -1] and result.neg_image_idx.tolist() == [-1, -1, -1]


def test_sampled_negatives_follow_the_softmax_weights():
    """Chi-square goodness of fit of 600 draws per row against softmax(logits) over the negatives."""
    batch, draws = 5, 600
    image, text = features(batch, 4, 50), features(batch, 4, 51)
    scale = 3.0
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(batch, batch, dtype=torch.float64)
    for _ in range(draws):
        picked = itc_loss(image, text, scale, hard_negatives="sample", generator=generator, backend="reference")
        counts[torch.arange(batch), picked.neg_text_idx] += 1
    weights = torch.softmax((scale * image @ text.T).masked_fill(torch.eye(batch, dtype=torch.bool), -torch.inf), 1)
    assert (counts.diagonal() == 0).all()
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    expected = weights[off_diagonal] * draws
    statistic = ((counts[off_diagonal] - expected) ** 2 / expected).sum()
    degrees = batch * (batch - 2)
    p_value = 1 - torch.special.gammainc(torch.tensor(degrees / 2), statistic / 2)
    assert p_value > 1e-3, f"chi-square {statistic:.1f} on {degrees} degrees of freedom, p = {p_value:.2e}"


def test_sampling_is_reproducible_with_a_generator():
    image, text = features(16, 8, 60), features(16, 8, 61)

    def draw(seed):
        result = itc_loss(
            image,
            text,
            2.0,
            hard_negatives="sample",
            generator=torch.Generator().manual_seed(seed),
            backend="reference",
        )
        return torch.cat([result.neg_text_idx, result.neg_image_idx])

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_sampling_draws_per_row_keyed_by_the_seed_from_the_generator():
    """itc_loss_ref draws one seed from the generator, then each row with a generator keyed by (seed, row,
    direction): the rows form on any slice draws the same, and so does the op."""
    image, text = features(12, 8, 62), features(12, 8, 63)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])
    whole = itc_loss_ref(
        image, text, 4.0, positive_ids=ids, hard_negatives="sample", generator=torch.Generator().manual_seed(3)
    )
    seed = int(sample_seed(torch.Generator().manual_seed(3)))
    parts = [
        itc_loss_rows_ref(
            image[a:b], text[a:b], image, text, 4.0, row_offset=a, positive_ids=ids, hard_negatives="sample", seed=seed
        )
        for a, b in ((0, 5), (5, 6), (6, 12))
    ]
    assert torch.equal(torch.cat([p.neg_text_idx for p in parts]), whole.neg_text_idx)
    assert torch.equal(torch.cat([p.neg_image_idx for p in parts]), whole.neg_image_idx)
    op = itc_loss(
        image,
        text,
        4.0,
        positive_ids=ids,
        hard_negatives="sample",
        generator=torch.Generator().manual_seed(3),
        backend="reference",
    )
    assert torch.equal(op.neg_text_idx, whole.neg_text_idx) and torch.equal(op.neg_image_idx, whole.neg_image_idx)


BATCH, DIM, QUEUE = 45, 24, 7


def make_batch(mode, batch=BATCH, seed=0):
    """The global batch in float64: online features, and in ALBEF mode momentum features, a queue and ids."""
    case = dict(image=features(batch, DIM, seed), text=features(batch, DIM, seed + 1), scale=11.0)
    if mode == "albef":
        gen = torch.Generator().manual_seed(seed + 2)
        case.update(
            image_m=features(batch, DIM, seed + 3),
            text_m=features(batch, DIM, seed + 4),
            image_queue=features(QUEUE, DIM, seed + 5),
            text_queue=features(QUEUE, DIM, seed + 6),
            positive_ids=torch.randint(0, 15, (batch,), generator=gen),
            queue_ids=torch.randint(0, 15, (QUEUE,), generator=gen),
            alpha=0.4,
        )
    return case


@pytest.mark.parametrize("mode", ["clip", "albef"])
def test_spec_slices_make_up_the_full_spec(mode):
    """Equal-weighted slices: Σ (b_k / B) · rows loss_k is the full loss, for the value and every gradient."""
    case = make_batch(mode)
    image = case["image"].clone().requires_grad_()
    text = case["text"].clone().requires_grad_()
    scale = torch.tensor(case["scale"], dtype=torch.float64, requires_grad=True)
    albef = mode == "albef"
    shared = {k: case[k] for k in ("image_queue", "text_queue", "positive_ids", "queue_ids", "alpha") if k in case}
    full = itc_loss_ref(
        image,
        text,
        scale,
        image_feats_m=case.get("image_m"),
        text_feats_m=case.get("text_m"),
        hard_negatives="hardest",
        **shared,
    )
    total, picks_text, picks_image = 0.0, [], []
    for start, stop in ((0, 4), (4, 31), (31, 32), (32, BATCH)):
        momentum = (
            dict(image_feats_m=case["image_m"][start:stop], text_feats_m=case["text_m"][start:stop]) if albef else {}
        )
        local = itc_loss_rows_ref(
            image[start:stop],
            text[start:stop],
            case["image_m"] if albef else image,
            case["text_m"] if albef else text,
            scale,
            row_offset=start,
            hard_negatives="hardest",
            **momentum,
            **shared,
        )
        total = total + (stop - start) / BATCH * local.loss
        picks_text.append(local.neg_text_idx)
        picks_image.append(local.neg_image_idx)
    assert_close(total, full.loss, 1e-13, "loss")
    grads = torch.autograd.grad(total, [image, text, scale])
    expected = torch.autograd.grad(full.loss, [image, text, scale])
    for name, a, e in zip(("d image", "d text", "d scale"), grads, expected, strict=True):
        assert_close(a, e, 1e-12, name)
    assert torch.equal(torch.cat(picks_text), full.neg_text_idx)
    assert torch.equal(torch.cat(picks_image), full.neg_image_idx)


def rows_args(case, start, stop):
    """itc_loss_rows arguments for rows [start, stop) of a CLIP batch (constants, not differentiated)."""
    return dict(
        image_rows=case["image"][start:stop],
        text_rows=case["text"][start:stop],
        image_columns=case["image"],
        text_columns=case["text"],
        scale=case["scale"],
        row_offset=start,
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(row_offset=40), ValueError, "row_offset"),
        (dict(row_offset=-1), ValueError, "row_offset"),
        (dict(row_offset=2.0), TypeError, "row_offset"),
        (dict(text_rows=torch.zeros(3, DIM, dtype=torch.float64)), ValueError, "text_rows"),
        (dict(image_columns=torch.zeros(BATCH, DIM + 1, dtype=torch.float64)), ValueError, "image_columns"),
        (dict(options=ITCOptions(positive_ids=torch.zeros(12, dtype=torch.int64))), ValueError, "positive_ids"),
        (dict(options=ITCOptions(alpha=0.5)), ValueError, "image_feats_m"),
        (dict(options=dict(alpha=0.5)), TypeError, "options"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(seed="3"), TypeError, "seed"),
    ],
)
def test_rows_op_bad_arguments_name_the_argument(change, error, message):
    args = rows_args(make_batch("clip"), 10, 22) | change
    with pytest.raises(error, match=message):
        itc_loss_rows(**args, backend="reference")


def test_distillation_rejects_differentiable_columns():
    case = make_batch("albef")
    options = ITCOptions(case["image_m"][:10], case["text_m"][:10], alpha=0.4)
    args = rows_args(case, 0, 10) | dict(image_columns=case["image"].clone().requires_grad_(), options=options)
    with pytest.raises(ValueError, match="detached"):
        itc_loss_rows(**args, backend="reference")


F_IMG, F_TXT = features(4, 8, 70), features(4, 8, 71)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(alpha="0.4"), TypeError, "alpha"),
        (dict(alpha=None), TypeError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha=torch.tensor(0.4, device="meta")), TypeError, "alpha"),
        (dict(generator=123), TypeError, "generator"),
        (dict(scale="10"), TypeError, "scale"),
        (dict(scale=[10.0]), TypeError, "scale"),
        (dict(scale=1 + 2j), TypeError, "scale"),
        (dict(scale=torch.tensor(2.0 + 0j)), TypeError, "scale"),
        (dict(scale=torch.tensor(2)), TypeError, "scale"),
        (dict(scale=torch.ones(2, dtype=torch.float64)), ValueError, "scale"),
        (dict(hard_negatives=["sample"]), TypeError, "hard_negatives"),
        (dict(image_feats_m=F_IMG[:3]), ValueError, "image_feats_m"),
        (dict(positive_ids=torch.zeros(4)), TypeError, "positive_ids"),
    ],
)
def test_itc_loss_arguments_checked_by_type_and_range(kwargs, error, message):
    """Issue 12 (8): each bad argument raises TypeError/ValueError naming it (alpha strings and generator=123
    reached arithmetic and attribute errors deep inside before)."""
    args = dict(scale=10.0, hard_negatives="sample") | kwargs
    with pytest.raises(error, match=message):
        itc_loss(F_IMG, F_TXT, args.pop("scale"), **args, backend="reference")


def test_rows_op_compiles_without_graph_breaks():
    """Fake implementations and the registered autograd: torch.compile traces the op whole, gradients included."""
    case = make_batch("clip", batch=9)

    def loss_fn(image_rows, text_rows, image_columns, text_columns, scale):
        out = itc_loss_rows(
            image_rows,
            text_rows,
            image_columns,
            text_columns,
            scale,
            row_offset=3,
            hard_negatives="hardest",
            backend="reference",
        )
        return out.loss, out.neg_text_idx

    def inputs():
        image, text = case["image"].clone().requires_grad_(), case["text"].clone().requires_grad_()
        return image[3:7], text[3:7], image, text, torch.tensor(11.0, dtype=torch.float64, requires_grad=True)

    compiled_args, eager_args = inputs(), inputs()
    loss, picks = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled_args)
    expected_loss, expected_picks = loss_fn(*eager_args)
    assert_close(loss, expected_loss, 1e-12, "loss")
    assert torch.equal(picks, expected_picks)
    grads = torch.autograd.grad(loss, compiled_args[2:])
    expected = torch.autograd.grad(expected_loss, eager_args[2:])
    for name, a, e in zip(("d image", "d text", "d scale"), grads, expected, strict=True):
        assert_close(a, e, 1e-12, name)
