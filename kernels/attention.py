"""Triton backend of the attention op family: flash-style forward and backward with masks as structure.

The kernels live beside this module: ``attention_fwd`` (online softmax over key tiles), ``attention_bwd``
(Δ, dK/dV with the key tile stationary, dQ with the query tile stationary), ``attention_bias_grad`` (dBias, summed
over the broadcast dims without atomics), ``attention_schedule`` (which tiles of a padded or modality-masked launch
are fully, partially or not at all visible) and ``attention_masks`` (the mask, bias and dropout arithmetic they
share). An additive bias and dropout (Philox, regenerated in the backward) are constexpr flags of every plan.
This module holds the backend contract: ``LIMITS``, the launchers, and the launch plans, one per direction, that
both the launchers and the ahead-of-time gate read, so the gate compiles exactly what a launch runs.

Head dims are padded to a power of two ≥ 16 with masked loads. A query that sees no key gets 0 and a gradient
of 0. Configurations come from ``attention_configs`` (per architecture, dtype class and head dim).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
from mome.kernels._common import TRITON_TYPE, dot_precision, padded_dim, pointer_type
from mome.kernels._compile import AotSpec, GateCase
from mome.kernels._plan import GATE_TARGETS, Launch, install_allocator, target
from mome.kernels.attention_bias_grad import attention_bias_grad_kernel
from mome.kernels.attention_bwd import attention_bwd_delta_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from mome.kernels.attention_configs import DELTA_BLOCK_M, SAFE_PASS_SPILLS, TileConfig, tile_config
from mome.kernels.attention_fwd import attention_fwd_kernel
from mome.kernels.attention_schedule import attention_schedule_kernel, chunk, tiles_bound
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

MASK_LETTERS = {"CAUSAL": "c", "HAS_PADDING": "k", "HAS_PREFIX": "p", "HAS_MODALITY": "m"}
# The other flags of a plan: an additive bias, dropout (their letters follow the masks' in a launch's tag).
EXTRA_LETTERS = {"HAS_BIAS": "b", "HAS_DROPOUT": "d"}
_MASK_POINTERS = {"KeyPad": "*u8", "PrefixLen": "*i64", "Modality": "*i64", "AllowedBits": "*i32"}
_BIAS_SIZES = {"bias_stride_b": "i32", "bias_stride_h": "i32", "bias_row": "i32"}
# The launcher pads the bias's rows to a multiple of 16 elements (``_aligned_bias``): its strides are then always
# divisible by 16 (0 when broadcast), as Triton specialises them at launch, so the plans say so to the gate.
BIAS_ROW_ALIGNMENT = 16
_DROPOUT_SCALARS = {"dropout_threshold": "i32", "keep_scale": "fp32"}
_SCHEDULE_POINTERS = {"SchedFull": "*i32", "SchedPartial": "*i32", "SchedCounts": "*i32"}
_SIZES = {"heads": "i32", "group": "i32", "nq": "i32", "nk": "i32"}


@dataclass(frozen=True)
class Shape:
    """What a launch plan depends on besides the masks: sizes, dtype and the target."""

    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    dtype: torch.dtype
    arch: int  # 90 for sm_90; 80 stands for everything else, the interpreter included
    multiprocessors: int
    aligned: bool = True  # every tensor's address a multiple of 16 bytes (TMA needs it)
    bias_dtype: torch.dtype = torch.float32  # the bias's (a placeholder's when there is none)
    bias_planes: tuple[int, int] = (1, 1)  # its batch and head dims, 1 where it broadcasts

    @property
    def sixteen_bit(self) -> bool:
        return self.dtype != torch.float32

    @property
    def block_d(self) -> int:
        return padded_dim(self.head_dim)

    @property
    def use_tma(self) -> bool:
        row_bytes = self.head_dim * self.dtype.itemsize
        return self.arch == 90 and self.aligned and row_bytes % 16 == 0


def _launch(name: str, kernel, grid, signature: dict, constexprs: dict, config: TileConfig) -> Launch:
    aligned = tuple(size for size in _BIAS_SIZES if size in signature)
    return Launch(name, kernel, grid, signature, constexprs, config.num_warps, config.num_stages,
                  divisible_by_16=aligned, spill_budget=config.spill_budget)  # fmt: skip


def _mask_flags(flags: dict) -> dict:
    return {flag: flags[flag] for flag in MASK_LETTERS}


def _schedule_launch(shape: Shape, flags: dict, config: TileConfig, *, key_stationary: bool) -> Launch:
    query_tiles, key_tiles = triton.cdiv(shape.nq, config.block_m), triton.cdiv(shape.nk, config.block_n)
    flags = _mask_flags(flags)
    signature = dict(Full="*i32", Partial="*i32", Counts="*i32", **_MASK_POINTERS, nq="i32", nk="i32")
    tiles = tiles_bound(shape.nq, shape.nk, config.block_m, config.block_n)
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, TILES=tiles,
                      CHUNK_N=chunk(config.block_n, tiles), CHUNK_M=chunk(config.block_m, tiles),
                      KEY_STATIONARY=key_stationary, **flags)  # fmt: skip
    grid = (key_tiles if key_stationary else query_tiles, shape.batch)
    name = "attention_schedule_by_key" if key_stationary else "attention_schedule_by_query"
    return _launch(name, attention_schedule_kernel, grid, signature, constexprs, TileConfig(0, 0, 4, 1))


def _common_constexprs(shape: Shape, flags: dict, config: TileConfig) -> dict:
    return dict(HEAD_DIM=shape.head_dim, BLOCK_D=shape.block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                **flags)  # fmt: skip


def _tail_constexprs(shape: Shape) -> dict:
    return dict(USE_TMA=shape.use_tma, DOT_PRECISION=dot_precision(shape.dtype, fp32_accurate=True))


def _bias_and_seed(shape: Shape) -> dict:
    return dict(Bias=pointer_type(shape.bias_dtype), Seed="*i64")


def forward_plan(shape: Shape, flags: dict, scale: float) -> dict[str, Launch]:
    """The forward's launches: the schedule (padding or modality ids only), then the kernel. ``flags``: the masks'
    (``MASK_LETTERS``) and ``HAS_BIAS``, ``HAS_DROPOUT``."""
    t = pointer_type(shape.dtype)
    config = tile_config("fwd", shape.arch, shape.sixteen_bit, shape.block_d, shape.nq, shape.batch * shape.heads,
                         shape.multiprocessors)  # fmt: skip
    plan = {}
    if flags["HAS_PADDING"] or flags["HAS_MODALITY"]:
        plan["schedule"] = _schedule_launch(shape, flags, config, key_stationary=False)
    signature = dict(Out=t, Lse="*fp32", Q=t, K=t, V=t, **_bias_and_seed(shape), **_MASK_POINTERS,
                     **_SCHEDULE_POINTERS, Flags="*i32", **_SIZES, **_BIAS_SIZES, scale_log2="fp32",
                     **_DROPOUT_SCALARS)  # fmt: skip
    constexprs = _common_constexprs(shape, flags, config)
    # the bias is added after the scale, so the scale cannot ride in the max's FMA
    constexprs["SCALE_FMA"] = bool(scale > 0 and math.isfinite(scale)) and not flags["HAS_BIAS"]
    constexprs.update(_tail_constexprs(shape))
    grid = (triton.cdiv(shape.nq, config.block_m), shape.batch * shape.heads)
    check = hides_real_keys(flags)
    fast = dict(constexprs, SAFE=False, CHECK_FINITE=check)
    plan["fwd"] = _launch("attention_fwd", attention_fwd_kernel, grid, signature, fast, config)
    if check:
        safe = dict(constexprs, SAFE=True, CHECK_FINITE=False)
        plan["fwd_safe"] = _launch("attention_fwd_safe", attention_fwd_kernel, grid, signature, safe,
                                        config._replace(spill_budget=SAFE_PASS_SPILLS))  # fmt: skip
    return plan


def hides_real_keys(flags: dict) -> bool:
    """Can a tile hold a hidden key with real data (a NaN there would reach a plain product)? Without masks or a
    bias (whose -inf hides a pair in any tile) the only partial tile is the sequence's end, whose missing keys
    load as zeros."""
    return flags["CAUSAL"] or flags["HAS_PADDING"] or flags["HAS_MODALITY"] or flags["HAS_BIAS"]


def backward_plan(shape: Shape, flags: dict, bias_grad: bool = False) -> dict[str, Launch]:
    """The backward's launches: Δ, the schedules (padding or modality ids only), dK/dV, dQ, and dBias when
    ``bias_grad``."""
    t = pointer_type(shape.dtype)
    plan = {}
    rows_total = shape.batch * shape.heads * shape.nq
    plan["delta"] = _launch(
        "attention_bwd_delta", attention_bwd_delta_kernel, (triton.cdiv(rows_total, DELTA_BLOCK_M),),
        dict(Delta="*fp32", Out=t, DOut=t, rows_total="i32"),
        dict(HEAD_DIM=shape.head_dim, BLOCK_D=shape.block_d, BLOCK_M=DELTA_BLOCK_M), TileConfig(DELTA_BLOCK_M, 0, 4, 1),
    )  # fmt: skip
    scheduled = flags["HAS_PADDING"] or flags["HAS_MODALITY"]
    scalars = dict(**_BIAS_SIZES, scale="fp32", scale_log2="fp32", **_DROPOUT_SCALARS)
    extras = dict(dropout=flags["HAS_DROPOUT"], bias=flags["HAS_BIAS"])
    dkdv = tile_config("dkdv", shape.arch, shape.sixteen_bit, shape.block_d, shape.nk, shape.batch * shape.kv_heads,
                       shape.multiprocessors, **extras)  # fmt: skip
    dq = tile_config("dq", shape.arch, shape.sixteen_bit, shape.block_d, shape.nq, shape.batch * shape.heads,
                     shape.multiprocessors, **extras)  # fmt: skip
    if scheduled:
        plan["schedule_dkdv"] = _schedule_launch(shape, flags, dkdv, key_stationary=True)
        plan["schedule_dq"] = _schedule_launch(shape, flags, dq, key_stationary=False)
    dkdv_grid = (triton.cdiv(shape.nk, dkdv.block_n), shape.batch * shape.kv_heads)
    plan["dkdv"] = _launch(
        "attention_bwd_dkdv", attention_bwd_dkdv_kernel, dkdv_grid,
        dict(DK=t, DV=t, Q=t, K=t, V=t, DOut=t, Lse="*fp32", Delta="*fp32", **_bias_and_seed(shape), **_MASK_POINTERS,
             **_SCHEDULE_POINTERS, **_SIZES, **scalars),
        {**_common_constexprs(shape, flags, dkdv), **_tail_constexprs(shape)}, dkdv,
    )  # fmt: skip
    dq_grid = (triton.cdiv(shape.nq, dq.block_m), shape.batch * shape.heads)
    dq_signature = dict(DQ=t, Q=t, K=t, V=t, DOut=t, Lse="*fp32", Delta="*fp32", **_bias_and_seed(shape),
                        **_MASK_POINTERS, **_SCHEDULE_POINTERS, Flags="*i32", **_SIZES, **scalars)  # fmt: skip
    dq_constexprs = {**_common_constexprs(shape, flags, dq), **_tail_constexprs(shape)}
    check = hides_real_keys(flags)
    plan["dq"] = _launch("attention_bwd_dq", attention_bwd_dq_kernel, dq_grid, dq_signature,
                              dict(dq_constexprs, SAFE=False, CHECK_FINITE=check), dq)  # fmt: skip
    if check:
        plan["dq_safe"] = _launch("attention_bwd_dq_safe", attention_bwd_dq_kernel, dq_grid, dq_signature,
                                       dict(dq_constexprs, SAFE=True, CHECK_FINITE=False),
                                       dq._replace(spill_budget=SAFE_PASS_SPILLS))  # fmt: skip
    if bias_grad:
        plan["dbias"] = _bias_grad_launch(shape, flags)
    return plan


def _bias_grad_launch(shape: Shape, flags: dict) -> Launch:
    """dBias: one program per (query tile, key tile) of each bias plane, summing over the pairs broadcast onto it."""
    t = pointer_type(shape.dtype)
    planes = shape.bias_planes[0] * shape.bias_planes[1]
    config = tile_config("dbias", shape.arch, shape.sixteen_bit, shape.block_d, shape.nq,
                         triton.cdiv(shape.nk, 64) * planes, shape.multiprocessors)  # fmt: skip
    grid = (triton.cdiv(shape.nq, config.block_m) * triton.cdiv(shape.nk, config.block_n), planes)
    signature = dict(DBias=pointer_type(shape.bias_dtype), Q=t, K=t, V=t, DOut=t, Lse="*fp32", Delta="*fp32",
                     **_bias_and_seed(shape), **_MASK_POINTERS, batch_size="i32", **_SIZES, bias_heads="i32",
                     bias_row="i32", scale_log2="fp32", **_DROPOUT_SCALARS)  # fmt: skip
    constexprs = dict(HEAD_DIM=shape.head_dim, BLOCK_D=shape.block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      **_mask_flags(flags), HAS_DROPOUT=flags["HAS_DROPOUT"],
                      BATCH_BROADCAST=shape.bias_planes[0] == 1, HEAD_BROADCAST=shape.bias_planes[1] == 1,
                      **_tail_constexprs(shape))  # fmt: skip
    return _launch("attention_bias_grad", attention_bias_grad_kernel, grid, signature, constexprs, config)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers (the attention family's contract, AttentionBackend).


def _shape(q: Tensor, k: Tensor, *tensors: Tensor, bias: Tensor | None = None) -> Shape:
    batch, heads, nq, head_dim = q.shape
    arch, multiprocessors = target(q.device)
    aligned = all(t.data_ptr() % 16 == 0 for t in (q, k, *tensors))
    bias_dtype, bias_planes = (torch.float32, (1, 1)) if bias is None else (bias.dtype, tuple(bias.shape[:2]))
    return Shape(batch, heads, k.shape[1], nq, k.shape[2], head_dim, q.dtype, arch, multiprocessors, aligned,
                 bias_dtype, bias_planes)  # fmt: skip


@functools.cache
def _placeholders(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1-element uint8 / int64 / int32 / fp32 tensors passed for absent masks, bias and seed (never read: their
    flags are off)."""
    dtypes = (torch.uint8, torch.int64, torch.int32, torch.float32)
    return tuple(torch.zeros(1, dtype=dtype, device=device) for dtype in dtypes)


