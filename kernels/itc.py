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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mome.kernels._common import (
    TRITON_TYPE,
    accumulator_type,
    dot_precision,
    interpreting,
    padded_dim,
    pointer_type,
    widen_bf16_in_interpreter,
)
from mome.kernels.aot import AotSpec
from torch import Tensor

MINE_NONE, MINE_SAMPLE, MINE_HARDEST = 0, 1, 2
_MINING = {None: MINE_NONE, "sample": MINE_SAMPLE, "hardest": MINE_HARDEST}
# Launch shapes, the same as the AOT specs compile (GPU tuning pending: see benchmarks/NOTES-itc.md).
FWD_LAUNCH = {"num_warps": 8, "num_stages": 3}
BWD_LAUNCH = {"num_warps": 8, "num_stages": 2}


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
def _column_pointers(cols_ptr, queue_ptr, offs_n, B, D):
    """Row pointers of the columns ``[batch; queue]`` without concatenating them."""
    in_batch = offs_n < B
    return tl.where(in_batch, cols_ptr + offs_n.to(tl.int64) * D, queue_ptr + (offs_n - B).to(tl.int64) * D)


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
    row_loss_ptr, lse_ptr, lse_m_ptr, neg_idx_ptr,
    rows_ptr, rows_m_ptr, cols_ptr, queue_ptr, row_ids_ptr, ids_ptr, queue_ids_ptr, scale_ptr,
    M, B, Q, D, row_offset, seed, direction, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_QUEUE_IDS: tl.constexpr, DISTILL: tl.constexpr, MINING: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_M of the M rows; streams all B + Q columns once (and the momentum tile with it).

    The rows are global rows ``[row_offset, row_offset + M)`` of the batch the B columns belong to
    (the whole batch: M == B, row_offset == 0); the Gumbel noise is keyed by the global row index.
    """
    pid = tl.program_id(0)
    N = B + Q
    block_rows = tl.arange(0, BLOCK_M)
    offs_m = pid * BLOCK_M + block_rows
    block_start = (pid * BLOCK_M).to(tl.int64) * D  # element offset of this block's first row
    rows_block, rows_m_block = rows_ptr + block_start, rows_m_ptr + block_start
    row_valid = offs_m < M
    row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-2)
    scale = tl.load(scale_ptr).to(ACC)
    neg_inf = float("-inf")

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

    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        col_ptrs = _column_pointers(cols_ptr, queue_ptr, offs_n, B, D)
        raw = _similarity_tile(
            rows_block, block_rows, row_valid, col_ptrs, col_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N
        )
        logits = tl.where(col_valid[None, :], raw * scale, neg_inf)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        finite_logits = tl.where(col_valid[None, :], logits, 0.0)
        positive = _positive_tile(row_ids, ids_ptr, queue_ids_ptr, offs_n, B, N, HAS_QUEUE_IDS)
        pos_logits += tl.sum(tl.where(positive, finite_logits, 0.0), axis=1)
        pos_count += tl.sum(positive.to(ACC), axis=1)
        if DISTILL:
            raw_m = _similarity_tile(
                rows_m_block, block_rows, row_valid, col_ptrs, col_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N
            )
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

    lse = run_max + tl.log(run_sum)
    target_logits = pos_logits / tl.maximum(pos_count, 1.0)  # padding rows have none
    if DISTILL:
        target_logits = (1.0 - alpha) * target_logits + alpha * (m_dot / m_sum)
        tl.store(lse_m_ptr + offs_m, m_max + tl.log(m_sum), mask=row_valid)
    tl.store(row_loss_ptr + offs_m, lse - target_logits, mask=row_valid)
    tl.store(lse_ptr + offs_m, lse, mask=row_valid)
    if MINING != 0:
        best_idx = tl.where(undefined > 0, -1, best_idx)
        tl.store(neg_idx_ptr + offs_m, best_idx.to(tl.int64), mask=row_valid)


@triton.jit
def _itc_bwd_rows_kernel(
    d_rows_ptr, d_scale_ptr,
    rows_ptr, rows_m_ptr, cols_ptr, queue_ptr, row_ids_ptr, ids_ptr, queue_ids_ptr, scale_ptr, lse_ptr, lse_m_ptr,
    pos_count_ptr, grad_ptr, lse_t_ptr, grad_t_ptr, M, B, Q, D, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
    HAS_QUEUE_IDS: tl.constexpr, DISTILL: tl.constexpr, TRANSPOSED: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, HALF_RANGE: tl.constexpr,
):  # fmt: skip
    """Program (row block, feature slice): ``d rows[:, slice] = scale · Σ_j dlogits[:, j] · columns[j, slice]``.

    Logits are recomputed over the full feature dimension; the slice keeps the accumulator
    at BLOCK_M × BLOCK_DOUT. The first slice also writes each row's part of ``d scale``.
    TRANSPOSED (CLIP mode: both sides online, so the other direction's batch logits are this
    tile transposed): the other direction's ``dlogits[j, i]`` (its lse ``lse_t``, gradient
    ``grad_t``) is added for batch columns, which gives these rows their gradient as the other
    direction's columns in the same pass; ``d scale`` counts only this direction's term (then M == B).
    The loss is the mean over the M rows: ``grad / M``.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    N = B + Q
    block_rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + block_rows
    block_start = (pid_m * BLOCK_M).to(tl.int64) * D  # element offset of this block's first row
    rows_block, rows_m_block = rows_ptr + block_start, rows_m_ptr + block_start
    row_valid = offs_m < M
    offs_out = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_valid = offs_out < D
    row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-2)
    scale = tl.load(scale_ptr).to(ACC)
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
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        col_ptrs = _column_pointers(cols_ptr, queue_ptr, offs_n, B, D)
        raw = _similarity_tile(
            rows_block, block_rows, row_valid, col_ptrs, col_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N
        )
        positive = _positive_tile(row_ids, ids_ptr, queue_ids_ptr, offs_n, B, N, HAS_QUEUE_IDS)
        target = tl.where(positive, 1.0 / pos_count[:, None], 0.0)
        if DISTILL:
            raw_m = _similarity_tile(
                rows_m_block, block_rows, row_valid, col_ptrs, col_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_M, BLOCK_N
            )
            target = (1.0 - alpha) * target + alpha * tl.exp(raw_m * scale - lse_m[:, None])
        prob = tl.exp(raw * scale - lse[:, None])
        keep = row_valid[:, None] & col_valid[None, :]
        d_logits = tl.where(keep, prob - target, 0.0)
        d_scale += tl.sum(d_logits * raw, axis=1)
        d_logits = d_logits * (grad / grad_norm)
        if TRANSPOSED:
            in_batch = offs_n < B
            lse_t = tl.load(lse_t_ptr + offs_n, mask=in_batch, other=0.0).to(ACC)
            pos_count_t = tl.load(pos_count_ptr + offs_n, mask=in_batch, other=1.0).to(ACC)
            target_t = tl.where(positive, 1.0 / pos_count_t[None, :], 0.0)  # ids agree: positives are symmetric
            prob_t = tl.exp(raw * scale - lse_t[None, :])
            d_logits += tl.where(keep & in_batch[None, :], prob_t - target_t, 0.0) * (grad_t / grad_norm)
        cols = tl.load(col_ptrs[:, None] + offs_out[None, :], mask=col_valid[:, None] & out_valid[None, :], other=0.0)
        cols = widen_bf16_in_interpreter(cols)
        d_rows += tl.dot((d_logits * HALF_RANGE).to(cols.dtype), cols, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = d_rows_ptr + offs_m[:, None].to(tl.int64) * D + offs_out[None, :]
    tl.store(
        out_ptrs,
        (d_rows * (scale * grad_norm / HALF_RANGE)).to(d_rows_ptr.dtype.element_ty),
        mask=row_valid[:, None] & out_valid[None, :],
    )
    if pid_d == 0:
        tl.store(d_scale_ptr + offs_m, d_scale * grad, mask=row_valid)


@triton.jit
def _itc_bwd_cols_kernel(
    d_cols_ptr,
    rows_ptr, cols_ptr, row_ids_ptr, ids_ptr, scale_ptr, lse_ptr, pos_count_ptr, grad_ptr, M, B, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, HALF_RANGE: tl.constexpr,
):  # fmt: skip
    """Program (batch-column block, feature slice): ``d cols[j, slice] = scale · Σ_i dlogits[i, j] · rows[i, slice]``.

    Only for online columns, where the target is the hard one (no distillation). Tiles
    are the transposed logits: BLOCK_N columns against BLOCK_M rows at a time. The M rows
    (ids, lse and positive counts per row) may be a slice of the batch the B columns are.
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
    scale = tl.load(scale_ptr).to(ACC)
    grad = tl.load(grad_ptr).to(ACC) / M
    d_cols = tl.zeros((BLOCK_N, BLOCK_DOUT), ACC)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_valid = offs_m < M
        row_ptrs = rows_ptr + offs_m.to(tl.int64) * D
        raw = _similarity_tile(  # [BLOCK_N columns, BLOCK_M rows]
            cols_block, block_cols, col_valid, row_ptrs, row_valid, D, BLOCK_D, ACC, PRECISION, BLOCK_N, BLOCK_M
        )
        lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=0.0).to(ACC)
        pos_count = tl.load(pos_count_ptr + offs_m, mask=row_valid, other=1.0).to(ACC)
        row_ids = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=-3)
        target = tl.where(col_ids[:, None] == row_ids[None, :], 1.0 / pos_count[None, :], 0.0)
        prob = tl.exp(raw * scale - lse[None, :])
        keep = col_valid[:, None] & row_valid[None, :]
        d_logits = tl.where(keep, prob - target, 0.0)
        rows = tl.load(row_ptrs[:, None] + offs_out[None, :], mask=row_valid[:, None] & out_valid[None, :], other=0.0)
        rows = widen_bf16_in_interpreter(rows)
        d_cols += tl.dot((d_logits * HALF_RANGE).to(rows.dtype), rows, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = d_cols_ptr + offs_n[:, None].to(tl.int64) * D + offs_out[None, :]
    tl.store(
        out_ptrs,
        (d_cols * (scale * grad / HALF_RANGE)).to(d_cols_ptr.dtype.element_ty),
        mask=col_valid[:, None] & out_valid[None, :],
    )


# GPU tiles per kernel, chosen from the sm_80/sm_90 compiles (no GPU has run these yet): a
# streamed tile of 32 and a 32-row stationary block in the backward keep the register spills
# near zero (per-thread stack 0-128 B; 64-wide tiles spilled 250-2700 B). Tune on a GPU.
GPU_TILES = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "bwd_rows": {"BLOCK_M": 32, "BLOCK_N": 32},
    "bwd_cols": {"BLOCK_M": 32, "BLOCK_N": 32},  # BLOCK_N columns stay, BLOCK_M rows stream
}
# The backward's feature slice (BLOCK_DOUT) for wide features: one program per slice on the grid's second axis.
FEATURE_SLICE = 128 if interpreting() else 256
MAX_GRID_Y = 65535
MAX_INT32 = 2**31 - 1  # rows, columns and their indices are int32 in the kernels

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
}


def _block_sizes(dim: int, kernel: str) -> dict[str, int]:
    """Tile sizes: small under the interpreter (cost grows with tile steps), tensor-core sized on a GPU."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_DOUT": FEATURE_SLICE}
    width = padded_dim(dim)
    return {**GPU_TILES[kernel], "BLOCK_D": min(64, width), "BLOCK_DOUT": min(FEATURE_SLICE, width)}


