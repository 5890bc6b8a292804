"""Triton backend of the attention op family: flash-style forward and backward with masks as structure.

Tiling. The forward keeps a ``BLOCK_M`` tile of queries in registers and streams ``BLOCK_N`` tiles of
keys and values with an online softmax in base 2 (``log2 e`` is folded into the scale), accumulating
in fp32. The backward runs three kernels: Δ = rowsum(dO ∘ O); dK/dV with one key tile stationary per
program, looping over every query tile of every query head of its key/value group (grouped-query
attention needs no atomics); dQ with one query tile stationary. Both recompute P from the saved
log-sum-exp, so no ``Nq × Nk`` buffer exists anywhere.

Masks. For each query tile the causal and prefix-LM structure gives two key bounds: keys below
``full_end`` are visible to every query of the tile (no mask arithmetic), keys in
``[full_end, end)`` are visible to some (mask applied), keys from ``end`` on are never loaded. The
backward's key-stationary kernel uses the mirror-image bounds over queries. Key padding and
modality ids are data, not structure: their visibility is computed per tile from ``BLOCK_N`` bytes of
mask and ids, and a tile where no query sees any key is skipped before K and V are loaded. Modality
masks travel as one bitmask per query modality (bit j set: keys of modality j are visible), so a tile's
visibility is a shift and an and. A query that sees no key gets 0 and a gradient of 0.

Head dims are padded to a power of two ≥ 16 with masked loads. Launch configurations are fixed per
(dtype, padded head dim) rather than autotuned, so what runs on a GPU is what ``AOT_SPECS`` compiles.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from mome.kernels._common import TRITON_TYPE, dot_precision, padded_dim, pointer_type, widen_bf16_in_interpreter
from mome.kernels.aot import AotSpec
from torch import Tensor

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128
MAX_MODALITIES = 31  # one int32 bitmask per query modality

MAX_GRID_ROWS = 65535  # the grid's second dimension: one row per (batch, head)

# What this backend runs: the op reads it before any launch (the backend contract).
LIMITS = {
    "dtypes": (torch.float16, torch.bfloat16, torch.float32),
    "head_dim": (1, MAX_HEAD_DIM),
    "batch_heads": (0, MAX_GRID_ROWS),  # empty inputs return at once
    "modalities": (1, MAX_MODALITIES),
}


@triton.jit
def _key_bounds(start_m, nq, nk, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query tile at ``start_m``: keys below ``full_end`` (a multiple of BLOCK_N) are visible to all
    of its queries as far as causal/prefix structure goes; keys from ``end`` on are visible to none."""
    if CAUSAL:
        shift = nk - nq  # query i sits at absolute position i + shift
        last_row = tl.minimum(start_m + BLOCK_M, nq) - 1
        end = tl.maximum(tl.minimum(tl.maximum(last_row + shift + 1, prefix), nk), 0)
        full = tl.maximum(tl.minimum(tl.maximum(start_m + shift + 1, prefix), nk), 0)
        full_end = (full // BLOCK_N) * BLOCK_N
    else:
        end = nk
        full_end = (nk // BLOCK_N) * BLOCK_N
    return full_end, end


@triton.jit
def _query_bounds(start_n, nq, nk, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the key tile at ``start_n``: query tiles before ``lo`` see none of its keys; query tiles from
    ``full_lo`` (a multiple of BLOCK_M) on see all of them as far as causal/prefix structure goes."""
    if CAUSAL:
        shift = nk - nq
        last_key = tl.minimum(start_n + BLOCK_N, nk) - 1
        first = tl.where(start_n < prefix, 0, tl.maximum(start_n - shift, 0))
        full = tl.where(last_key < prefix, 0, tl.maximum(last_key - shift, 0))
        lo = (tl.minimum(first, nq) // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(tl.cdiv(tl.minimum(full, nq), BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo


@triton.jit
def _visible(
    rows,
    cols,
    shift,
    prefix,
    key_ok,
    key_modality,
    row_bits,
    STRUCT_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
):
    """Boolean [BLOCK_M, BLOCK_N] (or [1, BLOCK_N]) tile: may query ``rows[i]`` see key ``cols[j]``?
    ``key_ok`` already holds the key bounds and padding."""
    visible = key_ok[None, :]
    if STRUCT_MASK:
        if CAUSAL:
            visible = visible & ((cols[None, :] <= rows[:, None] + shift) | (cols[None, :] < prefix))
    if HAS_MODALITY:
        visible = visible & (((row_bits[:, None] >> key_modality[None, :]) & 1) != 0)
    return visible


@triton.jit
def _seen_by_some_row(visible, row_ok):
    """Per key of a tile: does any (in-bounds) query of the tile see it?"""
    return tl.max((visible & row_ok[:, None]).to(tl.int32), 0) > 0


@triton.jit
def _key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING: tl.constexpr, HAS_MODALITY: tl.constexpr):
    """Per key of a tile: in bounds and not padding; its modality id (0 when there are no modality ids)."""
    key_ok = cols < nk
    if HAS_PADDING:
        key_ok = key_ok & (tl.load(KeyPad + batch * nk + cols, mask=key_ok, other=1) == 0)
    key_modality = tl.zeros_like(cols)
    if HAS_MODALITY:
        key_modality = tl.load(Modality + batch * nk + cols, mask=cols < nk, other=0).to(tl.int32)
    return key_ok, key_modality


@triton.jit
def _query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY: tl.constexpr):
    """Per query row: bitmask of the key modalities it may see (queries take the ids of the last Nq keys)."""
    bits = tl.zeros_like(rows)
    if HAS_MODALITY:
        row_ok = rows < nq
        query_modality = tl.load(Modality + batch * nk + (nk - nq) + rows, mask=row_ok, other=0)
        bits = tl.load(AllowedBits + query_modality, mask=row_ok, other=0)
    return bits


@triton.jit
def _load_rows(base, idx, offs_d, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    """Rows ``idx`` of a row-major ``[*, HEAD_DIM]`` tensor as ``[len(idx), BLOCK_D]``; rows ``>= limit`` and padded
    columns read 0. Tiles known to be in bounds skip the row mask (and the column mask when nothing is padded)."""
    pointers = base + idx[:, None] * HEAD_DIM + offs_d[None, :]
    if CHECK_BOUNDS:
        tile = tl.load(pointers, mask=(idx[:, None] < limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        tile = tl.load(pointers)
    else:
        tile = tl.load(pointers, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return widen_bf16_in_interpreter(tile)


@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    seen_bad,
    q,
    k_base,
    v_base,
    start_n,
    rows,
    row_ok,
    offs_n,
    offs_d,
    nk,
    shift,
    prefix,
    scale_log2,
    key_ok,
    key_modality,
    row_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    STRUCT_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax over the key tile at ``start_n``. Hidden keys get a score of -inf whatever K
    holds, and hidden pairs never multiply their V (``seen_bad``: a masked tile held a non-finite V value that some
    query sees, to be added after the loop)."""
    cols = start_n + offs_n
    k = _load_rows(k_base, cols, offs_d, nk, HEAD_DIM, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, STRUCT_MASK, CAUSAL, HAS_MODALITY)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp2(-inf) = 0
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, cols, offs_d, nk, HEAD_DIM, BLOCK_D, MASKED)
    acc = acc * alpha[:, None]
    if MASKED:
        acc, bad = _masked_pv(acc, p, v, visible, row_ok, DOT_PRECISION)
        seen_bad = tl.maximum(seen_bad, bad)
    else:
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, seen_bad


@triton.jit
def _masked_pv(acc, p, v, visible, row_ok, DOT_PRECISION: tl.constexpr):
    """``(acc + P·V, flag)`` where a hidden (query, key) pair never multiplies its value: 0 · NaN would be NaN.

    The product runs on the finite part of V; the flag says whether some query of the tile sees a non-finite value
    (a real NaN or Inf), which :func:`_add_nonfinite_values` then adds after the main loop. Keeping that rare work
    out of the loop keeps the loop's registers those of a plain tile.
    """
    finite = (v == v) & (tl.abs(v) != float("inf"))
    acc += tl.dot(p.to(v.dtype), tl.where(finite, v, 0.0), input_precision=DOT_PRECISION)
    bad_keys = tl.max((~finite).to(tl.int32), 1) > 0  # [BLOCK_N]
    return acc, tl.max((bad_keys & _seen_by_some_row(visible, row_ok)).to(tl.int32))


@triton.jit
def _add_nonfinite_values(acc, v, sees):
    """Adds, key by key, each non-finite value of ``v`` [N, D] to the queries that see its key (``sees`` [M, N]):
    acc + NaN is NaN, acc + inf is inf, and +inf from one key with -inf from another make NaN, as the dense
    product would."""
    finite = (v == v) & (tl.abs(v) != float("inf"))
    offs_n = tl.arange(0, v.shape[0])
    for n in range(0, v.shape[0]):
        pick = offs_n == n
        value = tl.sum(tl.where(pick[:, None] & ~finite, v.to(tl.float32), 0.0), 0)  # [D]: key n's non-finite
        sees_key = tl.max(tl.where(pick[None, :], sees.to(tl.int32), 0), 1) > 0  # [M]
        acc += tl.where(sees_key[:, None] & (value != 0.0)[None, :], value[None, :], 0.0)
    return acc


@triton.jit
def _attention_fwd_kernel(
    Out,
    Lse,
    Q,
    K,
    V,
    KeyPad,
    PrefixLen,
    Modality,
    AllowedBits,
    heads,
    group,
    nq,
    nk,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # batch * heads + head
    batch = bh // heads
    kv_bh = batch * (heads // group) + (bh % heads) // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_offsets = bh.to(tl.int64) * nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = widen_bf16_in_interpreter(tl.load(Q + q_offsets, mask=io_mask, other=0.0))
    k_base = K + kv_bh.to(tl.int64) * nk * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * nk * HEAD_DIM
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    shift = nk - nq
    full_end, end = _key_bounds(start_m, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL)
    row_bits = _query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen_bad = 0
    DATA_MASK: tl.constexpr = HAS_PADDING or HAS_MODALITY
    if DATA_MASK:  # padding / modality ids: visibility per tile from the ids, skip tiles nobody sees
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + offs_n
            key_ok, key_modality = _key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
            visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, True, CAUSAL, HAS_MODALITY)
            if tl.max(visible.to(tl.int32)) > 0:
                acc, m_i, l_i, seen_bad = _fwd_tile(
                    acc, m_i, l_i, seen_bad, q, k_base, v_base, start_n, rows, row_ok, offs_n, offs_d, nk, shift,
                    prefix, scale_log2, key_ok, key_modality, row_bits,
                    HEAD_DIM, BLOCK_D, True, True, CAUSAL, HAS_MODALITY, DOT_PRECISION,
                )  # fmt: skip
    else:  # tiles fully visible under the structure (no mask arithmetic), then the partially visible band
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i, seen_bad = _fwd_tile(
                acc, m_i, l_i, seen_bad, q, k_base, v_base, start_n, rows, row_ok, offs_n, offs_d, nk, shift, prefix,
                scale_log2, offs_n < BLOCK_N, offs_n, row_bits,
                HEAD_DIM, BLOCK_D, False, False, CAUSAL, False, DOT_PRECISION,
            )  # fmt: skip
        for start_n in range(full_end, end, BLOCK_N):
            acc, m_i, l_i, seen_bad = _fwd_tile(
                acc, m_i, l_i, seen_bad, q, k_base, v_base, start_n, rows, row_ok, offs_n, offs_d, nk, shift, prefix,
                scale_log2, start_n + offs_n < nk, offs_n, row_bits,
                HEAD_DIM, BLOCK_D, True, True, CAUSAL, False, DOT_PRECISION,
            )  # fmt: skip

    if seen_bad > 0:  # rare: a masked tile held a NaN or Inf in V that some query sees; add it to exactly those
        for start_n in range(0 if DATA_MASK else full_end, end, BLOCK_N):
            cols = start_n + offs_n
            if DATA_MASK:
                key_ok, key_modality = _key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
            else:
                key_ok, key_modality = cols < nk, offs_n
            visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, True, CAUSAL, HAS_MODALITY)
            v = _load_rows(v_base, cols, offs_d, nk, HEAD_DIM, BLOCK_D, True)
            acc = _add_nonfinite_values(acc, v, visible & row_ok[:, None])

    nothing_visible = l_i == 0.0
    l_i = tl.where(nothing_visible, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(Out + q_offsets, out.to(Out.dtype.element_ty), mask=io_mask)
    lse = tl.where(nothing_visible, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)  # base 2 -> e
    tl.store(Lse + bh.to(tl.int64) * nq + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(Delta, Out, DOut, rows_total, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):  # fmt: skip
    """Δ_i = Σ_d dO_id · O_id in fp32, over the flattened (batch, head, query) rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < rows_total) & (offs_d[None, :] < HEAD_DIM)
    offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    out = tl.load(Out + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOut + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(out * dout, 1), mask=rows < rows_total)


@triton.jit
def _load_lse_log2(Lse, offsets, mask):
    """Saved natural-log LSE in base 2; rows that see nothing (or lie out of bounds) get +inf so P = 0."""
    lse = tl.load(Lse + offsets, mask=mask, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # x log2(e)


@triton.jit
def _bwd_dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    start_m,
    cols,
    offs_m,
    offs_d,
    nq,
    shift,
    prefix,
    scale_log2,
    key_ok,
    key_modality,
    row_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    STRUCT_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate one query tile's contribution to the stationary key tile's dK (unscaled) and dV."""
    rows = start_m + offs_m
    row_ok = rows < nq
    q = _load_rows(q_base, rows, offs_d, nq, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(do_base, rows, offs_d, nq, HEAD_DIM, BLOCK_D, True)
    lse2 = _load_lse_log2(lse_base, rows, row_ok)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
    if MASKED:
        visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, STRUCT_MASK, CAUSAL, HAS_MODALITY)
        s = tl.where(visible, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:  # a hidden pair's dP may be NaN (a NaN in a key's V): its dS is 0 all the same
        ds = tl.where(visible, ds, 0.0)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    DK,
    DV,
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    KeyPad,
    PrefixLen,
    Modality,
    AllowedBits,
    heads,
    group,
    nq,
    nk,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_bh = tl.program_id(1)  # batch * kv_heads + kv_head
    kv_heads = heads // group
    batch = kv_bh // kv_heads
    first_head = batch * heads + (kv_bh % kv_heads) * group
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < nk) & (offs_d[None, :] < HEAD_DIM)
    kv_offsets = kv_bh.to(tl.int64) * nk * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    k = widen_bf16_in_interpreter(tl.load(K + kv_offsets, mask=kv_mask, other=0.0))
    v = widen_bf16_in_interpreter(tl.load(V + kv_offsets, mask=kv_mask, other=0.0))
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    shift = nk - nq
    lo, full_lo = _query_bounds(start_n, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL)
    key_ok, key_modality = _key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
    hi = nq
    if HAS_PADDING:
        hi = tl.where(tl.max(key_ok.to(tl.int32)) > 0, nq, 0)  # every key of the tile is padding: no query work
        full_lo = tl.minimum(full_lo, hi)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    DATA_MASK: tl.constexpr = HAS_PADDING or HAS_MODALITY
    for head_in_group in range(0, group):
        bh = (first_head + head_in_group).to(tl.int64)
        q_base = Q + bh * nq * HEAD_DIM
        do_base = DOut + bh * nq * HEAD_DIM
        lse_base = Lse + bh * nq
        delta_base = Delta + bh * nq
        if DATA_MASK:
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + offs_m
                row_bits = _query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)
                visible = _visible(
                    rows, cols, shift, prefix, key_ok, key_modality, row_bits, True, CAUSAL, HAS_MODALITY
                )
                if tl.max(visible.to(tl.int32)) > 0:
                    dk, dv = _bwd_dkdv_tile(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols, offs_m, offs_d, nq,
                        shift, prefix, scale_log2, key_ok, key_modality, row_bits,
                        HEAD_DIM, BLOCK_D, True, True, CAUSAL, HAS_MODALITY, DOT_PRECISION,
                    )  # fmt: skip
        else:  # the partially visible band of query tiles, then those that see the whole key tile
            for start_m in range(lo, full_lo, BLOCK_M):
                dk, dv = _bwd_dkdv_tile(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols, offs_m, offs_d, nq,
                    shift, prefix, scale_log2, key_ok, key_modality, offs_m,
                    HEAD_DIM, BLOCK_D, True, True, CAUSAL, False, DOT_PRECISION,
                )  # fmt: skip
            for start_m in range(full_lo, hi, BLOCK_M):
                dk, dv = _bwd_dkdv_tile(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols, offs_m, offs_d, nq,
                    shift, prefix, scale_log2, key_ok, key_modality, offs_m,
                    HEAD_DIM, BLOCK_D, False, False, CAUSAL, False, DOT_PRECISION,
                )  # fmt: skip
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    start_n,
    rows,
    offs_n,
    offs_d,
    nk,
    shift,
    prefix,
    scale_log2,
    key_ok,
    key_modality,
    row_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    STRUCT_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate one key tile's contribution to the stationary query tile's dQ (unscaled)."""
    cols = start_n + offs_n
    k = _load_rows(k_base, cols, offs_d, nk, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_rows(v_base, cols, offs_d, nk, HEAD_DIM, BLOCK_D, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, STRUCT_MASK, CAUSAL, HAS_MODALITY)
        s = tl.where(visible, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:  # hidden pairs give 0, and keys no query of the tile sees never enter the product
        ds = tl.where(visible, ds, 0.0)
        k = tl.where(_seen_by_some_row(visible, lse2 < float("inf"))[:, None], k, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    DQ,
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    KeyPad,
    PrefixLen,
    Modality,
    AllowedBits,
    heads,
    group,
    nq,
    nk,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_MODALITY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    batch = bh // heads
    kv_bh = batch * (heads // group) + (bh % heads) // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_offsets = bh.to(tl.int64) * nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = widen_bf16_in_interpreter(tl.load(Q + q_offsets, mask=io_mask, other=0.0))
    do = widen_bf16_in_interpreter(tl.load(DOut + q_offsets, mask=io_mask, other=0.0))
    lse2 = _load_lse_log2(Lse, bh.to(tl.int64) * nq + rows, row_ok)
    delta = tl.load(Delta + bh.to(tl.int64) * nq + rows, mask=row_ok, other=0.0)
    k_base = K + kv_bh.to(tl.int64) * nk * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * nk * HEAD_DIM
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    shift = nk - nq
    full_end, end = _key_bounds(start_m, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL)
    row_bits = _query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    DATA_MASK: tl.constexpr = HAS_PADDING or HAS_MODALITY
    if DATA_MASK:
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + offs_n
            key_ok, key_modality = _key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
            visible = _visible(rows, cols, shift, prefix, key_ok, key_modality, row_bits, True, CAUSAL, HAS_MODALITY)
            if tl.max(visible.to(tl.int32)) > 0:
                dq = _bwd_dq_tile(
                    dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, nk, shift, prefix,
                    scale_log2, key_ok, key_modality, row_bits,
                    HEAD_DIM, BLOCK_D, True, True, CAUSAL, HAS_MODALITY, DOT_PRECISION,
                )  # fmt: skip
    else:
        for start_n in range(0, full_end, BLOCK_N):
            dq = _bwd_dq_tile(
                dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, nk, shift, prefix,
                scale_log2, offs_n < BLOCK_N, offs_n, row_bits,
                HEAD_DIM, BLOCK_D, False, False, CAUSAL, False, DOT_PRECISION,
            )  # fmt: skip
        for start_n in range(full_end, end, BLOCK_N):
            dq = _bwd_dq_tile(
                dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, nk, shift, prefix,
                scale_log2, start_n + offs_n < nk, offs_n, row_bits,
                HEAD_DIM, BLOCK_D, True, True, CAUSAL, False, DOT_PRECISION,
            )  # fmt: skip
    tl.store(DQ + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers (the attention family's contract, AttentionBackend) and launch configurations.


def _block_d(head_dim: int) -> int:
    return padded_dim(head_dim)


def _dot_precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, fp32_accurate=True)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (16-bit inputs?, padded head dim), one table per kernel. Picked
# from the AOT register report (no spills on sm_90 where one was found; see benchmarks/NOTES-attention.md), not yet
# from GPU timings.
_FWD_CONFIGS = {
    (True, 16): (128, 64, 8, 3),
    (True, 32): (128, 64, 8, 3),
    (True, 64): (128, 64, 8, 3),
    (True, 128): (64, 64, 4, 3),
    (False, 16): (64, 32, 8, 2),
    (False, 32): (64, 32, 8, 2),
    (False, 64): (64, 32, 8, 2),
    (False, 128): (32, 32, 8, 2),
}
_DKDV_CONFIGS = {
    (True, 16): (64, 64, 8, 2),
    (True, 32): (64, 64, 8, 2),
    (True, 64): (64, 64, 8, 2),
    (True, 128): (32, 64, 8, 2),
    (False, 16): (32, 32, 4, 2),
    (False, 32): (32, 32, 4, 2),
    (False, 64): (32, 32, 4, 2),
    (False, 128): (32, 32, 8, 1),
}
_DQ_CONFIGS = {
    (True, 16): (64, 32, 4, 2),
    (True, 32): (64, 32, 4, 2),
    (True, 64): (64, 32, 4, 2),
    (True, 128): (64, 64, 8, 2),
    (False, 16): (32, 32, 4, 2),
    (False, 32): (32, 32, 4, 2),
    (False, 64): (32, 32, 4, 2),
    (False, 128): (32, 32, 8, 1),
}
_DELTA_BLOCK_M = 64


def _config(table: dict, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    return table[(dtype != torch.float32, _block_d(head_dim))]


@functools.cache
def _placeholders(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """1-element uint8 / int64 / int32 tensors passed for absent masks (never read: their flags are off)."""
    return tuple(torch.zeros(1, dtype=dtype, device=device) for dtype in (torch.uint8, torch.int64, torch.int32))


def _mask_arguments(q: Tensor, masks) -> dict:
    """Kernel pointer arguments and flags for the masks; an absent mask passes a placeholder."""
    _causal, key_padding_mask, prefix_len, modality, modality_mask = masks
    placeholder_u8, placeholder_i64, allowed_bits = _placeholders(q.device)
    if modality_mask is not None:  # row i: bit j set when queries of modality i see keys of modality j
        num_modalities = modality_mask.shape[0]
        bit_values = torch.ones(num_modalities, dtype=torch.int64, device=q.device) << torch.arange(
            num_modalities, device=q.device
        )
        allowed_bits = (modality_mask.to(torch.int64) * bit_values).sum(1).to(torch.int32)
    return dict(
        pointers=(
            placeholder_u8 if key_padding_mask is None else key_padding_mask.view(torch.uint8),
            placeholder_i64 if prefix_len is None else prefix_len,
            placeholder_i64 if modality is None else modality,
            allowed_bits,
        ),
        flags=dict(
            HAS_PADDING=key_padding_mask is not None,
            HAS_PREFIX=prefix_len is not None,
            HAS_MODALITY=modality is not None,
        ),
    )


def attention_fwd(q, k, v, masks, scale):
    """Launcher of the attention contract (AttentionBackend): ``(out, lse)``."""
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    mask_args = _mask_arguments(q, masks)
    block_m, block_n, num_warps, num_stages = _config(_FWD_CONFIGS, q.dtype, head_dim)
    grid = (triton.cdiv(nq, block_m), batch * heads)
    _attention_fwd_kernel[grid](
        out, lse, q, k, v, *mask_args["pointers"],
        heads, heads // kv_heads, nq, nk, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(masks.causal),
        **mask_args["flags"], DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, masks, scale):
    """Launcher of the attention contract: ``(dq, dk, dv)``."""
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = dout.contiguous()
    block_d = _block_d(head_dim)
    delta = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    rows_total = batch * heads * nq
    _attention_bwd_delta_kernel[(triton.cdiv(rows_total, _DELTA_BLOCK_M),)](
        delta, out, dout, rows_total, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK_M
    )
    mask_args = _mask_arguments(q, masks)
    arguments = (*mask_args["pointers"], heads, heads // kv_heads, nq, nk, scale, scale * LOG2E)
    flags = dict(CAUSAL=bool(masks.causal), **mask_args["flags"], DOT_PRECISION=_dot_precision(q.dtype))
    block_m, block_n, num_warps, num_stages = _config(_DKDV_CONFIGS, q.dtype, head_dim)
    _attention_bwd_dkdv_kernel[(triton.cdiv(nk, block_n), batch * kv_heads)](
        dk, dv, q, k, v, dout, lse, delta, *arguments,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    block_m, block_n, num_warps, num_stages = _config(_DQ_CONFIGS, q.dtype, head_dim)
    _attention_bwd_dq_kernel[(triton.cdiv(nq, block_m), batch * heads)](
        dq, q, k, v, dout, lse, delta, *arguments,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every dtype, head dims 64 and 128 (their configurations differ), the padded head dim
# 80 (-> 128), and each mask path (no mask, causal structure only, every mask at once) for some dtype. The
# configurations depend only on 16-bit vs fp32 and the padded head dim, so fp16 and bf16 share them.

_MASK_POINTERS = {"KeyPad": "*u8", "PrefixLen": "*i64", "Modality": "*i64", "AllowedBits": "*i32"}
_MASK_VARIANTS = {
    "plain": dict(CAUSAL=False, HAS_PADDING=False, HAS_PREFIX=False, HAS_MODALITY=False),
    "causal": dict(CAUSAL=True, HAS_PADDING=False, HAS_PREFIX=False, HAS_MODALITY=False),
    "all_masks": dict(CAUSAL=True, HAS_PADDING=True, HAS_PREFIX=True, HAS_MODALITY=True),
}
_CONSTEXPR_NAMES = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "HAS_PADDING", "HAS_PREFIX",
                    "HAS_MODALITY", "DOT_PRECISION")  # fmt: skip


def _attention_specs(dtype: torch.dtype, head_dim: int, variant: str) -> list[AotSpec]:
    t = pointer_type(dtype)
    flags = _MASK_VARIANTS[variant]
    tag = f"{TRITON_TYPE[dtype]}_d{head_dim}_{variant}"
    specs = []
    for kind, kernel, table, tensors, scalars in (
        ("fwd", _attention_fwd_kernel, _FWD_CONFIGS, dict(Out=t, Lse="*fp32", Q=t, K=t, V=t), ("scale_log2",)),
        ("bwd_dkdv", _attention_bwd_dkdv_kernel, _DKDV_CONFIGS,
         dict(DK=t, DV=t, Q=t, K=t, V=t, DOut=t, Lse="*fp32", Delta="*fp32"), ("scale", "scale_log2")),
        ("bwd_dq", _attention_bwd_dq_kernel, _DQ_CONFIGS,
         dict(DQ=t, Q=t, K=t, V=t, DOut=t, Lse="*fp32", Delta="*fp32"), ("scale", "scale_log2")),
    ):  # fmt: skip
        block_m, block_n, num_warps, num_stages = _config(table, dtype, head_dim)
        constexprs = dict(
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, **flags,
            DOT_PRECISION=_dot_precision(dtype),
        )  # fmt: skip
        signature = {**tensors, **_MASK_POINTERS, "heads": "i32", "group": "i32", "nq": "i32", "nk": "i32"}
        signature.update({name: "fp32" for name in scalars})
        signature.update({name: "constexpr" for name in _CONSTEXPR_NAMES})
        specs.append(AotSpec(f"attention_{kind}_{tag}", kernel, signature, constexprs, num_warps, num_stages))
    return specs


def _delta_spec(dtype: torch.dtype, head_dim: int) -> AotSpec:
    t = pointer_type(dtype)
    signature = dict(Delta="*fp32", Out=t, DOut=t, rows_total="i32", HEAD_DIM="constexpr", BLOCK_D="constexpr",
                     BLOCK_M="constexpr")  # fmt: skip
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=_DELTA_BLOCK_M)
    return AotSpec(f"attention_bwd_delta_{TRITON_TYPE[dtype]}_d{head_dim}", _attention_bwd_delta_kernel, signature,
                   constexprs)  # fmt: skip


_AOT_VARIANTS = (
    (torch.float16, 128, "all_masks"),
    (torch.bfloat16, 64, "all_masks"),
    (torch.bfloat16, 128, "causal"),
    (torch.bfloat16, 80, "plain"),
    (torch.float32, 64, "plain"),
    (torch.float32, 128, "all_masks"),
)
AOT_SPECS = [
    *[spec for dtype, head_dim, variant in _AOT_VARIANTS for spec in _attention_specs(dtype, head_dim, variant)],
    *[_delta_spec(dtype, 64) for dtype in (torch.float16, torch.bfloat16, torch.float32)],
]