def _mask_arguments(q: Tensor, masks) -> tuple[tuple[Tensor, ...], dict]:
    """Kernel pointer arguments and flags for the masks; an absent mask passes a placeholder."""
    causal, key_padding_mask, prefix_len, modality, modality_mask = masks
    placeholder_u8, placeholder_i64, allowed_bits, _ = _placeholders(q.device)
    if modality_mask is not None:  # row i: bit j set when queries of modality i see keys of modality j
        num_modalities = modality_mask.shape[0]
        bit_values = torch.ones(num_modalities, dtype=torch.int64, device=q.device) << torch.arange(
            num_modalities, device=q.device
        )
        allowed_bits = (modality_mask.to(torch.int64) * bit_values).sum(1).to(torch.int32)
    pointers = (
        placeholder_u8 if key_padding_mask is None else key_padding_mask.view(torch.uint8),
        placeholder_i64 if prefix_len is None else prefix_len,
        placeholder_i64 if modality is None else modality,
        allowed_bits,
    )
    flags = dict(CAUSAL=bool(causal), HAS_PADDING=key_padding_mask is not None, HAS_PREFIX=prefix_len is not None,
                 HAS_MODALITY=modality is not None)  # fmt: skip
    return pointers, flags


def dropout_threshold(p: float) -> int:
    """The smallest kept 16-bit half of a Philox word for dropout probability ``p``
    (``threshold`` of mome/reference/dropout.py, which the tests hold this to)."""
    return min(round(p * 2**16), 2**16 - 1)