def _dot_precision(dtype: torch.dtype) -> str:
    """The shared policy (``dot_precision``: TF32 for fp32 when torch allows it), except that fp32 otherwise takes
    IEEE dots, not three TF32 passes: at these tiles tf32x3 spills 280-736 B of stack per thread on sm_90 (IEEE:
    16-88 B; see benchmarks/NOTES-itc.md). To revisit with GPU timings."""
    precision = dot_precision(dtype)
    return "ieee" if precision == "tf32x3" else precision


def _numerics(features: Tensor) -> dict[str, object]:
    """Accumulate in fp32 (fp64 for fp64 features); the dots' input precision from ``_dot_precision``."""
    return {"ACC": accumulator_type(features.dtype), "PRECISION": _dot_precision(features.dtype)}


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
    """(rows, momentum rows, batch columns, queue) for i2t and t2i."""
    return (
        (image_rows, options.image_feats_m, text_columns, options.text_queue),
        (text_rows, options.text_feats_m, image_columns, options.image_queue),
    )


def _direction_stats(rows, rows_m, cols, queue, ids: _Ids, scale, alpha, mining, seed, direction, row_offset):
    """Forward of one direction: per-row loss, lse, momentum lse (or None) and picked negatives (or empty)."""
    local, dim = rows.shape
    acc_dtype = _accumulator_dtype(rows)
    distill = alpha > 0
    row_loss = torch.empty(local, dtype=acc_dtype, device=rows.device)
    lse = torch.empty_like(row_loss)
    lse_m = torch.empty_like(row_loss) if distill else row_loss
    neg_idx = torch.empty(local if mining else 0, dtype=torch.int64, device=rows.device)
    blocks = _block_sizes(dim, "fwd")
    grid = (triton.cdiv(local, blocks["BLOCK_M"]),)
    _itc_fwd_kernel[grid](
        row_loss, lse, lse_m, neg_idx if mining else row_loss,
        rows, rows if rows_m is None else rows_m, cols, cols if queue is None else queue,
        ids.rows, ids.columns, ids.columns if ids.queue is None else ids.queue, scale,
        local, cols.shape[0], 0 if queue is None else queue.shape[0], dim, row_offset, seed, direction, float(alpha),
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
        HAS_QUEUE_IDS=ids.queue is not None, DISTILL=distill, MINING=_MINING[mining],
        **_numerics(rows), **FWD_LAUNCH,
    )  # fmt: skip
    return row_loss, lse, (lse_m if distill else None), neg_idx


