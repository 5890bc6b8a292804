"""The attention backward kernels: Δ = rowsum(dO ∘ O), then dK/dV with one key tile stationary per program and dQ
with one query tile stationary. Both recompute P from the saved log-sum-exp, so no ``Nq × Nk`` buffer exists.

dK/dV computes the transposed products (``Sᵀ = K·Qᵀ``, ``dPᵀ = V·dOᵀ``, ``dV += Pᵀ·dO``, ``dK += dSᵀ·Q``), so the
key tile is the M side of all four: with 64 key rows per warpgroup every one of them maps onto wgmma on sm_90.
It loops over every query tile of every query head of its key/value group (grouped-query attention needs no
atomics). Both kernels walk their tiles as the forward does: fully visible tiles first with no mask arithmetic,
then partially visible ones, from causal bounds or from the schedule (the dK/dV kernel's lists are the
transposed ones: query tiles per key tile).
"""

from __future__ import annotations

import triton
import triton.language as tl
from mome.kernels.attention_fwd import key_tile_loops, load_tile, schedule_entry, tile_source
from mome.kernels.attention_masks import (
    bias_plane,
    causal_query_bounds,
    dropout_keep,
    key_tile_info,
    load_bias_log2,
    load_lse_log2,
    query_row_bits,
    visible_pairs,
)


