"""Triton backend of the decode op family (``decode_attention``): split-K flash-decoding over a KV cache.

Decoding one token is memory-bound: the kernel exists to read each valid K/V cache entry once. The
cache of every (batch, key/value head) is cut into ``num_splits`` chunks of whole ``BLOCK_N`` tiles,
one program per chunk, so small batches still fill the GPU. A program serves all the query heads of
its key/value group at once (grouped-query attention reads the cache once per group, not per head):
the group is padded to 16 rows for ``tl.dot``, which costs nothing that matters here. Each program
writes its chunk's normalised partial output and base-2 log-sum-exp in fp32; a second small kernel
combines the chunks with their softmax weights. Entries at or beyond ``cache_seqlens[b]`` are never
loaded; chunks that start past the end write an empty partial (weight 0), and a sequence of length 0
gets zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from mome.kernels._common import TRITON_TYPE, dot_precision, padded_dim, pointer_type, widen_bf16_in_interpreter
from mome.kernels._plan import GATE_TARGETS, Launch, divisible_by_16, target
from mome.kernels.aot import AotSpec, GateCase

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128
MAX_GROUP = 64  # query heads per key/value head
MAX_SPLITS = 64
MAX_GRID_ROWS = 65535  # the grid's second dimension: one row per (batch, cache head)

# What this backend runs: the op reads it before any launch (the backend contract).
LIMITS = {
    "dtypes": (torch.float16, torch.bfloat16, torch.float32),
    "head_dim": (1, MAX_HEAD_DIM),
    "group": (1, MAX_GROUP),
    "batch_kv_heads": (0, MAX_GRID_ROWS),  # empty inputs return at once
}


@triton.jit
def _decode_attention_split_kernel(
    PartOut,
    PartLse,
    Q,
    KCache,
    VCache,
    CacheSeqlens,
    heads,
    kv_heads,
    nmax,
    chunk,
    num_splits,
    scale_log2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    kv_bh = tl.program_id(1)  # batch * kv_heads + kv_head
    batch = kv_bh // kv_heads
    seqlen = tl.load(CacheSeqlens + batch)
    start = split * chunk
    end = tl.minimum(start + chunk, seqlen)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    head_rows = (batch * heads + (kv_bh % kv_heads) * GROUP + offs_g).to(tl.int64)  # query heads of this group
    q_mask = (offs_g[:, None] < GROUP) & d_ok[None, :]
    q = widen_bf16_in_interpreter(tl.load(Q + head_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0))
    cache_base = kv_bh.to(tl.int64) * nmax * HEAD_DIM

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        k_t = tl.load(
            KCache + cache_base + cols[None, :] * HEAD_DIM + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [D, N]
        k_t = widen_bf16_in_interpreter(k_t)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one valid entry
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            VCache + cache_base + cols[:, None] * HEAD_DIM + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = widen_bf16_in_interpreter(v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    part_rows = head_rows * num_splits + split
    tl.store(PartOut + part_rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=q_mask)
    tl.store(PartLse + part_rows, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_i)), mask=offs_g < GROUP)


@triton.jit
def _decode_attention_combine_kernel(
    Out,
    PartOut,
    PartLse,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    """out = Σ_s w_s · part_s with w_s = 2^(lse_s − max) / Σ 2^(lse − max); all-empty rows give 0."""
    row = tl.program_id(0).to(tl.int64)  # batch * heads + head
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < num_splits
    lse = tl.load(PartLse + row * num_splits + offs_s, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(weights, 0)
    parts = tl.load(
        PartOut + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=split_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------------------
# Launcher (the decode family's contract, DecodeBackend).


def _block_d(head_dim: int) -> int:
    return padded_dim(head_dim)


def _group_pad(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def _dot_precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, fp32_accurate=True)


def _launch_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(cache entries per tile, warps): 32 KiB of K per tile for 16-bit caches (wide loads, many bytes in flight),
    less for fp32; sizes with no register spills in the AOT report."""
    if dtype == torch.float32:
        return (32 if _block_d(head_dim) >= 128 else 64), 4
    return 128, (8 if _block_d(head_dim) >= 128 else 4)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * target(device)[1]
    return 8  # the interpreter: a handful of splits exercises the combine without slowing the tests


