"""Shared by the integration tests: weights that make attention matter, and a gradient comparison."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.helpers import assert_close

# Outputs and losses agree to 1e-6 (fp32, reference backend); gradients to twice that, as backward tolerances are
# looser everywhere: fp32 rounding through a few LayerNorm backwards alone reaches ~1e-6 on some bias gradients.
FP32_GRAD_TOL = 2e-6


@torch.no_grad()
def spread_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every Linear / Embedding / attention input projection with unit-variance outputs. The libraries'
    inits give tiny embeddings, hence near-uniform attention whose q/k gradients are rounding noise; with these,
    attention scores are O(1)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(module.in_features))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weight = module.in_proj_weight
            weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(weight.shape[1]))
    return model


def assert_grads_close(reference: nn.Module, ours: nn.Module, tol: float) -> None:
    """Every parameter's gradient to ``tol`` (never tighter than FP32_GRAD_TOL), relative to its own norm, or to
    1e-3 of the largest one for gradients that are 0 up to rounding by structure (a key bias: softmax does not see
    a shift shared by all keys)."""
    tol = max(tol, FP32_GRAD_TOL)
    pairs = [
        (name, p.grad, q.grad) for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True)
    ]
    pairs = [(name, expected, actual) for name, expected, actual in pairs if expected is not None]
    largest = max(expected.norm().item() for _, expected, _ in pairs)
    for name, expected, actual in pairs:
        assert actual is not None, f"no gradient reached {name}"
        floor = 1e-3 * largest
        if expected.norm().item() >= floor:
            assert_close(actual, expected, tol, f"grad of {name}")
        else:
            error = (actual - expected).norm().item() / floor
            assert error <= tol, f"grad of {name}: error {error:.3e} relative to 1e-3 of the largest gradient > {tol}"