@triton.jit
def attention_bwd_delta_kernel(Delta, Out, DOut, rows_total, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
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
def _dkdv_tile(dk, dv, k, v, q_source, do_source, lse_base, delta_base, Bias, bias_base, bias_row, start_m, start_n,
               cols, nq, shift, prefix, scale_log2, key_ok, key_modality, Modality, AllowedBits, batch, nk, seed, bh,
               dropout_threshold, keep_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MODALITY: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
               DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One query tile's contribution to the stationary key tile's dK (unscaled) and dV, in transposed form.

    With a bias every tile applies its visibility (bias != -inf): this kernel has no safe launch, so a NaN in the
    K or V of a pair hidden only by the bias is kept out of dK/dV here. With dropout (Z: kept × keep_scale, else
    0), ``dV += (Pᵀ∘Zᵀ)·dO`` and ``dSᵀ = Pᵀ∘(dPᵀ∘Zᵀ − Δ)``."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    q = load_tile(q_source, start_m, nq, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    do = load_tile(do_source, start_m, nq, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    lse2 = load_lse_log2(lse_base, rows, row_ok)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        bias_t = load_bias_log2(Bias, bias_base, rows[None, :], cols[:, None], nq, nk, bias_row)  # [N, M]
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [N, M]
    if MASKED:
        row_bits = query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)
        visible = visible_pairs(rows[None, :], cols[:, None], shift, prefix, key_ok[:, None], key_modality[:, None],
                                row_bits[None, :], CAUSAL, HAS_MODALITY)  # fmt: skip
        if HAS_BIAS:
            visible = visible & (bias_t != float("-inf"))
    elif HAS_BIAS:
        visible = bias_t != float("-inf")
    CHECKED: tl.constexpr = MASKED or HAS_BIAS
    if HAS_BIAS:
        p_t = tl.math.exp2(s_t * scale_log2 + bias_t - lse2[None, :])
    else:
        p_t = tl.math.exp2(s_t * scale_log2 - lse2[None, :])  # one FMA; a hidden pair's P is then set to 0
    if CHECKED:
        p_t = tl.where(visible, p_t, 0.0)
    if HAS_DROPOUT:
        keep_t = tl.trans(dropout_keep(seed, bh, rows, start_n, dropout_threshold, BLOCK_N))  # [N, M]
        dv += tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    if CHECKED:  # a hidden pair's dP may be NaN (a NaN in a key's V): its dS is 0 all the same
        ds_t = tl.where(visible, ds_t, 0.0)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    DK,
    DV,
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
    SchedFull,
    SchedPartial,
    SchedCounts,
    heads,
    group,
    nq,
    nk,
    bias_stride_b,
    bias_stride_h,
    bias_row,
    scale,
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
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    key_tile = tl.program_id(0)
    start_n = key_tile * BLOCK_N
    kv_bh = tl.program_id(1)  # batch * kv_heads + kv_head
    kv_heads = heads // group
    batch = kv_bh // kv_heads
    first_head = batch * heads + (kv_bh % kv_heads) * group
    cols = start_n + tl.arange(0, BLOCK_N)
    kv_base = kv_bh.to(tl.int64) * nk * HEAD_DIM
    k_source = tile_source(K + kv_base, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_source = tile_source(V + kv_base, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    k = load_tile(k_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v = load_tile(v_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    shift = nk - nq
    key_ok, key_modality = key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    SCHEDULE: tl.constexpr = HAS_PADDING or HAS_MODALITY
    schedule_at = (batch * tl.num_programs(0) + key_tile).to(tl.int64)
    list_base = schedule_at * tl.cdiv(nq, BLOCK_M)
    if SCHEDULE:
        first_partial = 0
        first_full = 0
        n_full = tl.load(SchedCounts + schedule_at * 2)
        n_partial = tl.load(SchedCounts + schedule_at * 2 + 1)
    else:
        first_partial, first_full, end = causal_query_bounds(start_n, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL)
        n_partial = first_full - first_partial
        n_full = end - first_full

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for head_in_group in range(0, group):
        bh = (first_head + head_in_group).to(tl.int64)
        q_source = tile_source(Q + bh * nq * HEAD_DIM, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        do_source = tile_source(DOut + bh * nq * HEAD_DIM, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        lse_base = Lse + bh * nq
        delta_base = Delta + bh * nq
        bias_base = bias_plane(batch, bh % heads, bias_stride_b, bias_stride_h)
        for i in range(0, n_full):
            start_m = schedule_entry(SchedFull, list_base, i, first_full, SCHEDULE) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_source, do_source, lse_base, delta_base, Bias, bias_base, bias_row, start_m, start_n,
                cols, nq, shift, prefix, scale_log2, key_ok, key_modality, Modality, AllowedBits, batch, nk, seed, bh,
                dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, CAUSAL, HAS_MODALITY,
                HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION,
            )  # fmt: skip
        for i in range(0, n_partial):
            start_m = schedule_entry(SchedPartial, list_base, i, first_partial, SCHEDULE) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_source, do_source, lse_base, delta_base, Bias, bias_base, bias_row, start_m, start_n,
                cols, nq, shift, prefix, scale_log2, key_ok, key_modality, Modality, AllowedBits, batch, nk, seed, bh,
                dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, CAUSAL, HAS_MODALITY,
                HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION,
            )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < nk) & (offs_d[None, :] < HEAD_DIM)
    kv_offsets = kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, nq, nk, shift,
             prefix, scale_log2, key_ok, key_modality, row_bits, seed, bh, dropout_threshold, keep_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             SAFE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MODALITY: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One key tile's contribution to the stationary query tile's dQ (unscaled): ``dS = P∘(dP∘Z − Δ)``. With
    ``SAFE``, keys no query of the tile sees are zeroed before the product (their dS is 0, but 0 · NaN would be
    NaN); with a bias the safe launch masks every tile by its visibility (bias != -inf) as well."""
    k = load_tile(k_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v = load_tile(v_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    cols = start_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = load_bias_log2(Bias, bias_base, rows[:, None], cols[None, :], nq, nk, bias_row)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = visible_pairs(rows[:, None], cols[None, :], shift, prefix, key_ok[None, :], key_modality[None, :],
                                row_bits[:, None], CAUSAL, HAS_MODALITY)  # fmt: skip
        if SAFE and HAS_BIAS:
            visible = visible & (bias != float("-inf"))
    elif SAFE and HAS_BIAS:
        visible = bias != float("-inf")
    CHECKED: tl.constexpr = MASKED or (SAFE and HAS_BIAS)
    if HAS_BIAS:
        p = tl.math.exp2(s * scale_log2 + bias - lse2[:, None])
    else:
        p = tl.math.exp2(s * scale_log2 - lse2[:, None])
    if CHECKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dp = tl.where(dropout_keep(seed, bh, rows, start_n, dropout_threshold, BLOCK_N), dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if CHECKED:  # hidden pairs give 0
        ds = tl.where(visible, ds, 0.0)
        if SAFE:
            seen = tl.max((visible & (lse2 < float("inf"))[:, None]).to(tl.int32), 0) > 0
            k = tl.where(seen[:, None], k, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_pass(q, do, lse2, delta, k_source, v_source, Bias, bias_base, bias_row, KeyPad, Modality, SchedFull,
             SchedPartial, list_base, first_partial, n_full, n_partial, batch, rows, offs_n, nq, nk, shift, prefix,
             scale_log2, row_bits, seed, bh, dropout_threshold, keep_scale, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
             SCHEDULE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_MODALITY: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
             DOT_PRECISION: tl.constexpr):  # fmt: skip
    """dQ (unscaled) over the query tile's full key tiles, then its partial ones."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i in range(0, n_full):
        start_n = schedule_entry(SchedFull, list_base, i, 0, SCHEDULE) * BLOCK_N
        dq = _dq_tile(
            dq, q, do, lse2, delta, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, nq, nk, shift, prefix,
            scale_log2, offs_n, offs_n, row_bits, seed, bh, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
            False, SAFE, CAUSAL, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION,
        )  # fmt: skip
    for i in range(0, n_partial):
        start_n = schedule_entry(SchedPartial, list_base, i, first_partial, SCHEDULE) * BLOCK_N
        key_ok, key_modality = key_tile_info(KeyPad, Modality, batch, start_n + offs_n, nk, HAS_PADDING, HAS_MODALITY)
        dq = _dq_tile(
            dq, q, do, lse2, delta, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, nq, nk, shift, prefix,
            scale_log2, key_ok, key_modality, row_bits, seed, bh, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D,
            BLOCK_N, True, SAFE, CAUSAL, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION,
        )  # fmt: skip
    return dq


@triton.jit
def _dq_program(
    DQ,
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
    SchedFull,
    SchedPartial,
    SchedCounts,
    Flags,
    heads,
    group,
    nq,
    nk,
    bias_stride_b,
    bias_stride_h,
    bias_row,
    scale,
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
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SAFE: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    """One query tile's dQ, fast or safe, as the forward's program."""
    query_tile = tl.program_id(0)
    start_m = query_tile * BLOCK_M
    bh = tl.program_id(1)
    batch = bh // heads
    kv_bh = batch * (heads // group) + (bh % heads) // group
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    q_base = bh.to(tl.int64) * nq * HEAD_DIM
    q = load_tile(tile_source(Q + q_base, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA), start_m, nq, BLOCK_M, HEAD_DIM,
                  BLOCK_D, USE_TMA)  # fmt: skip
    do = load_tile(tile_source(DOut + q_base, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA), start_m, nq, BLOCK_M,
                   HEAD_DIM, BLOCK_D, USE_TMA)  # fmt: skip
    lse2 = load_lse_log2(Lse, bh.to(tl.int64) * nq + rows, row_ok)
    delta = tl.load(Delta + bh.to(tl.int64) * nq + rows, mask=row_ok, other=0.0)
    k_source = tile_source(K + kv_bh.to(tl.int64) * nk * HEAD_DIM, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_source = tile_source(V + kv_bh.to(tl.int64) * nk * HEAD_DIM, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    prefix = 0
    if HAS_PREFIX:
        prefix = tl.load(PrefixLen + batch).to(tl.int32)
    shift = nk - nq
    row_bits = query_row_bits(Modality, AllowedBits, batch, rows, nq, nk, HAS_MODALITY)
    bias_base = bias_plane(batch, bh % heads, bias_stride_b, bias_stride_h)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    SCHEDULE: tl.constexpr = HAS_PADDING or HAS_MODALITY
    list_base, first_partial, n_full, n_partial = key_tile_loops(
        SchedCounts, batch, query_tile, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL, SCHEDULE
    )

    offs_n = tl.arange(0, BLOCK_N)
    dq = _dq_pass(
        q, do, lse2, delta, k_source, v_source, Bias, bias_base, bias_row, KeyPad, Modality, SchedFull, SchedPartial,
        list_base, first_partial, n_full, n_partial, batch, rows, offs_n, nq, nk, shift, prefix, scale_log2, row_bits,
        seed, bh, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, SAFE, SCHEDULE, CAUSAL,
        HAS_PADDING, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION,
    )  # fmt: skip
    if CHECK_FINITE:
        nonfinite = tl.max(((dq != dq) | (tl.abs(dq) == float("inf"))).to(tl.int32))
        tl.store(Flags + bh.to(tl.int64) * tl.num_programs(0) + query_tile, nonfinite)
    offs_d = tl.arange(0, BLOCK_D)
    q_offsets = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def attention_bwd_dq_kernel(DQ, Q, K, V, DOut, Lse, Delta, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits,
                            SchedFull, SchedPartial, SchedCounts, Flags, heads, group, nq, nk, bias_stride_b,
                            bias_stride_h, bias_row, scale, scale_log2, dropout_threshold, keep_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_PREFIX: tl.constexpr,
                            HAS_MODALITY: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                            USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, SAFE: tl.constexpr,
                            CHECK_FINITE: tl.constexpr):  # fmt: skip
    """dQ, launched as the forward is: fast first, then (where masks can hide real keys) a safe recompute of the
    tiles whose dQ is not finite. A hidden pair's dS is 0, but 0 times a hidden key's NaN or Inf is NaN."""
    if SAFE:
        if tl.load(Flags + tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) != 0:
            _dq_program(
                DQ, Q, K, V, DOut, Lse, Delta, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits, SchedFull,
                SchedPartial, SchedCounts, Flags, heads, group, nq, nk, bias_stride_b, bias_stride_h, bias_row, scale,
                scale_log2, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING,
                HAS_PREFIX, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION, True, False,
            )  # fmt: skip
    else:
        _dq_program(
            DQ, Q, K, V, DOut, Lse, Delta, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits, SchedFull,
            SchedPartial, SchedCounts, Flags, heads, group, nq, nk, bias_stride_b, bias_stride_h, bias_row, scale,
            scale_log2, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING,
            HAS_PREFIX, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, USE_TMA, DOT_PRECISION, False, CHECK_FINITE,
        )  # fmt: skip
