"""Comparison helpers shared by the tests: relative-norm error with a readable failure."""

from __future__ import annotations

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
