"""Fused image-text contrastive loss: the ``b × (B + Q)`` logits are streamed in tiles and never stored.

One direction at a time (i2t: image rows against ``[texts; text queue]``, t2i: text
rows against ``[images; image queue]``). The rows are the global rows ``[row_offset,
row_offset + M)`` of the batch the B columns belong to (the whole batch: M == B,
row_offset == 0; one rank's share of a gathered batch otherwise). Per row the forward
keeps, in fp32 (fp64 for fp64 features), the running max and sum of ``exp``
(log-sum-exp), the sum of the positives' logits and their count, and with distillation
the momentum logits' log-sum-exp and the online logits weighted by their softmax; the
loss of a row is ``lse - (1 - alpha) · mean(positive logits) - alpha · Σ softmax(momentum)
· logits``. Hard negatives are picked in the same pass over the in-batch columns:
Gumbel-max (Philox noise keyed by seed, global row, column and direction) or the plain
arg-max; -1 for a row without a negative or with a non-finite in-batch logit.

The backward recomputes each tile: ``dlogits = g / M · (softmax - target)``; a row
kernel gives ``d rows`` and per-row parts of ``d scale``. In CLIP mode (the op's ``clip``
flag: whole batch, no momentum features) the other direction's batch logits are the same
tile transposed, so each row kernel also adds that direction's ``dlogits`` and two kernels
make the whole backward; otherwise a column kernel gives ``d columns`` for online batch
columns (then ``alpha == 0``: distillation needs momentum columns, which are constants).
No atomics: partial sums are reduced by torch in a fixed order, so the gradients are
deterministic.

Options (constexpr flags, so the kernels without them are what they were): SMOOTH, label smoothing as
``F.cross_entropy`` smooths (targets ``(1 - ε)·t + ε/N``: the forward also sums each row's logits, the
backward shifts the target by ``ε/N``); SIGMOID, SigLIP's loss ``Σ_j softplus(∓(logit + bias))`` per
row (− on positives), with no log-sum-exp at all: the forward sums softplus over the column tiles, the
backward's ``dlogits = sigmoid(logit + bias) − [positive]``, and ``d bias`` beside ``d scale``. Hard
negatives drawn against other columns than the loss's (BLIP's online similarities) are one more
forward pass, with mining only, over those batch columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mome.kernels._common import (
    SIXTEEN_BIT,
    TRITON_TYPE,
    accumulator_type,
    dot_precision,
    padded_dim,
    pointer_type,
    widen_bf16_in_interpreter,
)
from mome.kernels._plan import GATE_TARGETS, Launch, divisible_by_16, target
from mome.kernels.aot import AotSpec, GateCase
from mome.kernels.itc_configs import FEATURE_SLICE, ItcConfig, column_splits, feature_blocks, itc_config
from torch import Tensor

MINE_NONE, MINE_SAMPLE, MINE_HARDEST = 0, 1, 2
_MINING = {None: MINE_NONE, "sample": MINE_SAMPLE, "hardest": MINE_HARDEST}
# What a split forward stores per (column range, row), in this order (``_combine_splits`` reads them back)
SPLIT_STAT_NAMES = ("run_max", "run_sum", "pos_logits", "pos_count", "logit_sum", "sig_sum", "m_max", "m_sum",
                    "m_dot", "best_score")  # fmt: skip
SPLIT_STATS = tl.constexpr(len(SPLIT_STAT_NAMES))


@triton.jit
def _similarity_tile(
    a_ptr, a_offs, a_valid, b_ptrs_base, b_valid, D,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """``a[a_offs] @ b.T`` over the feature dimension in BLOCK_D chunks; ``b_ptrs_base`` points at each b row.

    ``a_ptr`` points at the block's first row (an int64 offset from the tensor's start, so more than 2**31
    elements are fine) and ``a_offs`` are the rows within the block: int32 vector offsets (BLOCK_A · D fits).
    """
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        a = tl.load(a_ptr + a_offs[:, None] * D + offs_d[None, :], mask=a_valid[:, None] & d_valid[None, :], other=0.0)
        b = tl.load(b_ptrs_base[None, :] + offs_d[:, None], mask=d_valid[:, None] & b_valid[None, :], other=0.0)
        a = widen_bf16_in_interpreter(a)
        b = widen_bf16_in_interpreter(b)
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _feature_rows(row_ptrs, valid, D, BLOCK_D: tl.constexpr, WHOLE_D: tl.constexpr):
    """WHOLE_D: the ``[len(row_ptrs), BLOCK_D]`` tile of whole feature rows (``BLOCK_D >= D``), zeros past D and on
    invalid rows, loaded once where a program holds it and once per tile where it streams it (one load of a column
    tile serves the similarity and the gradient's product, and the column loop is the only loop, so its loads
    are the ones pipelined). Otherwise nothing (0): ``_similarity_tile`` steps through the features itself."""
    if WHOLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        tile = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d < D)[None, :], other=0.0)
        return widen_bf16_in_interpreter(tile)
    else:
        return 0


@triton.jit
def _logits_tile(
    a_tile, b_tile, a_ptr, a_offs, a_valid, b_ptrs, b_valid, D,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    WHOLE_D: tl.constexpr,
):  # fmt: skip
    """``a @ b.T`` of one tile: one product of the two ``_feature_rows`` tiles (WHOLE_D), or ``_similarity_tile``."""
    if WHOLE_D:
        return tl.dot(a_tile, tl.trans(b_tile), input_precision=PRECISION, out_dtype=ACC)
    else:
        return _similarity_tile(a_ptr, a_offs, a_valid, b_ptrs, b_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_A, BLOCK_B)


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))``, stable for large ``|x|`` and exact where ``exp(-|x|)`` is tiny: ``log1p(u)`` as
    ``u · log(w) / (w - 1)``, ``w = 1 + u`` (Goldberg's correction; libdevice's log1p is not there under the
    interpreter, and plain ``log(1 + u)`` loses every digit of a negative pair's small loss)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    rounded_to_one = w == 1.0
    log1p = tl.where(rounded_to_one, u, u * tl.log(w) / tl.where(rounded_to_one, 1.0, w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    """``1 / (1 + exp(-x))`` from ``exp(-|x|)``: no overflow on either side."""
    u = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + u), u / (1.0 + u))


@triton.jit
def _params(params_ptr, SIGMOID: tl.constexpr, DISTILL: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr):
    """(scale, bias, alpha, smoothing) from the launch's parameter vector; only what the flags use is read."""
    scale = tl.load(params_ptr).to(ACC)
    bias = tl.load(params_ptr + 1).to(ACC) if SIGMOID else 0.0
    alpha = tl.load(params_ptr + 2).to(ACC) if DISTILL else 0.0
    smoothing = tl.load(params_ptr + 3).to(ACC) if SMOOTH else 0.0
    return scale, bias, alpha, smoothing


@triton.jit
def _column_pointers(cols_ptr, queue_ptr, offs_n, B, D):
    """Row pointers of the columns ``[batch; queue]`` without concatenating them."""
    in_batch = offs_n < B
    return tl.where(in_batch, cols_ptr + offs_n.to(tl.int64) * D, queue_ptr + (offs_n - B).to(tl.int64) * D)


@triton.jit
def _column_range(axis: tl.constexpr, N, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """The columns ``[begin, end)`` a program streams: all N, or with SPLIT the range numbered by the grid's
    ``axis``, the N columns cut into as many ranges of whole tiles (``column_splits`` leaves none empty)."""
    if SPLIT:
        span = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(axis)) * BLOCK_N
        begin = tl.program_id(axis) * span
        return begin, tl.minimum(begin + span, N)
    else:
        return 0, N


