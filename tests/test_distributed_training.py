"""The demo's recipe on 2 CPU processes (gloo): DDP and FSDP2 against one process on the whole batch.

One spawn runs every 2-process scenario (spawning dominates the time): a few DDP steps of both stages,
a naive DDP port (each rank runs the single-process losses on its share) as the control that shows the
comparison can fail, and one FSDP2 step with every MoMELayer and the root sharded.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mome.demo_distributed as demo_distributed
from mome import demo
from mome.demo import DemoOptions, History, Pretrainer
from mome.demo_training import adamw_warmup_cosine
from mome.distributed import Ranks, fully_shard_mome, mean_over_ranks, torchrun_environment
from mome.nn.decoder import CaptionDecoder
from mome.shapes_data import ShapesCaptions
from tests.helpers import assert_close, leave_spawned_worker

WORLD = 2
ENCODER_STEPS, DECODER_STEPS = 3, 2
# the default recipe with half its batch: 24 pairs, 12 per rank, so that ITM's and MLM's first 16 pairs (and their
# negatives) come from both ranks' shares
OPTIONS = DemoOptions(batch_size=24, quiet=True)
LOSS_TOL = 2e-6  # relative, per step: fp32 sums taken in another order (measured: <= 5e-7)
GRAD_TOL = 1e-5  # ‖Δ‖/‖g‖ per tensor of the first step's gradients (measured: <= 7e-7)
# Adam divides each gradient element by its own size: where that is near its eps (1e-8), fp32 rounding of the
# gradient moves the update by a visible share of the learning rate (2e-3 at its peak; measured: <= 8e-5).
# Per element the weights are compared to a tenth of one step, the whole parameter vector to fp32 tolerance.
WEIGHT_ATOL, WEIGHTS_TOL = 2e-4, 2e-5


def build(options: DemoOptions):
    """What ``run_demo`` builds before training, in its order (the seeds decide every weight and draw)."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    data = ShapesCaptions(options.seed, options.image_size, jitter=options.jitter)
    tokenizer = data.tokenizer
    model = Pretrainer(options, tokenizer.vocab_size, data.max_len)
    decoder = CaptionDecoder(
        tokenizer.vocab_size,
        options.dim,
        depth=options.decoder_depth,
        heads=options.heads,
        max_len=data.max_len,
        pad_id=tokenizer.pad_id,
        label_smoothing=0.1,
        image_tokens=model.encoder.config.num_patches + 1,
    )
    return model, decoder, data, generator


def recording_negatives(record: list):
    """Wraps ``Pretrainer.itm_negatives`` to keep each step's ITM negatives (indices into the whole batch)."""
    original = Pretrainer.itm_negatives

    def wrapped(batch, itc, random_share, generator):
        picked = original(batch, itc, random_share, generator)
        record.append(dict(hard_text=itc.neg_text_idx.clone(), text=picked[0].clone(), image=picked[1].clone()))
        return picked

    return staticmethod(wrapped)


def _full(tensor):
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def full_state(module: nn.Module) -> dict:
    """Parameters as full tensors (FSDP2 keeps DTensor shards)."""
    return {name: _full(param) for name, param in module.named_parameters()}


def full_grads(module: nn.Module) -> dict:
    """Gradients as full tensors; parameters the step did not reach (BEiT's image mask token) are left out."""
    return {name: _full(param.grad) for name, param in module.named_parameters() if param.grad is not None}


