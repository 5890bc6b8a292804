"""Routing of the modality family: a stable counting sort of the tokens by expert id, on the device.

The Triton backend of ``mome::modality_routing`` (the ``RoutingBackend`` contract of the ops layer):
``modality_routing(modality, num_experts) -> (perm, inv_perm, offsets)``, all int32:

- ``perm[k]``: original index of the k-th token in stable expert-sorted order;
- ``inv_perm[t]``: sorted position of token t;
- ``offsets`` ``(E + 1,)``: ``offsets[e]`` is the first sorted row of expert e, ``offsets[E] = T``.

Two launches and no host sync: a per-block histogram of ids, then per block the exclusive prefix over earlier
blocks (read in chunks of block histograms, so any number of tokens fits) plus the rank of each token among the
same expert's tokens in its block. The CUDA twin (``mome.cuda.modality``) keeps this contract.
Moves ``T`` ids in twice and ``2·T`` int32 out: bandwidth-bound, a few microseconds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mome.kernels._plan import GATE_TARGETS, Launch, divisible_by_16
from mome.kernels.aot import GateCase
from torch import Tensor

ROUTING_BLOCK = 1024  # tokens per program; the second pass reads all block histograms, (T / 1024) x E ints
ONE_HOT_ELEMENTS = 16384  # a program's (tokens x padded experts) one-hot tile: fewer tokens for many experts
COUNTS_ELEMENTS = 16384  # a chunk of (block histograms x padded experts) that the second pass holds at once
MAX_EXPERTS = 256
MAX_TOKENS = 2**31 - 1  # int32 ids of the sorted rows

# What this backend routes: the ops layer reads it before any launch.
LIMITS = {
    "dtypes": (torch.int64,),
    "experts": (1, MAX_EXPERTS),
    "tokens": (0, MAX_TOKENS),
}


@triton.jit
def _routing_count_kernel(
    block_counts,  # [num_blocks, NUM_EXPERTS] int32 out
    modality,  # [T] int64
    T,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(modality + tokens, mask=tokens < T, other=-1).to(tl.int32)
    experts = tl.arange(0, EXPERTS_PAD)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, EXPERTS_PAD]
    counts = tl.sum(one_hot, axis=0)
    tl.store(block_counts + block * NUM_EXPERTS + experts, counts, mask=experts < NUM_EXPERTS)


@triton.jit
def _routing_scatter_kernel(
    perm,  # [T] int32 out
    inv_perm,  # [T] int32 out
    offsets,  # [NUM_EXPERTS + 1] int32 out
    modality,  # [T] int64
    block_counts,  # [num_blocks, NUM_EXPERTS] int32
    T,
    num_blocks,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    BLOCKS_CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PAD)
    totals = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)  # tokens per expert
    earlier = tl.zeros((EXPERTS_PAD,), dtype=tl.int32)  # tokens per expert in the blocks before this one
    for chunk_start in range(0, num_blocks, BLOCKS_CHUNK):
        blocks = chunk_start + tl.arange(0, BLOCKS_CHUNK)
        valid = (blocks[:, None] < num_blocks) & (experts[None, :] < NUM_EXPERTS)
        counts = tl.load(block_counts + blocks[:, None] * NUM_EXPERTS + experts[None, :], mask=valid, other=0)
        totals += tl.sum(counts, axis=0)
        earlier += tl.sum(tl.where(blocks[:, None] < block, counts, 0), axis=0)
    expert_start = tl.cumsum(totals, axis=0) - totals  # exclusive prefix: first sorted row of each expert
    base = expert_start + earlier

    tokens = block * BLOCK + tl.arange(0, BLOCK)
    in_range = tokens < T
    ids = tl.load(modality + tokens, mask=in_range, other=-1).to(tl.int32)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, EXPERTS_PAD]
    rank = tl.cumsum(one_hot, axis=0) - one_hot  # earlier tokens of the same expert in this block (stable)
    position = tl.sum(one_hot * (rank + base[None, :]), axis=1)
    tl.store(inv_perm + tokens, position, mask=in_range)
    tl.store(perm + position, tokens, mask=in_range)
    if block == 0:
        tl.store(offsets + experts, expert_start, mask=experts < NUM_EXPERTS)
        tl.store(offsets + NUM_EXPERTS, T)


def _default_block(experts_pad: int) -> int:
    return max(64, min(ROUTING_BLOCK, ONE_HOT_ELEMENTS // experts_pad))


def routing_plan(tokens: int, num_experts: int, *, block: int | None = None,
                 blocks_chunk: int | None = None) -> tuple[Launch, Launch]:  # fmt: skip
    """The two launches (count, scatter) of one routing; the same on every architecture (no products, a few
    microseconds of memory traffic)."""
    experts_pad = triton.next_power_of_2(num_experts)
    block = _default_block(experts_pad) if block is None else block
    num_blocks = triton.cdiv(tokens, block)
    if blocks_chunk is None:
        blocks_chunk = max(1, min(triton.next_power_of_2(num_blocks), COUNTS_ELEMENTS // experts_pad))
    flags = dict(NUM_EXPERTS=num_experts, EXPERTS_PAD=experts_pad, BLOCK=block)
    divisible = divisible_by_16(T=tokens, num_blocks=num_blocks)
    count = Launch(
        f"routing_count_E{num_experts}_b{block}",
        _routing_count_kernel,
        (num_blocks,),
        {"block_counts": "*i32", "modality": "*i64", "T": "i32"},
        flags,
        divisible_by_16=divisible,
    )
    scatter = Launch(f"routing_scatter_E{num_experts}_b{block}c{blocks_chunk}", _routing_scatter_kernel, (num_blocks,),
                     {"perm": "*i32", "inv_perm": "*i32", "offsets": "*i32", "modality": "*i64",
                      "block_counts": "*i32", "T": "i32", "num_blocks": "i32"},
                     dict(flags, BLOCKS_CHUNK=blocks_chunk), divisible_by_16=divisible)  # fmt: skip
    return count, scatter


def counting_sort(
    modality: Tensor, num_experts: int, *, block: int | None = None, blocks_chunk: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(perm, inv_perm, offsets)`` with explicit tiling: ``block`` tokens per program and ``blocks_chunk`` block
    histograms per step of the second pass (powers of two; defaults from the number of experts). Tests take small
    ones to get many programs and chunks at small sizes.

    modality: ``(T,)`` int64, contiguous, ids in ``[0, num_experts)`` (not checked here: that would sync).
    """
    tokens = modality.shape[0]
    device = modality.device
    perm = torch.empty(tokens, dtype=torch.int32, device=device)
    inv_perm = torch.empty(tokens, dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    if tokens == 0:
        return perm, inv_perm, offsets.zero_()
    count, scatter = routing_plan(tokens, num_experts, block=block, blocks_chunk=blocks_chunk)
    block_counts = torch.empty(count.grid[0], num_experts, dtype=torch.int32, device=device)
    count(block_counts, modality, tokens)
    scatter(perm, inv_perm, offsets, modality, block_counts, tokens, count.grid[0])
    return perm, inv_perm, offsets


def modality_routing(modality: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Launcher of the routing contract: the stable expert-sorted order of the tokens, int32 on modality's device.

    modality: ``(T,)`` int64, contiguous, ids in ``[0, num_experts)``; ``1 <= num_experts <= MAX_EXPERTS``.
    """
    if modality.dim() != 1 or modality.dtype != torch.int64:
        raise ValueError(f"modality must be a 1-D int64 tensor, got shape {tuple(modality.shape)}, {modality.dtype}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}] for the Triton routing, got {num_experts}")
    return counting_sort(modality.contiguous(), num_experts)


GATE_TOKENS = (32 * 261, 256 * 261)  # 32-256 images of 197 tokens, each with 64 text tokens


def gate_cases() -> list[GateCase]:
    """The routings of the gate's models (2 or 3 experts) on both targets; no products, so only the spill rule."""
    cases = []
    for arch, _multiprocessors in GATE_TARGETS:
        for experts in (2, 3):
            for tokens in GATE_TOKENS:
                for launch in routing_plan(tokens, experts):
                    cases.append(launch.gate_case(arch, None, f"{tokens} tokens, {experts} experts"))
    return cases


AOT_SPECS = [launch.spec() for experts in (2, 3) for launch in routing_plan(256 * 261, experts)]
