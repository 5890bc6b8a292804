"""itc_loss options of the LAVIS family and SigLIP against formulas written here in float64 (not mome.reference):
label smoothing vs F.cross_entropy, the sigmoid loss vs open_clip's SigLipLoss, image features with query tokens
vs a dense max (BLIP-2), hard negatives from the online similarities (BLIP), columns without gradient, queues in
ALBEF's (d, Q) layout. Each runs on every backend that declares the option in its LIMITS; gradcheck on the
reference."""

import pytest
import torch
import torch.nn.functional as F

from mome.ops import itc_loss
from mome.ops.itc import BACKENDS, ITCOptions, itc_loss_rows
from tests.helpers import assert_close, usable_backends


def features(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def declaring(option):
    """The usable backends whose LIMITS admit ``option`` on (declared range reaching past its off value)."""
    names = []
    for backend in usable_backends(BACKENDS):
        bounds = BACKENDS.limits(backend).ranges.get(option)
        if bounds is not None and (bounds[1] is None or bounds[1] > (1 if option == "query_tokens" else 0)):
            names.append(backend)
    return names


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def same_id_mask(ids):
    return ids[:, None] == ids[None, :]


# --- label smoothing: F.cross_entropy(label_smoothing=ε) over the candidate columns ---


@pytest.mark.parametrize("backend", declaring("label_smoothing"))
@pytest.mark.parametrize("epsilon", [0.1, 0.35])
def test_label_smoothing_is_cross_entropys(backend, epsilon):
    batch, queue, dim, scale = 11, 5, 12, 9.0
    image, text = features(batch, dim, seed=0).requires_grad_(), features(batch, dim, seed=1).requires_grad_()
    image_queue, text_queue = features(queue, dim, seed=2), features(queue, dim, seed=3)
    labels = torch.arange(batch)
    logits_i2t = scale * image @ torch.cat([text, text_queue]).T  # [B, B + Q]
    logits_t2i = scale * text @ torch.cat([image, image_queue]).T
    expected_i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=epsilon)
    expected_t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=epsilon)
    out = itc_loss(image, text, scale, image_queue=image_queue, text_queue=text_queue, label_smoothing=epsilon,
                   backend=backend)  # fmt: skip
    assert_close(out.loss_i2t, expected_i2t, 1e-12, "loss_i2t")
    assert_close(out.loss_t2i, expected_t2i, 1e-12, "loss_t2i")
    for name, a, e in zip(("d image", "d text"), grads(out.loss, image, text),
                          grads((expected_i2t + expected_t2i) / 2, image, text), strict=True):  # fmt: skip
        assert_close(a, e, 1e-10, name)


@pytest.mark.parametrize("backend", declaring("label_smoothing"))
def test_label_smoothing_with_ids_and_distillation_smooths_the_soft_targets(backend):
    """Probability targets (uniform over same-id pairs, mixed with the momentum softmax), smoothed as torch does."""
    batch, dim, scale, alpha, epsilon = 9, 8, 7.0, 0.4, 0.2
    image, text, image_m, text_m = (features(batch, dim, seed=s) for s in range(10, 14))
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])
    hard = same_id_mask(ids).double()
    hard = hard / hard.sum(1, keepdim=True)
    expected = []
    for rows, rows_m, columns in ((image, image_m, text_m), (text, text_m, image_m)):
        target = alpha * torch.softmax(scale * rows_m @ columns.T, 1) + (1 - alpha) * hard
        expected.append(F.cross_entropy(scale * rows @ columns.T, target, label_smoothing=epsilon))
    out = itc_loss(image, text, scale, image_feats_m=image_m, text_feats_m=text_m, alpha=alpha, positive_ids=ids,
                   label_smoothing=epsilon, backend=backend)  # fmt: skip
    assert_close(out.loss_i2t, expected[0], 1e-12, "loss_i2t")
    assert_close(out.loss_t2i, expected[1], 1e-12, "loss_t2i")


