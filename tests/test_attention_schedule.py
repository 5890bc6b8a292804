"""The tile schedule of masked attention launches against the dense visibility table of the reference.

For every (query tile, key tile) pair the schedule says full (no mask arithmetic), partial (mask applied) or
empty (never visited). Checked under the interpreter, for each mask kind and combination, ragged lengths,
B > 1, Nq != Nk, and both orientations (key tiles per query tile; query tiles per key tile).
"""

import pytest
import torch

from mome.reference.attention import attention_visibility

triton_attention = pytest.importorskip("mome.kernels.attention")
from mome.kernels.attention_configs import TileConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

BLOCK_M, BLOCK_N = 16, 32


def make_masks(kind: str, batch: int, nq: int, nk: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = dict(causal="causal" in kind)
    if "ragged" in kind:  # suffix padding per sequence, one sequence fully padded
        lengths = torch.randint(1, nk + 1, (batch,), generator=gen)
        lengths[0] = 0
        masks["key_padding_mask"] = torch.arange(nk)[None, :] >= lengths[:, None]
    if "random_padding" in kind:
        masks["key_padding_mask"] = torch.rand(batch, nk, generator=gen) < 0.3
    if "prefix" in kind:
        masks["prefix_len"] = torch.randint(0, nk + 1, (batch,), generator=gen)
    if "split_modality" in kind:  # image tokens then text: images see images, text sees both
        images = torch.randint(0, nk + 1, (batch, 1), generator=gen)
        masks["modality"] = (torch.arange(nk)[None, :] >= images).long()
        masks["modality_mask"] = torch.tensor([[True, False], [True, True]])
    if "interleaved_modality" in kind:
        masks["modality"] = torch.randint(0, 3, (batch, nk), generator=gen)
        masks["modality_mask"] = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    return masks


def schedule_classes(masks: dict, batch: int, nq: int, nk: int, key_stationary: bool) -> torch.Tensor:
    """``(B, query tiles, key tiles)`` of 0 empty / 1 partial / 2 full, read back from the schedule's lists."""
    bundle = (masks["causal"], masks.get("key_padding_mask"), masks.get("prefix_len"), masks.get("modality"),
              masks.get("modality_mask"))  # fmt: skip
    probe = torch.empty(1, 1, nq, 16)
    pointers, flags = triton_attention._mask_arguments(probe, bundle)
    shape = triton_attention.Shape(batch, 1, 1, nq, nk, 16, torch.float32, 80, 108)
    launch = triton_attention._schedule_launch(shape, flags, TileConfig(BLOCK_M, BLOCK_N, 4, 1),
                                               key_stationary=key_stationary)  # fmt: skip
    full, partial, counts = triton_attention._run_schedule(launch, pointers, probe.device, shape)
    classes = torch.zeros(batch, -(-nq // BLOCK_M), -(-nk // BLOCK_N), dtype=torch.long)
    for b in range(batch):
        for stationary in range(full.shape[1]):
            for kind, lists, count in ((2, full, counts[b, stationary, 0]), (1, partial, counts[b, stationary, 1])):
                others = lists[b, stationary, : int(count)].long()
                assert others.tolist() == sorted(set(others.tolist())), "each list is increasing, no repeats"
                if key_stationary:
                    classes[b, others, stationary] = kind
                else:
                    classes[b, stationary, others] = kind
    return classes


def dense_classes(masks: dict, batch: int, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile pair from the dense table: does some pair see, and is the tile full (every pair sees and every
    key of the tile is in bounds)?"""
    visible = attention_visibility(batch, nq, nk, **masks)
    rows, cols = -(-nq // BLOCK_M), -(-nk // BLOCK_N)
    some = torch.zeros(batch, rows, cols, dtype=torch.bool)
    every = torch.zeros_like(some)
    for i in range(rows):
        for j in range(cols):
            tile = visible[:, i * BLOCK_M : (i + 1) * BLOCK_M, j * BLOCK_N : (j + 1) * BLOCK_N]
            some[:, i, j] = tile.flatten(1).any(1)
            every[:, i, j] = tile.flatten(1).all(1) & ((j + 1) * BLOCK_N <= nk)
    return some, every


SINGLE_KINDS = ["ragged", "random_padding", "split_modality", "interleaved_modality", "ragged_split_modality",
                "random_padding_interleaved_modality"]  # fmt: skip
COMBINED_KINDS = ["causal_ragged", "causal_prefix_random_padding", "causal_interleaved_modality",
                  "causal_prefix_ragged_split_modality"]  # fmt: skip
SIZES = [(3, 70, 70), (2, 45, 130), (4, 33, 200), (1, 16, 32)]  # (B, Nq, Nk): odd, Nq != Nk, exact multiples


@pytest.mark.parametrize("key_stationary", [False, True], ids=["by_query", "by_key"])
@pytest.mark.parametrize("batch,nq,nk", SIZES)
@pytest.mark.parametrize("kind", SINGLE_KINDS + COMBINED_KINDS)
def test_schedule_classifies_every_tile_like_the_dense_mask(kind, batch, nq, nk, key_stationary):
    if "modality" in kind and nq > nk:
        pytest.skip("modality ids need Nq <= Nk")
    masks = make_masks(kind, batch, nq, nk, seed=nq * nk)
    got = schedule_classes(masks, batch, nq, nk, key_stationary)
    some, every = dense_classes(masks, batch, nq, nk)
    assert torch.equal(got == 2, every), "full exactly where every pair of the tile is visible"
    assert not (some & (got == 0)).any(), "a tile with a visible pair is never skipped"
    if kind in SINGLE_KINDS:  # with one kind of mask the per-tile summaries are exact
        assert torch.equal(got == 1, some & ~every)
    else:  # causal with data masks: a tile may be partial with nothing visible after all (never the reverse)
        assert not ((got == 0) & some).any()


def test_schedule_is_the_same_in_both_orientations():
    batch, nq, nk = 3, 90, 150
    masks = make_masks("causal_prefix_random_padding_interleaved_modality", batch, nq, nk, seed=7)
    assert torch.equal(schedule_classes(masks, batch, nq, nk, False), schedule_classes(masks, batch, nq, nk, True))