def dropout_keep_scale(p: float) -> float:
    """One over the probability of keeping a pair (``keep_scale`` of mome/reference/dropout.py)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - dropout_threshold(p) / 2**16)


def _aligned_bias(bias: Tensor) -> Tensor:
    """``bias`` with its rows ``BIAS_ROW_ALIGNMENT`` elements apart (a padded copy unless Nk already is a multiple):
    the kernels' bias loads then vectorise to 16-byte (asynchronous) copies. The copy reads and writes the bias once,
    small beside the attention's traffic for a broadcast bias and a fraction of the kernels' own bias reads for a
    full one."""
    nk = bias.shape[-1]
    if nk % BIAS_ROW_ALIGNMENT == 0:
        return bias
    padded = torch.empty((*bias.shape[:-1], triton.cdiv(nk, BIAS_ROW_ALIGNMENT) * BIAS_ROW_ALIGNMENT),
                         dtype=bias.dtype, device=bias.device)  # fmt: skip
    padded[..., :nk].copy_(bias)
    return padded


def _bias_dropout_arguments(q: Tensor, nk: int, bias: Tensor | None, dropout) -> tuple[tuple, tuple, tuple, dict]:
    """``(pointers, bias strides, dropout scalars, flags)`` of the bias and dropout; placeholders when absent.
    ``dropout`` with ``p == 0`` is no dropout at all."""
    placeholder_i64, placeholder_f32 = _placeholders(q.device)[1], _placeholders(q.device)[3]
    has_dropout = dropout is not None and dropout.p > 0
    if bias is None:
        strides = (0, 0, 0)
    else:
        batch, heads, nq = q.shape[:3]
        planes_ok = bias.dim() == 4 and bias.shape[0] in (1, batch) and bias.shape[1] in (1, heads)
        if not (planes_ok and tuple(bias.shape[2:]) == (nq, nk) and bias.is_contiguous()):
            raise ValueError(f"bias must be a contiguous (1|{batch}, 1|{heads}, Nq={nq}, Nk={nk}) tensor, got shape "
                             f"{tuple(bias.shape)}, contiguous={bias.is_contiguous()}")  # fmt: skip
        bias = _aligned_bias(bias)
        strides = (*(bias.stride(dim) if bias.shape[dim] > 1 else 0 for dim in (0, 1)), bias.stride(2))
    pointers = (placeholder_f32 if bias is None else bias, dropout.seed if has_dropout else placeholder_i64)
    scalars = (dropout_threshold(dropout.p), dropout_keep_scale(dropout.p)) if has_dropout else (0, 0.0)
    return pointers, strides, scalars, dict(HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout)


def _run_schedule(launch: Launch | None, mask_pointers, device: torch.device, shape: Shape):
    """The schedule's three tensors, or placeholders when the plan has none."""
    if launch is None:
        placeholder = _placeholders(device)[2]
        return placeholder, placeholder, placeholder
    stationary, others = launch.grid[0], shape.nq if launch.constexprs["KEY_STATIONARY"] else shape.nk
    block = launch.constexprs["BLOCK_M" if launch.constexprs["KEY_STATIONARY"] else "BLOCK_N"]
    full = torch.empty((shape.batch, stationary, triton.cdiv(others, block)), dtype=torch.int32, device=device)
    partial = torch.empty_like(full)
    counts = torch.empty((shape.batch, stationary, 2), dtype=torch.int32, device=device)
    launch(full, partial, counts, *mask_pointers, shape.nq, shape.nk)
    return full, partial, counts