def itc_loss_fwd(image_rows, text_rows, image_columns, text_columns, scale, options, row_offset, hard_negatives, seed):
    """Launcher of the ITC contract (``ITCBackend`` of the ops layer): ``(loss_i2t, loss_t2i, neg_text, neg_image,
    lse_i2t, lse_t2i)``, the losses means over the rows, the picks indices into the B batch columns."""
    ids = _Ids.of(options, row_offset, image_rows.shape[0], image_columns.shape[0], image_rows.device)
    scale = scale.reshape(1).to(_accumulator_dtype(image_rows))
    directions = _directions(image_rows, text_rows, image_columns, text_columns, options)
    (loss_i2t, lse_i2t, _, neg_text), (loss_t2i, lse_t2i, _, neg_image) = (
        _direction_stats(*direction, ids, scale, options.alpha, hard_negatives, seed, index, row_offset)
        for index, direction in enumerate(directions)
    )
    return loss_i2t.mean(), loss_t2i.mean(), neg_text, neg_image, lse_i2t.float(), lse_t2i.float()


def _direction_grads(grad, rows, rows_m, cols, queue, ids: _Ids, scale, stats, alpha, column_grad, transposed):
    """``(d rows, d batch columns or None, per-row d scale)`` of one direction; ``stats = (lse, lse_m, pos_count)``.

    ``transposed = (lse, grad)`` of the other direction in CLIP mode: the row kernel then also
    serves the other direction's column gradient and no column kernel runs. Otherwise the column
    kernel runs when ``column_grad`` asks for the columns' gradient (online columns, alpha == 0).
    """
    local, dim = rows.shape
    batch = cols.shape[0]
    lse, lse_m, pos_count = stats
    blocks = _block_sizes(dim, "bwd_rows")
    # fp16 would flush small softmax differences to zero: scale them up before the cast, back after the dot.
    numerics = dict(_numerics(rows), HALF_RANGE=1024.0 if rows.dtype == torch.float16 else 1.0)
    acc_dtype = _accumulator_dtype(rows)
    grad = grad.reshape(1).to(acc_dtype)
    lse_t, grad_t = (lse, grad) if transposed is None else (transposed[0], transposed[1].reshape(1).to(acc_dtype))
    d_rows = torch.empty_like(rows)
    d_scale = torch.empty(local, dtype=acc_dtype, device=rows.device)
    grid = (triton.cdiv(local, blocks["BLOCK_M"]), triton.cdiv(dim, blocks["BLOCK_DOUT"]))
    _itc_bwd_rows_kernel[grid](
        d_rows, d_scale,
        rows, rows if rows_m is None else rows_m, cols, cols if queue is None else queue,
        ids.rows, ids.columns, ids.columns if ids.queue is None else ids.queue, scale, lse,
        lse if lse_m is None else lse_m, pos_count, grad, lse_t, grad_t,
        local, batch, 0 if queue is None else queue.shape[0], dim, float(alpha),
        **blocks, HAS_QUEUE_IDS=ids.queue is not None, DISTILL=alpha > 0, TRANSPOSED=transposed is not None,
        **numerics, **BWD_LAUNCH,
    )  # fmt: skip
    d_cols = None
    if column_grad and transposed is None:
        d_cols = torch.empty_like(cols)
        blocks = _block_sizes(dim, "bwd_cols")
        grid = (triton.cdiv(batch, blocks["BLOCK_N"]), triton.cdiv(dim, blocks["BLOCK_DOUT"]))
        _itc_bwd_cols_kernel[grid](
            d_cols, rows, cols, ids.rows, ids.columns, scale, lse, pos_count, grad, local, batch, dim,
            **blocks, **numerics, **BWD_LAUNCH,
        )  # fmt: skip
    return d_rows, d_cols, d_scale


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
    """
    local, dim = image_rows.shape
    ids = _Ids.of(options, row_offset, local, image_columns.shape[0], image_rows.device)
    acc_dtype = _accumulator_dtype(image_rows)
    scale_vec = scale.reshape(1).to(acc_dtype)
    pos_count = _positive_counts(ids).to(acc_dtype)
    directions = _directions(image_rows, text_rows, image_columns, text_columns, options)
    lses, lse_ms = [lse_i2t.to(acc_dtype).contiguous(), lse_t2i.to(acc_dtype).contiguous()], [None, None]
    if options.alpha > 0 or image_rows.dtype == torch.float64:
        for index, direction in enumerate(directions):
            _, lses[index], lse_ms[index], _ = _direction_stats(
                *direction, ids, scale_vec, options.alpha, None, 0, index, row_offset
            )
    grads = (d_loss_i2t, d_loss_t2i)
    results = []
    for index, direction in enumerate(directions):
        other = 1 - index  # the columns of i2t are the texts, of t2i the images
        transposed = (lses[other], grads[other]) if clip else None
        stats = (lses[index], lse_ms[index], pos_count)
        column_grad = column_grads[other]
        results.append(
            _direction_grads(grads[index], *direction, ids, scale_vec, stats, options.alpha, column_grad, transposed)
        )
    (d_image, d_text_columns, d_scale_i2t), (d_text, d_image_columns, d_scale_t2i) = results
    if d_image_columns is None:
        d_image_columns = image_columns.new_empty((0, dim))
    if d_text_columns is None:
        d_text_columns = text_columns.new_empty((0, dim))
    d_scale = (d_scale_i2t.sum() + d_scale_t2i.sum()).to(scale.dtype).reshape(scale.shape)
    return d_image, d_text, d_image_columns, d_text_columns, d_scale


def _aot_specs() -> list[AotSpec]:
    """Each kernel for fp16/bf16/fp32 features and its main constexpr variants, at the GPU tile sizes."""
    specs = []
    blocks = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}  # every kernel takes these three; values per kernel below
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name, features, acc = TRITON_TYPE[dtype], pointer_type(dtype), pointer_type(torch.float32)
        numerics = {"ACC": accumulator_type(dtype), "PRECISION": _dot_precision(dtype)}
        fwd_sig = {
            **dict.fromkeys(("row_loss_ptr", "lse_ptr", "lse_m_ptr"), acc),
            "neg_idx_ptr": "*i64",
            **dict.fromkeys(("rows_ptr", "rows_m_ptr", "cols_ptr", "queue_ptr"), features),
            **dict.fromkeys(("row_ids_ptr", "ids_ptr", "queue_ids_ptr"), "*i64"),
            "scale_ptr": acc,
            **dict.fromkeys(("M", "B", "Q", "D", "row_offset"), "i32"),
            "seed": "i64",
            "direction": "i32",
            "alpha": "fp32",
            **dict.fromkeys((*blocks, "HAS_QUEUE_IDS", "DISTILL", "MINING", *numerics), "constexpr"),
        }
        variants = (
            ("clip", {"HAS_QUEUE_IDS": False, "DISTILL": False, "MINING": MINE_NONE}),
            ("albef_sample", {"HAS_QUEUE_IDS": True, "DISTILL": True, "MINING": MINE_SAMPLE}),  # hardest: a subset
        )
        for variant, flags in variants:
            constexprs = {**blocks, **GPU_TILES["fwd"], **flags, **numerics}
            specs.append(AotSpec(f"itc_fwd_{variant}_{name}", _itc_fwd_kernel, fwd_sig, constexprs, **FWD_LAUNCH))
        bwd_numerics = {**numerics, "HALF_RANGE": 1024.0 if dtype == torch.float16 else 1.0}
        rows_sig = {
            "d_rows_ptr": features,
            "d_scale_ptr": acc,
            **dict.fromkeys(("rows_ptr", "rows_m_ptr", "cols_ptr", "queue_ptr"), features),
            **dict.fromkeys(("row_ids_ptr", "ids_ptr", "queue_ids_ptr"), "*i64"),
            **dict.fromkeys(("scale_ptr", "lse_ptr", "lse_m_ptr", "pos_count_ptr", "grad_ptr"), acc),
            **dict.fromkeys(("lse_t_ptr", "grad_t_ptr"), acc),
            **dict.fromkeys(("M", "B", "Q", "D"), "i32"),
            "alpha": "fp32",
            **dict.fromkeys(
                (*blocks, "BLOCK_DOUT", "HAS_QUEUE_IDS", "DISTILL", "TRANSPOSED", *bwd_numerics), "constexpr"
            ),
        }
        # clip: whole batch, rows serve as columns too; albef: distillation; local: a slice of rows (gather=True)
        for variant, distill, transposed in (("clip", False, True), ("albef", True, False), ("local", False, False)):
            flags = {"HAS_QUEUE_IDS": distill, "DISTILL": distill, "TRANSPOSED": transposed}
            constexprs = {**blocks, **GPU_TILES["bwd_rows"], "BLOCK_DOUT": 256, **flags, **bwd_numerics}
            specs.append(
                AotSpec(f"itc_bwd_rows_{variant}_{name}", _itc_bwd_rows_kernel, rows_sig, constexprs, **BWD_LAUNCH)
            )
        cols_sig = {
            "d_cols_ptr": features,
            **dict.fromkeys(("rows_ptr", "cols_ptr"), features),
            **dict.fromkeys(("row_ids_ptr", "ids_ptr"), "*i64"),
            **dict.fromkeys(("scale_ptr", "lse_ptr", "pos_count_ptr", "grad_ptr"), acc),
            **dict.fromkeys(("M", "B", "D"), "i32"),
            **dict.fromkeys((*blocks, "BLOCK_DOUT", *bwd_numerics), "constexpr"),
        }
        constexprs = {**blocks, **GPU_TILES["bwd_cols"], "BLOCK_DOUT": 256, **bwd_numerics}
        specs.append(AotSpec(f"itc_bwd_cols_{name}", _itc_bwd_cols_kernel, cols_sig, constexprs, **BWD_LAUNCH))
    return specs


AOT_SPECS = _aot_specs()
