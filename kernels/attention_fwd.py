"""The attention forward kernel: one query tile per program, an online softmax in base 2 over the key tiles of
its schedule, fp32 accumulation.

The key tiles come in two loops: fully visible tiles with no mask arithmetic, then partially visible tiles with
the mask applied. Without padding or modality ids both lists are ranges from the causal/prefix bounds; with
them, they are the schedule's lists (``attention_schedule``). Either way every load sits at the top level of the
loop body, so the software pipeliner overlaps the next tile's K and V with this tile's products.

The softmax scale is folded into one FMA with the running row max (``s · scale − m``, ``log2 e`` inside the
scale) when the scale is positive and finite; any other scale (negative, NaN, Inf) takes the plain product so
that its max and NaN propagate exactly.

With ``USE_TMA`` (sm_90), Q, K, V and O move through device-side tensor descriptors: one bulk copy per tile,
zero-filled past the sequence and head-dim ends, and no address arithmetic in the loop.
"""

from __future__ import annotations

import triton
import triton.language as tl
from mome.kernels._common import widen_bf16_in_interpreter
from mome.kernels.attention_masks import (
    bias_plane,
    causal_key_bounds,
    dropout_keep,
    key_tile_info,
    load_bias_log2,
    load_rows,
    query_row_bits,
    visible_pairs,
)