def _num_splits(batch: int, kv_heads: int, nmax: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, entries per split): enough programs to fill the device, each a whole number of tiles."""
    return _splits(batch, kv_heads, nmax, block_n, _target_programs(device))


def _splits(batch: int, kv_heads: int, nmax: int, block_n: int, programs: int) -> tuple[int, int]:
    tiles = max(1, triton.cdiv(nmax, block_n))
    splits = min(MAX_SPLITS, tiles, max(1, triton.cdiv(programs, batch * kv_heads)))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max(nmax, 1), chunk), chunk


# Why the split kernel keeps mma.sync on sm_90 (the gate allows it with this reason): wgmma needs 64 query rows per
# warpgroup, and a program holds one key/value group's query heads (1-64, padded to 16). The kernel is memory-bound
# (each cache entry read once for 2 x GROUP_PAD x D multiply-adds, far below either instruction's rate), so its
# speed is the cache read: the cp.async pipeline that the gate checks.
SPLIT_MMA_SYNC_REASON = "memory-bound decode: one KV group's 1-64 query heads per program, under wgmma's 64 rows"


def decode_plan(arch: int, dtype: torch.dtype, batch: int, heads: int, kv_heads: int, nmax: int, head_dim: int,
                programs: int) -> tuple[Launch, Launch, int]:  # fmt: skip
    """``(split, combine, chunk)``; ``programs``: how many the device wants in flight (2 per SM). The same tiles on
    sm_80 and sm_90: a memory-bound kernel sized for bytes in flight, not for the tensor-core shape."""
    block_n, num_warps = _launch_config(dtype, head_dim)
    num_splits, chunk = _splits(batch, kv_heads, nmax, block_n, programs)
    group = heads // kv_heads
    t = pointer_type(dtype)
    tag = f"{TRITON_TYPE[dtype]}_d{head_dim}_g{group}"
    split_signature = dict(
        PartOut="*fp32",
        PartLse="*fp32",
        Q=t,
        KCache=t,
        VCache=t,
        CacheSeqlens="*i32",
        heads="i32",
        kv_heads="i32",
        nmax="i32",
        chunk="i32",
        num_splits="i32",
        scale_log2="fp32",
    )
    split_constexprs = dict(
        GROUP=group,
        GROUP_PAD=_group_pad(group),
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(dtype),
    )
    sizes = divisible_by_16(heads=heads, kv_heads=kv_heads, nmax=nmax, chunk=chunk, num_splits=num_splits)
    split = Launch(
        f"decode_split_n{block_n}_{tag}",
        _decode_attention_split_kernel,
        (num_splits, batch * kv_heads),
        split_signature,
        split_constexprs,
        num_warps,
        3,
        sizes,
        mma_sync_reason=SPLIT_MMA_SYNC_REASON,
    )
    block_splits = max(2, triton.next_power_of_2(num_splits))
    combine = Launch(
        f"decode_combine_s{block_splits}_{tag}",
        _decode_attention_combine_kernel,
        (batch * heads,),
        dict(Out=t, PartOut="*fp32", PartLse="*fp32", num_splits="i32"),
        dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SPLITS=block_splits),
        divisible_by_16=divisible_by_16(num_splits=num_splits),
    )
    return split, combine, chunk  # fmt: skip


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale):
    """Launcher of the decode contract (DecodeBackend)."""
    batch, heads, head_dim = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    split, combine, chunk = decode_plan(target(q.device)[0], q.dtype, batch, heads, kv_heads, nmax, head_dim,
                                        _target_programs(q.device))  # fmt: skip
    num_splits = split.grid[0]
    part_out = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    split(part_out, part_lse, q, k_cache, v_cache, cache_seqlens, heads, kv_heads, nmax, chunk, num_splits,
          scale * LOG2E)  # fmt: skip
    combine(out, part_out, part_lse, num_splits)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The gate (``python -m mome.kernels.aot --check``) and the plain compile check: captioning decoders' caches.

GATE_SHAPES = (  # (label, batch, heads, kv_heads, head dim)
    ("BEiT-3 base decoder", 32, 12, 12, 64),
    ("large, GQA 4", 8, 16, 4, 128),
    ("GQA 8, one sequence", 1, 32, 4, 128),
)
GATE_CONTEXTS = (256, 4096, 32768)
GATE_DTYPES = {90: (torch.bfloat16, torch.float16, torch.float32), 80: (torch.bfloat16,)}


def gate_cases() -> list[GateCase]:
    cases = []
    for arch, sms in GATE_TARGETS:
        for dtype in GATE_DTYPES[arch]:
            shapes = GATE_SHAPES if dtype == torch.bfloat16 else GATE_SHAPES[1:2]  # fp16, fp32: a spot check
            for label, batch, heads, kv_heads, head_dim in shapes:
                for context in GATE_CONTEXTS:
                    for launch in decode_plan(arch, dtype, batch, heads, kv_heads, context, head_dim, 2 * sms)[:2]:
                        cases.append(launch.gate_case(arch, dtype, f"{label}, context {context}"))
    return cases


def _aot_specs() -> list[AotSpec]:
    shapes = (
        (torch.float16, 8, 64, 128),
        (torch.bfloat16, 8, 8, 64),
        (torch.bfloat16, 8, 32, 128),
        (torch.float32, 8, 8, 128),
    )  # (dtype, kv heads, heads, head dim): groups 8, 1, 4, 1
    specs = []
    for dtype, kv_heads, heads, head_dim in shapes:
        split, combine, _ = decode_plan(80, dtype, 4, heads, kv_heads, 4096, head_dim, 216)
        specs += [split.spec(), combine.spec()]
    return specs  # fmt: skip


AOT_SPECS = _aot_specs()