@pytest.mark.parametrize("backend", declaring("label_smoothing"))
def test_blip2_rank_rows_with_smoothing(backend):
    """BLIP-2's ITC on one rank: local rows against the gathered batch, targets rank·b + arange(b), ε = 0.1."""
    world, local, dim, scale = 3, 4, 8, 1 / 0.07
    image, text = features(world * local, dim, seed=20), features(world * local, dim, seed=21)
    for rank in range(world):
        rows = slice(rank * local, (rank + 1) * local)
        targets = rank * local + torch.arange(local)
        expected_i2t = F.cross_entropy(scale * image[rows] @ text.T, targets, label_smoothing=0.1)
        expected_t2i = F.cross_entropy(scale * text[rows] @ image.T, targets, label_smoothing=0.1)
        out = itc_loss_rows(image[rows], text[rows], image, text, scale, row_offset=rank * local,
                            options=ITCOptions(label_smoothing=0.1), backend=backend)  # fmt: skip
        assert_close(out.loss_i2t, expected_i2t, 1e-12, f"rank {rank} loss_i2t")
        assert_close(out.loss_t2i, expected_t2i, 1e-12, f"rank {rank} loss_t2i")


# --- the sigmoid loss: open_clip's SigLipLoss, retyped from its definition ---


def siglip_formula(image, text, logit_scale, logit_bias, labels=None):
    """open_clip SigLipLoss._loss: logits = scale · I Tᵀ + bias, labels 2·eye − 1 (or the ±1 table given),
    loss −Σ logsigmoid(labels · logits) / B."""
    logits = logit_scale * image @ text.T + logit_bias
    if labels is None:
        labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def siglip_rank_formula(image, text, logit_scale, logit_bias, rank, local):
    """open_clip's distributed SigLipLoss on one rank: its images against its own texts, plus every other rank's
    texts with negative labels only."""
    rows = slice(rank * local, (rank + 1) * local)
    loss = siglip_formula(image[rows], text[rows], logit_scale, logit_bias)
    for other in range(text.shape[0] // local):
        if other != rank:
            texts = text[other * local : (other + 1) * local]
            loss = loss + siglip_formula(image[rows], texts, logit_scale, logit_bias, -torch.ones(local, local))
    return loss


@pytest.mark.parametrize("backend", declaring("sigmoid_loss"))
def test_sigmoid_loss_is_open_clips_siglip(backend):
    batch, dim = 13, 16
    image, text = features(batch, dim, seed=30).requires_grad_(), features(batch, dim, seed=31).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    expected = siglip_formula(image, text, scale, bias)
    out = itc_loss(image, text, scale, loss="sigmoid", logit_bias=bias, backend=backend)
    for name, value in (("loss", out.loss), ("loss_i2t", out.loss_i2t), ("loss_t2i", out.loss_t2i)):
        assert_close(value, expected, 1e-12, name)
    actual = grads(0.3 * out.loss_i2t + 0.7 * out.loss_t2i, image, text, scale, bias)
    expected_grads = grads(expected, image, text, scale, bias)
    for name, a, e in zip(("d image", "d text", "d scale", "d bias"), actual, expected_grads, strict=True):
        assert_close(a, e, 1e-10, name)
    no_bias = itc_loss(image, text, scale, loss="sigmoid", backend=backend)  # open_clip's logit_bias=None
    assert_close(no_bias.loss, siglip_formula(image, text, scale, 0.0), 1e-12, "loss without bias")


@pytest.mark.parametrize("backend", declaring("sigmoid_loss"))
def test_sigmoid_loss_per_rank_is_open_clips_distributed_siglip(backend):
    """itc_loss_rows' loss_i2t for rank r's rows is open_clip's loss on rank r (this rank's images × all texts,
    divided by the local batch); the ranks' mean of ``loss`` is the one-process loss."""
    world, local, dim = 3, 4, 8
    image, text = features(world * local, dim, seed=32), features(world * local, dim, seed=33)
    scale, bias, total = 8.0, -4.0, 0.0
    for rank in range(world):
        rows = slice(rank * local, (rank + 1) * local)
        out = itc_loss_rows(image[rows], text[rows], image, text, scale, row_offset=rank * local,
                            options=ITCOptions(loss="sigmoid"), logit_bias=bias, backend=backend)  # fmt: skip
        assert_close(out.loss_i2t, siglip_rank_formula(image, text, scale, bias, rank, local), 1e-12, f"rank {rank}")
        total = total + out.loss / world
    assert_close(total, siglip_formula(image, text, scale, bias), 1e-12, "mean over ranks")


@pytest.mark.parametrize("backend", declaring("sigmoid_loss"))
def test_sigmoid_loss_with_ids_and_a_queue(backend):
    """Equal ids are positives (+1), queue entries are extra columns labelled by their ids, divided by B."""
    batch, queue, dim, scale, bias = 10, 6, 8, 6.0, -2.0
    image, text = features(batch, dim, seed=34), features(batch, dim, seed=35)
    image_queue, text_queue = features(queue, dim, seed=36), features(queue, dim, seed=37)
    ids, queue_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6]), torch.tensor([1, -1, 6, 0, 9, 9])
    labels = 2 * torch.cat([same_id_mask(ids), ids[:, None] == queue_ids[None, :]], 1).double() - 1
    expected_i2t = siglip_formula(image, torch.cat([text, text_queue]), scale, bias, labels)
    expected_t2i = siglip_formula(text, torch.cat([image, image_queue]), scale, bias, labels)
    out = itc_loss(image, text, scale, image_queue=image_queue, text_queue=text_queue, positive_ids=ids,
                   queue_ids=queue_ids, loss="sigmoid", logit_bias=bias, backend=backend)  # fmt: skip
    assert_close(out.loss_i2t, expected_i2t, 1e-12, "loss_i2t")
    assert_close(out.loss_t2i, expected_t2i, 1e-12, "loss_t2i")