class NaiveStep(nn.Module):
    """The control: each rank runs the single-process losses on its share (local ITC negatives, own streams)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, share, data, options, generator):
        return self.model.losses(share, data, options, generator)


def _ddp_run(ranks: Ranks, record: list) -> dict:
    model, decoder, data, generator = build(OPTIONS)
    history = History()
    Pretrainer.itm_negatives = recording_negatives(record)
    demo_distributed.train_encoder(model, data, OPTIONS, ENCODER_STEPS, ranks, history, generator)
    demo_distributed.train_decoder(model, decoder, data, OPTIONS, DECODER_STEPS, ranks, history)
    return dict(history=history, encoder=full_state(model), decoder=full_state(decoder), negatives=list(record))


def _naive_run(ranks: Ranks) -> list[float]:
    model, _decoder, data, generator = build(OPTIONS)
    step = DistributedDataParallel(NaiveStep(model), find_unused_parameters=True)
    optimizer, _ = adamw_warmup_cosine(model.parameters(), OPTIONS.lr, ENCODER_STEPS)
    rows = ranks.equal_share(OPTIONS.batch_size, "batch_size")
    itc = []
    for _ in range(2):
        share = demo_distributed.share_of(data.train_batch(OPTIONS.batch_size), rows)
        losses = step(share, data, OPTIONS, torch.Generator().manual_seed(100 + ranks.rank))
        optimizer.zero_grad(set_to_none=True)
        (losses["itc"] + OPTIONS.itm_weight * losses["itm"] + losses["mlm"]).backward()
        optimizer.step()
        itc.append(mean_over_ranks(losses["itc"]).item())
    return itc


def _fsdp_step(ranks: Ranks) -> dict:
    model, _decoder, data, generator = build(OPTIONS)
    step = fully_shard_mome(demo_distributed.Stage1Step(model, ranks))
    sharded = sum(hasattr(p, "full_tensor") for p in model.parameters())
    optimizer, _ = adamw_warmup_cosine(model.parameters(), OPTIONS.lr, ENCODER_STEPS)
    model.train()
    share = demo_distributed.share_of(data.train_batch(OPTIONS.batch_size), ranks.equal_share(OPTIONS.batch_size, "b"))
    losses = step(share, data, OPTIONS, generator)
    loss = losses["itc"] + OPTIONS.itm_weight * losses["itm"] + losses["mlm"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = full_grads(model)
    optimizer.step()
    local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    return dict(
        loss=mean_over_ranks(loss).item(),
        grads=grads,
        weights=full_state(model),
        sharded=sharded,
        local_numel=local_numel,
    )


def _ddp_gradients(ranks: Ranks) -> dict:
    """The gradients of the first stage-1 step, after DDP averaged them."""
    model, _decoder, data, generator = build(OPTIONS)
    step = demo_distributed.wrap_ddp(demo_distributed.Stage1Step(model, ranks), ranks, find_unused_parameters=True)
    model.train()
    share = demo_distributed.share_of(data.train_batch(OPTIONS.batch_size), ranks.equal_share(OPTIONS.batch_size, "b"))
    losses = step(share, data, OPTIONS, generator)
    (losses["itc"] + OPTIONS.itm_weight * losses["itm"] + losses["mlm"]).backward()
    return full_grads(model)


def _worker(rank: int, store: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90)
    )
    try:
        ranks = Ranks(rank, WORLD, rank, torch.device("cpu"))
        original = vars(Pretrainer)["itm_negatives"]  # the staticmethod itself
        results = dict(ddp=_ddp_run(ranks, []))
        Pretrainer.itm_negatives = original
        results["naive_itc"] = _naive_run(ranks)
        results["fsdp"] = _fsdp_step(ranks)
        results["ddp_grads"] = _ddp_gradients(ranks)
        torch.save(results, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed_training")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    """The single-process recipe on the whole batch: the same steps, negatives recorded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original, record = vars(Pretrainer)["itm_negatives"], []
    try:
        model, decoder, data, generator = build(OPTIONS)
        history = History()
        Pretrainer.itm_negatives = recording_negatives(record)
        cpu = torch.device("cpu")
        demo.train_encoder(model, data, OPTIONS, ENCODER_STEPS, cpu, history, generator)
        demo.train_decoder(model, decoder, data, OPTIONS, DECODER_STEPS, cpu, history)
    finally:
        Pretrainer.itm_negatives = original
        torch.set_num_threads(threads)
    return dict(history=history, encoder=full_state(model), decoder=full_state(decoder), negatives=record)