@triton.jit
def tile_source(base, rows, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_TMA: tl.constexpr):  # fmt: skip
    """What :func:`load_tile` reads a ``[rows, HEAD_DIM]`` tensor through: a tensor descriptor, or the pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])  # fmt: skip
    else:
        return base


@triton.jit
def load_tile(source, start, limit, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              USE_TMA: tl.constexpr):  # fmt: skip
    """Rows ``[start, start + BLOCK_ROWS)`` as ``[BLOCK_ROWS, BLOCK_D]``; rows past ``limit`` and padded columns
    read 0."""
    if USE_TMA:
        return widen_bf16_in_interpreter(source.load([start, 0]))
    else:
        return load_rows(source, start + tl.arange(0, BLOCK_ROWS), tl.arange(0, BLOCK_D), limit, HEAD_DIM, BLOCK_D)


@triton.jit
def scaled_softmax_step(s, m_i, scale_log2, SCALE_FMA: tl.constexpr):
    """``(p, m_new, m_safe)`` for scores ``s`` (already scaled unless ``SCALE_FMA``; hidden pairs -inf): the new
    running max of the scaled scores and exp2(scaled − max); a row with nothing visible yet keeps max −inf and
    gets p = 0."""
    if SCALE_FMA:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
    return p, m_new, m_safe


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
    seen = tl.max((visible & row_ok[:, None]).to(tl.int32), 0) > 0
    return acc, tl.max((bad_keys & seen).to(tl.int32))


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
def _fwd_tile(acc, m_i, l_i, seen_bad, q, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, row_ok, nq, nk,
              shift, prefix, scale_log2, key_ok, key_modality, row_bits, seed, bh, dropout_threshold, keep_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              SAFE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MODALITY: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, SCALE_FMA: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One step of the online softmax over the key tile at ``start_n``. Hidden keys get a score of -inf whatever K
    holds. With ``SAFE``, hidden pairs of a masked tile never multiply their V (``seen_bad``: the tile held a
    non-finite V value that some query sees, to be added after the loop); without it the masked tile runs the
    plain product, whose P is 0 for hidden pairs, which is exact unless V holds a NaN or Inf there.

    A bias is added to the scaled scores (base 2); its -inf hides the pair through P = 0 in the fast kernel, and
    explicitly (every tile is then masked) in the safe one. Dropout scales the kept P of the P·V product only: the
    softmax statistics are those of the undropped probabilities."""
    k = load_tile(k_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v = load_tile(v_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    cols = start_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = load_bias_log2(Bias, bias_base, rows[:, None], cols[None, :], nq, nk, bias_row)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        s = s * scale_log2 + bias
    elif not SCALE_FMA:  # scaled before the mask: a negative scale must not turn a hidden -inf into +inf
        s = s * scale_log2
    if MASKED:
        visible = visible_pairs(rows[:, None], cols[None, :], shift, prefix, key_ok[None, :], key_modality[None, :],
                                row_bits[:, None], CAUSAL, HAS_MODALITY)  # fmt: skip
        if SAFE and HAS_BIAS:
            visible = visible & (bias != float("-inf"))
    elif SAFE and HAS_BIAS:
        visible = bias != float("-inf")
    CHECKED: tl.constexpr = MASKED or (SAFE and HAS_BIAS)
    if CHECKED:
        s = tl.where(visible, s, float("-inf"))
    p, m_new, m_safe = scaled_softmax_step(s, m_i, scale_log2, SCALE_FMA)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        p = tl.where(dropout_keep(seed, bh, rows, start_n, dropout_threshold, BLOCK_N), p * keep_scale, 0.0)
    if CHECKED and SAFE:
        acc, bad = _masked_pv(acc, p, v, visible, row_ok, DOT_PRECISION)
        seen_bad = tl.maximum(seen_bad, bad)
    else:
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, seen_bad


@triton.jit
def schedule_entry(List, base, i, first, SCHEDULE: tl.constexpr):
    """The i-th tile of a loop: from the schedule's list, or ``first + i`` for a range."""
    if SCHEDULE:
        return tl.load(List + base + i)
    else:
        return first + i


@triton.jit
def key_tile_loops(SchedCounts, batch, query_tile, nq, nk, prefix, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, SCHEDULE: tl.constexpr):  # fmt: skip
    """``(list base, first partial tile, full count, partial count)`` of a query tile's two key-tile loops: from the
    schedule, or from the causal/prefix bounds (the full tiles are then ``[0, n_full)``)."""
    schedule_at = (batch * tl.num_programs(0) + query_tile).to(tl.int64)
    list_base = schedule_at * tl.cdiv(nk, BLOCK_N)
    if SCHEDULE:
        return list_base, 0, tl.load(SchedCounts + schedule_at * 2), tl.load(SchedCounts + schedule_at * 2 + 1)
    else:
        first_partial, end = causal_key_bounds(query_tile * BLOCK_M, nq, nk, prefix, BLOCK_M, BLOCK_N, CAUSAL)
        return list_base, first_partial, first_partial, end - first_partial


@triton.jit
def _fwd_pass(q, k_source, v_source, Bias, bias_base, bias_row, KeyPad, Modality, SchedFull, SchedPartial, list_base,
              first_partial, n_full, n_partial, batch, rows, row_ok, offs_n, nq, nk, shift, prefix, scale_log2,
              row_bits, seed, bh, dropout_threshold, keep_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr, SCHEDULE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_MODALITY: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, SCALE_FMA: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_PRECISION: tl.constexpr):  # fmt: skip
    """The online softmax over the query tile's full key tiles, then its partial ones: ``(acc, m, l, seen_bad)``."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen_bad = 0
    for i in range(0, n_full):
        start_n = schedule_entry(SchedFull, list_base, i, 0, SCHEDULE) * BLOCK_N
        acc, m_i, l_i, seen_bad = _fwd_tile(
            acc, m_i, l_i, seen_bad, q, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, row_ok, nq, nk,
            shift, prefix, scale_log2, offs_n, offs_n, row_bits, seed, bh, dropout_threshold, keep_scale, HEAD_DIM,
            BLOCK_D, BLOCK_N, False, SAFE, CAUSAL, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, SCALE_FMA, USE_TMA,
            DOT_PRECISION,
        )  # fmt: skip
    for i in range(0, n_partial):
        start_n = schedule_entry(SchedPartial, list_base, i, first_partial, SCHEDULE) * BLOCK_N
        key_ok, key_modality = key_tile_info(KeyPad, Modality, batch, start_n + offs_n, nk, HAS_PADDING, HAS_MODALITY)
        acc, m_i, l_i, seen_bad = _fwd_tile(
            acc, m_i, l_i, seen_bad, q, k_source, v_source, Bias, bias_base, bias_row, start_n, rows, row_ok, nq, nk,
            shift, prefix, scale_log2, key_ok, key_modality, row_bits, seed, bh, dropout_threshold, keep_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, SAFE, CAUSAL, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, SCALE_FMA, USE_TMA,
            DOT_PRECISION,
        )  # fmt: skip
    return acc, m_i, l_i, seen_bad


@triton.jit
def _add_nonfinite_tile(acc, v_source, Bias, bias_base, bias_row, KeyPad, Modality, batch, start_n, rows, row_ok,
                        offs_n, nq, nk, shift, prefix, row_bits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                        HAS_MODALITY: tl.constexpr, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """The safe pass's post-loop step for one key tile: its non-finite values, added to the queries that see them."""
    cols = start_n + offs_n
    visible = row_ok[:, None] & (cols < nk)[None, :]
    if MASKED:
        key_ok, key_modality = key_tile_info(KeyPad, Modality, batch, cols, nk, HAS_PADDING, HAS_MODALITY)
        visible = visible & visible_pairs(rows[:, None], cols[None, :], shift, prefix, key_ok[None, :],
                                          key_modality[None, :], row_bits[:, None], CAUSAL, HAS_MODALITY)  # fmt: skip
    if HAS_BIAS:
        bias = load_bias_log2(Bias, bias_base, rows[:, None], cols[None, :], nq, nk, bias_row)
        visible = visible & (bias != float("-inf"))
    v = load_tile(v_source, start_n, nk, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    return _add_nonfinite_values(acc, v, visible)


@triton.jit
def _fwd_program(
    Out,
    Lse,
    Q,
    K,
    V,
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
    SCALE_FMA: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SAFE: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    """One query tile, fast (``SAFE`` off: masked tiles run the plain product, and ``Flags`` records whether the
    output is non-finite) or safe (hidden pairs never multiply their values)."""
    query_tile = tl.program_id(0)
    start_m = query_tile * BLOCK_M
    bh = tl.program_id(1)  # batch * heads + head
    batch = bh // heads
    kv_bh = batch * (heads // group) + (bh % heads) // group
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < nq
    q_base = Q + bh.to(tl.int64) * nq * HEAD_DIM
    q_source = tile_source(q_base, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_source = tile_source(K + kv_bh.to(tl.int64) * nk * HEAD_DIM, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_source = tile_source(V + kv_bh.to(tl.int64) * nk * HEAD_DIM, nk, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    q = load_tile(q_source, start_m, nq, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
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
    acc, m_i, l_i, seen_bad = _fwd_pass(
        q, k_source, v_source, Bias, bias_base, bias_row, KeyPad, Modality, SchedFull, SchedPartial, list_base,
        first_partial, n_full, n_partial, batch, rows, row_ok, offs_n, nq, nk, shift, prefix, scale_log2, row_bits,
        seed, bh, dropout_threshold, keep_scale, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, SAFE, SCHEDULE, CAUSAL,
        HAS_PADDING, HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, SCALE_FMA, USE_TMA, DOT_PRECISION,
    )  # fmt: skip
    if SAFE:
        if seen_bad > 0:  # a masked tile held a NaN or Inf in V that some query sees: add it to exactly those
            if HAS_BIAS:  # the full tiles were masked too (by the bias)
                for i in range(0, n_full):
                    start_n = schedule_entry(SchedFull, list_base, i, 0, SCHEDULE) * BLOCK_N
                    acc = _add_nonfinite_tile(
                        acc, v_source, Bias, bias_base, bias_row, KeyPad, Modality, batch, start_n, rows, row_ok,
                        offs_n, nq, nk, shift, prefix, row_bits, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_PADDING,
                        HAS_MODALITY, HAS_BIAS, USE_TMA,
                    )  # fmt: skip
            for i in range(0, n_partial):
                start_n = schedule_entry(SchedPartial, list_base, i, first_partial, SCHEDULE) * BLOCK_N
                acc = _add_nonfinite_tile(
                    acc, v_source, Bias, bias_base, bias_row, KeyPad, Modality, batch, start_n, rows, row_ok, offs_n,
                    nq, nk, shift, prefix, row_bits, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PADDING,
                    HAS_MODALITY, HAS_BIAS, USE_TMA,
                )  # fmt: skip
    elif CHECK_FINITE:
        nonfinite = tl.max(((acc != acc) | (tl.abs(acc) == float("inf"))).to(tl.int32))
        tl.store(Flags + bh.to(tl.int64) * tl.num_programs(0) + query_tile, nonfinite)

    nothing_visible = l_i == 0.0
    l_i = tl.where(nothing_visible, 1.0, l_i)
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    if USE_TMA:
        o_source = tile_source(Out + bh.to(tl.int64) * nq * HEAD_DIM, nq, HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        o_source.store([start_m, 0], out)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        o_offsets = bh.to(tl.int64) * nq * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(Out + o_offsets, out, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(nothing_visible, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)  # base 2 -> e
    tl.store(Lse + bh.to(tl.int64) * nq + rows, lse, mask=row_ok)


@triton.jit
def attention_fwd_kernel(Out, Lse, Q, K, V, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits, SchedFull,
                         SchedPartial, SchedCounts, Flags, heads, group, nq, nk, bias_stride_b, bias_stride_h, bias_row,
                         scale_log2, dropout_threshold, keep_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         HAS_PADDING: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_MODALITY: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_FMA: tl.constexpr,
                         USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, SAFE: tl.constexpr,
                         CHECK_FINITE: tl.constexpr):  # fmt: skip
    """The forward. Launched fast first; where masks can hide real keys (``CHECK_FINITE``) a second launch with
    ``SAFE`` recomputes, exactly, only the tiles whose fast output is non-finite: a hidden pair's plain product is
    P = 0 times its value, exact unless that value is a NaN or Inf (a real one, or whatever padding holds). Keeping
    that rare work out of the fast kernel keeps its registers those of a plain tile. ``Bias`` (``HAS_BIAS``) is a
    ``[Nq, Nk]`` plane per (batch, head) at the given strides; ``Seed`` (``HAS_DROPOUT``) the one-element int64
    dropout seed, with the 16-bit threshold and the kept values' scale."""
    if SAFE:
        if tl.load(Flags + tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) != 0:
            _fwd_program(
                Out, Lse, Q, K, V, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits, SchedFull, SchedPartial,
                SchedCounts, Flags, heads, group, nq, nk, bias_stride_b, bias_stride_h, bias_row, scale_log2,
                dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING, HAS_PREFIX,
                HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, SCALE_FMA, USE_TMA, DOT_PRECISION, True, False,
            )  # fmt: skip
    else:
        _fwd_program(
            Out, Lse, Q, K, V, Bias, Seed, KeyPad, PrefixLen, Modality, AllowedBits, SchedFull, SchedPartial,
            SchedCounts, Flags, heads, group, nq, nk, bias_stride_b, bias_stride_h, bias_row, scale_log2,
            dropout_threshold, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING, HAS_PREFIX,
            HAS_MODALITY, HAS_BIAS, HAS_DROPOUT, SCALE_FMA, USE_TMA, DOT_PRECISION, False, CHECK_FINITE,
        )  # fmt: skip
