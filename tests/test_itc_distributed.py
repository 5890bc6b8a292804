"""ITCLoss(gather=True) on 2 CPU processes (gloo) against one process on the concatenated batch."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import mome.ops.itc
from mome.nn.itc import ITCLoss
from mome.ops import itc_loss
from tests.helpers import assert_close, leave_spawned_worker

WORLD, LOCAL_BATCH, IN_DIM, EMBED_DIM, QUEUE = 2, 13, 12, 16, 37
# (columns, hard negatives): CLIP (online columns, differentiable), ALBEF (momentum columns, queue, alpha), BLIP-2
# (label smoothing, columns gathered without gradient), SigLIP (the sigmoid loss with a learnable bias)
SCENARIOS = (("clip", "hardest"), ("clip", "sample"), ("albef", "sample"), ("blip2", "hardest"), ("siglip", "sample"))
MODES = {
    "clip": {},
    "albef": dict(queue_size=QUEUE, embed_dim=EMBED_DIM, alpha=0.4),
    "blip2": dict(label_smoothing=0.1, detach_columns=True),
    "siglip": dict(loss="sigmoid", init_logit_bias=-2.0),
}
SAMPLE_SEED = 21


class TwoTower(nn.Module):
    """Image and text projections to unit vectors, then ITCLoss: a model DDP can wrap. ALBEF mode adds fixed
    "momentum" projections (buffers), a queue and distillation."""

    def __init__(self, backend, gather, mode, hard_negatives):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.text_proj = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.albef = mode == "albef"
        self.register_buffer("image_proj_m", torch.randn(IN_DIM, EMBED_DIM, dtype=torch.float64))
        self.register_buffer("text_proj_m", torch.randn(IN_DIM, EMBED_DIM, dtype=torch.float64))
        self.loss = ITCLoss(gather=gather, hard_negatives=hard_negatives, backend=backend, **MODES[mode]).double()

    def features(self, images, texts):
        image_feats = F.normalize(self.image_proj(images), dim=-1)
        text_feats = F.normalize(self.text_proj(texts), dim=-1)
        momentum = {}
        if self.albef:
            momentum = dict(
                image_feats_m=F.normalize(images @ self.image_proj_m, dim=-1),
                text_feats_m=F.normalize(texts @ self.text_proj_m, dim=-1),
            )
        return image_feats, text_feats, momentum

    def forward(self, images, texts, positive_ids, generator=None):
        image_feats, text_feats, momentum = self.features(images, texts)
        return self.loss(image_feats, text_feats, positive_ids=positive_ids, generator=generator, **momentum)


def global_batch():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    texts = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 20, (WORLD * LOCAL_BATCH,), generator=gen)
    return images, texts, ids


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _recording_rows_op(calls):
    """Wraps itc_loss_rows to record what each rank's op was given: its rows, the columns and the row offset."""
    original = mome.ops.itc.itc_loss_rows

    def record(image_rows, text_rows, image_columns, text_columns, scale, **kwargs):
        result = original(image_rows, text_rows, image_columns, text_columns, scale, **kwargs)
        calls.append(
            dict(
                rows=image_rows.shape[0],
                columns=image_columns.shape[0],
                offset=kwargs["row_offset"],
                lse=tuple(result.lse_i2t.shape),
            )
        )
        return result

    return record


