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
from mome.kernels.aot import AotSpec

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
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a handful of splits exercises the combine without slowing the tests


def _num_splits(batch: int, kv_heads: int, nmax: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, entries per split): enough programs to fill the device, each a whole number of tiles."""
    tiles = max(1, triton.cdiv(nmax, block_n))
    splits = min(MAX_SPLITS, tiles, max(1, triton.cdiv(_target_programs(device), batch * kv_heads)))
    chunk = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max(nmax, 1), chunk), chunk


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale):
    """Launcher of the decode contract (DecodeBackend)."""
    batch, heads, head_dim = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    block_n, num_warps = _launch_config(q.dtype, head_dim)
    num_splits, chunk = _num_splits(batch, kv_heads, nmax, block_n, q.device)
    part_out = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    _decode_attention_split_kernel[(num_splits, batch * kv_heads)](
        part_out, part_lse, q, k_cache, v_cache, cache_seqlens,
        heads, kv_heads, nmax, chunk, num_splits, scale * LOG2E,
        GROUP=group, GROUP_PAD=_group_pad(group), HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=3,
    )  # fmt: skip
    _decode_attention_combine_kernel[(batch * heads,)](
        out, part_out, part_lse, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SPLITS=max(2, triton.next_power_of_2(num_splits)),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: each dtype, head dims 64 and 128, with and without grouped-query heads.


def _decode_specs(dtype: torch.dtype, head_dim: int, group: int) -> list[AotSpec]:
    t = pointer_type(dtype)
    tag = f"{TRITON_TYPE[dtype]}_d{head_dim}_g{group}"
    split_signature = dict(
        PartOut="*fp32", PartLse="*fp32", Q=t, KCache=t, VCache=t, CacheSeqlens="*i32",
        heads="i32", kv_heads="i32", nmax="i32", chunk="i32", num_splits="i32", scale_log2="fp32",
        GROUP="constexpr", GROUP_PAD="constexpr", HEAD_DIM="constexpr", BLOCK_D="constexpr", BLOCK_N="constexpr",
        DOT_PRECISION="constexpr",
    )  # fmt: skip
    block_n, num_warps = _launch_config(dtype, head_dim)
    split_constexprs = dict(
        GROUP=group, GROUP_PAD=_group_pad(group), HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(dtype),
    )  # fmt: skip
    combine_signature = dict(
        Out=t, PartOut="*fp32", PartLse="*fp32", num_splits="i32",
        HEAD_DIM="constexpr", BLOCK_D="constexpr", BLOCK_SPLITS="constexpr",
    )  # fmt: skip
    combine_constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SPLITS=16)
    return [
        AotSpec(f"decode_split_{tag}", _decode_attention_split_kernel, split_signature, split_constexprs, num_warps, 3),
        AotSpec(f"decode_combine_{tag}", _decode_attention_combine_kernel, combine_signature, combine_constexprs),
    ]


AOT_SPECS = [
    *_decode_specs(torch.float16, 128, 8),
    *_decode_specs(torch.bfloat16, 64, 1),
    *_decode_specs(torch.bfloat16, 128, 4),
    *_decode_specs(torch.float32, 128, 1),
]
