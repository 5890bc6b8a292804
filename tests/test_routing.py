"""Routing metadata (kernels/routing.py) against a torch.sort(stable=True) oracle."""

from __future__ import annotations

import pytest
import torch

routing = pytest.importorskip("mome.kernels.routing")


def make_ids(tokens: int, experts: int, layout: str, generator: torch.Generator) -> torch.Tensor:
    """Modality ids: ``interleaved`` random, ``empty`` (expert 1 unused), ``one`` (all the last expert), ``split``."""
    if layout == "interleaved":
        return torch.randint(0, experts, (tokens,), generator=generator)
    if layout == "empty":
        ids = torch.randint(0, experts, (tokens,), generator=generator)
        return torch.where(ids == 1, 0, ids)
    if layout == "one":
        return torch.full((tokens,), experts - 1, dtype=torch.int64)
    if layout == "split":
        ids = torch.zeros(tokens, dtype=torch.int64)
        ids[tokens * 2 // 3 :] = experts - 1
        return ids
    raise ValueError(layout)


CASES = [
    # tokens, experts, layout, block (tokens per program: small blocks give several programs)
    (1, 1, "interleaved", 64),
    (1, 3, "interleaved", 64),
    (100, 1, "interleaved", 32),
    (200, 3, "interleaved", 64),
    (257, 2, "interleaved", 32),
    (130, 3, "empty", 32),
    (96, 3, "one", 32),
    (150, 2, "split", 64),
    (300, 5, "interleaved", None),
    (70, 40, "interleaved", None),
]


@pytest.mark.parametrize("tokens, experts, layout, block", CASES)
def test_routing_matches_stable_sort(tokens, experts, layout, block, poisoned_allocations):
    generator = torch.Generator().manual_seed(tokens * 31 + experts)
    ids = make_ids(tokens, experts, layout, generator)
    perm, inv_perm, offsets = routing.modality_routing(ids, experts, block=block)
    expected_perm = torch.sort(ids, stable=True).indices
    expected_offsets = torch.zeros(experts + 1, dtype=torch.int64)
    expected_offsets[1:] = torch.bincount(ids, minlength=experts).cumsum(0)
    assert perm.dtype == inv_perm.dtype == offsets.dtype == torch.int32
    assert torch.equal(perm.long(), expected_perm), f"perm {perm.tolist()} != {expected_perm.tolist()}"
    assert torch.equal(offsets.long(), expected_offsets), f"offsets {offsets.tolist()} != {expected_offsets.tolist()}"
    assert torch.equal(inv_perm.long()[expected_perm], torch.arange(tokens)), "inv_perm is not the inverse of perm"


def test_routing_of_no_tokens():
    perm, inv_perm, offsets = routing.modality_routing(torch.zeros(0, dtype=torch.int64), 3)
    assert perm.numel() == inv_perm.numel() == 0
    assert offsets.tolist() == [0, 0, 0, 0]


def test_routing_rejects_wrong_ids_dtype():
    with pytest.raises(ValueError, match="modality"):
        routing.modality_routing(torch.zeros(4, dtype=torch.int32), 2)