def _worker(rank, store_path, backend, result_dir):
    # a file rendezvous: no port to race other processes for; the timeout turns a hang into an error
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        calls = []
        mome.ops.itc.itc_loss_rows = _recording_rows_op(calls)
        images, texts, ids = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for mode, mining in SCENARIOS:
            model = nn.parallel.DistributedDataParallel(TwoTower(backend, True, mode, mining))
            # only the first rank's generator matters: the module broadcasts its seed
            generator = torch.Generator().manual_seed(SAMPLE_SEED if rank == 0 else 1000 + rank)
            out = model(images[rows], texts[rows], ids[rows], generator=generator)
            out.loss.backward()
            queue = model.module.loss.queue
            results[mode, mining] = dict(
                loss=out.loss.detach(),
                neg_text=out.neg_text_idx,
                neg_image=out.neg_image_idx,
                grads=gradients(model.module),
                queue=None if queue is None else queue.image_queue.clone(),
            )
        torch.save({"results": results, "calls": calls}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


@pytest.fixture(scope="module", params=["reference", "triton"])
def two_ranks(request, tmp_path_factory):
    """Both ranks' results, from one 2-process run per backend (spawning dominates the time)."""
    result_dir = tmp_path_factory.mktemp(f"itc_{request.param}")
    mp.spawn(_worker, args=(str(result_dir / "store"), request.param, str(result_dir)), nprocs=WORLD, join=True)
    return request.param, [torch.load(result_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def single_process(backend, mode, mining):
    model = TwoTower(backend, False, mode, mining)
    images, texts, ids = global_batch()
    out = model(images, texts, ids, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    out.loss.backward()
    return model, out


@pytest.mark.parametrize("mode, mining", SCENARIOS)
def test_loss_and_gradients_equal_one_process_on_the_concatenated_batch(two_ranks, mode, mining):
    backend, ranks = two_ranks
    model, out = single_process(backend, mode, mining)
    results = [r["results"][mode, mining] for r in ranks]
    # each rank's loss is the mean over its rows: their mean is the global loss
    assert_close(sum(r["loss"] for r in results) / WORLD, out.loss.detach(), 1e-12, "mean of the ranks' losses")
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    for name, grad in gradients(model).items():
        for rank, result in enumerate(results):  # DDP averaged them: the same on both ranks
            assert_close(result["grads"][name], grad, 1e-10, f"rank {rank}: d {name}")
    if mode == "albef":  # refilled with the gathered momentum features, in rank order
        assert_close(results[0]["queue"], model.loss.queue.image_queue, 1e-15, "queue after the step")


@pytest.mark.parametrize("mode, mining", SCENARIOS)
def test_hard_negatives_equal_one_process_and_cross_ranks(two_ranks, mode, mining):
    backend, ranks = two_ranks
    results = [r["results"][mode, mining] for r in ranks]
    neg_text = torch.cat([r["neg_text"] for r in results])
    neg_image = torch.cat([r["neg_image"] for r in results])
    model, out = single_process(backend, mode, mining)
    # hardest: the arg-max; sample: every backend keys each row's draw by the seed (drawn alike) and the global row
    assert torch.equal(neg_text, out.neg_text_idx) and torch.equal(neg_image, out.neg_image_idx)
    expected = whole_batch_rows_picks(model, backend, mining)  # the rows op on the whole batch: one rank of one
    assert torch.equal(neg_text, expected[0]) and torch.equal(neg_image, expected[1])
    # some of each rank's picks are the other rank's rows
    assert (results[0]["neg_text"] >= LOCAL_BATCH).any() and (results[1]["neg_text"] < LOCAL_BATCH).any()
    assert (results[0]["neg_image"] >= LOCAL_BATCH).any() and (results[1]["neg_image"] < LOCAL_BATCH).any()


def whole_batch_rows_picks(model, backend, mining):
    """The rows op on the whole batch (one rank of one), with the seed the module would draw."""
    images, texts, ids = global_batch()
    with torch.no_grad():
        image_feats, text_feats, momentum = model.features(images, texts)
    seed = int(mome.ops.itc.sample_seed(torch.Generator().manual_seed(SAMPLE_SEED)))
    image_columns, text_columns = momentum.get("image_feats_m", image_feats), momentum.get("text_feats_m", text_feats)
    queue = {}
    if model.loss.queue is not None:
        torch.manual_seed(0)  # the queue as TwoTower's construction left it, before the step refilled it
        fresh = TwoTower(backend, False, "albef", mining).loss.queue
        queue = dict(image_queue=fresh.image_queue.double(), text_queue=fresh.text_queue.double(), queue_ids=fresh.ids)
    options = mome.ops.itc.ITCOptions(**momentum, alpha=model.loss.alpha, positive_ids=ids, **queue,
                                      label_smoothing=model.loss.label_smoothing, loss=model.loss.loss)  # fmt: skip
    bias = {} if model.loss.logit_bias is None else {"logit_bias": model.loss.logit_bias.detach()}
    result = mome.ops.itc.itc_loss_rows(
        image_feats,
        text_feats,
        image_columns,
        text_columns,
        model.loss.scale.detach(),
        row_offset=0,
        options=options,
        hard_negatives=mining,
        seed=seed,
        backend=backend,
        **bias,
    )
    return result.neg_text_idx, result.neg_image_idx


def test_each_rank_computes_only_its_rows(two_ranks):
    _backend, ranks = two_ranks
    for rank, run in enumerate(ranks):
        assert len(run["calls"]) == len(SCENARIOS)
        for call, (mode, _mining) in zip(run["calls"], SCENARIOS, strict=True):
            saved = (0,) if mode == "siglip" else (LOCAL_BATCH,)  # the sigmoid loss has no log-sum-exp
            assert call == dict(rows=LOCAL_BATCH, columns=WORLD * LOCAL_BATCH, offset=rank * LOCAL_BATCH, lse=saved)


def _unequal_worker(rank, store_path, result_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        feats = F.normalize(torch.randn(3 + rank, EMBED_DIM, dtype=torch.float64), dim=-1)
        try:
            ITCLoss(gather=True, backend="reference")(feats, feats)
            message = "no error"
        except ValueError as error:
            message = str(error)
        with open(f"{result_dir}/rank{rank}.txt", "w") as handle:
            handle.write(message)
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


def test_unequal_local_batches_are_rejected_on_every_rank(tmp_path):
    mp.spawn(_unequal_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "same local batch size" in message and "[3, 4]" in message, message


def test_gather_needs_an_initialised_process_group():
    loss = ITCLoss(gather=True)
    with pytest.raises(RuntimeError, match="process group"):
        loss(F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1))


def test_queue_gives_extra_negatives_and_is_refilled():
    """Single process: the loss uses the queue as it was before the call; afterwards the momentum features sit in it."""
    batch, dim, size = 5, EMBED_DIM, 12
    loss = ITCLoss(queue_size=size, embed_dim=dim, alpha=0.4, hard_negatives="hardest", backend="triton").double()
    gen = torch.Generator().manual_seed(3)
    image, text, image_m, text_m = (
        F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1) for _ in range(4)
    )
    ids = torch.tensor([0, 1, 1, 2, 3])
    queue_before = loss.queue.image_queue.clone(), loss.queue.text_queue.clone(), loss.queue.ids.clone()
    out = loss(image, text, image_feats_m=image_m, text_feats_m=text_m, positive_ids=ids)
    expected = itc_loss(
        image,
        text,
        loss.scale.detach(),
        image_feats_m=image_m,
        text_feats_m=text_m,
        image_queue=queue_before[0].double(),
        text_queue=queue_before[1].double(),
        alpha=0.4,
        positive_ids=ids,
        queue_ids=queue_before[2],
        backend="reference",
    )
    assert_close(out.loss.detach(), expected.loss, 1e-10, "loss with queue")
    assert_close(loss.queue.image_queue[:batch], image_m.float(), 1e-7, "enqueued image features")
    assert torch.equal(loss.queue.ids[:batch], ids) and int(loss.queue.ptr) == batch
    out.loss.backward()
    assert loss.logit_scale.grad is not None and torch.isfinite(loss.logit_scale.grad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_temperature=0.0), "init_temperature"),
        (dict(queue_size=-1), "queue_size"),
        (dict(queue_size=8), "embed_dim"),
        (dict(alpha=1.5), "alpha"),
        (dict(hard_negatives="random"), "hard_negatives"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ITCLoss(**kwargs)


def test_scale_starts_at_the_inverse_temperature_and_is_capped():
    loss = ITCLoss(init_temperature=0.05)
    assert abs(loss.scale.item() - 20.0) < 1e-4
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    assert loss.scale.item() == 100.0
