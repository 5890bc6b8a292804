"""Grouped GEMM for per-modality expert linears: ``y[t] = act(x[t] @ W[e].T + b[e])``, ``e = modality[t]``.

Tokens stay in their original order in memory. Routing (``mome::modality_routing``, computed once per op call
by the ops layer and handed in as ``perm`` and ``offsets``) gives the stable expert-sorted order; each
program owns a tile of BLOCK_M sorted rows of one expert, *gathers* those rows of its input through ``perm`` and
*scatters* its output rows back through ``perm``, so no permuted copy of any activation is ever written. The tile
schedule (which expert a row tile belongs to) is derived inside the kernel from ``offsets``: the grid is sized by
the upper bound ``cdiv(T, BLOCK_M) + E - 1`` and programs past the last tile exit at once.
With one expert there is no routing at all (a plain GEMM; ``perm`` and ``offsets`` are not read).

Backward: ``dX`` is the same kernel with ``W[e]`` untransposed, the activation's
derivative applied to ``dY`` as it is loaded (from the saved pre-activation);
``dW[e] = dPreᵀ · X_e`` and ``db[e] = Σ dPre`` come from one kernel per
(expert, Dout tile, Din tile) looping over that expert's rows.

FFN (``modality_ffn_fwd`` / ``_bwd``): one routing for all GEMMs of a pass; the first GEMM writes only its
pre-activation and the second applies the activation as it loads it, so the hidden layer is never stored.

Accumulation is fp32; the dot precision of fp32 inputs follows ``mome.kernels._common.dot_precision``. Under the
Triton interpreter every loaded tile goes through ``widen_bf16_in_interpreter`` (bf16 arithmetic is wrong there).
The launchers of the backend contract are in ``mome.kernels.modality``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from mome.kernels._common import SIXTEEN_BIT, TRITON_TYPE, dot_precision, interpreting, narrow, padded_dim, pointer_type
from mome.kernels._common import widen_bf16_in_interpreter as widen
from mome.kernels._plan import Launch, divisible_by_16, install_allocator, target
from mome.kernels.aot import AotSpec
from torch import Tensor

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # tanh from exp (no libdevice, so it also runs in the interpreter); saturates cleanly at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _activation(u, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return 0.5 * u * (1.0 + tl.erf(u * _SQRT_HALF))
    elif ACTIVATION == 2:
        return 0.5 * u * (1.0 + _tanh(_SQRT_2_OVER_PI * (u + _TANH_CUBIC * u * u * u)))
    elif ACTIVATION == 3:
        return tl.maximum(u, 0.0)
    else:
        return u


@triton.jit
def _activation_grad(u, ACTIVATION: tl.constexpr):
    """d act(u) / du, matching torch's gelu / gelu(approximate="tanh") / relu backward."""
    if ACTIVATION == 1:
        return 0.5 * (1.0 + tl.erf(u * _SQRT_HALF)) + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)
    elif ACTIVATION == 2:
        t = _tanh(_SQRT_2_OVER_PI * (u + _TANH_CUBIC * u * u * u))
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * u * u)
    elif ACTIVATION == 3:
        return tl.where(u > 0.0, 1.0, 0.0)
    else:
        return tl.full(u.shape, 1.0, tl.float32)