def test_sigmoid_gradcheck_whole_batch_and_rows():
    image, text = features(4, 5, seed=38).requires_grad_(), features(4, 5, seed=39).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 2])

    def whole(i, t, s, b):
        return itc_loss(i, t, s, loss="sigmoid", logit_bias=b, positive_ids=ids, backend="reference").loss

    def rows(i, t, s, b):  # rows 1..3 of the batch, online columns (their gradients too)
        out = itc_loss_rows(i[1:3], t[1:3], i, t, s, row_offset=1, logit_bias=b,
                            options=ITCOptions(loss="sigmoid", positive_ids=ids), backend="reference")  # fmt: skip
        return 0.3 * out.loss_i2t + 0.7 * out.loss_t2i

    assert torch.autograd.gradcheck(whole, (image, text, scale, bias))
    assert torch.autograd.gradcheck(rows, (image, text, scale, bias))


# --- image features with query tokens (BLIP-2's Q-Former): the max over them ---


def blip2_formula(image_queries, text, scale, epsilon):
    """BLIP-2's ITC: sim_q2t [B, B, NQ] → max over queries, both directions, targets arange, label smoothing."""
    sim_i2t = (image_queries.unsqueeze(1) @ text[None, :, :, None]).squeeze(-1).max(-1).values  # [B, B]
    sim_t2i = (text[:, None, None, :] @ image_queries.transpose(1, 2)[None]).squeeze(2).max(-1).values
    targets = torch.arange(text.shape[0])
    loss_i2t = F.cross_entropy(scale * sim_i2t, targets, label_smoothing=epsilon)
    return loss_i2t, F.cross_entropy(scale * sim_t2i, targets, label_smoothing=epsilon)


