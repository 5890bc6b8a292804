"""The tile schedule of a masked attention launch: for each stationary tile, the lists of the other side's tiles
that are fully visible (no mask arithmetic) and partially visible (mask applied); invisible tiles are never
visited.

Built on the device from the mask structure by one small kernel, with no host sync: per key tile, whether all
or any of its keys are in bounds and not padding, and a bitmask of the modalities present; per query tile, the
and / or of its rows' allowed-modality bitmasks; causal and prefix-LM bounds from positions. A pair of tiles is

- empty when the structure hides every pair, every key is padding, or no row's allowed set meets the keys' set;
- full when the structure shows every pair, every key is in bounds and unpadded, and every row allows every
  modality present;
- partial otherwise (possibly with nothing visible after all: a mixed causal and modality tile; the kernel's
  mask then hides every pair, which is correct and merely not skipped).

The forward and dQ kernels walk the key tiles of their query tile (``KEY_STATIONARY=False``); the dK/dV kernel
walks the query tiles of its key tile (``KEY_STATIONARY=True``). The lists are plain loads at the top of the
kernels' loops, which the software pipeliner overlaps like any other load (FlexAttention's ``kv_indices`` and
``full_kv_indices``, built here from the structure instead of a dense block mask).

Layout, for B batches, S stationary tiles and T tiles on the other side: ``full`` and ``partial`` are
``(B, S, T)`` int32 with the first ``counts[b, s, 0]`` (resp. ``[.., 1]``) entries valid, in increasing order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from mome.kernels.attention_masks import key_tile_info, query_row_bits


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _bit_and(a, b):
    return a & b


@triton.jit
def _key_tiles(KeyPad, Modality, batch, tiles, nk, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
               HAS_PADDING: tl.constexpr, HAS_MODALITY: tl.constexpr):  # fmt: skip
    """Per key tile: every key usable, some key usable, and the bitmask of the usable keys' modalities. Reads
    ``[tiles, CHUNK]`` keys at a time."""
    every = tiles >= 0
    some = tiles < 0
    bits = tl.zeros_like(tiles)
    for start in range(0, BLOCK_N, CHUNK):
        cols = tiles[:, None] * BLOCK_N + start + tl.arange(0, CHUNK)[None, :]
        usable, modality = key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
        every = every & (tl.min(usable.to(tl.int32), 1) > 0)
        some = some | (tl.max(usable.to(tl.int32), 1) > 0)
        bits = bits | tl.reduce(tl.where(usable, 1 << modality, 0), 1, _bit_or)
    return every, some, bits


@triton.jit
def _query_tiles(Modality, AllowedBits, batch, tiles, nq, nk, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                 HAS_MODALITY: tl.constexpr):  # fmt: skip
    """Per query tile: the key modalities every in-bounds row may see, and those some row may see."""
    every = tl.full(tiles.shape, -1, tl.int32)
    some = tl.zeros_like(tiles)
    if HAS_MODALITY:
        for start in range(0, BLOCK_M, CHUNK):
            rows = tiles[:, None] * BLOCK_M + start + tl.arange(0, CHUNK)[None, :]
            bits = query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)
            every = every & tl.reduce(tl.where(rows < nq, bits, -1), 1, _bit_and)
            some = some | tl.reduce(bits, 1, _bit_or)
    return every, some


@triton.jit
def _pick(values, index, position):
    """``values[position]`` of a vector, as a scalar."""
    return tl.sum(tl.where(index == position, values, 0), 0)


@triton.jit
def attention_schedule_kernel(
    Full,
    Partial,
    Counts,
    KeyPad,
    PrefixLen,
    Modality,
    AllowedBits,
    nq,
    nk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,
    CHUNK_N: tl.constexpr,
    CHUNK_M: tl.constexpr,
    KEY_STATIONARY: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
):
    stationary = tl.program_id(0)
    batch = tl.program_id(1)
    n_query_tiles = tl.cdiv(nq, BLOCK_M)
    n_key_tiles = tl.cdiv(nk, BLOCK_N)
    index = tl.arange(0, TILES)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    keys_every, keys_some, key_bits = _key_tiles(KeyPad, Modality, batch, index, nk, BLOCK_N, CHUNK_N, HAS_PADDING,
                                                     HAS_MODALITY)  # fmt: skip
    rows_every, rows_some = _query_tiles(Modality, AllowedBits, batch, index, nq, nk, BLOCK_M, CHUNK_M, HAS_MODALITY)
    if KEY_STATIONARY:  # this program's key tile against every query tile
        query_tile = index
        key_tile = stationary
        others = n_query_tiles
        keys_every = _pick(keys_every.to(tl.int32), index, stationary) != 0
        keys_some = _pick(keys_some.to(tl.int32), index, stationary) != 0
        key_bits = _pick(key_bits, index, stationary)
    else:  # this program's query tile against every key tile
        query_tile = stationary
        key_tile = index
        others = n_key_tiles
        rows_every = _pick(rows_every, index, stationary)
        rows_some = _pick(rows_some, index, stationary)

    first_row = query_tile * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, nq) - 1
    first_key = key_tile * BLOCK_N
    last_key = tl.minimum(first_key + BLOCK_N, nk) - 1
    shift = nk - nq
    if CAUSAL:
        struct_some = (first_key <= last_row + shift) | (first_key < prefix)
        struct_every = (last_key <= first_row + shift) | (last_key < prefix)
    else:
        struct_some = index >= 0
        struct_every = index >= 0
    some = struct_some & keys_some
    every = struct_every & keys_every
    if HAS_MODALITY:
        some = some & ((rows_some & key_bits) != 0)
        every = every & ((key_bits & ~rows_every) == 0)
    in_range = index < others
    is_full = in_range & some & every
    is_partial = in_range & some & ~every

    base = (batch * tl.num_programs(0) + stationary).to(tl.int64)
    full_at = tl.cumsum(is_full.to(tl.int32), 0) - 1
    partial_at = tl.cumsum(is_partial.to(tl.int32), 0) - 1
    tl.store(Full + base * others + full_at, index, mask=is_full)
    tl.store(Partial + base * others + partial_at, index, mask=is_partial)
    tl.store(Counts + base * 2, tl.sum(is_full.to(tl.int32), 0))
    tl.store(Counts + base * 2 + 1, tl.sum(is_partial.to(tl.int32), 0))


ELEMENTS_PER_STEP = 4096  # keys (or rows) one program reads per step: a bounded register tile at any length


def tiles_bound(nq: int, nk: int, block_m: int, block_n: int) -> int:
    """The ``TILES`` constexpr: a power of two covering both sides' tile counts."""
    return triton.next_power_of_2(max(triton.cdiv(nq, block_m), triton.cdiv(nk, block_n), 1))


def chunk(block: int, tiles: int) -> int:
    """``CHUNK_N`` / ``CHUNK_M``: how many keys (rows) of each tile one step reads."""
    return max(1, min(block, ELEMENTS_PER_STEP // tiles))