def attention_fwd(q, k, v, masks, scale, bias=None, dropout=None):
    """Launcher of the attention contract (AttentionBackend): ``(out, lse)``. ``bias``: None or a contiguous
    ``(1|B, 1|H, Nq, Nk)`` tensor; ``dropout``: None or ``(p, seed)`` with a one-element int64 ``seed`` on q's
    device."""
    batch, heads, nq, _head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[2] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    pointers, flags = _mask_arguments(q, masks)
    extra_pointers, bias_strides, dropout_scalars, extra_flags = _bias_dropout_arguments(q, k.shape[2], bias, dropout)
    shape = _shape(q, k, v, out, bias=bias)
    plan = forward_plan(shape, {**flags, **extra_flags}, scale)
    if shape.use_tma:
        install_allocator()
    schedule = _run_schedule(plan.get("schedule"), pointers, q.device, shape)
    arguments = (*extra_pointers, *pointers, *schedule, _finite_flags(plan["fwd"], q.device), heads,
                 heads // shape.kv_heads, nq, shape.nk, *bias_strides, scale * LOG2E, *dropout_scalars)  # fmt: skip
    plan["fwd"](out, lse, q, k, v, *arguments)
    if "fwd_safe" in plan:  # recomputes exactly the tiles whose fast output is not finite; the others exit at once
        plan["fwd_safe"](out, lse, q, k, v, *arguments)
    return out, lse


def _finite_flags(launch: Launch, device: torch.device) -> Tensor:
    """One int32 per program of a fast launch that checks its output (set: not finite), else a placeholder."""
    if not launch.constexprs["CHECK_FINITE"]:
        return _placeholders(device)[2]
    return torch.empty(launch.grid[0] * launch.grid[1], dtype=torch.int32, device=device)


def attention_bwd(dout, q, k, v, out, lse, masks, scale, bias=None, dropout=None, bias_grad=False):
    """Launcher of the attention contract: ``(dq, dk, dv, dbias)``; ``dbias`` (the bias's shape and dtype, summed
    over its broadcast dims in a fixed order) is None unless ``bias_grad``."""
    batch, heads, nq, _head_dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if bias_grad and bias is None:
        raise ValueError("bias_grad needs the bias it differentiates, got bias=None")
    dbias = torch.empty_like(bias) if bias_grad else None
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None if dbias is None else dbias.zero_()
    dout = dout.contiguous()
    pointers, flags = _mask_arguments(q, masks)
    extra_pointers, bias_strides, dropout_scalars, extra_flags = _bias_dropout_arguments(q, k.shape[2], bias, dropout)
    shape = _shape(q, k, v, dout, dq, dk, dv, bias=bias)
    bias_row = bias_strides[2]
    plan = backward_plan(shape, {**flags, **extra_flags}, bias_grad)
    if shape.use_tma:
        install_allocator()
    delta = torch.empty((batch, heads, nq), dtype=torch.float32, device=q.device)
    plan["delta"](delta, out, dout, batch * heads * nq)
    sizes = (heads, heads // shape.kv_heads, nq, shape.nk, *bias_strides, scale, scale * LOG2E, *dropout_scalars)
    schedule = _run_schedule(plan.get("schedule_dkdv"), pointers, q.device, shape)
    plan["dkdv"](dk, dv, q, k, v, dout, lse, delta, *extra_pointers, *pointers, *schedule, *sizes)
    schedule = _run_schedule(plan.get("schedule_dq"), pointers, q.device, shape)
    arguments = (dq, q, k, v, dout, lse, delta, *extra_pointers, *pointers, *schedule,
                 _finite_flags(plan["dq"], q.device), *sizes)  # fmt: skip
    plan["dq"](*arguments)
    if "dq_safe" in plan:
        plan["dq_safe"](*arguments)
    if dbias is not None:
        plan["dbias"](dbias, q, k, v, dout, lse, delta, *extra_pointers, *pointers, batch, heads,
                      heads // shape.kv_heads, nq, shape.nk, shape.bias_planes[1], bias_row, scale * LOG2E,
                      *dropout_scalars)  # fmt: skip
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------------------------------
# The shapes the ahead-of-time gate plans (``python -m mome.kernels.aot --check``): the launches real models make,
# through the same plans as the launchers. (label, batch, heads, kv_heads, Nq = Nk, head dim).

GATE_SHAPES = (
    ("VLMo/BEiT-3 base, 197 + 40 tokens", 128, 12, 12, 237, 64),
    ("BEiT-3 large, 577 + 64 tokens", 32, 16, 16, 641, 64),
    ("vision-language D128, 197 + 40 tokens", 64, 8, 8, 237, 128),
    ("S 1k, D 64, small batch", 1, 12, 12, 1024, 64),
    ("S 2k, D 64", 8, 16, 16, 2048, 64),
    ("S 4k, D 128, GQA 32/8", 4, 32, 8, 4096, 128),
    ("S 8k, D 128", 2, 16, 16, 8192, 128),
)
_MASKS_OFF = dict(CAUSAL=False, HAS_PADDING=False, HAS_PREFIX=False, HAS_MODALITY=False)
_EXTRAS_OFF = dict(HAS_BIAS=False, HAS_DROPOUT=False)
GATE_MASKS = {
    "none": dict(_MASKS_OFF, **_EXTRAS_OFF),
    "causal": dict(_MASKS_OFF, CAUSAL=True, **_EXTRAS_OFF),
    "prefix_lm": dict(_MASKS_OFF, CAUSAL=True, HAS_PREFIX=True, **_EXTRAS_OFF),
    "padding": dict(_MASKS_OFF, HAS_PADDING=True, **_EXTRAS_OFF),
    "modality": dict(_MASKS_OFF, HAS_PADDING=True, HAS_MODALITY=True, **_EXTRAS_OFF),
    "all": dict(CAUSAL=True, HAS_PADDING=True, HAS_PREFIX=True, HAS_MODALITY=True, **_EXTRAS_OFF),
    # a (1, H, N, N) bias (relative positions) with its gradient; dropout; both with key padding
    "bias": dict(_MASKS_OFF, HAS_BIAS=True, HAS_DROPOUT=False),
    "dropout": dict(_MASKS_OFF, HAS_BIAS=False, HAS_DROPOUT=True),
    "padding_bias_dropout": dict(_MASKS_OFF, HAS_PADDING=True, HAS_BIAS=True, HAS_DROPOUT=True),
}
# Which (arch, dtype) pairs the gate compiles for which mask kinds: every mask in bf16 on sm_90, where the rules
# apply; fp16 lowers to the same instructions, so its rows are a spot check; sm_80 and fp32 only show that the
# plans compile (the rules are about Hopper's 16-bit instructions).
GATE_DTYPES = {
    (90, torch.bfloat16): tuple(GATE_MASKS),
    (90, torch.float16): ("none", "all"),
    (90, torch.float32): ("none", "all", "padding_bias_dropout"),
    (80, torch.bfloat16): ("none", "causal", "all", "padding_bias_dropout"),
    (80, torch.float32): ("all",),
}
# The bias and dropout variants are planned for the vision-language shapes (where relative-position biases and
# attention dropout are used): the longer-sequence rows would add compiles, not new code paths.
BIAS_GATE_SHAPES = tuple(shape[0] for shape in GATE_SHAPES[:3])


def gate_cases() -> list[GateCase]:
    """The launches the plans make for the gate shapes, as the launchers would plan them. The schedule kernel runs
    no product, so only the plain compile check (``AOT_SPECS``) compiles it."""
    cases = []
    for label, batch, heads, kv_heads, length, head_dim in GATE_SHAPES:
        for arch, multiprocessors in GATE_TARGETS:
            for (planned_arch, dtype), masks in GATE_DTYPES.items():
                if planned_arch != arch:
                    continue
                for mask in masks:
                    flags = GATE_MASKS[mask]
                    if (flags["HAS_BIAS"] or flags["HAS_DROPOUT"]) and label not in BIAS_GATE_SHAPES:
                        continue
                    shape = Shape(batch, heads, kv_heads, length, length, head_dim, dtype, arch, multiprocessors,
                                  bias_dtype=dtype, bias_planes=(1, heads))  # fmt: skip
                    plan = {**forward_plan(shape, flags, 1 / math.sqrt(head_dim)),
                            **backward_plan(shape, flags, bias_grad=flags["HAS_BIAS"])}  # fmt: skip
                    for launch in plan.values():
                        if launch.kernel is attention_schedule_kernel:
                            continue
                        cases.append(_tagged(launch, dtype).gate_case(arch, dtype, f"{label}, {mask}"))
    return cases


def _tagged(launch: Launch, dtype: torch.dtype) -> Launch:
    """The launch named for reports: kernel, dtype and the constexprs that change its code."""
    return dataclasses.replace(launch, name=f"{launch.name}_{launch_tag(launch, TRITON_TYPE[dtype])}")


def launch_tag(launch: Launch, dtype_name: str) -> str:
    """A compile's name: dtype, head dim, masks (causal, key padding, prefix, modality) then bias and dropout,
    tiles, warps, stages."""
    c = launch.constexprs
    masks = "".join(letter for flag, letter in {**MASK_LETTERS, **EXTRA_LETTERS}.items() if c.get(flag))
    head = f"_d{c['HEAD_DIM']}" if "HEAD_DIM" in c else ""
    tiles = f"{c.get('BLOCK_M', 0)}x{c.get('BLOCK_N', 0)}" + (f"t{c['TILES']}" if "TILES" in c else "")
    tma = "_tma" if c.get("USE_TMA") else ""
    return f"{dtype_name}{head}_{masks or 'none'}_{tiles}_w{launch.num_warps}s{launch.num_stages}{tma}"


# The plain compile check (``python -m mome.kernels.aot``) compiles a few representative plans for each arch.
_AOT_CASES = (
    (torch.float16, 128, "all"),
    (torch.bfloat16, 64, "all"),
    (torch.bfloat16, 128, "causal"),
    (torch.bfloat16, 80, "none"),
    (torch.float32, 64, "none"),
    (torch.float32, 128, "all"),
    (torch.bfloat16, 64, "padding_bias_dropout"),
)


def _aot_specs() -> list[AotSpec]:
    specs, seen = [], set()
    for dtype, head_dim, mask in _AOT_CASES:
        shape = Shape(16, 12, 12, 1024, 1024, head_dim, dtype, 80, 108, bias_dtype=dtype, bias_planes=(1, 12))
        flags = GATE_MASKS[mask]
        plan = {**forward_plan(shape, flags, 0.125), **backward_plan(shape, flags, bias_grad=flags["HAS_BIAS"])}
        for launch in plan.values():
            spec = _tagged(launch, dtype).spec()
            if spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()
