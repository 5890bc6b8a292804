"""What every demo's training loop shares: the device, batches on it, the optimizer and its schedule, progress."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mome.ops._validate import is_int
from mome.shapes_data import CaptionBatch, ShapesCaptions


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else CPU; any other name as given (CUDA must then be there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N, got {name!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__})")
    return device


def check_counts(options, minimum: int, *names: str) -> None:
    """Each named field of ``options`` is an int (not a bool) of at least ``minimum``, or a ValueError names it."""
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    for name in names:
        value = getattr(options, name)
        if not is_int(value) or value < minimum:
            raise ValueError(f"{name} must be {expected}, got {value!r}")


def start_recipe_demo(options) -> tuple[float, torch.device, ShapesCaptions]:
    """What every recipe demo starts from: the clock, the device, torch's seed and the ShapesCaptions data."""
    started = time.perf_counter()
    device = pick_device(options.device)
    torch.manual_seed(options.seed)
    return started, device, ShapesCaptions(options.seed, options.image_size, jitter=options.jitter)


def finish_recipe_demo(metrics: dict, started: float, device: torch.device, options, history) -> dict:
    """``metrics`` with the run's seconds, device, options and history; written to ``options.out``/metrics.json
    when ``options.out`` is set."""
    metrics.update(seconds=time.perf_counter() - started, device=str(device), options=dataclasses.asdict(options),
                   history=dataclasses.asdict(history))  # fmt: skip
    if options.out is not None:
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def on_device(batch: CaptionBatch, device: torch.device) -> CaptionBatch:
    """``batch`` with every tensor moved to ``device`` (the captions' strings as they are)."""
    moved = {
        field.name: value.to(device) if isinstance(value := getattr(batch, field.name), Tensor) else value
        for field in dataclasses.fields(batch)
    }
    return CaptionBatch(**moved)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of step ``i`` of ``steps``: a linear warm-up over the first tenth, then a cosine
    decay to 10% (for ``torch.optim.lr_scheduler.LambdaLR``)."""
    warmup = max(steps // 10, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return factor


def adamw_warmup_cosine(params, lr: float, steps: int):
    """AdamW (weight decay 0.01) and its :func:`warmup_cosine` scheduler over ``steps`` steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))


class Progress:
    """A dependency-free progress line: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, label: str, quiet: bool = False, stream=None) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.inline = getattr(self.stream, "isatty", lambda: False)()

    def update(self, done: int, note: str = "") -> None:
        if self.quiet or not (self.inline or done == self.total or done % max(self.total // 10, 1) == 0):
            return
        elapsed = time.perf_counter() - self.start
        filled = int(24 * done / max(self.total, 1))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (24 - filled)}] {done}/{self.total} {note} {done / elapsed:.1f} it/s"
        )
        print(("\r" + line) if self.inline else line, end="" if self.inline else "\n", file=self.stream, flush=True)
        if self.inline and done == self.total:
            print(file=self.stream, flush=True)