@triton.jit
def _positive_tile(row_ids, ids_ptr, queue_ids_ptr, offs_n, B, N, HAS_QUEUE_IDS: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` bool: column is a positive of the row (ids agree; queue only with queue ids)."""
    in_batch = offs_n < B
    col_ids = tl.load(ids_ptr + offs_n, mask=in_batch, other=-1)
    if HAS_QUEUE_IDS:
        queue_ids = tl.load(queue_ids_ptr + (offs_n - B), mask=(~in_batch) & (offs_n < N), other=-1)
        col_ids = tl.where(in_batch, col_ids, queue_ids)
    valid = in_batch
    if HAS_QUEUE_IDS:
        valid = offs_n < N
    return (row_ids[:, None] == col_ids[None, :]) & valid[None, :]


@triton.jit
def _itc_fwd_kernel(
    row_loss_ptr, lse_ptr, lse_m_ptr, neg_idx_ptr, split_stats_ptr,
    rows_ptr, rows_m_ptr, cols_ptr, queue_ptr, row_ids_ptr, ids_ptr, queue_ids_ptr, params_ptr,
    M, B, Q, D, row_offset, seed, direction,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WHOLE_D: tl.constexpr, SPLIT: tl.constexpr,
    HAS_QUEUE_IDS: tl.constexpr, DISTILL: tl.constexpr, MINING: tl.constexpr,
    SMOOTH: tl.constexpr, SIGMOID: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_M of the M rows; streams all B + Q columns once (and the momentum tile with it).

    The rows are global rows ``[row_offset, row_offset + M)`` of the batch the B columns belong to
    (the whole batch: M == B, row_offset == 0); the Gumbel noise is keyed by the global row index.
    ``params_ptr``: (scale, bias, alpha, smoothing) in the accumulator dtype (runtime float arguments would be
    fp32). SIGMOID: the row loss is the softplus sum and nothing goes to ``lse_ptr``.
    Mining scores are ``scale · similarity`` without the bias (a row's softmax and arg-max ignore it).

    SPLIT: program (row block, s) streams only the s-th range of the columns and stores its running statistics
    (``SPLIT_STAT_NAMES``, M each, at ``split_stats_ptr``, its pick at ``neg_idx_ptr + s · M``, -2 where a logit was
    not finite) for the launcher to combine (``_combine_splits``); nothing goes to the loss pointers.
    """
    pid = tl.program_id(0)
    N = B + Q
    block_rows = tl.arange(0, BLOCK_M)
    offs_m = pid * BLOCK_M + block_rows
    block_start = (pid * BLOCK_M).to(tl.int64) * D  # element offset of this block's first row
    rows_block, rows_m_block = rows_ptr + block_start, rows_m_ptr + block_start
    row_valid = offs_m < M
    row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-2)
    scale, bias, alpha, smoothing = _params(params_ptr, SIGMOID, DISTILL, SMOOTH, ACC)
    neg_inf = float("-inf")

    sig_sum = tl.zeros((BLOCK_M,), ACC)  # sigmoid loss: Σ softplus(∓(logit + bias))
    logit_sum = tl.zeros((BLOCK_M,), ACC)  # label smoothing: Σ logits over the N columns
    run_max = tl.full((BLOCK_M,), neg_inf, ACC)
    run_sum = tl.zeros((BLOCK_M,), ACC)
    pos_logits = tl.zeros((BLOCK_M,), ACC)
    pos_count = tl.zeros((BLOCK_M,), ACC)
    m_max = tl.full((BLOCK_M,), neg_inf, ACC)  # momentum logits: online softmax and softmax-weighted online logits
    m_sum = tl.zeros((BLOCK_M,), ACC)
    m_dot = tl.zeros((BLOCK_M,), ACC)
    best_score = tl.full((BLOCK_M,), neg_inf, ACC)
    best_idx = tl.full((BLOCK_M,), -1, tl.int32)
    undefined = tl.zeros((BLOCK_M,), tl.int32)  # a non-finite in-batch logit: no defined draw, pick -1
    rows = _feature_rows(rows_block + block_rows * D, row_valid, D, BLOCK_D, WHOLE_D)
    rows_m = _feature_rows(rows_m_block + block_rows * D, row_valid, D, BLOCK_D, WHOLE_D and DISTILL)

    begin, end = _column_range(1, N, BLOCK_N, SPLIT)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        col_ptrs = _column_pointers(cols_ptr, queue_ptr, offs_n, B, D)
        cols = _feature_rows(col_ptrs, col_valid, D, BLOCK_D, WHOLE_D)
        raw = _logits_tile(rows, cols, rows_block, block_rows, row_valid, col_ptrs, col_valid, D,
                           BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N, WHOLE_D)  # fmt: skip
        logits = tl.where(col_valid[None, :], raw * scale, neg_inf)
        positive = _positive_tile(row_ids, ids_ptr, queue_ids_ptr, offs_n, B, N, HAS_QUEUE_IDS)
        if SIGMOID:
            # -logsigmoid(label · z) = softplus(-label · z): no cancellation against the positives' logits
            z = raw * scale + bias
            sig_sum += tl.sum(tl.where(col_valid[None, :], _softplus(tl.where(positive, -z, z)), 0.0), axis=1)
        else:
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            finite_logits = tl.where(col_valid[None, :], logits, 0.0)
            pos_logits += tl.sum(tl.where(positive, finite_logits, 0.0), axis=1)
            pos_count += tl.sum(positive.to(ACC), axis=1)
            if SMOOTH:
                logit_sum += tl.sum(finite_logits, axis=1)
        if DISTILL:
            raw_m = _logits_tile(rows_m, cols, rows_m_block, block_rows, row_valid, col_ptrs, col_valid, D,
                                 BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N, WHOLE_D)  # fmt: skip
            logits_m = tl.where(col_valid[None, :], raw_m * scale, neg_inf)
            new_m_max = tl.maximum(m_max, tl.max(logits_m, axis=1))
            rescale = tl.exp(m_max - new_m_max)
            weights = tl.exp(logits_m - new_m_max[:, None])
            m_sum = m_sum * rescale + tl.sum(weights, axis=1)
            m_dot = m_dot * rescale + tl.sum(weights * finite_logits, axis=1)
            m_max = new_m_max
        if MINING != 0:
            if start < B:
                score = logits
                if MINING == 1:
                    # Gumbel-max: arg-max of logits + Gumbel noise is an exact draw from softmax(logits).
                    zero = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
                    global_rows = row_offset + offs_m
                    bits, _, _, _ = tl.philox(seed, offs_n[None, :] + zero, global_rows[:, None] + zero,
                                              zero + direction, zero)  # fmt: skip
                    uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                    score = score + (-tl.log(-tl.log(uniform))).to(ACC)
                in_batch = (offs_n < B)[None, :]
                not_finite = (logits != logits) | (tl.abs(logits) == float("inf"))
                undefined = tl.maximum(undefined, tl.max((in_batch & not_finite).to(tl.int32), axis=1))
                score = tl.where(in_batch & ~positive, score, neg_inf)
                tile_best = tl.max(score, axis=1)
                tile_idx = start + tl.argmax(score, axis=1).to(tl.int32)
                better = tile_best > best_score
                best_idx = tl.where(better, tile_idx, best_idx)
                best_score = tl.where(better, tile_best, best_score)

    if SPLIT:  # in the order of SPLIT_STAT_NAMES
        stats = split_stats_ptr + (tl.program_id(1) * SPLIT_STATS).to(tl.int64) * M + offs_m
        tl.store(stats, run_max, mask=row_valid)
        tl.store(stats + M, run_sum, mask=row_valid)
        tl.store(stats + 2 * M, pos_logits, mask=row_valid)
        tl.store(stats + 3 * M, pos_count, mask=row_valid)
        tl.store(stats + 4 * M, logit_sum, mask=row_valid)
        tl.store(stats + 5 * M, sig_sum, mask=row_valid)
        tl.store(stats + 6 * M, m_max, mask=row_valid)
        tl.store(stats + 7 * M, m_sum, mask=row_valid)
        tl.store(stats + 8 * M, m_dot, mask=row_valid)
        tl.store(stats + 9 * M, best_score, mask=row_valid)
        if MINING != 0:
            picks = neg_idx_ptr + tl.program_id(1).to(tl.int64) * M + offs_m
            tl.store(picks, tl.where(undefined > 0, -2, best_idx).to(tl.int64), mask=row_valid)
    else:
        if SIGMOID:
            tl.store(row_loss_ptr + offs_m, sig_sum, mask=row_valid)
        else:
            lse = run_max + tl.log(run_sum)
            target_logits = pos_logits / tl.maximum(pos_count, 1.0)  # padding rows have none
            if DISTILL:
                target_logits = (1.0 - alpha) * target_logits + alpha * (m_dot / m_sum)
                tl.store(lse_m_ptr + offs_m, m_max + tl.log(m_sum), mask=row_valid)
            if SMOOTH:  # targets (1 - ε)·t + ε/N: Σ target · logits = (1 - ε)·(Σ t · logits) + ε · mean(logits)
                target_logits = (1.0 - smoothing) * target_logits + smoothing * (logit_sum / N)
            tl.store(row_loss_ptr + offs_m, lse - target_logits, mask=row_valid)
            tl.store(lse_ptr + offs_m, lse, mask=row_valid)
        if MINING != 0:
            best_idx = tl.where(undefined > 0, -1, best_idx)
            tl.store(neg_idx_ptr + offs_m, best_idx.to(tl.int64), mask=row_valid)


@triton.jit
def _itc_fwd_both_kernel(
    row_lse_ptr, positive_ptr, col_lse_ptr,
    rows_ptr, cols_ptr, params_ptr, B, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WHOLE_D: tl.constexpr, SPLIT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Plain CLIP (whole batch, pair j's positive is column j only, no queue, no options): both directions in one
    pass. Per row (i2t) the log-sum-exp and the positive logit over this program's columns, stored at ``[s, row]``
    (s: the column range, 0 without SPLIT); per column tile the log-sum-exp of its logits over this program's
    BLOCK_M rows, stored at ``[row block, column]``. The launcher combines the ranges into the i2t statistics and
    the ``cdiv(B, BLOCK_M)`` partials of each column into the t2i log-sum-exp, in a fixed order (no atomics).
    """
    pid = tl.program_id(0)
    block_rows = tl.arange(0, BLOCK_M)
    offs_m = pid * BLOCK_M + block_rows
    rows_block = rows_ptr + (pid * BLOCK_M).to(tl.int64) * D
    row_valid = offs_m < B
    scale = tl.load(params_ptr).to(ACC)
    neg_inf = float("-inf")
    run_max = tl.full((BLOCK_M,), neg_inf, ACC)
    run_sum = tl.zeros((BLOCK_M,), ACC)
    pos_logits = tl.zeros((BLOCK_M,), ACC)
    partials = pid.to(tl.int64) * B
    rows = _feature_rows(rows_block + block_rows * D, row_valid, D, BLOCK_D, WHOLE_D)
    begin, end = _column_range(1, B, BLOCK_N, SPLIT)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < B
        col_ptrs = cols_ptr + offs_n.to(tl.int64) * D
        cols = _feature_rows(col_ptrs, col_valid, D, BLOCK_D, WHOLE_D)
        raw = _logits_tile(rows, cols, rows_block, block_rows, row_valid, col_ptrs, col_valid, D,
                           BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N, WHOLE_D)  # fmt: skip
        logits = raw * scale
        by_row = tl.where(col_valid[None, :], logits, neg_inf)
        new_max = tl.maximum(run_max, tl.max(by_row, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(by_row - new_max[:, None]), axis=1)
        run_max = new_max
        pos_logits += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], logits, 0.0), axis=1)
        by_column = tl.where(row_valid[:, None], logits, neg_inf)  # every block has a valid row: a finite max
        column_max = tl.max(by_column, axis=0)
        column_sum = tl.sum(tl.exp(by_column - column_max[None, :]), axis=0)
        tl.store(col_lse_ptr + partials + offs_n, column_max + tl.log(column_sum), mask=col_valid)
    split_rows = tl.program_id(1).to(tl.int64) * B + offs_m
    tl.store(row_lse_ptr + split_rows, run_max + tl.log(run_sum), mask=row_valid)
    tl.store(positive_ptr + split_rows, pos_logits, mask=row_valid)


@triton.jit
def _itc_bwd_rows_kernel(
    d_rows_ptr, d_rows_split_ptr, d_scale_ptr, d_bias_ptr,
    rows_ptr, rows_m_ptr, cols_ptr, queue_ptr, row_ids_ptr, ids_ptr, queue_ids_ptr, params_ptr, lse_ptr, lse_m_ptr,
    pos_count_ptr, grad_ptr, lse_t_ptr, grad_t_ptr, M, B, Q, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
    WHOLE_D: tl.constexpr, SPLIT: tl.constexpr,
    HAS_QUEUE_IDS: tl.constexpr, DISTILL: tl.constexpr, TRANSPOSED: tl.constexpr, SMOOTH: tl.constexpr,
    SIGMOID: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, HALF_RANGE: tl.constexpr,
):  # fmt: skip
    """Program (row block, feature slice): ``d rows[:, slice] = scale · Σ_j dlogits[:, j] · columns[j, slice]``.

    Logits are recomputed over the full feature dimension; the slice keeps the accumulator
    at BLOCK_M × BLOCK_DOUT. The first slice also writes each row's part of ``d scale``.
    TRANSPOSED (CLIP mode: both sides online, so the other direction's batch logits are this
    tile transposed): the other direction's ``dlogits[j, i]`` (its lse ``lse_t``, gradient
    ``grad_t``) is added for batch columns, which gives these rows their gradient as the other
    direction's columns in the same pass; ``d scale`` counts only this direction's term (then M == B).
    The loss is the mean over the M rows: ``grad / M``. SIGMOID (never with DISTILL):
    ``dlogits = sigmoid(z) - [positive]`` with ``z = logit + bias``, the same for the transposed pair, and
    the first slice writes each row's part of ``d bias`` too; no lse is read.

    SPLIT: program (row block, slice, s) streams the s-th range of the columns only and stores its part of
    ``d rows`` in the accumulator dtype at ``d_rows_split_ptr + s · M · D``, for the launcher to sum; ``d scale`` /
    ``d bias`` parts go to ``s · M + row`` (summed by the launcher in every case).
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    N = B + Q
    block_rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + block_rows
    block_start = (pid_m * BLOCK_M).to(tl.int64) * D  # element offset of this block's first row
    rows_block, rows_m_block = rows_ptr + block_start, rows_m_ptr + block_start
    row_valid = offs_m < M
    offs_out = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_valid = offs_out < D
    row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-2)
    scale, bias, alpha, smoothing = _params(params_ptr, SIGMOID, DISTILL, SMOOTH, ACC)
    if not SIGMOID:
        lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=0.0).to(ACC)
        pos_count = tl.load(pos_count_ptr + offs_m, mask=row_valid, other=1.0).to(ACC)
    grad = tl.load(grad_ptr).to(ACC) / M
    grad_norm = tl.abs(grad)  # weights below are grad / grad_norm in [-1, 1]: fp16-safe before the dot
    if TRANSPOSED:
        grad_t = tl.load(grad_t_ptr).to(ACC) / M
        grad_norm = tl.maximum(grad_norm, tl.abs(grad_t))
    grad_norm = tl.where(grad_norm > 0, grad_norm, 1.0)
    if DISTILL:
        lse_m = tl.load(lse_m_ptr + offs_m, mask=row_valid, other=0.0).to(ACC)
    d_rows = tl.zeros((BLOCK_M, BLOCK_DOUT), ACC)
    d_scale = tl.zeros((BLOCK_M,), ACC)
    d_bias = tl.zeros((BLOCK_M,), ACC)
    rows = _feature_rows(rows_block + block_rows * D, row_valid, D, BLOCK_D, WHOLE_D)  # WHOLE_D: one slice
    rows_m = _feature_rows(rows_m_block + block_rows * D, row_valid, D, BLOCK_D, WHOLE_D and DISTILL)
    begin, end = _column_range(2, N, BLOCK_N, SPLIT)
    for start in range(begin, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        col_ptrs = _column_pointers(cols_ptr, queue_ptr, offs_n, B, D)
        cols = _feature_rows(col_ptrs, col_valid, D, BLOCK_D, WHOLE_D)
        raw = _logits_tile(rows, cols, rows_block, block_rows, row_valid, col_ptrs, col_valid, D,
                           BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N, WHOLE_D)  # fmt: skip
        positive = _positive_tile(row_ids, ids_ptr, queue_ids_ptr, offs_n, B, N, HAS_QUEUE_IDS)
        keep = row_valid[:, None] & col_valid[None, :]
        if SIGMOID:  # d softplus(-label · z) / dz = -label · sigmoid(-label · z) = sigmoid(z) - [positive]
            sign = tl.where(positive, -1.0, 1.0)
            d_logits = tl.where(keep, sign * _sigmoid(sign * (raw * scale + bias)), 0.0)
            d_bias += tl.sum(d_logits, axis=1)
        else:
            target = tl.where(positive, 1.0 / pos_count[:, None], 0.0)
            if DISTILL:
                raw_m = _logits_tile(rows_m, cols, rows_m_block, block_rows, row_valid, col_ptrs, col_valid, D,
                                     BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N, WHOLE_D)  # fmt: skip
                target = (1.0 - alpha) * target + alpha * tl.exp(raw_m * scale - lse_m[:, None])
            if SMOOTH:
                target = (1.0 - smoothing) * target + smoothing / N
            prob = tl.exp(raw * scale - lse[:, None])
            d_logits = tl.where(keep, prob - target, 0.0)
        d_scale += tl.sum(d_logits * raw, axis=1)
        d_tile = d_logits * (grad / grad_norm)
        if TRANSPOSED:
            in_batch = offs_n < B
            if SIGMOID:  # the other direction's pair (j, i) has this logit and label: the same dlogits
                d_t = tl.where(in_batch[None, :], d_logits, 0.0)
            else:
                lse_t = tl.load(lse_t_ptr + offs_n, mask=in_batch, other=0.0).to(ACC)
                pos_count_t = tl.load(pos_count_ptr + offs_n, mask=in_batch, other=1.0).to(ACC)
                target_t = tl.where(positive, 1.0 / pos_count_t[None, :], 0.0)  # ids agree: positives are symmetric
                if SMOOTH:  # both directions have B + Q columns
                    target_t = (1.0 - smoothing) * target_t + smoothing / N
                prob_t = tl.exp(raw * scale - lse_t[None, :])
                d_t = tl.where(keep & in_batch[None, :], prob_t - target_t, 0.0)
            d_tile += d_t * (grad_t / grad_norm)
        if not WHOLE_D:  # this program's feature slice of the column tile
            cols = tl.load(col_ptrs[:, None] + offs_out[None, :], mask=col_valid[:, None] & out_valid[None, :],
                           other=0.0)  # fmt: skip
            cols = widen_bf16_in_interpreter(cols)
        d_rows += tl.dot((d_tile * HALF_RANGE).to(cols.dtype), cols, input_precision=PRECISION, out_dtype=ACC)
    d_rows = d_rows * (scale * grad_norm / HALF_RANGE)
    out_offsets = offs_m[:, None].to(tl.int64) * D + offs_out[None, :]
    out_mask = row_valid[:, None] & out_valid[None, :]
    if SPLIT:
        tl.store(d_rows_split_ptr + pid_s.to(tl.int64) * M * D + out_offsets, d_rows, mask=out_mask)
    else:
        tl.store(d_rows_ptr + out_offsets, d_rows.to(d_rows_ptr.dtype.element_ty), mask=out_mask)
    if pid_d == 0:
        tl.store(d_scale_ptr + pid_s * M + offs_m, d_scale * grad, mask=row_valid)
        if SIGMOID:
            tl.store(d_bias_ptr + pid_s * M + offs_m, d_bias * grad, mask=row_valid)


@triton.jit
def _itc_bwd_cols_kernel(
    d_cols_ptr,
    rows_ptr, cols_ptr, row_ids_ptr, ids_ptr, params_ptr, lse_ptr, pos_count_ptr, grad_ptr, M, B, Q, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
    WHOLE_D: tl.constexpr, SMOOTH: tl.constexpr, SIGMOID: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, HALF_RANGE: tl.constexpr,
):  # fmt: skip
    """Program (batch-column block, feature slice): ``d cols[j, slice] = scale · Σ_i dlogits[i, j] · rows[i, slice]``.

    Only for online columns, where the target is the hard one (no distillation). Tiles
    are the transposed logits: BLOCK_N columns against BLOCK_M rows at a time. The M rows
    (ids, lse and positive counts per row) may be a slice of the batch the B columns are; the
    rows have B + Q columns (Q: the queue, constants), which label smoothing spreads ε over.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    block_cols = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + block_cols
    cols_block = cols_ptr + (pid_n * BLOCK_N).to(tl.int64) * D  # this block's first column (int64 offset)
    col_valid = offs_n < B
    offs_out = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_valid = offs_out < D
    col_ids = tl.load(ids_ptr + offs_n, mask=col_valid, other=-2)
    scale, bias, _alpha, smoothing = _params(params_ptr, SIGMOID, False, SMOOTH, ACC)
    grad = tl.load(grad_ptr).to(ACC) / M
    d_cols = tl.zeros((BLOCK_N, BLOCK_DOUT), ACC)
    cols = _feature_rows(cols_block + block_cols * D, col_valid, D, BLOCK_D, WHOLE_D)  # WHOLE_D: one slice
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_valid = offs_m < M
        row_ptrs = rows_ptr + offs_m.to(tl.int64) * D
        rows = _feature_rows(row_ptrs, row_valid, D, BLOCK_D, WHOLE_D)
        raw = _logits_tile(cols, rows, cols_block, block_cols, col_valid, row_ptrs, row_valid, D,  # [columns, rows]
                           BLOCK_D, ACC, PRECISION, BLOCK_N, BLOCK_M, WHOLE_D)  # fmt: skip
        row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-3)
        positive = col_ids[:, None] == row_ids[None, :]
        keep = col_valid[:, None] & row_valid[None, :]
        if SIGMOID:
            sign = tl.where(positive, -1.0, 1.0)
            d_logits = tl.where(keep, sign * _sigmoid(sign * (raw * scale + bias)), 0.0)
        else:
            lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=0.0).to(ACC)
            pos_count = tl.load(pos_count_ptr + offs_m, mask=row_valid, other=1.0).to(ACC)
            target = tl.where(positive, 1.0 / pos_count[None, :], 0.0)
            if SMOOTH:
                target = (1.0 - smoothing) * target + smoothing / (B + Q)
            prob = tl.exp(raw * scale - lse[None, :])
            d_logits = tl.where(keep, prob - target, 0.0)
        if not WHOLE_D:  # this program's feature slice of the row tile
            rows = tl.load(row_ptrs[:, None] + offs_out[None, :], mask=row_valid[:, None] & out_valid[None, :],
                           other=0.0)  # fmt: skip
            rows = widen_bf16_in_interpreter(rows)
        d_cols += tl.dot((d_logits * HALF_RANGE).to(rows.dtype), rows, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = d_cols_ptr + offs_n[:, None].to(tl.int64) * D + offs_out[None, :]
    tl.store(
        out_ptrs,
        (d_cols * (scale * grad / HALF_RANGE)).to(d_cols_ptr.dtype.element_ty),
        mask=col_valid[:, None] & out_valid[None, :],
    )


MAX_GRID_Y = 65535
MAX_INT32 = 2**31 - 1  # rows, columns and their indices are int32 in the kernels


# ---------------------------------------------------------------------------------------------------------------------
# Launch plans: what the launchers below run and what the gate compiles (``gate_cases``), from ``itc_configs``.


class Sizes(NamedTuple):
    """What a plan depends on besides the flags: M rows against B batch columns and Q queue columns of width D."""

    rows: int
    batch: int
    queue: int
    dim: int
    row_offset: int = 0


def _feature_types(dtype: torch.dtype) -> tuple[str, str]:
    return pointer_type(dtype), pointer_type(torch.float64 if dtype == torch.float64 else torch.float32)


def _numerics_of(dtype: torch.dtype, backward: bool) -> dict[str, object]:
    numerics = {"ACC": accumulator_type(dtype), "PRECISION": _dot_precision(dtype)}
    if backward:  # fp16 would flush small softmax differences to zero: scaled up before the cast, back after the dot
        numerics["HALF_RANGE"] = 1024.0 if dtype == torch.float16 else 1.0
    return numerics


def _launch(name, kernel, grid, signature, constexprs, config: ItcConfig, dtype, sizes: Sizes) -> Launch:
    divisible = divisible_by_16(M=sizes.rows, B=sizes.batch, Q=sizes.queue, D=sizes.dim, row_offset=sizes.row_offset)
    layout = ("_whole" if constexprs["WHOLE_D"] else "") + ("_split" if constexprs.get("SPLIT") else "")
    tag = f"{TRITON_TYPE[dtype]}_{config.block_m}x{config.block_n}x{constexprs['BLOCK_D']}{layout}_w{config.num_warps}"
    return Launch(f"{name}_{tag}", kernel, grid, signature, constexprs, config.num_warps, config.num_stages,
                  tuple(n for n in divisible if n in signature), config.spill_budget)  # fmt: skip


def _flag_names(flags: dict) -> str:
    return "".join(f"_{name.lower()}" for name, value in flags.items() if value) or "_plain"


def fwd_plan(arch: int, dtype: torch.dtype, sizes: Sizes, *, multiprocessors: int, has_queue_ids: bool,
             distill: bool, mining: int, smooth: bool, sigmoid: bool) -> Launch:  # fmt: skip
    """The forward of one direction (``_itc_fwd_kernel``); its grid's second axis is the column ranges."""
    config = itc_config("fwd_distill" if distill else "fwd", arch, dtype in SIXTEEN_BIT, padded_dim(sizes.dim))
    features, acc = _feature_types(dtype)
    block_d, _, whole = feature_blocks(config, padded_dim(sizes.dim))
    signature = {
        **dict.fromkeys(("row_loss_ptr", "lse_ptr", "lse_m_ptr"), acc), "neg_idx_ptr": "*i64", "split_stats_ptr": acc,
        **dict.fromkeys(("rows_ptr", "rows_m_ptr", "cols_ptr", "queue_ptr"), features),
        **dict.fromkeys(("row_ids_ptr", "ids_ptr", "queue_ids_ptr"), "*i64"), "params_ptr": acc,
        **dict.fromkeys(("M", "B", "Q", "D", "row_offset"), "i32"), "seed": "i64", "direction": "i32",
    }  # fmt: skip
    flags = dict(HAS_QUEUE_IDS=has_queue_ids, DISTILL=distill, MINING=mining, SMOOTH=smooth, SIGMOID=sigmoid)
    programs = triton.cdiv(sizes.rows, config.block_m)
    splits = column_splits(programs, sizes.batch + sizes.queue, config.block_n, multiprocessors)
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, WHOLE_D=whole,
                      SPLIT=splits > 1, **flags, **_numerics_of(dtype, backward=False))  # fmt: skip
    grid = (programs, splits)
    name = f"itc_fwd{_flag_names(flags)}"
    return _launch(name, _itc_fwd_kernel, grid, signature, constexprs, config, dtype, sizes)


def fwd_both_plan(arch: int, dtype: torch.dtype, sizes: Sizes, *, multiprocessors: int) -> Launch:
    """Plain CLIP's one forward pass for both directions (``_itc_fwd_both_kernel``), at the forward's tiles; its
    grid's second axis is the column ranges."""
    config = itc_config("fwd", arch, dtype in SIXTEEN_BIT, padded_dim(sizes.dim))
    features, acc = _feature_types(dtype)
    block_d, _, whole = feature_blocks(config, padded_dim(sizes.dim))
    signature = {
        **dict.fromkeys(("row_lse_ptr", "positive_ptr", "col_lse_ptr"), acc),
        **dict.fromkeys(("rows_ptr", "cols_ptr"), features), "params_ptr": acc, "B": "i32", "D": "i32",
    }  # fmt: skip
    programs = triton.cdiv(sizes.batch, config.block_m)
    splits = column_splits(programs, sizes.batch, config.block_n, multiprocessors)
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, WHOLE_D=whole,
                      SPLIT=splits > 1, **_numerics_of(dtype, backward=False))  # fmt: skip
    grid = (programs, splits)
    return _launch("itc_fwd_both", _itc_fwd_both_kernel, grid, signature, constexprs, config, dtype, sizes)


def bwd_rows_plan(arch: int, dtype: torch.dtype, sizes: Sizes, *, multiprocessors: int, has_queue_ids: bool,
                  distill: bool, transposed: bool, smooth: bool, sigmoid: bool) -> Launch:  # fmt: skip
    """The row gradient of one direction (``_itc_bwd_rows_kernel``); its grid's third axis is the column ranges."""
    config = itc_config("bwd_rows", arch, dtype in SIXTEEN_BIT, padded_dim(sizes.dim))
    features, acc = _feature_types(dtype)
    block_d, block_dout, whole = feature_blocks(config, padded_dim(sizes.dim))
    signature = {
        "d_rows_ptr": features, **dict.fromkeys(("d_rows_split_ptr", "d_scale_ptr", "d_bias_ptr"), acc),
        **dict.fromkeys(("rows_ptr", "rows_m_ptr", "cols_ptr", "queue_ptr"), features),
        **dict.fromkeys(("row_ids_ptr", "ids_ptr", "queue_ids_ptr"), "*i64"),
        **dict.fromkeys(("params_ptr", "lse_ptr", "lse_m_ptr", "pos_count_ptr", "grad_ptr", "lse_t_ptr", "grad_t_ptr"),
                        acc),
        **dict.fromkeys(("M", "B", "Q", "D"), "i32"),
    }  # fmt: skip
    flags = dict(HAS_QUEUE_IDS=has_queue_ids, DISTILL=distill, TRANSPOSED=transposed, SMOOTH=smooth, SIGMOID=sigmoid)
    grid = (triton.cdiv(sizes.rows, config.block_m), triton.cdiv(sizes.dim, block_dout))
    splits = column_splits(grid[0] * grid[1], sizes.batch + sizes.queue, config.block_n, multiprocessors)
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, BLOCK_DOUT=block_dout,
                      WHOLE_D=whole, SPLIT=splits > 1, **flags, **_numerics_of(dtype, backward=True))  # fmt: skip
    grid = (*grid, splits)
    name = f"itc_bwd_rows{_flag_names(flags)}"
    return _launch(name, _itc_bwd_rows_kernel, grid, signature, constexprs, config, dtype, sizes)


def bwd_cols_plan(arch: int, dtype: torch.dtype, sizes: Sizes, *, smooth: bool, sigmoid: bool) -> Launch:
    """The batch-column gradient of one direction (``_itc_bwd_cols_kernel``): ``block_m`` columns stay, rows
    stream (the kernel's BLOCK_N is the stationary side)."""
    config = itc_config("bwd_cols", arch, dtype in SIXTEEN_BIT, padded_dim(sizes.dim))
    features, acc = _feature_types(dtype)
    block_d, block_dout, whole = feature_blocks(config, padded_dim(sizes.dim))
    signature = {
        "d_cols_ptr": features, **dict.fromkeys(("rows_ptr", "cols_ptr"), features),
        **dict.fromkeys(("row_ids_ptr", "ids_ptr"), "*i64"),
        **dict.fromkeys(("params_ptr", "lse_ptr", "pos_count_ptr", "grad_ptr"), acc),
        **dict.fromkeys(("M", "B", "Q", "D"), "i32"),
    }  # fmt: skip
    flags = dict(SMOOTH=smooth, SIGMOID=sigmoid)
    constexprs = dict(BLOCK_M=config.block_n, BLOCK_N=config.block_m, BLOCK_D=block_d, BLOCK_DOUT=block_dout,
                      WHOLE_D=whole, **flags, **_numerics_of(dtype, backward=True))  # fmt: skip
    grid = (triton.cdiv(sizes.batch, config.block_m), triton.cdiv(sizes.dim, block_dout))
    name = f"itc_bwd_cols{_flag_names(flags)}"
    return _launch(name, _itc_bwd_cols_kernel, grid, signature, constexprs, config, dtype, sizes)


# What this backend runs: the op reads it before any launch (the backend contract of the ops layer). fp64 runs under
# the interpreter (the tests); on a GPU it is the reference backend's (the kernels target fp32/fp16/bf16).
LIMITS = {
    "dtypes": {
        "cuda": (torch.float16, torch.bfloat16, torch.float32),
        "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
    "feature_dim": (1, MAX_GRID_Y * FEATURE_SLICE),
    "rows": (1, MAX_INT32),
    "columns": (1, MAX_INT32),
    # One vector per image: the max over query tokens (BLIP-2) needs the arg-max token of every pair in the
    # backward, i.e. NQ recomputes or an O(B²) index: the reference's (declined here, so `auto` falls back).
    "query_tokens": (1, 1),
    "sigmoid_loss": (0, 1),
    "label_smoothing": (0, 1),
    "mining_columns": (0, 1),
}


def _dot_precision(dtype: torch.dtype) -> str:
    """The shared policy (``dot_precision``: TF32 for fp32 when torch allows it), except that fp32 otherwise takes
    IEEE dots, not three TF32 passes: at these tiles tf32x3 spills 280-736 B of stack per thread on sm_90 (IEEE:
    16-88 B; see benchmarks/NOTES-itc.md). To revisit with GPU timings."""
    precision = dot_precision(dtype)
    return "ieee" if precision == "tf32x3" else precision


def _accumulator_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


class _Ids(NamedTuple):
    """The ids the kernels compare: equal ids are positives, so "no id" (negative) is mapped to ids nothing shares."""

    rows: Tensor  # [M] the rows' ids: columns[row_offset : row_offset + M]
    columns: Tensor  # [B]
    queue: Tensor | None  # [Q]

    @classmethod
    def of(cls, options, row_offset: int, rows: int, batch: int, device: torch.device) -> _Ids:
        index = torch.arange(batch, device=device)
        if options.positive_ids is None:
            ids = index
        else:  # a negative id is no id: -2 - j for pair j matches only the pair itself (queue ids are >= -1)
            ids = options.positive_ids.to(torch.int64)
            ids = torch.where(ids < 0, -2 - index, ids)
        queue = None if options.queue_ids is None else options.queue_ids.to(torch.int64).clamp(min=-1).contiguous()
        return cls(ids[row_offset : row_offset + rows].contiguous(), ids.contiguous(), queue)


def _positive_counts(ids: _Ids) -> Tensor:
    """Per row, how many batch (and queue) columns share its id: O(B + Q) memory via sorted search."""
    sorted_ids = ids.columns.sort().values
    counts = torch.searchsorted(sorted_ids, ids.rows, right=True) - torch.searchsorted(sorted_ids, ids.rows)
    if ids.queue is not None:
        sorted_queue = ids.queue.sort().values
        counts += torch.searchsorted(sorted_queue, ids.rows, right=True) - torch.searchsorted(sorted_queue, ids.rows)
    return counts


def _directions(image_rows, text_rows, image_columns, text_columns, options):
    """(rows, momentum rows, batch columns, queue, mining columns) for i2t and t2i."""
    return (
        (image_rows, options.image_feats_m, text_columns, options.text_queue, options.mining_text_columns),
        (text_rows, options.text_feats_m, image_columns, options.image_queue, options.mining_image_columns),
    )


class _Loss(NamedTuple):
    """The loss flags of one launch: distillation weight, label smoothing, sigmoid (SigLIP) or softmax."""

    alpha: float = 0.0
    smoothing: float = 0.0
    sigmoid: bool = False

    @classmethod
    def of(cls, options) -> _Loss:
        return cls(options.alpha, options.label_smoothing, options.loss == "sigmoid")

    def kwargs(self) -> dict[str, bool]:
        return {"smooth": self.smoothing > 0, "sigmoid": self.sigmoid}


def _launch_params(scale: Tensor, options, acc_dtype: torch.dtype) -> Tensor:
    """``(scale, bias, alpha, smoothing)``: what every kernel reads at ``params_ptr``, in the accumulator dtype.
    ``scale`` is the contract's: ``[scale]``, or ``[scale, bias]`` for the sigmoid loss."""
    scale = scale.reshape(-1).to(acc_dtype)
    bias = scale[1:] if scale.numel() == 2 else scale.new_zeros(1)
    rest = torch.tensor([options.alpha, options.label_smoothing], dtype=acc_dtype, device=scale.device)
    return torch.cat([scale[:1], bias, rest])


def _direction_stats(rows, rows_m, cols, queue, ids: _Ids, params, loss: _Loss, mining, seed, direction, row_offset):
    """Forward of one direction: per-row loss, lse (softmax), momentum lse (or None) and picked negatives (or
    empty)."""
    local, dim = rows.shape
    acc_dtype = _accumulator_dtype(rows)
    distill = loss.alpha > 0
    row_loss = torch.empty(local, dtype=acc_dtype, device=rows.device)
    lse = torch.empty_like(row_loss) if not loss.sigmoid else row_loss
    lse_m = torch.empty_like(row_loss) if distill else row_loss
    sizes = Sizes(local, cols.shape[0], 0 if queue is None else queue.shape[0], dim, row_offset)
    arch, multiprocessors = target(rows.device)
    launch = fwd_plan(arch, rows.dtype, sizes, multiprocessors=multiprocessors, has_queue_ids=ids.queue is not None,
                      distill=distill, mining=_MINING[mining], **loss.kwargs())  # fmt: skip
    splits = launch.grid[1]
    split_stats = row_loss.new_empty((splits, len(SPLIT_STAT_NAMES), local) if splits > 1 else 0)
    neg_idx = torch.empty(splits * local if mining else 0, dtype=torch.int64, device=rows.device)
    launch(
        row_loss, lse, lse_m, neg_idx, split_stats,
        rows, rows if rows_m is None else rows_m, cols, cols if queue is None else queue,
        ids.rows, ids.columns, ids.columns if ids.queue is None else ids.queue, params,
        *sizes, seed, direction,
    )  # fmt: skip
    if splits > 1:
        picks = neg_idx.view(splits, local) if mining else None
        row_loss, lse, lse_m, picked = _combine_splits(split_stats, picks, loss, sizes)
        neg_idx = neg_idx if picked is None else picked
    return row_loss, (None if loss.sigmoid else lse), (lse_m if distill else None), neg_idx


def _combine_splits(stats: Tensor, picks: Tensor | None, loss: _Loss, sizes: Sizes):
    """``(row loss, lse, momentum lse, picks)`` from the column ranges' statistics (``(splits, SPLIT_STATS, M)``,
    picks ``(splits, M)`` or None), as the unsplit kernel's epilogue computes them from one range; fixed-order
    reductions over the ranges, so the result is deterministic. The first range with the best score gives the pick
    (the lowest column on ties, as the arg-max within a range); a range that met a non-finite logit (-2) makes it
    -1."""
    run_max, run_sum, pos_logits, pos_count, logit_sum, sig_sum, m_max, m_sum, m_dot, best_score = stats.unbind(1)
    if picks is not None:
        best = picks.gather(0, best_score.argmax(dim=0, keepdim=True)).squeeze(0)
        picks = torch.where((picks == -2).any(dim=0), -1, best)
    if loss.sigmoid:
        return sig_sum.sum(dim=0), None, None, picks
    lse = torch.logsumexp(run_max + run_sum.log(), dim=0)
    target_logits = pos_logits.sum(dim=0) / pos_count.sum(dim=0).clamp(min=1.0)
    lse_m = None
    if loss.alpha > 0:  # the momentum softmax's weights of each range, rescaled to the largest range maximum
        top = m_max.max(dim=0).values
        weight = torch.exp(m_max - top)
        m_total = (m_sum * weight).sum(dim=0)
        target_logits = (1.0 - loss.alpha) * target_logits + loss.alpha * (m_dot * weight).sum(dim=0) / m_total
        lse_m = top + m_total.log()
    if loss.smoothing > 0:
        columns = sizes.batch + sizes.queue
        target_logits = (1.0 - loss.smoothing) * target_logits + loss.smoothing * logit_sum.sum(dim=0) / columns
    return lse - target_logits, lse, lse_m, picks


def _one_pass(image_rows, text_rows, image_columns, text_columns, options, row_offset, hard_negatives) -> bool:
    """Plain CLIP: the rows are the columns (the same memory), whole batch, no queue, ids, momentum features,
    smoothing, sigmoid loss or mining: then t2i's logits are i2t's transposed and one pass serves both."""
    same = all(
        rows.data_ptr() == cols.data_ptr() and rows.shape == cols.shape and rows.stride() == cols.stride()
        for rows, cols in ((image_rows, image_columns), (text_rows, text_columns))
    )
    plain = options.image_queue is None and options.text_queue is None and options.positive_ids is None
    plain = plain and options.image_feats_m is None and options.text_feats_m is None and options.alpha == 0
    plain = plain and options.label_smoothing == 0 and options.loss == "softmax" and hard_negatives is None
    plain = plain and options.mining_image_columns is None and options.mining_text_columns is None
    return same and plain and row_offset == 0


def _clip_fwd(image_rows, text_rows, params):
    """Both directions from one pass over the image-row tiles; the t2i statistics from the column partials.

    The partials take ``cdiv(B, BLOCK_M) · B`` accumulator floats (B = 65 536: 128 MiB in fp32 at sm_90's 128-row
    tiles for d ≤ 256, 256 MiB at 64 rows), 1/128 to 1/64 of one fp32 B × B logit matrix of the formula: more
    than the features at large B, well under the memory target (1/20 of the formula's), and they save a whole
    similarity pass."""
    batch, dim = image_rows.shape
    acc_dtype = _accumulator_dtype(image_rows)
    arch, multiprocessors = target(image_rows.device)
    launch = fwd_both_plan(arch, image_rows.dtype, Sizes(batch, batch, 0, dim), multiprocessors=multiprocessors)
    row_blocks, splits = launch.grid
    row_lse = torch.empty((splits, batch), dtype=acc_dtype, device=image_rows.device)
    positives = torch.empty_like(row_lse)
    col_lse = torch.empty((row_blocks, batch), dtype=acc_dtype, device=image_rows.device)
    launch(row_lse, positives, col_lse, image_rows, text_rows, params, batch, dim)
    lse_i2t = row_lse[0] if splits == 1 else torch.logsumexp(row_lse, dim=0)
    lse_t2i = torch.logsumexp(col_lse, dim=0)
    positives = positives.sum(dim=0)  # the diagonal logits: pair j's positive in both directions
    neg_text, neg_image = (torch.empty(0, dtype=torch.int64, device=image_rows.device) for _ in range(2))
    loss_i2t, loss_t2i = (lse_i2t - positives).mean(), (lse_t2i - positives).mean()
    return loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t.float(), lse_t2i.float()


def itc_loss_fwd(image_rows, text_rows, image_columns, text_columns, scale, options, row_offset, hard_negatives, seed):
    """Launcher of the ITC contract (``ITCBackend`` of the ops layer): ``(loss_i2t, loss_t2i, neg_text, neg_image,
    lse_i2t, lse_t2i)``, the losses means over the rows, the picks indices into the B batch columns.

    With mining columns (BLIP's online similarities beside momentum columns) the loss pass mines nothing and one
    more pass per direction, mining only, runs over those B columns (no queue)."""
    params = _launch_params(scale, options, _accumulator_dtype(image_rows))
    if _one_pass(image_rows, text_rows, image_columns, text_columns, options, row_offset, hard_negatives):
        return _clip_fwd(image_rows, text_rows, params)
    ids = _Ids.of(options, row_offset, image_rows.shape[0], image_columns.shape[0], image_rows.device)
    loss = _Loss.of(options)
    outputs = []
    for direction, (rows, rows_m, cols, queue, mine_cols) in enumerate(
        _directions(image_rows, text_rows, image_columns, text_columns, options)
    ):
        mine_here = hard_negatives if mine_cols is None else None
        row_loss, lse, _, neg_idx = _direction_stats(
            rows, rows_m, cols, queue, ids, params, loss, mine_here, seed, direction, row_offset
        )
        if mine_cols is not None and hard_negatives is not None:
            neg_idx = _direction_stats(
                rows, None, mine_cols, None, ids._replace(queue=None), params, _Loss(), hard_negatives, seed,
                direction, row_offset,
            )[3]  # fmt: skip
        saved = rows.new_empty(0, dtype=torch.float32) if lse is None else lse.float()
        outputs.append((row_loss.mean(), neg_idx, saved))
    (loss_i2t, neg_text, lse_i2t), (loss_t2i, neg_image, lse_t2i) = outputs
    return loss_i2t, loss_t2i, neg_text, neg_image, lse_i2t, lse_t2i


def _direction_grads(grad, rows, rows_m, cols, queue, ids: _Ids, params, stats, loss: _Loss, column_grad, transposed):
    """``(d rows, d batch columns or None, per-row d scale, per-row d bias or None)`` of one direction;
    ``stats = (lse, lse_m, pos_count)`` (lse None for the sigmoid loss).

    ``transposed = (lse, grad)`` of the other direction in CLIP mode (lse None: sigmoid): the row kernel then also
    serves the other direction's column gradient and no column kernel runs. Otherwise the column
    kernel runs when ``column_grad`` asks for the columns' gradient (online columns, alpha == 0).
    """
    local, dim = rows.shape
    batch = cols.shape[0]
    queue_size = 0 if queue is None else queue.shape[0]
    lse, lse_m, pos_count = stats
    lse = pos_count if lse is None else lse  # the sigmoid kernels read no lse: any (B,) buffer
    acc_dtype = _accumulator_dtype(rows)
    grad = grad.reshape(1).to(acc_dtype)
    lse_t, grad_t = lse, grad
    if transposed is not None:
        lse_t = lse if transposed[0] is None else transposed[0]
        grad_t = transposed[1].reshape(1).to(acc_dtype)
    arch, multiprocessors = target(rows.device)
    sizes = Sizes(local, batch, queue_size, dim)
    launch = bwd_rows_plan(arch, rows.dtype, sizes, multiprocessors=multiprocessors,
                           has_queue_ids=ids.queue is not None, distill=loss.alpha > 0,
                           transposed=transposed is not None, **loss.kwargs())  # fmt: skip
    splits = launch.grid[2]
    d_rows = torch.empty_like(rows)
    d_rows_split = torch.empty((splits, local, dim) if splits > 1 else 0, dtype=acc_dtype, device=rows.device)
    d_scale = torch.empty(splits * local, dtype=acc_dtype, device=rows.device)  # per (range, row): summed below
    d_bias = torch.empty_like(d_scale) if loss.sigmoid else d_scale
    launch(
        d_rows, d_rows_split, d_scale, d_bias,
        rows, rows if rows_m is None else rows_m, cols, cols if queue is None else queue,
        ids.rows, ids.columns, ids.columns if ids.queue is None else ids.queue, params, lse,
        lse if lse_m is None else lse_m, pos_count, grad, lse_t, grad_t, local, batch, queue_size, dim,
    )  # fmt: skip
    if splits > 1:
        d_rows = d_rows_split.sum(dim=0).to(rows.dtype)
    d_cols = None
    if column_grad and transposed is None:
        d_cols = torch.empty_like(cols)
        launch = bwd_cols_plan(arch, rows.dtype, sizes, **loss.kwargs())
        launch(d_cols, rows, cols, ids.rows, ids.columns, params, lse, pos_count, grad, local, batch, queue_size, dim)
    return d_rows, d_cols, d_scale, (d_bias if loss.sigmoid else None)


def itc_loss_bwd(
    d_loss_i2t,
    d_loss_t2i,
    image_rows,
    text_rows,
    image_columns,
    text_columns,
    scale,
    options,
    lse_i2t,
    lse_t2i,
    row_offset,
    clip,
    column_grads,
):
    """Launcher of the ITC contract: ``(d image_rows, d text_rows, d image_columns, d text_columns, d scale)``.

    A row kernel per direction. ``clip`` (whole batch, rows are the columns): each direction's row kernel also
    adds the other direction's gradient of its rows as columns, so two kernels serve the whole backward.
    Otherwise a column kernel per direction whose columns ``column_grads = (image, text)`` asks for (online
    columns, no distillation); the other column gradients are empty ``(0, d)`` tensors. The saved fp32
    log-sum-exps are used as they are, except with distillation (the momentum log-sum-exp is not saved) and for
    fp64 features (fp32 is too coarse for them): then one forward pass per direction rebuilds the row statistics.

    The sigmoid loss: no lse at all, the transposed term is the tile's own ``dlogits`` on batch columns, and
    ``d scale`` is ``(2,)``: (d scale, d bias).
    """
    local, dim = image_rows.shape
    ids = _Ids.of(options, row_offset, local, image_columns.shape[0], image_rows.device)
    acc_dtype = _accumulator_dtype(image_rows)
    params = _launch_params(scale, options, acc_dtype)
    pos_count = _positive_counts(ids).to(acc_dtype)
    loss = _Loss.of(options)
    directions = [d[:4] for d in _directions(image_rows, text_rows, image_columns, text_columns, options)]
    lses, lse_ms = [lse_i2t.to(acc_dtype).contiguous(), lse_t2i.to(acc_dtype).contiguous()], [None, None]
    if loss.sigmoid:
        lses = [None, None]
    elif options.alpha > 0 or image_rows.dtype == torch.float64:
        for index, direction in enumerate(directions):
            _, lses[index], lse_ms[index], _ = _direction_stats(
                *direction, ids, params, loss, None, 0, index, row_offset
            )
    grads = (d_loss_i2t, d_loss_t2i)
    results = []
    for index, direction in enumerate(directions):
        other = 1 - index  # the columns of i2t are the texts, of t2i the images
        transposed = (lses[other], grads[other]) if clip else None
        stats = (lses[index], lse_ms[index], pos_count)
        column_grad = column_grads[other] and not clip
        results.append(_direction_grads(grads[index], *direction, ids, params, stats, loss, column_grad, transposed))
    (d_image, d_text_columns, *scale_i2t), (d_text, d_image_columns, *scale_t2i) = results
    if d_image_columns is None:
        d_image_columns = image_columns.new_empty((0, dim))
    if d_text_columns is None:
        d_text_columns = text_columns.new_empty((0, dim))
    d_scale = scale_i2t[0].sum() + scale_t2i[0].sum()
    if loss.sigmoid:
        d_scale = torch.stack([d_scale, scale_i2t[1].sum() + scale_t2i[1].sum()])
    return d_image, d_text, d_image_columns, d_text_columns, d_scale.to(scale.dtype).reshape(scale.shape)


# ---------------------------------------------------------------------------------------------------------------------
# The gate (``python -m mome.kernels.aot --check``): the launches the launchers above make for real training setups,
# through the same plans. Every batch here compiles to the same kernels (all sizes divisible by 16); d = 256 holds
# the features whole on sm_90 (16-bit) and d = 512 / 768 slices them (BLOCK_D 64, BLOCK_DOUT 256), so they dedupe
# to two compiles per (mode, kernel, dtype) on sm_90 and one elsewhere.

GATE_WIDTHS = (256, 512, 768)
_MULTIPROCESSORS = dict(GATE_TARGETS)
GATE_BATCHES = (256, 16384, 65536)
GATE_QUEUE = 57600  # ALBEF's queue
_OFF = dict(smooth=False, sigmoid=False)
# (mode, queue, forward flags, row-backward flags, column backward flags or None); "gather": one rank's rows
GATE_MODES = {
    "clip": (0, dict(has_queue_ids=False, distill=False, mining=MINE_NONE, **_OFF),
             dict(has_queue_ids=False, distill=False, transposed=True, **_OFF), None),
    "clip_hardest": (0, dict(has_queue_ids=False, distill=False, mining=MINE_HARDEST, **_OFF),
                     dict(has_queue_ids=False, distill=False, transposed=True, **_OFF), None),
    "gather": (0, dict(has_queue_ids=False, distill=False, mining=MINE_NONE, **_OFF),
               dict(has_queue_ids=False, distill=False, transposed=False, **_OFF), _OFF),
    "albef": (GATE_QUEUE, dict(has_queue_ids=True, distill=True, mining=MINE_SAMPLE, **_OFF),
              dict(has_queue_ids=True, distill=True, transposed=False, **_OFF), None),
    "blip2_smooth": (0, dict(has_queue_ids=False, distill=False, mining=MINE_NONE, smooth=True, sigmoid=False),
                     dict(has_queue_ids=False, distill=False, transposed=False, smooth=True, sigmoid=False),
                     dict(smooth=True, sigmoid=False)),
    "siglip": (0, dict(has_queue_ids=False, distill=False, mining=MINE_NONE, smooth=False, sigmoid=True),
               dict(has_queue_ids=False, distill=False, transposed=True, smooth=False, sigmoid=True), None),
}  # fmt: skip
GATE_DTYPES = {
    (90, torch.bfloat16): tuple(GATE_MODES),
    (90, torch.float16): ("clip", "gather"),
    (90, torch.float32): ("clip",),
    (80, torch.bfloat16): ("clip", "albef"),
}


def _mode_launches(arch: int, dtype: torch.dtype, mode: str, batch: int, dim: int) -> list[tuple[str, Launch]]:
    queue, fwd, rows, cols = GATE_MODES[mode]
    local = batch // 8 if cols is not None else batch  # gathered: one of 8 ranks' rows
    sizes = Sizes(local, batch, queue, dim, row_offset=local)
    if mode == "clip":  # both directions in one pass
        launches = [("fwd both", fwd_both_plan(arch, dtype, Sizes(batch, batch, 0, dim),
                                               multiprocessors=_MULTIPROCESSORS[arch]))]  # fmt: skip
    else:
        launches = [("fwd", fwd_plan(arch, dtype, sizes, multiprocessors=_MULTIPROCESSORS[arch], **fwd))]
    launches.append(("bwd rows", bwd_rows_plan(arch, dtype, sizes, multiprocessors=_MULTIPROCESSORS[arch], **rows)))
    if cols is not None:
        launches.append(("bwd cols", bwd_cols_plan(arch, dtype, sizes, **cols)))
    return launches


def gate_cases() -> list[GateCase]:
    cases = []
    for (arch, dtype), modes in GATE_DTYPES.items():
        for mode in modes:
            for batch in GATE_BATCHES:
                for dim in GATE_WIDTHS:
                    for use, launch in _mode_launches(arch, dtype, mode, batch, dim):
                        cases.append(launch.gate_case(arch, dtype, f"{mode} B{batch} d{dim}: {use}"))
    return cases


def _aot_specs() -> list[AotSpec]:
    """The plain compile check (``python -m mome.kernels.aot``): every mode's kernels as sm_80 plans them, bf16;
    fp16 and fp32 CLIP."""
    launches = [launch for mode in GATE_MODES for _, launch in _mode_launches(80, torch.bfloat16, mode, 4096, 512)]
    for dtype in (torch.float16, torch.float32):
        launches += [launch for _, launch in _mode_launches(80, dtype, "gather", 4096, 512)]
    return list({launch.name: launch.spec() for launch in launches}.values())


AOT_SPECS = _aot_specs()