@triton.jit
def _expert_rows(offsets, pid_m, T, NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, end of the expert's rows) of row tile ``pid_m``; expert == NUM_EXPERTS: no tile."""
    experts = tl.arange(0, EXPERTS_PAD)
    starts = tl.load(offsets + experts, mask=experts < NUM_EXPERTS, other=T)
    ends = tl.load(offsets + experts + 1, mask=experts < NUM_EXPERTS, other=T)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)  # experts whose tiles all come before this one
    this = experts == expert
    first_tile = tl.sum(tl.where(this, tiles_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(this, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return expert, row_start, row_end


@triton.jit
def _grouped_gemm_kernel(
    out,  # [T, N] rows in original token order
    pre_out,  # [T, N] pre-activation (written when SAVE_PRE)
    a,  # [T, K] rows in original token order (act(a) is used when A_ACTIVATION)
    a_pre,  # [T, K] pre-activation of a's forward (read when GRAD_ACTIVATION: a is then dY)
    b,  # [E, N, K] when B_TRANSPOSED (forward: W), else [E, K, N] (dX: W untransposed)
    bias,  # [E, N]
    perm,  # [T] int32 sorted row -> token
    offsets,  # [E + 1] int32
    T,
    N,
    K,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    A_ACTIVATION: tl.constexpr,
    GRAD_ACTIVATION: tl.constexpr,
    EPILOGUE_HALVES: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if NUM_EXPERTS == 1:
        expert = pid_m * 0  # a tensor, like the routed branch's
        row_start = pid_m * BLOCK_M
        row_end = T
    else:
        expert, row_start, row_end = _expert_rows(offsets, pid_m, T, NUM_EXPERTS, EXPERTS_PAD, BLOCK_M)
        if expert >= NUM_EXPERTS:
            return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if NUM_EXPERTS == 1:
        tokens = rows.to(tl.int64)
    else:
        tokens = tl.load(perm + rows, mask=row_mask, other=0).to(tl.int64)  # the gather
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    b_expert = b + expert.to(tl.int64) * N * K
    if USE_TMA:  # the weight tiles by TMA (sm_90); out-of-range rows and columns load as zeros
        if B_TRANSPOSED:
            b_desc = tl.make_tensor_descriptor(b_expert, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_expert, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a_offsets = tokens[:, None] * K + k[None, :]
        a_mask = row_mask[:, None] & (k[None, :] < K)
        a_tile = widen(tl.load(a + a_offsets, mask=a_mask, other=0.0))
        if A_ACTIVATION != 0:  # the FFN's second GEMM reads the first one's pre-activation
            a_tile = widen(narrow(_activation(a_tile.to(tl.float32), A_ACTIVATION), a.dtype.element_ty))
        if GRAD_ACTIVATION != 0:
            u = widen(tl.load(a_pre + a_offsets, mask=a_mask, other=0.0)).to(tl.float32)
            a_tile = widen(narrow(a_tile.to(tl.float32) * _activation_grad(u, GRAD_ACTIVATION), a.dtype.element_ty))
        if USE_TMA:
            if B_TRANSPOSED:
                b_tile = widen(b_desc.load([pid_n * BLOCK_N, k0]).T)
            else:
                b_tile = widen(b_desc.load([k0, pid_n * BLOCK_N]))
        else:
            if B_TRANSPOSED:
                b_offsets = k[:, None] + cols[None, :] * K
            else:
                b_offsets = k[:, None] * N + cols[None, :]
            b_tile = widen(tl.load(b_expert + b_offsets, mask=(k[:, None] < K) & col_mask[None, :], other=0.0))
        acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PRECISION)

    if EPILOGUE_HALVES:  # the activation on one half of the columns at a time: fewer values in flight
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _epilogue(acc_lo, out, pre_out, bias, expert, tokens, row_mask, half, N, HAS_BIAS, ACTIVATION, SAVE_PRE)
        _epilogue(acc_hi, out, pre_out, bias, expert, tokens, row_mask, half + BLOCK_N // 2, N, HAS_BIAS, ACTIVATION,
                  SAVE_PRE)  # fmt: skip
    else:
        _epilogue(acc, out, pre_out, bias, expert, tokens, row_mask, cols, N, HAS_BIAS, ACTIVATION, SAVE_PRE)


@triton.jit
def _epilogue(acc, out, pre_out, bias, expert, tokens, row_mask, cols, N, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, SAVE_PRE: tl.constexpr):  # fmt: skip
    """Bias, the pre-activation's store, the activation and the scatter of one tile's columns ``cols``."""
    col_mask = cols < N
    if HAS_BIAS:
        acc += widen(tl.load(bias + expert * N + cols, mask=col_mask, other=0.0)).to(tl.float32)[None, :]
    out_offsets = tokens[:, None] * N + cols[None, :]  # the scatter
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SAVE_PRE:
        tl.store(pre_out + out_offsets, narrow(acc, pre_out.dtype.element_ty), mask=out_mask)
    tl.store(out + out_offsets, narrow(_activation(acc, ACTIVATION), out.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_weight_grad_kernel(
    dweight,  # [E, N, K] (N = Dout, K = Din)
    dbias,  # [E, N]
    dy,  # [T, N]
    pre,  # [T, N] (read when ACTIVATION)
    x,  # [T, K] (act(x) is used when X_ACTIVATION)
    perm,
    offsets,
    T,
    N,
    K,
    NUM_EXPERTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    X_ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.program_id(2)
    if NUM_EXPERTS == 1:
        row_start = 0
        row_end = T
    else:
        row_start = tl.load(offsets + expert)
        row_end = tl.load(offsets + expert + 1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if NUM_EXPERTS == 1:
            tokens = rows.to(tl.int64)
        else:
            tokens = tl.load(perm + rows, mask=row_mask, other=0).to(tl.int64)
        dy_offsets = tokens[:, None] * N + ns[None, :]
        dy_mask = row_mask[:, None] & n_mask[None, :]
        grad = widen(tl.load(dy + dy_offsets, mask=dy_mask, other=0.0)).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        if ACTIVATION != 0:
            u = widen(tl.load(pre + dy_offsets, mask=dy_mask, other=0.0)).to(tl.float32)
            grad = grad * _activation_grad(u, ACTIVATION)
        if HAS_BIAS:
            bias_acc += tl.sum(grad, axis=0)
        x_mask = row_mask[:, None] & k_mask[None, :]
        x_tile = widen(tl.load(x + tokens[:, None] * K + ks[None, :], mask=x_mask, other=0.0))
        if X_ACTIVATION != 0:
            x_tile = widen(narrow(_activation(x_tile.to(tl.float32), X_ACTIVATION), x.dtype.element_ty))
        dpre = widen(narrow(grad, x.dtype.element_ty))  # the dot's operands in x's dtype (fp32 when interpreting bf16)
        acc = tl.dot(tl.trans(dpre), x_tile, acc, input_precision=DOT_PRECISION)
    w_offsets = expert.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :]
    tl.store(dweight + w_offsets, narrow(acc, dweight.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(dbias + expert * N + ns, narrow(bias_acc, dbias.dtype.element_ty), mask=n_mask)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    spill_budget: int = 0  # SASS local-memory instructions the gate accepts (sm_90, 16-bit)
    epilogue_halves: bool = False  # an epilogue activation on half the tile's columns at a time


def gemm_config(arch: int, dtype: torch.dtype, n: int, k: int, prologue: bool) -> GemmConfig:
    """The tiles of one grouped GEMM (``_grouped_gemm_kernel``): small when interpreting, tensor-core tiles on a GPU.

    ``prologue``: the activation or its derivative is applied to A as it is loaded. sm_80 takes BLOCK_K = 32 then
    (at 64 its build spilled 500-2100 B of stack, see benchmarks/NOTES-modality.md); sm_90 keeps 64, which its
    compile holds without spills. fp32 takes 32 on both: a 3-stage 128x128x64 fp32 pipeline needs 192 KiB of
    shared memory.

    An activation in the epilogue runs on half the tile's columns at a time: on sm_90 (bf16, 128x128x64, 8 warps)
    the whole-tile GELU took 182 registers (1 CTA per SM); halves take 128 without spills (2 CTAs, as the plain
    GEMM); a 128-register cap instead spilled 82 instructions, in the main loop too.
    """
    if interpreting():
        return GemmConfig(32, 32, 32, 4, 1, epilogue_halves=True)
    block_n = 128 if n >= 128 else padded_dim(n)
    narrow_k = dtype == torch.float32 or (prologue and arch != 90)
    block_k = (32 if narrow_k else 64) if k >= 64 else padded_dim(k)
    return GemmConfig(128, block_n, block_k, 8 if block_n == 128 else 4, 3, epilogue_halves=block_n >= 32)


def use_weight_tma(arch: int, dtype: torch.dtype, n: int, k: int, weight_aligned: bool) -> bool:
    """Descriptors need 16-byte aligned rows and experts (N, K multiples of 8 in 16 bits) and non-empty sides."""
    return arch == 90 and dtype in SIXTEEN_BIT and weight_aligned and n > 0 and k > 0 and n % 8 == 0 and k % 8 == 0


def weight_grad_config(arch: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles of ``_grouped_weight_grad_kernel``: (rows streamed, Dout tile, Din tile); no ptxas spills on sm_90."""
    if interpreting():
        return GemmConfig(32, 32, 32, 4, 1)
    return GemmConfig(32, 128, 128, 8, 3)


def gemm_plan(arch: int, dtype: torch.dtype, tokens: int, n: int, k: int, num_experts: int, *, b_transposed: bool,
              has_bias: bool, activation: str | None = None, save_pre: bool = False, a_activation: str | None = None,
              grad_activation: str | None = None, weight_aligned: bool = True) -> Launch:  # fmt: skip
    """The launch of one grouped GEMM (what ``grouped_gemm`` runs and the gate compiles).

    sm_90, 16-bit: the weight operand comes by TMA when its address is 16-byte aligned (``weight_aligned``) and its
    rows are too (N and K multiples of 8); the activation operand is a row gather through ``perm``, which TMA
    cannot do before Blackwell, so it stays on ``cp.async``."""
    prologue = a_activation is not None or grad_activation is not None
    config = gemm_config(arch, dtype, n, k, prologue)
    m_tiles = triton.cdiv(tokens, config.block_m) + num_experts - 1  # upper bound on the row tiles of all experts
    pointer = pointer_type(dtype)
    signature = dict.fromkeys(("out", "pre_out", "a", "a_pre", "b", "bias"), pointer)
    signature |= {"perm": "*i32", "offsets": "*i32", "T": "i32", "N": "i32", "K": "i32"}
    constexprs = dict(
        NUM_EXPERTS=num_experts, EXPERTS_PAD=triton.next_power_of_2(num_experts), B_TRANSPOSED=b_transposed,
        HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation], SAVE_PRE=save_pre,
        A_ACTIVATION=ACTIVATION_CODES[a_activation], GRAD_ACTIVATION=ACTIVATION_CODES[grad_activation],
        EPILOGUE_HALVES=config.epilogue_halves and activation is not None,
        USE_TMA=use_weight_tma(arch, dtype, n, k, weight_aligned), DOT_PRECISION=dot_precision(dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )  # fmt: skip
    kind = "fwd" if b_transposed else "dx"
    act = f"_act{constexprs['ACTIVATION']}{constexprs['A_ACTIVATION']}{constexprs['GRAD_ACTIVATION']}"
    tma = "_tma" if constexprs["USE_TMA"] else ""
    name = f"grouped_gemm_{kind}{act}_E{num_experts}_{TRITON_TYPE[dtype]}_{config.block_n}x{config.block_k}{tma}"
    grid = (m_tiles, triton.cdiv(n, config.block_n))
    return Launch(name, _grouped_gemm_kernel, grid, signature, constexprs, config.num_warps, config.num_stages,
                  divisible_by_16(T=tokens, N=n, K=k), config.spill_budget)  # fmt: skip


def weight_grad_plan(arch: int, dtype: torch.dtype, tokens: int, n: int, k: int, num_experts: int, *,
                     has_bias: bool, activation: str | None, x_activation: str | None = None) -> Launch:  # fmt: skip
    """The launch of one expert weight gradient (what ``grouped_weight_grad`` runs and the gate compiles)."""
    config = weight_grad_config(arch, dtype)
    pointer = pointer_type(dtype)
    signature = dict.fromkeys(("dweight", "dbias", "dy", "pre", "x"), pointer)
    signature |= {"perm": "*i32", "offsets": "*i32", "T": "i32", "N": "i32", "K": "i32"}
    constexprs = dict(
        NUM_EXPERTS=num_experts, HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation],
        X_ACTIVATION=ACTIVATION_CODES[x_activation], DOT_PRECISION=dot_precision(dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
    )  # fmt: skip
    # K = 0 still takes one column of programs: the pid_k == 0 ones write the bias gradient
    grid = (triton.cdiv(n, config.block_n), max(1, triton.cdiv(k, config.block_k)), num_experts)
    act = f"_act{constexprs['ACTIVATION']}{constexprs['X_ACTIVATION']}"
    name = f"grouped_weight_grad{act}_E{num_experts}{'_bias' if has_bias else ''}_{TRITON_TYPE[dtype]}"
    return Launch(name, _grouped_weight_grad_kernel, grid, signature, constexprs, config.num_warps, config.num_stages,
                  divisible_by_16(T=tokens, N=n, K=k), config.spill_budget)  # fmt: skip


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    perm: Tensor,
    offsets: Tensor,
    *,
    b_transposed: bool,
    bias: Tensor | None = None,
    activation: str | None = None,
    save_pre: bool = False,
    a_activation: str | None = None,
    a_pre: Tensor | None = None,
    grad_activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``out[t] = act(a'[t] @ B[e] + bias[e])`` with ``B[e] = b[e].T`` when ``b_transposed`` (b is ``(E, N, K)``),
    else ``b[e]`` (b is ``(E, K, N)``); ``a' = a_act(a)``, or ``a * grad_act(a_pre)`` when ``grad_activation``.
    ``perm``/``offsets``: the routing (not read with one expert). Returns (out, pre). K = 0 gives ``act(bias)``."""
    tokens, k = a.shape
    num_experts = b.shape[0]
    n = b.shape[1] if b_transposed else b.shape[2]
    out = torch.empty(tokens, n, dtype=a.dtype, device=a.device)
    pre = torch.empty_like(out) if save_pre else a.new_empty(0)
    if tokens == 0 or n == 0:
        return out, pre
    arch, _multiprocessors = target(a.device)
    launch = gemm_plan(arch, a.dtype, tokens, n, k, num_experts, b_transposed=b_transposed, has_bias=bias is not None,
                       activation=activation, save_pre=save_pre, a_activation=a_activation,
                       grad_activation=grad_activation, weight_aligned=b.data_ptr() % 16 == 0)  # fmt: skip
    if launch.constexprs["USE_TMA"]:
        install_allocator()
    launch(out, pre, a, a if a_pre is None else a_pre, b, b if bias is None else bias, perm, offsets, tokens, n, k)
    return out, pre


def grouped_weight_grad(
    dy: Tensor,
    pre: Tensor | None,
    x: Tensor,
    perm: Tensor,
    offsets: Tensor,
    num_experts: int,
    *,
    activation: str | None,
    has_bias: bool,
    x_activation: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``dW[e] = dPre_eᵀ · x'_e`` ``(E, Dout, Din)`` and ``db[e] = Σ dPre_e`` with ``dPre = dy * act'(pre)``,
    ``x' = x_act(x)``. An expert without tokens gets zeros; so does every expert when there are no tokens."""
    tokens, n = dy.shape
    k = x.shape[1]
    dweight = torch.empty(num_experts, n, k, dtype=x.dtype, device=x.device)
    dbias = torch.empty(num_experts, n, dtype=x.dtype, device=x.device) if has_bias else None
    if n == 0 or num_experts == 0:
        return dweight, dbias
    launch = weight_grad_plan(target(x.device)[0], x.dtype, tokens, n, k, num_experts, has_bias=has_bias,
                              activation=activation, x_activation=x_activation)  # fmt: skip
    launch(dweight, dweight if dbias is None else dbias, dy, dy if pre is None else pre, x, perm, offsets, tokens, n, k)
    return dweight, dbias


# --- the plain compile check (python -m mome.kernels.aot): the FFN's GEMM kinds at model widths, as sm_80 plans ---


def _aot_specs() -> list[AotSpec]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tokens, d, f = 256 * 261, 768, 3072
        specs += [
            gemm_plan(80, dtype, tokens, f, d, 3, b_transposed=True, has_bias=True, activation="gelu", save_pre=True),
            gemm_plan(80, dtype, tokens, d, f, 3, b_transposed=True, has_bias=True, a_activation="gelu"),
            gemm_plan(80, dtype, tokens, d, f, 3, b_transposed=False, has_bias=False, grad_activation="gelu"),
            weight_grad_plan(80, dtype, tokens, f, d, 3, has_bias=True, activation="gelu"),
        ]
        if dtype == torch.bfloat16:
            specs += [
                gemm_plan(80, dtype, tokens, f, d, 1, b_transposed=True, has_bias=False),
                weight_grad_plan(80, dtype, tokens, d, f, 3, has_bias=True, activation=None, x_activation="gelu"),
            ]
    return [launch.spec() for launch in specs]


AOT_SPECS = _aot_specs()