def assert_weights_close(actual: dict, expected: dict, name: str) -> None:
    assert actual.keys() == expected.keys(), f"{name}: parameters {sorted(actual.keys() ^ expected.keys())}"
    for key, value in expected.items():
        worst = (actual[key] - value).abs().max().item()
        assert worst <= WEIGHT_ATOL, f"{name}: {key} is {worst:.2e} off somewhere (> {WEIGHT_ATOL:.0e})"
    flat = [torch.cat([d[key].flatten() for key in expected]) for d in (actual, expected)]
    assert_close(flat[0], flat[1], WEIGHTS_TOL, f"{name}: all parameters")


def assert_grads_close(actual: dict, expected: dict, name: str) -> None:
    assert actual.keys() == expected.keys(), f"{name}: gradients of {sorted(actual.keys() ^ expected.keys())}"
    for key, value in expected.items():
        assert_close(actual[key], value, GRAD_TOL, f"{name}: d {key}")


def single_first_step():
    """One step of the single-process recipe on the whole batch: (loss, gradients, weights after the step)."""
    model, _decoder, data, generator = build(OPTIONS)
    optimizer, _ = adamw_warmup_cosine(model.parameters(), OPTIONS.lr, ENCODER_STEPS)
    model.train()
    losses = model.losses(data.train_batch(OPTIONS.batch_size), data, OPTIONS, generator)
    loss = losses["itc"] + OPTIONS.itm_weight * losses["itm"] + losses["mlm"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = full_grads(model)
    optimizer.step()
    return loss.item(), grads, full_state(model)


def _assert_curves_close(actual: list[float], expected: list[float], name: str) -> None:
    assert len(actual) == len(expected), f"{name}: {len(actual)} steps, expected {len(expected)}"
    assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                 LOSS_TOL, f"{name} loss curve")  # fmt: skip


@pytest.mark.parametrize("name", ["itc", "itm", "mlm", "caption"])
def test_ddp_loss_curves_equal_one_process(ranks_results, one_process, name):
    expected = getattr(one_process["history"], name)
    for rank, result in enumerate(ranks_results):  # the logged loss is the ranks' mean: the global batch's
        _assert_curves_close(getattr(result["ddp"]["history"], name), expected, f"rank {rank}: {name}")
    assert len(set(expected)) == len(expected), f"{name}: a constant curve would prove nothing"


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_ddp_weights_equal_one_process_and_across_ranks(ranks_results, one_process, part):
    start = build(OPTIONS)[0 if part == "encoder" else 1].state_dict()
    for rank, result in enumerate(ranks_results):
        assert_weights_close(result["ddp"][part], one_process[part], f"rank {rank}: {part}")
    for name in one_process[part]:
        assert torch.equal(ranks_results[0]["ddp"][part][name], ranks_results[1]["ddp"][part][name]), name
    moved = [name for name, value in one_process[part].items() if not torch.equal(value, start[name])]
    assert len(moved) > len(one_process[part]) // 2, f"{part}: the steps left most weights where they started"


