"""Comparison helpers shared by the tests: relative-norm error with a readable failure."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor

# ‖out − ref‖ / ‖ref‖ bounds against a float64 reference (DESIGN.md, Testing).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def assert_close(actual: Tensor, expected: Tensor, tol: float, name: str = "output") -> None:
    """Fail on NaN, shape mismatch, or ‖actual − expected‖/‖expected‖ > tol; report the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    bad = ~torch.isfinite(actual) & torch.isfinite(expected)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements, first at {tuple(bad.nonzero()[0].tolist())}"
    error = relative_error(actual, expected)
    if error > tol:
        diff = (actual.double() - expected.double()).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        mismatched = int((diff > tol * expected.double().abs().max().clamp_min(1e-30)).sum())
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tol:.1e}; {mismatched}/{diff.numel()} elements off, "
            f"worst at {worst}: {actual[worst].item():.6g} vs {expected[worst].item():.6g}"
        )


def poison(t: Tensor) -> Tensor:
    """Fill with NaN (ints: a sentinel) so an element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


CPU = torch.device("cpu")


def usable_backends(op_backends, device: torch.device = CPU) -> list[str]:
    """The backends of an op (``mome.ops.<family>.BACKENDS`` etc.) that load and run on ``device`` here: the
    reference always, Triton under the interpreter, CUDA on a GPU with the extension built. Cross-backend tests
    parametrize over this, so a new backend is tested the day it appears."""
    return [backend for backend, why in op_backends.report(device).items() if why is None]


def declared_dtypes(op_backends, backend: str, device: torch.device = CPU) -> tuple[torch.dtype, ...]:
    """The dtypes ``backend`` declares for ``device`` in its LIMITS."""
    return op_backends.limits(backend).dtypes_on(device.type)


def declared_range(op_backends, backend: str, size: str) -> tuple[int, int | None] | None:
    """The inclusive range ``backend`` declares for a named size, or None when it leaves it unbounded."""
    return op_backends.limits(backend).ranges.get(size)


def triton_module_or_none(module: str):
    """``importlib.import_module(module)``, or None where triton (or the module) cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def leave_spawned_worker() -> None:
    """End a spawned 2-process test worker whose results are saved and whose group is destroyed, skipping the
    interpreter's teardown, where gloo's threads can abort the process (SIGABRT, "terminate called without an
    active exception": seen once in about ten runs, with no error reported by either rank before it). Call it
    after the ``try/finally`` that destroys the group, so a failure before it still raises and fails the test."""
    os._exit(0)
