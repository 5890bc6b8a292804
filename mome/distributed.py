"""Multi-process training under ``torchrun``: the process group, each rank's share of a batch, rank-0 output, FSDP2.

Everything here is ``torch.distributed`` as it comes: ``init_process_group`` from torchrun's environment
(gloo on CPU, NCCL on GPU), ``all_reduce`` / ``all_gather`` for the few values the ranks share, and
``torch.distributed.fsdp.fully_shard`` for sharding a MoME model one :class:`~mome.nn.layer.MoMELayer` at a time.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mome.nn.layer import MoMELayer

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the group: its rank, the number of ranks, its GPU (or the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, evaluates and writes files."""
        return self.rank == 0

    def share(self, total: int) -> slice:
        """This rank's contiguous rows of ``total``, as equal as can be (the first ``total % world`` get one more)."""
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def equal_share(self, total: int, name: str) -> slice:
        """This rank's ``total / world`` rows; a ValueError naming ``name`` unless they divide evenly."""
        if total % self.world_size:
            raise ValueError(
                f"{name} must be a multiple of the number of ranks ({self.world_size}) so that every rank gets an "
                f"equal share, got {total}"
            )
        local = total // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)


def torchrun_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; a RuntimeError naming the missing ones."""
    environ = os.environ if environ is None else environ
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise RuntimeError(
            f"--distributed needs torchrun's environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch it as "
            "`torchrun --nproc-per-node 2 -m mome demo --distributed`"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise RuntimeError(f"{name} must be an integer, got {environ[name]!r}") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise RuntimeError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def init_from_torchrun(
    device: str = "auto", timeout: datetime.timedelta = datetime.timedelta(minutes=5), environ=None
) -> Ranks:
    """Join the group torchrun set up: NCCL on this rank's GPU (``cuda:LOCAL_RANK``), gloo on the CPU.

    ``device``: ``"auto"`` (a GPU when there is one), ``"cpu"`` or ``"cuda"``; an explicit ``cuda:N`` is
    rejected, since the rank's GPU is its local rank.
    """
    rank, world, local = torchrun_environment(environ)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device must be auto, cpu or cuda with --distributed (rank r uses cuda:LOCAL_RANK), got {device!r}"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise RuntimeError(f"rank {rank} needs GPU {local} (its LOCAL_RANK), but {found} GPU(s) are visible")
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout, device_id=target)
    else:
        target = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return Ranks(rank, world, local, target)


def teardown() -> None:
    """Leave the group (every rank calls it, also after an error); a no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: Tensor) -> Tensor:
    """The ranks' mean of ``values`` (detached; gloo has no AVG reduction, so a sum divided by the world size)."""
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def sum_over_ranks(values: Tensor) -> Tensor:
    total = values.detach().clone()
    dist.all_reduce(total)
    return total


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's equally sized ``(b, ...)`` tensor concatenated in rank order, without gradient.

    Bool tensors travel as uint8 (not every backend reduces or gathers bool).
    """
    sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, sent)
    gathered = torch.cat(parts)
    return gathered.bool() if tensor.dtype == torch.bool else gathered


def fully_shard_mome(model: nn.Module, **fsdp_options) -> nn.Module:
    """FSDP2: ``fully_shard`` each :class:`MoMELayer` inside ``model``, then ``model`` itself (the root keeps the
    embeddings, heads and everything else). Returns ``model``, whose parameters are then DTensors sharded over
    the ranks; ``fsdp_options`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``, ...).

    ``fully_shard`` cannot shard a 0-d parameter (``ITCHead.temperature``, ``ITCLoss.logit_scale``): those stay
    whole on every rank, out of FSDP's hands, and a gradient hook averages their gradients over the ranks
    (what FSDP's reduce-scatter does for the rest). They must start equal on every rank (same seed).
    """
    from torch.distributed.fsdp import fully_shard

    layers = [module for module in model.modules() if isinstance(module, MoMELayer)]
    if not layers:
        raise ValueError(f"fully_shard_mome found no MoMELayer inside {type(model).__name__}")
    ignored = set(fsdp_options.pop("ignored_params", None) or ())
    scalars = {param for param in model.parameters() if param.dim() == 0 and param not in ignored}
    for layer in layers:
        fully_shard(layer, ignored_params=ignored | scalars, **fsdp_options)
    fully_shard(model, ignored_params=ignored | scalars, **fsdp_options)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient_over_ranks)
    return model


def _average_gradient_over_ranks(param: Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())