@pytest.mark.parametrize("backend", declaring("query_tokens"))
def test_query_tokens_take_the_max_like_blip2(backend):
    batch, queries, dim, scale = 7, 5, 12, 1 / 0.07
    image = features(batch, queries, dim, seed=40).requires_grad_()
    text = features(batch, dim, seed=41).requires_grad_()
    expected = blip2_formula(image, text, scale, 0.1)
    out = itc_loss(image, text, scale, label_smoothing=0.1, backend=backend)
    assert_close(out.loss_i2t, expected[0], 1e-12, "loss_i2t")
    assert_close(out.loss_t2i, expected[1], 1e-12, "loss_t2i")
    for name, a, e in zip(("d image", "d text"), grads(out.loss, image, text),
                          grads(sum(expected) / 2, image, text), strict=True):  # fmt: skip
        assert_close(a, e, 1e-10, name)
    similarity = torch.einsum("bqd,nd->bnq", image, text).amax(-1).detach()
    hardest = itc_loss(image, text, scale, hard_negatives="hardest", backend=backend)
    diagonal = torch.eye(batch, dtype=torch.bool)
    assert torch.equal(hardest.neg_text_idx, similarity.masked_fill(diagonal, -torch.inf).argmax(1))
    assert torch.equal(hardest.neg_image_idx, similarity.T.masked_fill(diagonal, -torch.inf).argmax(1))


def test_query_tokens_gradcheck_and_one_token_is_a_plain_vector():
    image, text = features(3, 4, 5, seed=42).requires_grad_(), features(3, 5, seed=43).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    for loss in ("softmax", "sigmoid"):

        def op(i, t, s, loss=loss):
            return itc_loss(i, t, s, loss=loss, label_smoothing=0.2 * (loss == "softmax"), backend="reference").loss

        assert torch.autograd.gradcheck(op, (image, text, scale))
    one = itc_loss(image[:, :1], text, 4.0, backend="auto")
    assert_close(one.loss, itc_loss(image[:, 0], text, 4.0).loss, 1e-14, "(B, 1, d) vs (B, d)")


def test_query_token_ties_send_the_gradient_to_the_first_token():
    """Two equal query tokens: the max is either; all of its gradient goes to the lower index (torch.max's)."""
    image = features(4, 3, 6, seed=44)
    image[:, 2] = image[:, 1]  # tokens 1 and 2 tie for every text
    image.requires_grad_()
    text = features(4, 6, seed=45)
    (d_image,) = grads(itc_loss(image, text, 5.0, backend="reference").loss, image)
    assert d_image[:, 1].abs().sum() > 0
    assert torch.equal(d_image[:, 2], torch.zeros_like(d_image[:, 2]))


# --- hard negatives from the online similarities (BLIP) or from the loss's columns (ALBEF) ---


@pytest.mark.parametrize("backend", declaring("mining_columns"))
def test_hard_negative_source_picks_from_online_or_momentum_similarities(backend):
    batch, dim, scale = 12, 8, 10.0
    image, text, image_m, text_m = (features(batch, dim, seed=s) for s in range(50, 54))
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    masked = same_id_mask(ids)
    momentum = dict(image_feats_m=image_m, text_feats_m=text_m, positive_ids=ids, hard_negatives="hardest")
    for source, i2t, t2i in (("loss", image @ text_m.T, text @ image_m.T), ("similarity", image @ text.T,
                                                                          text @ image.T)):  # fmt: skip
        out = itc_loss(image, text, scale, **momentum, hard_negative_source=source, backend=backend)
        assert torch.equal(out.neg_text_idx, i2t.masked_fill(masked, -torch.inf).argmax(1)), source
        assert torch.equal(out.neg_image_idx, t2i.masked_fill(masked, -torch.inf).argmax(1)), source
    # a rank's share draws what the whole batch draws for its rows, given the online batch as mining columns
    whole = itc_loss(image, text, scale, **momentum, hard_negative_source="similarity", backend=backend)
    options = ITCOptions(image_feats_m=image_m[3:9], text_feats_m=text_m[3:9], positive_ids=ids,
                         mining_image_columns=image, mining_text_columns=text)  # fmt: skip
    rows = itc_loss_rows(image[3:9], text[3:9], image_m, text_m, scale, row_offset=3, options=options,
                         hard_negatives="hardest", hard_negative_source="similarity", backend=backend)  # fmt: skip
    assert torch.equal(rows.neg_text_idx, whole.neg_text_idx[3:9])
    assert torch.equal(rows.neg_image_idx, whole.neg_image_idx[3:9])


