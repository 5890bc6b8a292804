"""Multiway LayerNorm: LayerNorm over the last dim with gamma/beta chosen per token by its modality id.

Forward: each program normalises BLOCK_M whole rows (D fits in one BLOCK_D tile),
statistics in fp32, gamma/beta rows gathered by ``modality[t]``; saves mean and
rstd (fp32) for backward. Moves ``2·T·D`` elements plus ``E·D`` parameters.

Backward: the same row tiling gives ``dx`` row by row; ``dgamma``/``dbeta`` are
accumulated per expert in registers (``E_PAD x BLOCK_D``) over a group of rows per
program and written as fp32 partial sums ``(groups, E, D)`` that the launcher
adds up: deterministic, no atomics. Moves ``3·T·D`` elements. The accumulators bound ``E x D`` (``MAX_PARAMS``).

Every loaded tile goes through ``widen_bf16_in_interpreter`` (bf16 arithmetic is wrong in the interpreter). The
launchers of the backend contract are in ``mome.kernels.modality``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mome.kernels._common import TRITON_TYPE, interpreting, multiprocessors, narrow, pointer_type
from mome.kernels._common import widen_bf16_in_interpreter as widen
from mome.kernels._plan import GATE_TARGETS, Launch, divisible_by_16, target
from mome.kernels.aot import GateCase
from torch import Tensor

MAX_ROW = 65536  # a whole row is one tile
# E x D of the gamma table: the backward holds two (padded E, padded D) fp32 accumulators per program, and a Triton
# tensor has at most 2**20 elements; padding at most doubles each side.
MAX_PARAMS = 2**18


@triton.jit
def _modality_layer_norm_fwd_kernel(
    y,  # [T, D]
    mean_out,  # [T] fp32
    rstd_out,  # [T] fp32
    x,  # [T, D]
    modality,  # [T] int64
    weight,  # [E, D]
    bias,  # [E, D]
    T,
    D,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < T
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    values = widen(tl.load(x + offsets, mask=mask, other=0.0)).to(tl.float32)
    mean = tl.sum(values, axis=1) / D
    centered = tl.where(mask, values - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    expert = tl.load(modality + rows, mask=row_mask, other=0)
    param_offsets = expert[:, None] * D + cols[None, :]
    out = centered * rstd[:, None] * widen(tl.load(weight + param_offsets, mask=mask, other=0.0)).to(tl.float32)
    if HAS_BIAS:
        out += widen(tl.load(bias + param_offsets, mask=mask, other=0.0)).to(tl.float32)
    tl.store(y + offsets, narrow(out, y.dtype.element_ty), mask=mask)
    tl.store(mean_out + rows, mean, mask=row_mask)
    tl.store(rstd_out + rows, rstd, mask=row_mask)


@triton.jit
def _modality_layer_norm_bwd_kernel(
    dx,  # [T, D]
    dweight_partial,  # [groups, NUM_EXPERTS, D] fp32
    dbias_partial,  # [groups, NUM_EXPERTS, D] fp32
    dy,  # [T, D]
    x,  # [T, D]
    modality,  # [T] int64
    weight,  # [E, D]
    mean,  # [T] fp32
    rstd,  # [T] fp32
    T,
    D,
    rows_per_group,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    experts = tl.arange(0, EXPERTS_PAD)
    dweight_acc = tl.zeros((EXPERTS_PAD, BLOCK_D), dtype=tl.float32)
    dbias_acc = tl.zeros((EXPERTS_PAD, BLOCK_D), dtype=tl.float32)
    group_start = group * rows_per_group
    group_end = tl.minimum(group_start + rows_per_group, T)
    for row0 in range(group_start, group_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < group_end
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        values = widen(tl.load(x + offsets, mask=mask, other=0.0)).to(tl.float32)
        grad = widen(tl.load(dy + offsets, mask=mask, other=0.0)).to(tl.float32)
        row_mean = tl.load(mean + rows, mask=row_mask, other=0.0)
        row_rstd = tl.load(rstd + rows, mask=row_mask, other=0.0)
        expert = tl.load(modality + rows, mask=row_mask, other=-1).to(tl.int32)
        gamma = widen(tl.load(weight + expert[:, None] * D + cols[None, :], mask=mask, other=0.0)).to(tl.float32)
        normed = tl.where(mask, (values - row_mean[:, None]) * row_rstd[:, None], 0.0)
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma
        scaled = grad * gamma
        mean_scaled = tl.sum(scaled, axis=1) / D
        mean_scaled_normed = tl.sum(scaled * normed, axis=1) / D
        grad_x = row_rstd[:, None] * (scaled - mean_scaled[:, None] - normed * mean_scaled_normed[:, None])
        tl.store(dx + offsets, narrow(grad_x, dx.dtype.element_ty), mask=mask)
        grad_normed = grad * normed
        for e in tl.static_range(NUM_EXPERTS):
            mine = (expert == e)[:, None]
            dweight_acc += tl.where(
                experts[:, None] == e, tl.sum(tl.where(mine, grad_normed, 0.0), axis=0)[None, :], 0.0
            )
            if HAS_BIAS:
                dbias_acc += tl.where(experts[:, None] == e, tl.sum(tl.where(mine, grad, 0.0), axis=0)[None, :], 0.0)
    partial_offsets = (group * NUM_EXPERTS + experts[:, None]) * D + cols[None, :]
    partial_mask = (experts[:, None] < NUM_EXPERTS) & col_mask[None, :]
    tl.store(dweight_partial + partial_offsets, dweight_acc, mask=partial_mask)
    if HAS_BIAS:
        tl.store(dbias_partial + partial_offsets, dbias_acc, mask=partial_mask)


def _row_tiling(d: int, *, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): whole rows per tile, 4K elements per program forward; backward holds ~6 such
    tiles and two (E_PAD, BLOCK_D) accumulators, so half the rows and twice the warps."""
    block_d = triton.next_power_of_2(d)
    elements = 2048 if backward else 4096
    block_m = max(1, min(16, elements // block_d))
    num_warps = min(16, max(4, block_d * block_m // (256 if backward else 1024)))
    return block_m, block_d, num_warps


def norm_fwd_plan(arch: int, dtype: torch.dtype, tokens: int, d: int, has_bias: bool) -> Launch:
    """The forward launch; the same tiles on every architecture (no products: it streams rows at bandwidth)."""
    block_m, block_d, num_warps = _row_tiling(d)
    pointer = pointer_type(dtype)
    signature = {"y": pointer, "mean_out": "*fp32", "rstd_out": "*fp32", "x": pointer, "modality": "*i64",
                 "weight": pointer, "bias": pointer, "T": "i32", "D": "i32", "eps": "fp32"}  # fmt: skip
    return Launch(f"modality_layer_norm_fwd_D{d}_{TRITON_TYPE[dtype]}", _modality_layer_norm_fwd_kernel,
                  (triton.cdiv(tokens, block_m),), signature, dict(HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_D=block_d),
                  num_warps, divisible_by_16=divisible_by_16(T=tokens, D=d))  # fmt: skip


def norm_bwd_plan(arch: int, dtype: torch.dtype, tokens: int, d: int, num_experts: int, has_bias: bool,
                  max_groups: int) -> tuple[Launch, int]:  # fmt: skip
    """The backward launch and its rows per program: at most ``max_groups`` programs (2 per SM), each a whole
    number of row tiles."""
    block_m, block_d, num_warps = _row_tiling(d, backward=True)
    groups = max(1, min(max_groups, triton.cdiv(tokens, block_m)))
    rows_per_group = max(1, triton.cdiv(triton.cdiv(tokens, groups), block_m)) * block_m
    groups = max(1, triton.cdiv(tokens, rows_per_group))
    pointer = pointer_type(dtype)
    signature = {"dx": pointer, "dweight_partial": "*fp32", "dbias_partial": "*fp32", "dy": pointer, "x": pointer,
                 "modality": "*i64", "weight": pointer, "mean": "*fp32", "rstd": "*fp32", "T": "i32", "D": "i32",
                 "rows_per_group": "i32"}  # fmt: skip
    constexprs = dict(NUM_EXPERTS=num_experts, EXPERTS_PAD=triton.next_power_of_2(num_experts), HAS_BIAS=has_bias,
                      BLOCK_M=block_m, BLOCK_D=block_d)  # fmt: skip
    launch = Launch(f"modality_layer_norm_bwd_D{d}_E{num_experts}_{TRITON_TYPE[dtype]}",
                    _modality_layer_norm_bwd_kernel, (groups,), signature, constexprs, num_warps,
                    divisible_by_16=divisible_by_16(T=tokens, D=d, rows_per_group=rows_per_group))  # fmt: skip
    return launch, rows_per_group


def layer_norm_forward(x: Tensor, modality: Tensor, weight: Tensor, bias: Tensor | None, eps: float):
    """``(y, mean, rstd)``: y in x's dtype, the statistics fp32. x ``(T, D)`` with ``1 <= D <= MAX_ROW``."""
    tokens, d = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(tokens, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if tokens == 0:
        return y, mean, rstd
    launch = norm_fwd_plan(target(x.device)[0], x.dtype, tokens, d, bias is not None)
    launch(y, mean, rstd, x, modality, weight, weight if bias is None else bias, tokens, d, eps)
    return y, mean, rstd


def layer_norm_backward(dy, x, modality, weight, bias, mean, rstd):
    """``(dx, dweight, dbias)`` (dbias None without a bias); an expert without tokens gets zero gradients."""
    tokens, d = x.shape
    num_experts = weight.shape[0]
    dx = torch.empty_like(x)
    max_groups = 16 if interpreting() else 2 * multiprocessors(x.device)
    launch, rows_per_group = norm_bwd_plan(
        target(x.device)[0], x.dtype, tokens, d, num_experts, bias is not None, max_groups
    )
    groups = launch.grid[0]
    partial = torch.empty(2 if bias is not None else 1, groups, num_experts, d, dtype=torch.float32, device=x.device)
    if tokens == 0:
        partial.zero_()
    else:
        launch(dx, partial[0], partial[-1], dy, x, modality, weight, mean, rstd, tokens, d, rows_per_group)
    dweight = partial[0].sum(dim=0).to(weight.dtype)
    dbias = partial[1].sum(dim=0).to(weight.dtype) if bias is not None else None
    return dx, dweight, dbias


# --- the gate (python -m mome.kernels.aot --check) and the plain compile check: BEiT-3 / VLMo base and large ---

GATE_WIDTHS = (768, 1024)
GATE_TOKENS = (32 * 261, 256 * 261)  # 32-256 images of 197 tokens, each with 64 text tokens


def gate_cases() -> list[GateCase]:
    """Forward and backward with 3 experts (vision, language, vision-language); no products, so only the spill rule
    bites. The backward's grid (2 programs per SM) changes only its runtime rows per program."""
    cases = []
    for arch, sms in GATE_TARGETS:
        for dtype in (torch.bfloat16, torch.float32) if arch == 90 else (torch.bfloat16,):
            for d in GATE_WIDTHS:
                for tokens in GATE_TOKENS:
                    use = f"D{d}, {tokens} tokens"
                    cases.append(norm_fwd_plan(arch, dtype, tokens, d, True).gate_case(arch, dtype, use))
                    launch, _ = norm_bwd_plan(arch, dtype, tokens, d, 3, True, 2 * sms)
                    cases.append(launch.gate_case(arch, dtype, use))
    return cases


AOT_SPECS = [
    spec
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for d in GATE_WIDTHS
    for spec in (
        norm_fwd_plan(80, dtype, 8352, d, True).spec(),
        norm_bwd_plan(80, dtype, 8352, d, 3, True, 216)[0].spec(),
    )
]
