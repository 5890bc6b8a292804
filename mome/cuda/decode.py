"""CUDA decode attention (``mome._C``): split-K flash-decoding over a KV cache, fp16/bf16, head dims 64 and 128.

The backend module of ``mome.ops.decode_attention`` for ``backend="cuda"``: it follows the decode
family's contract (``mome.ops.decode.DecodeBackend``), declares what it runs in ``LIMITS`` and says
through :func:`available` when the extension cannot run at all. The launch is the custom op
``mome::cuda_decode_attention``, so ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mome.cuda import device_reason, extension, fallback_reason

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
MAX_SPLITS = 128  # mome::kDecodeMaxSplits
MIN_ROWS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
BLOCKS_PER_SM = 2  # the split kernel's occupancy at its largest head group (254 registers x 128 threads)
GRID_LIMIT = 65535  # CUDA's limit on grid dims y (kv heads x head tiles) and z (batch)
MAX_GROUP_TILES = 8  # a block serves at most 8 query heads, so a group of up to 64 heads takes <= 8 tiles

# What this backend runs (read by mome.ops.decode before any launch). Grid y is kv_heads x ceil(group / tile):
# bounding kv_heads by GRID_LIMIT // MAX_GROUP_TILES keeps it in range for every group.
LIMITS = {
    "dtypes": {"cuda": DTYPES},
    "head_dim": frozenset(HEAD_DIMS),
    "group": (1, 64),
    "batch": (1, GRID_LIMIT),
    "kv_heads": (1, GRID_LIMIT // MAX_GROUP_TILES),
}


def group_tile(group: int) -> int:
    """Query heads per block, as the kernel picks it (csrc/decode_split.cuh, ``decode_group_tile``)."""
    return 1 if group <= 1 else 2 if group == 2 else 4 if group <= 4 else 8


def num_splits(batch: int, heads: int, kv_heads: int, nmax: int, num_sms: int) -> int:
    """Splits per sequence: enough blocks to fill the GPU, each split at least ``MIN_ROWS_PER_SPLIT`` rows of
    the cache. Chosen from ``Nmax`` (not the lengths: reading them would sync with the host)."""
    group = heads // kv_heads
    blocks = batch * kv_heads * math.ceil(group / group_tile(group))
    if blocks == 0 or nmax == 0:
        return 1
    wanted = math.ceil(BLOCKS_PER_SM * num_sms / blocks)
    useful = math.ceil(nmax / MIN_ROWS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0  # a fresh allocation is aligned to 512 bytes


def input_problem(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor) -> str | None:
    """What about these inputs the CUDA kernel cannot run (shapes are checked by ``mome.ops``), or None."""
    if q.dtype not in DTYPES:
        return f"the CUDA decode kernel takes float16 or bfloat16, got q of dtype {q.dtype}"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}"
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return f"expected q (B, H, D) and caches (B, Hkv, Nmax, D), got {tuple(q.shape)} and {tuple(k_cache.shape)}"
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or kv_heads == 0 or heads % kv_heads:
        return f"caches {tuple(k_cache.shape)} do not match q {tuple(q.shape)} (B, D, and H % Hkv == 0)"
    if head_dim not in HEAD_DIMS:
        return f"the CUDA decode kernel has head dims {HEAD_DIMS}, got {head_dim}"
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (batch,):
        return (
            f"cache_seqlens must be int32 of shape ({batch},), got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, cache_seqlens)}
    if len(devices) != 1:
        return f"all inputs must be on one device, got {sorted(str(d) for d in devices)}"
    if batch > GRID_LIMIT or kv_heads * math.ceil(heads // kv_heads / group_tile(heads // kv_heads)) > GRID_LIMIT:
        return f"batch {batch} or kv heads {kv_heads} exceed the CUDA grid limit {GRID_LIMIT}"
    return None  # alignment is not checked here (no data pointers while torch.compile traces): see the op


def available(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (not built, stale, no driver, no kernel image), or None.
    Warns once when it is unusable, since ``auto`` then falls back."""
    return fallback_reason(device)


def launch(
    out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, splits: int
) -> Tensor:
    """Runs the kernels into ``out`` (q's shape and dtype) with a given number of splits (tests force it)."""
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    batch, heads, head_dim = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    partial_out = partial_lse = out.new_empty(0, dtype=torch.float32)
    if splits > 1:
        partial_out = out.new_empty(batch, heads, splits, head_dim, dtype=torch.float32)
        partial_lse = out.new_empty(batch, heads, splits, dtype=torch.float32)
    with torch.cuda.device(q.device):
        extension().decode_attention_fwd(
            out.data_ptr(),
            partial_out.data_ptr(),
            partial_lse.data_ptr(),
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            cache_seqlens.data_ptr(),
            batch,
            heads,
            kv_heads,
            nmax,
            head_dim,
            splits,
            float(scale),
            q.dtype == torch.bfloat16,
            torch.cuda.current_stream(q.device).cuda_stream,
        )
    return out


@torch.library.custom_op("mome::cuda_decode_attention", mutates_args=())
def _cuda_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    why = device_reason(q.device) or input_problem(q, k_cache, v_cache, cache_seqlens)
    if why is not None:
        raise ValueError(f"mome.cuda.decode_attention_fwd cannot run these inputs: {why}")
    # 16-byte vector loads need contiguous rows starting on 16-byte boundaries: copy the rare view that is not.
    q, k_cache, v_cache = (
        t if t.is_contiguous() and _aligned(t) else t.clone(memory_format=torch.contiguous_format)
        for t in (q, k_cache, v_cache)
    )
    cache_seqlens = cache_seqlens.contiguous()
    batch, heads, _ = q.shape
    kv_heads, nmax = k_cache.shape[1], k_cache.shape[2]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    out = q.new_empty(q.shape)
    return launch(out, q, k_cache, v_cache, cache_seqlens, scale, num_splits(batch, heads, kv_heads, nmax, sms))


@_cuda_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return q.new_empty(q.shape)


def decode_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float) -> Tensor:
    """``(B, H, D)`` attention of q over the first ``cache_seqlens[b]`` rows of the caches (launcher contract).

    q ``(B, H, D)``, caches ``(B, Hkv, Nmax, D)`` contiguous, fp16/bf16, D in (64, 128), ``H % Hkv == 0``;
    cache_seqlens ``(B,)`` in ``[0, Nmax]`` (not checked here: ``mome.ops.decode_attention`` does).
    """
    if cache_seqlens.dtype != torch.int32:
        cache_seqlens = cache_seqlens.to(torch.int32)
    return _cuda_decode_attention(q, k_cache, v_cache, cache_seqlens.contiguous(), float(scale))