def test_similarity_source_samples_follow_the_online_softmax():
    """Chi-square of 400 draws of row 0 against softmax(scale · online similarity) over its negatives, with
    momentum features far from the online ones (the ALBEF source would follow theirs)."""
    batch, dim, scale, draws = 5, 4, 3.0, 400
    image, text, image_m, text_m = (features(batch, dim, seed=s) for s in range(60, 64))
    generator = torch.Generator().manual_seed(7)
    counts = torch.zeros(batch, dtype=torch.float64)
    for _ in range(draws):
        out = itc_loss(image, text, scale, image_feats_m=image_m, text_feats_m=-text_m, hard_negatives="sample",
                       hard_negative_source="similarity", generator=generator, backend="reference")  # fmt: skip
        counts[out.neg_text_idx[0]] += 1
    weights = torch.softmax(scale * image[0] @ text[1:].T, 0)
    expected = weights * draws
    statistic = ((counts[1:] - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor((batch - 2) / 2, dtype=torch.float64), statistic / 2).item()
    assert counts[0] == 0 and p_value > 1e-3, f"chi-square {statistic:.1f}, p = {p_value:.2e}"


# --- gathered (or whole-batch) columns without gradient (BLIP-2, VLMo) ---


@pytest.mark.parametrize(
    "backend, loss",
    [(b, "softmax") for b in usable_backends(BACKENDS)] + [(b, "sigmoid") for b in declaring("sigmoid_loss")],
)
def test_detached_columns_give_each_feature_only_its_rows_gradient(backend, loss):
    batch, dim, scale = 9, 8, 6.0
    image, text = features(batch, dim, seed=70).requires_grad_(), features(batch, dim, seed=71).requires_grad_()
    labels = torch.arange(batch)
    if loss == "softmax":
        expected = (F.cross_entropy(scale * image @ text.detach().T, labels)
                    + F.cross_entropy(scale * text @ image.detach().T, labels)) / 2  # fmt: skip
    else:
        expected = (siglip_formula(image, text.detach(), scale, -1.0)
                    + siglip_formula(text, image.detach(), scale, -1.0)) / 2  # fmt: skip
    bias = {"logit_bias": -1.0} if loss == "sigmoid" else {}
    out = itc_loss(image, text, scale, loss=loss, detach_columns=True, backend=backend, **bias)
    assert_close(out.loss, expected, 1e-12, "loss")
    for name, a, e in zip(("d image", "d text"), grads(out.loss, image, text), grads(expected, image, text),
                          strict=True):  # fmt: skip
        assert_close(a, e, 1e-10, name)
    rows = itc_loss_rows(image[2:5], text[2:5], image, text, scale, row_offset=2, detach_columns=True,
                         options=ITCOptions(loss=loss), backend=backend, **bias)  # fmt: skip
    d_image, d_text = grads(rows.loss, image, text)
    outside = torch.ones(batch, dtype=torch.bool)
    outside[2:5] = False
    assert (d_image[outside] == 0).all() and (d_text[outside] == 0).all() and d_image[2:5].abs().sum() > 0


# --- queues in ALBEF's (d, Q) layout ---


@pytest.mark.parametrize("backend", usable_backends(BACKENDS))
@pytest.mark.parametrize("queue", [5, 8])  # 8 == d: the layout is said, never guessed
def test_queue_layout_columns_takes_albefs_buffers(backend, queue):
    batch, dim = 6, 8
    image, text = features(batch, dim, seed=80), features(batch, dim, seed=81)
    image_queue, text_queue = features(queue, dim, seed=82), features(queue, dim, seed=83)
    rows = itc_loss(image, text, 7.0, image_queue=image_queue, text_queue=text_queue, backend=backend)
    columns = itc_loss(image, text, 7.0, image_queue=image_queue.T, text_queue=text_queue.T, queue_layout="columns",
                       backend=backend)  # fmt: skip
    assert_close(columns.loss, rows.loss, 1e-14, "(d, Q) vs (Q, d)")


# --- the module: ITCLoss with the options, whole batch and gathered (a gloo group of one) ---


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "options",
    [
        dict(loss="sigmoid", hard_negatives="sample"),
        dict(label_smoothing=0.1, detach_columns=True, hard_negatives="hardest"),
        dict(alpha=0.4, hard_negatives="hardest", hard_negative_source="similarity"),
    ],
    ids=["siglip", "blip2", "blip_similarity"],
)
def test_module_options_gathered_equal_whole_batch(options, one_rank_group):
    from mome.nn import ITCLoss

    batch, dim = 8, 12
    image, text, image_m, text_m = (features(batch, dim, seed=s) for s in range(90, 94))
    momentum = dict(image_feats_m=image_m, text_feats_m=text_m) if "alpha" in options else {}
    results = []
    for gather in (False, True):
        module = ITCLoss(gather=gather, backend="reference", **options).double()
        out = module(image, text, **momentum, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        results.append((out, [p.grad for p in module.parameters()]))
    (whole, whole_grads), (gathered, gathered_grads) = results
    assert_close(gathered.loss.detach(), whole.loss.detach(), 1e-12, "loss")
    assert len(whole_grads) == (2 if options.get("loss") == "sigmoid" else 1)  # logit_scale (and logit_bias)
    for a, e in zip(gathered_grads, whole_grads, strict=True):
        assert_close(a, e, 1e-10, "parameter gradient")
    assert torch.equal(gathered.neg_text_idx, whole.neg_text_idx)
    assert torch.equal(gathered.neg_image_idx, whole.neg_image_idx)
    if options.get("hard_negative_source") == "similarity":
        online = (image @ text.T).fill_diagonal_(-torch.inf)
        assert torch.equal(whole.neg_text_idx, online.argmax(1))


def test_new_options_compile_without_graph_breaks_and_run_on_meta():
    """The custom op's schema carries the new options: fake implementations (sigmoid saves no lse) and autograd."""
    image, text = features(6, 8, seed=95), features(6, 8, seed=96)

    def loss_fn(image, text, scale, bias):
        sigmoid = itc_loss(image, text, scale, loss="sigmoid", logit_bias=bias, hard_negatives="hardest")
        smooth = itc_loss_rows(image[2:5], text[2:5], image, text, scale, row_offset=2,
                               options=ITCOptions(label_smoothing=0.1))  # fmt: skip
        return sigmoid.loss + smooth.loss, sigmoid.neg_text_idx

    def inputs():
        return (image.clone().requires_grad_(), text.clone().requires_grad_(),
                torch.tensor(5.0, dtype=torch.float64, requires_grad=True),
                torch.tensor(-2.0, dtype=torch.float64, requires_grad=True))  # fmt: skip

    compiled, eager = inputs(), inputs()
    loss, picks = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled)
    expected, expected_picks = loss_fn(*eager)
    assert_close(loss, expected, 1e-12, "loss")
    assert torch.equal(picks, expected_picks)
    for a, e in zip(torch.autograd.grad(loss, compiled), torch.autograd.grad(expected, eager), strict=True):
        assert_close(a, e, 1e-12, "gradient")
    meta = torch.empty(6, 3, 8, device="meta", requires_grad=True)
    out = itc_loss(meta, torch.empty(6, 8, device="meta"), 3.0, loss="sigmoid", logit_bias=-1.0)
    out.loss.backward()
    assert out.loss.device.type == "meta" and meta.grad.shape == (6, 3, 8)
