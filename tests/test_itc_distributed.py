"""ITCLoss(gather=True) on 2 CPU processes (gloo) against one process on the concatenated batch."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mome.nn.itc import ITCLoss
from mome.ops import itc_loss
from tests.helpers import assert_close

WORLD, LOCAL_BATCH, IN_DIM, EMBED_DIM = 2, 13, 12, 16


class TwoTower(nn.Module):
    """Image and text projections to unit vectors, then ITCLoss: a model DDP can wrap."""

    def __init__(self, backend, gather, hard_negatives):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.text_proj = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.loss = ITCLoss(gather=gather, hard_negatives=hard_negatives, backend=backend).double()

    def forward(self, images, texts, positive_ids):
        image_feats = F.normalize(self.image_proj(images), dim=-1)
        text_feats = F.normalize(self.text_proj(texts), dim=-1)
        return self.loss(image_feats, text_feats, positive_ids=positive_ids)


def global_batch():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    texts = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 10, (WORLD * LOCAL_BATCH,), generator=gen)
    return images, texts, ids


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, store_path, backend, result_path):
    # a file rendezvous: no port to race other processes for; the timeout turns a hang into an error
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        model = nn.parallel.DistributedDataParallel(TwoTower(backend, gather=True, hard_negatives="hardest"))
        images, texts, ids = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        out = model(images[rows], texts[rows], ids[rows])
        out.loss.backward()
        if rank == 0:
            torch.save({"loss": out.loss.detach(), "neg_text": out.neg_text_idx, "neg_image": out.neg_image_idx,
                        "grads": gradients(model.module)}, result_path)  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["triton"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(backend, tmp_path):
    result_path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), backend, result_path), nprocs=WORLD, join=True)
    distributed = torch.load(result_path)

    single = TwoTower(backend, gather=False, hard_negatives="hardest")
    out = single(*global_batch())
    out.loss.backward()
    assert_close(distributed["loss"], out.loss.detach(), 1e-12, "loss")
    for name, grad in gradients(single).items():
        assert_close(distributed["grads"][name], grad, 1e-10, f"d {name}")
    # the hard negatives index the global batch: the same picks, some from the other rank's rows
    assert torch.equal(distributed["neg_text"], out.neg_text_idx)
    assert torch.equal(distributed["neg_image"], out.neg_image_idx)
    assert (distributed["neg_text"][:LOCAL_BATCH] >= LOCAL_BATCH).any()


def test_gather_needs_an_initialised_process_group():
    loss = ITCLoss(gather=True)
    with pytest.raises(RuntimeError, match="process group"):
        loss(F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1))


def test_queue_gives_extra_negatives_and_is_refilled():
    """Single process: the loss uses the queue as it was before the call; afterwards the momentum features sit in it."""
    batch, dim, size = 5, EMBED_DIM, 12
    loss = ITCLoss(queue_size=size, embed_dim=dim, alpha=0.4, hard_negatives="hardest", backend="triton").double()
    gen = torch.Generator().manual_seed(3)
    image, text, image_m, text_m = (F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
                                    for _ in range(4))  # fmt: skip
    ids = torch.tensor([0, 1, 1, 2, 3])
    queue_before = loss.queue.image_queue.clone(), loss.queue.text_queue.clone(), loss.queue.ids.clone()
    out = loss(image, text, image_feats_m=image_m, text_feats_m=text_m, positive_ids=ids)
    expected = itc_loss(image, text, loss.scale.detach(), image_feats_m=image_m, text_feats_m=text_m,
                        image_queue=queue_before[0].double(), text_queue=queue_before[1].double(), alpha=0.4,
                        positive_ids=ids, queue_ids=queue_before[2], backend="reference")  # fmt: skip
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
