"""Mask arithmetic shared by the attention kernels: which (query, key) pairs of a tile are visible.

Every helper takes index vectors already shaped for broadcasting, so the same code serves the forward's
``[queries, keys]`` tiles and the key-stationary backward's transposed ``[keys, queries]`` tiles.

Masks are structure, never a dense tensor: causal and prefix-LM from positions (query i sits at absolute
position ``i + Nk - Nq``; keys before ``prefix`` are visible to every query), key padding from one byte per
key, modality blocks from one id per key and one bitmask per query modality (bit j set: keys of modality j
are visible), so a pair's visibility is a shift and an and.
"""

from __future__ import annotations

import triton
import triton.language as tl
from mome.kernels._common import widen_bf16_in_interpreter


@triton.jit
def visible_pairs(rows, cols, shift, prefix, key_ok, key_modality, row_bits, CAUSAL: tl.constexpr,
                  HAS_MODALITY: tl.constexpr):  # fmt: skip
    """May query ``rows`` see key ``cols``? All arguments broadcast to the tile; ``key_ok`` holds the key
    bounds and padding."""
    visible = key_ok
    if CAUSAL:
        visible = visible & ((cols <= rows + shift) | (cols < prefix))
    if HAS_MODALITY:
        visible = visible & (((row_bits >> key_modality) & 1) != 0)
    return visible


@triton.jit
def key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING: tl.constexpr, HAS_MODALITY: tl.constexpr):
    """Per key of a tile: in bounds and not padding; its modality id (0 when there are no modality ids)."""
    key_ok = cols < nk
    if HAS_PADDING:
        key_ok = key_ok & (tl.load(KeyPad + batch * nk + cols, mask=key_ok, other=1) == 0)
    key_modality = tl.zeros_like(cols)
    if HAS_MODALITY:
        key_modality = tl.load(Modality + batch * nk + cols, mask=cols < nk, other=0).to(tl.int32)
    return key_ok, key_modality


@triton.jit
def query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY: tl.constexpr):
    """Per query row: bitmask of the key modalities it may see (queries take the ids of the last Nq keys)."""
    bits = tl.zeros_like(rows)
    if HAS_MODALITY:
        row_ok = rows < nq
        query_modality = tl.load(Modality + batch * nk + (nk - nq) + rows, mask=row_ok, other=0)
        bits = tl.load(AllowedBits + query_modality, mask=row_ok, other=0)
    return bits


@triton.jit
def causal_key_bounds(start_m, nq, nk, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr):  # fmt: skip
    """Key tiles of the query tile at ``start_m`` under causal/prefix structure alone: ``[0, full)`` are visible
    to every query of the tile, ``[full, end)`` to some, the rest to none (tile indices)."""
    if CAUSAL:
        shift = nk - nq  # query i sits at absolute position i + shift
        last_row = tl.minimum(start_m + BLOCK_M, nq) - 1
        end = tl.maximum(tl.minimum(tl.maximum(last_row + shift + 1, prefix), nk), 0)
        full = tl.maximum(tl.minimum(tl.maximum(start_m + shift + 1, prefix), nk), 0)
        return full // BLOCK_N, tl.cdiv(end, BLOCK_N)
    else:
        return nk // BLOCK_N, tl.cdiv(nk, BLOCK_N)


@triton.jit
def causal_query_bounds(start_n, nq, nk, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):  # fmt: skip
    """Query tiles for the key tile at ``start_n`` under causal/prefix structure alone: ``[lo, full)`` see some
    of its keys, ``[full, end)`` see all of them, those before ``lo`` none (tile indices)."""
    end = tl.cdiv(nq, BLOCK_M)
    if CAUSAL:
        shift = nk - nq
        last_key = tl.minimum(start_n + BLOCK_N, nk) - 1
        first = tl.where(start_n < prefix, 0, tl.maximum(start_n - shift, 0))
        every = tl.where(last_key < prefix, 0, tl.maximum(last_key - shift, 0))
        lo = tl.minimum(first, nq) // BLOCK_M
        full = tl.maximum(tl.cdiv(tl.minimum(every, nq), BLOCK_M), lo)
        return lo, full, end
    else:
        return 0, 0, end


@triton.jit
def load_rows(base, idx, offs_d, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of a row-major ``[*, HEAD_DIM]`` tensor as ``[len(idx), BLOCK_D]``; rows ``>= limit`` and padded
    columns read 0. A masked load is still an asynchronous copy (zero-filled), so the pipeliner overlaps it."""
    pointers = base + idx[:, None] * HEAD_DIM + offs_d[None, :]
    tile = tl.load(pointers, mask=(idx[:, None] < limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return widen_bf16_in_interpreter(tile)


@triton.jit
def load_lse_log2(Lse, offsets, mask):
    """Saved natural-log LSE in base 2; rows that see nothing (or lie out of bounds) get +inf so P = 0."""
    lse = tl.load(Lse + offsets, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # x log2(e)


@triton.jit
def bias_plane(batch, head, bias_stride_b, bias_stride_h):
    """Offset of the ``[Nq, Nk]`` bias plane of (batch, head): strides are 0 along broadcast dims."""
    return batch.to(tl.int64) * bias_stride_b + head.to(tl.int64) * bias_stride_h


@triton.jit
def load_bias_log2(Bias, base, rows, cols, nq, nk, row_stride):
    """The additive bias of the pairs ``(rows, cols)`` (index vectors shaped for broadcasting, as above) of the
    ``[Nq, Nk]`` bias plane at ``base`` (rows ``row_stride`` apart), in base 2 (× log2 e) and fp32. Pairs out of
    bounds get -inf: hidden like a masked pair, so a NaN that the product of a real key with a missing (zero) query
    row gives stays out of dK/dV. Plain pointer loads (no TMA: a descriptor per plane); the launcher pads
    ``row_stride`` to a multiple of 16 elements so they vectorise to 16-byte loads."""
    bias = tl.load(Bias + base + rows * row_stride + cols, mask=(rows < nq) & (cols < nk), other=float("-inf"))
    return bias.to(tl.float32) * 1.4426950408889634


@triton.jit
def dropout_keep(seed, bh, rows, start_n, threshold, BLOCK_N: tl.constexpr):
    """``[len(rows), BLOCK_N]`` bool: does dropout keep the pair (query ``rows[i]``, key ``start_n + j``) of head
    row ``bh``? The mask of mome/reference/dropout.py: one Philox4x32-10 call on the counter
    ``(key // 8, query, bh, 0)`` serves eight neighbouring keys, key ``j`` reading the 16-bit half ``j % 2`` of word
    ``(j % 8) // 2`` (``start_n`` is a multiple of 8); kept when that half is at least ``threshold``."""
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8]
    c0 = tl.broadcast_to(groups[None, :], (rows.shape[0], BLOCK_N // 8))
    c1 = tl.broadcast_to(rows[:, None], (rows.shape[0], BLOCK_N // 8))
    c2 = tl.zeros_like(c0) + bh.to(tl.int32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    # join appends a last axis, so the later a join the less significant its index once flattened:
    # [.., g, a, b, h] holds half h of word 2a + b, which is key 8g + 2(2a + b) + h
    low = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    high = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    halves = tl.reshape(tl.join(low, high), (rows.shape[0], BLOCK_N))
    return halves.to(tl.int32, bitcast=True) >= threshold
