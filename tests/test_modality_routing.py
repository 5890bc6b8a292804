"""Routing metadata (``mome::modality_routing``: kernels/modality_routing.py and the reference) against a
torch.sort(stable=True) oracle."""

from __future__ import annotations

import pytest
import torch

from mome.ops.modality import ROUTING_BACKENDS, route
from tests.helpers import usable_backends


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


def _check_routing(ids: torch.Tensor, experts: int, perm, inv_perm, offsets) -> None:
    tokens = ids.numel()
    expected_perm = torch.sort(ids, stable=True).indices
    expected_offsets = torch.zeros(experts + 1, dtype=torch.int64)
    expected_offsets[1:] = torch.bincount(ids, minlength=experts).cumsum(0)
    assert perm.dtype == inv_perm.dtype == offsets.dtype == torch.int32
    assert torch.equal(perm.long(), expected_perm), f"perm {perm.tolist()} != {expected_perm.tolist()}"
    assert torch.equal(offsets.long(), expected_offsets), f"offsets {offsets.tolist()} != {expected_offsets.tolist()}"
    assert torch.equal(inv_perm.long()[expected_perm], torch.arange(tokens)), "inv_perm is not the inverse of perm"


CASES = [
    # tokens, experts, layout, block (tokens per program: small blocks give several programs), blocks per chunk
    (1, 1, "interleaved", 64, None),
    (1, 3, "interleaved", 64, None),
    (100, 1, "interleaved", 32, None),
    (200, 3, "interleaved", 64, None),
    (257, 2, "interleaved", 32, None),
    (130, 3, "empty", 32, None),
    (96, 3, "one", 32, None),
    (150, 2, "split", 64, None),
    (300, 5, "interleaved", None, None),
    (70, 40, "interleaved", None, None),
    (333, 3, "interleaved", 32, 2),  # 11 blocks read 2 histograms at a time: 6 chunks, the last one partial
    (200, 7, "split", 16, 4),
]


@pytest.mark.parametrize("tokens, experts, layout, block, chunk", CASES)
def test_routing_matches_stable_sort(tokens, experts, layout, block, chunk, poisoned_allocations):
    routing = pytest.importorskip("mome.kernels.modality_routing")
    generator = torch.Generator().manual_seed(tokens * 31 + experts)
    ids = make_ids(tokens, experts, layout, generator)
    _check_routing(ids, experts, *routing.counting_sort(ids, experts, block=block, blocks_chunk=chunk))


@pytest.mark.parametrize("backend", usable_backends(ROUTING_BACKENDS))
@pytest.mark.parametrize("tokens, experts, layout", [(0, 3, "interleaved"), (1, 2, "one"), (123, 4, "empty")])
def test_every_routing_backend_matches_stable_sort(backend, tokens, experts, layout, poisoned_allocations):
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens))
    _check_routing(ids, experts, *route(ids, experts, backend))
    _check_routing(ids, experts, *torch.ops.mome.modality_routing(ids, experts, backend))


def test_routing_of_no_tokens():
    routing = pytest.importorskip("mome.kernels.modality_routing")
    perm, inv_perm, offsets = routing.modality_routing(torch.zeros(0, dtype=torch.int64), 3)
    assert perm.numel() == inv_perm.numel() == 0
    assert offsets.tolist() == [0, 0, 0, 0]


def test_routing_rejects_wrong_ids_dtype():
    routing = pytest.importorskip("mome.kernels.modality_routing")
    with pytest.raises(ValueError, match="modality"):
        routing.modality_routing(torch.zeros(4, dtype=torch.int32), 2)


def test_routing_limits_are_declared_and_read_before_a_launch():
    ids = torch.zeros(5, dtype=torch.int64)
    many = dict(modality=ids, num_experts=257)
    if "triton" in usable_backends(ROUTING_BACKENDS):
        assert "experts (E, the number of experts) in [1, 256], got 257" in ROUTING_BACKENDS.reason("triton", many)
        assert "int64" in ROUTING_BACKENDS.reason("triton", dict(modality=ids.int(), num_experts=2))
    assert ROUTING_BACKENDS.reason("reference", many) is None


def test_routing_op_traces_under_torch_compile():
    ids = make_ids(40, 3, "interleaved", torch.Generator().manual_seed(2))
    compiled = torch.compile(lambda m: torch.ops.mome.modality_routing(m, 3, "auto"), fullgraph=True)
    for got, want in zip(compiled(ids), route(ids, 3), strict=True):
        assert torch.equal(got, want)