def test_ddp_negatives_are_the_global_batch_ones(ranks_results, one_process):
    """ITC's hard negatives and ITM's mix are drawn on the whole batch: exactly the single-process picks, on both
    ranks alike, and some of each rank's images take a hard negative text from the other rank's share."""
    local = OPTIONS.batch_size // WORLD
    expected = one_process["negatives"]
    assert len(expected) == ENCODER_STEPS
    crossing = [0, 0]
    for rank, result in enumerate(ranks_results):
        got = result["ddp"]["negatives"]
        assert len(got) == ENCODER_STEPS
        for step, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
            for key in ("hard_text", "text", "image"):
                assert torch.equal(mine[key], theirs[key]), f"rank {rank}, step {step}: {key} negatives differ"
            rows = slice(rank * local, (rank + 1) * local)
            other = (mine["hard_text"][rows] >= 0) & ((mine["hard_text"][rows] // local) != rank)
            crossing[rank] += int(other.sum())
    assert all(count > 0 for count in crossing), f"hard negatives from the other rank's share per rank: {crossing}"


def test_the_control_without_global_negatives_differs(ranks_results, one_process):
    """The naive port (local ITC, per-rank streams) gives another curve from the first step: the equivalence
    tests above would catch it, far outside their tolerance."""
    expected = one_process["history"].itc[:2]
    for rank, result in enumerate(ranks_results):
        naive = result["naive_itc"]
        assert naive[0] < expected[0] - 0.3, f"rank {rank}: fewer negatives (local ones) give a lower loss"
        gap = max(abs(a - b) / abs(b) for a, b in zip(naive, expected, strict=True))
        assert gap > 1000 * LOSS_TOL, f"rank {rank}: naive ITC {naive} vs one process {expected}"


def test_ddp_first_step_gradients_equal_one_process(ranks_results):
    """Adam hides a gradient off by a constant factor (it divides by the gradient's size): the gradients
    themselves must be the global batch's, which the per-rank loss shares and DDP's average give."""
    _loss, grads, _weights = single_first_step()
    for rank, result in enumerate(ranks_results):
        assert_grads_close(result["ddp_grads"], grads, f"rank {rank}")


def test_fsdp2_step_equals_the_unsharded_step(ranks_results):
    loss, grads, weights = single_first_step()
    total = sum(value.numel() for value in weights.values())
    scalars = sum(value.dim() == 0 for value in weights.values())  # ITCHead.temperature: replicated, not sharded
    for rank, result in enumerate(ranks_results):
        fsdp = result["fsdp"]
        assert fsdp["sharded"] == len(weights) - scalars, f"rank {rank}: {fsdp['sharded']}/{len(weights)} sharded"
        assert fsdp["local_numel"] < 0.6 * total, f"rank {rank} holds {fsdp['local_numel']} of {total} elements"
        assert abs(fsdp["loss"] - loss) <= LOSS_TOL * abs(loss), (fsdp["loss"], loss)
        assert_grads_close(fsdp["grads"], grads, f"rank {rank} (FSDP2)")
        assert_weights_close(fsdp["weights"], weights, f"rank {rank} (FSDP2) after the step")


def test_torchrun_environment_names_what_is_missing():
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE, LOCAL_RANK.* are not set.*torchrun --nproc-per-node"):
        torchrun_environment({"RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"})
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    assert torchrun_environment(full) == (1, 2, 1)
    with pytest.raises(RuntimeError, match="RANK=2, WORLD_SIZE=2"):
        torchrun_environment({**full, "RANK": "2"})
    with pytest.raises(RuntimeError, match="WORLD_SIZE must be an integer"):
        torchrun_environment({**full, "WORLD_SIZE": "two"})


def test_demo_distributed_without_torchrun_says_how_to_launch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "mome", "demo", "--distributed", "--steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "needs torchrun's environment" in done.stderr and "torchrun --nproc-per-node 2" in done.stderr, done.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("total, world", [(48, 2), (7, 3), (2, 4), (16, 1)])
def test_rank_shares_cover_the_rows_once_in_order(total, world):
    shares = [Ranks(rank, world, rank, torch.device("cpu")).share(total) for rank in range(world)]
    rows = [row for share in shares for row in range(total)[share]]
    assert rows == list(range(total))
    sizes = [len(range(total)[share]) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_options_that_do_not_split_over_the_ranks_are_named():
    ranks = Ranks(0, 4, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--batch-size must be a multiple of the number of ranks \(4\).*got 30"):
        demo_distributed.check_options(DemoOptions(batch_size=30), ranks)
    with pytest.raises(ValueError, match="mlm_pairs must be at least the number of ranks"):
        demo_distributed.check_options(DemoOptions(batch_size=8, mlm_pairs=3), ranks)
    demo_distributed.check_options(DemoOptions(batch_size=8, itm_pairs=4, mlm_pairs=4), ranks)


def test_fully_shard_mome_needs_a_mome_layer():
    with pytest.raises(ValueError, match="no MoMELayer inside Linear"):
        fully_shard_mome(nn.Linear(2, 2))
