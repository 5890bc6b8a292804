"""The attention bias gradient: dBias = dS summed over the (batch, head) pairs that broadcast onto each bias entry.

One program per (bias plane, query tile, key tile) of a ``(1|B, 1|H, Nq, Nk)`` bias. It loops over the
(batch, head) pairs whose scores that plane feeds, in a fixed order (batch-major), recomputing for each
``S = Q·Kᵀ``, ``P`` from the saved log-sum-exp, ``dP = dO·Vᵀ`` with the dropout mask Z regenerated, and
``dS = P∘(dP∘Z − Δ)``, with hidden pairs (structure or a -inf bias) set to 0, accumulated in fp32 registers. No
atomics, so the result is deterministic, and no ``B·H·Nq·Nk`` buffer.

The loop's loads are Q, dO (rows of the query tile) and K, V (rows of the key tile) of a different head each
step, read through one tensor descriptor (TMA) or base pointer over the flattened ``[rows, HEAD_DIM]`` tensor:
rows past a head's end belong to the next head, and the bounds mask of the pairs hides them.
"""

from __future__ import annotations

import triton
import triton.language as tl
from mome.kernels._common import widen_bf16_in_interpreter
from mome.kernels.attention_fwd import tile_source
from mome.kernels.attention_masks import (
    dropout_keep,
    key_tile_info,
    load_bias_log2,
    load_lse_log2,
    load_rows,
    query_row_bits,
    visible_pairs,
)


@triton.jit
def _flat_tile(source, first_row, start, limit, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Rows ``[start, start + BLOCK_ROWS)`` of the head whose rows begin at ``first_row``. Under TMA rows past
    ``limit`` hold the next head's data (masked by the caller); with pointers they read 0."""
    if USE_TMA:
        return widen_bf16_in_interpreter(source.load([(first_row + start).to(tl.int32), 0]))
    else:
        return load_rows(source + first_row * HEAD_DIM, start + tl.arange(0, BLOCK_ROWS), tl.arange(0, BLOCK_D), limit,
                         HEAD_DIM, BLOCK_D)  # fmt: skip


@triton.jit
def attention_bias_grad_kernel(
    DBias,
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    Bias,
    Seed,
    KeyPad,
    PrefixLen,
    Modality,
    AllowedBits,
    batch_size,
    heads,
    group,
    nq,
    nk,
    bias_heads,
    bias_row,
    scale_log2,
    dropout_threshold,
    keep_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BATCH_BROADCAST: tl.constexpr,
    HEAD_BROADCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    key_tiles = tl.cdiv(nk, BLOCK_N)
    query_tile = tl.program_id(0) // key_tiles
    start_m = query_tile * BLOCK_M
    start_n = (tl.program_id(0) % key_tiles) * BLOCK_N
    plane = tl.program_id(1)  # bias batch * bias_heads + bias head
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    row_ok = rows < nq
    bias = load_bias_log2(Bias, plane.to(tl.int64) * nq * bias_row, rows[:, None], cols[None, :], nq, nk, bias_row)
    bias_visible = row_ok[:, None] & (bias != float("-inf"))
    shift = nk - nq

    pair_heads = 1  # the pairs of this plane: every head when the bias's head dim broadcasts, then every batch
    if HEAD_BROADCAST:
        pair_heads = heads
    pairs = pair_heads
    if BATCH_BROADCAST:
        pairs = batch_size * pair_heads
    if CAUSAL and not HAS_PREFIX:  # a key tile after the last row's diagonal: nothing to sum
        last_row = tl.minimum(start_m + BLOCK_M, nq) - 1
        pairs = tl.where(start_n > last_row + shift, 0, pairs)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    kv_heads = heads // group
    q_source = tile_source(Q, batch_size * heads * nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    do_source = tile_source(DOut, batch_size * heads * nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_source = tile_source(K, batch_size * kv_heads * nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_source = tile_source(V, batch_size * kv_heads * nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for pair in range(0, pairs):
        batch = plane // bias_heads
        if BATCH_BROADCAST:
            batch = pair // pair_heads
        head = plane % bias_heads
        if HEAD_BROADCAST:
            head = pair % pair_heads
        bh = batch * heads + head
        q_row = bh.to(tl.int64) * nq
        kv_row = (batch * kv_heads + head // group).to(tl.int64) * nk
        q = _flat_tile(q_source, q_row, start_m, nq, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        do = _flat_tile(do_source, q_row, start_m, nq, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        k = _flat_tile(k_source, kv_row, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
        v = _flat_tile(v_source, kv_row, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
        lse2 = load_lse_log2(Lse, q_row + rows, row_ok)
        delta = tl.load(Delta + q_row + rows, mask=row_ok, other=0.0)
        prefix = 0
        if HAS_PREFIX:
            prefix = tl.load(PrefixLen + batch).to(tl.int32)
        key_ok, key_modality = key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
        row_bits = query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)
        visible = bias_visible & visible_pairs(rows[:, None], cols[None, :], shift, prefix, key_ok[None, :],
                                               key_modality[None, :], row_bits[:, None], CAUSAL,
                                               HAS_MODALITY)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.where(visible, tl.math.exp2(s * scale_log2 + bias - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(seed, bh, rows, start_n, dropout_threshold, BLOCK_N), dp * keep_scale, 0.0)
        acc += tl.where(visible, p * (dp - delta[:, None]), 0.0)
    offsets = plane.to(tl.int64) * nq * nk + rows[:, None] * nk + cols[None, :]  # dBias is contiguous
    tl.store(DBias + offsets, acc.to(DBias.dtype.element_ty), mask=row_ok[:, None] & (cols < nk)[None, :])
