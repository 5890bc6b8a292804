"""Performance accounting: FLOP and byte formulas per op, device limits, measured ceilings and a timer.

Every figure mome reports comes from a formula written here, so a reader can check it:

- attention: ``4·B·H·Nq·Nk·D`` (two matmuls of ``2·Nq·Nk·D`` per head) times the fraction of
  visible score entries (causal: 1/2); backward 2.5× forward (FlashAttention's convention).
- GEMM: ``2·M·N·K``; an expert FFN is two GEMMs; backward 2× forward (dX and dW).
- decode: bytes = the valid K/V prefix read once (plus q and out); it is memory-bound.
- ITC: ``2·B·(B+Q)·d`` per similarity pass (see :func:`itc_flops` for the pass count).

Device limits are in decimal units (1 TFLOP/s = 1e12 FLOP/s, 1 GB/s = 1e9 B/s), dense (no
sparsity), from the vendors' datasheets. A roofline floor is ``max(flops / peak, bytes / bandwidth)``
and "% of roofline" is ``floor / measured time``.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mome import settings

MODES = ("fwd", "bwd", "fwd+bwd")
BACKWARD_FACTOR = {"attention": 2.5, "gemm": 2.0}


def _mode_factor(mode: str, backward: float) -> float:
    factors = {"fwd": 1.0, "bwd": backward, "fwd+bwd": 1.0 + backward}
    if mode not in factors:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return factors[mode]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- FLOP and byte formulas -------------------------------------------------------------------------------


def attention_flops(
    batch: int, heads: int, nq: int, nk: int, head_dim: int, *, causal: bool = False, density: float | None = None,
    mode: str = "fwd",
) -> float:  # fmt: skip
    """``4·B·H·Nq·Nk·D · density`` (density: visible fraction of the scores; causal alone: 1/2), ×2.5 backward."""
    if density is None:
        density = 0.5 if causal else 1.0
    return 4.0 * batch * heads * nq * nk * head_dim * density * _mode_factor(mode, BACKWARD_FACTOR["attention"])


def attention_bytes(
    batch: int, heads: int, kv_heads: int, nq: int, nk: int, head_dim: int, dtype: torch.dtype, mode: str = "fwd"
) -> float:
    """Minimum traffic of a fused kernel: forward reads q, k, v and writes out (+ fp32 LSE);
    backward reads q, k, v, out, dout, LSE and writes dq, dk, dv."""
    size = element_size(dtype)
    q_elems, kv_elems = batch * heads * nq * head_dim, batch * kv_heads * nk * head_dim
    lse = 4 * batch * heads * nq
    forward = size * (2 * q_elems + 2 * kv_elems) + lse
    backward = size * (4 * q_elems + 4 * kv_elems) + lse
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[_check_mode(mode)]


def _check_mode(mode: str) -> str:
    _mode_factor(mode, 1.0)
    return mode


def gemm_flops(m: int, n: int, k: int) -> float:
    """``2·M·N·K``."""
    return 2.0 * m * n * k


def ffn_flops(tokens: int, dim: int, hidden: int, dim_out: int | None = None, mode: str = "fwd") -> float:
    """Two GEMMs per token, whatever expert it goes to: ``2·T·D·F + 2·T·F·Dout``; backward 2×."""
    dim_out = dim if dim_out is None else dim_out
    forward = gemm_flops(tokens, hidden, dim) + gemm_flops(tokens, dim_out, hidden)
    return forward * _mode_factor(mode, BACKWARD_FACTOR["gemm"])


def ffn_bytes(
    tokens: int, dim: int, hidden: int, experts_used: int, dtype: torch.dtype, dim_out: int | None = None,
    mode: str = "fwd",
) -> float:  # fmt: skip
    """Minimum traffic with the hidden activation kept on chip in forward: x in, out written, each used
    expert's weights read once; backward also reads the saved hidden (T·F) and writes dx and dW."""
    dim_out = dim if dim_out is None else dim_out
    size = element_size(dtype)
    weights = experts_used * (hidden * dim + dim_out * hidden + hidden + dim_out)
    forward = size * (tokens * dim + tokens * dim_out + weights)
    backward = size * (2 * tokens * dim + 2 * tokens * dim_out + 2 * tokens * hidden + 3 * weights)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[_check_mode(mode)]


def decode_bytes(total_cached: int, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """K and V read once over the valid prefix (``total_cached`` = sum of cache_seqlens), plus q in and out."""
    size = element_size(dtype)
    return size * (2 * total_cached * kv_heads * head_dim + 2 * batch * heads * head_dim)


def decode_flops(total_cached: int, heads: int, head_dim: int) -> float:
    """``4·L·H·D`` summed over sequences: q·k and p·v per cached position."""
    return 4.0 * total_cached * heads * head_dim


def layer_norm_bytes(tokens: int, dim: int, experts: int, dtype: torch.dtype, mode: str = "fwd") -> float:
    """Forward reads x and writes y; backward reads x, dy and writes dx (plus the per-expert gamma/beta)."""
    size = element_size(dtype)
    params = 2 * experts * dim
    forward = size * (2 * tokens * dim + params)
    backward = size * (3 * tokens * dim + 2 * params)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[_check_mode(mode)]


def itc_flops(batch: int, queue: int, dim: int, *, distill: bool = False, mode: str = "fwd") -> float:
    """Effective FLOPs: ``2·B·(B+Q)·d`` per similarity pass.

    Forward: 2 passes (i2t and t2i), 4 with momentum distillation (the momentum logits).
    Backward: 4 passes (d rows and d columns in both directions; counted over the full
    ``B+Q`` columns although queue columns take no gradient).
    """
    one_pass = 2.0 * batch * (batch + queue) * dim
    forward = one_pass * (4 if distill else 2)
    backward = one_pass * 4
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[_check_mode(mode)]


def itc_bytes(batch: int, queue: int, dim: int, dtype: torch.dtype, *, distill: bool = False, mode: str = "fwd"):
    """Features read once per direction: online rows and columns, momentum columns, both queues."""
    size = element_size(dtype)
    features = size * dim * (2 * batch * (2 if distill else 1) + 2 * queue)
    grads = size * dim * 2 * batch
    return {"fwd": features, "bwd": features + grads, "fwd+bwd": 2 * features + grads}[_check_mode(mode)]


def mome_layer_flops(batch: int, seq: int, dim: int, heads: int, hidden: int, *, mode: str = "fwd+bwd") -> float:
    """Model FLOPs of one transformer layer (the MFU numerator): q/k/v/out projections ``2·T·4D²``,
    attention ``4·B·S²·D``, FFN ``2·T·2·D·F``; backward 2× for GEMMs and 2.5× for attention.
    Experts do not change the count: each token goes through exactly one expert."""
    tokens = batch * seq
    gemms = gemm_flops(tokens, 4 * dim, dim) + ffn_flops(tokens, dim, hidden)
    core = attention_flops(batch, heads, seq, seq, dim // heads)
    return gemms * _mode_factor(mode, BACKWARD_FACTOR["gemm"]) + core * _mode_factor(mode, BACKWARD_FACTOR["attention"])


# ---- device limits ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLimits:
    """Datasheet peaks, dense, decimal units. ``tflops`` maps a dtype name to tensor-core (or fp32 SIMT) peak."""

    name: str
    tflops: dict[str, float]
    hbm_gbps: float
    l2_bytes: int

    def peak_tflops(self, dtype: torch.dtype | str) -> float:
        return self.tflops[_dtype_name(dtype)]


DEVICE_LIMITS = {
    "H100 SXM": DeviceLimits(
        "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 3350.0, 50 * 2**20
    ),
    "H100 PCIe": DeviceLimits(
        "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}, 2000.0, 50 * 2**20
    ),
    "H200": DeviceLimits("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 4800.0, 50 * 2**20),
    "A100": DeviceLimits("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, 2039.0, 40 * 2**20),
}


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    return names[dtype]


def device_limits(device_name: str) -> DeviceLimits | None:
    """The datasheet entry for a ``torch.cuda.get_device_name()`` string, or None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        return DEVICE_LIMITS["H200"]
    if "H100" in name:
        return DEVICE_LIMITS["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return DEVICE_LIMITS["A100"]
    return None


def roofline_floor_ms(flops: float, nbytes: float, peak_tflops: float | None, peak_gbps: float | None) -> float | None:
    """``max(flops / peak, bytes / bandwidth)`` in ms, from whichever limits are known (None if neither)."""
    floors = []
    if peak_tflops:
        floors.append(flops / (peak_tflops * 1e12))
    if peak_gbps:
        floors.append(nbytes / (peak_gbps * 1e9))
    return max(floors) * 1e3 if floors else None


# ---- timing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int
    timer: str


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples_ms: list[float], timer: str) -> Timing:
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    return Timing(
        statistics.median(samples_ms), _quantile(samples_ms, 0.2), _quantile(samples_ms, 0.8), len(samples_ms), timer
    )


def time_calls(
    run: Callable[[int], object], num_inputs: int, device: torch.device, *, warmup_ms: float = 25.0,
    budget_ms: float = 100.0, min_rounds: int = 3, max_rounds: int = 200,
) -> Timing:  # fmt: skip
    """Time ``run(i)`` with the input sets rotated (``i = round % num_inputs``) so caches do not flatter.

    CUDA: one pair of CUDA events per call, after warm-up; CPU: ``time.perf_counter`` per call.
    The number of rounds fits ``budget_ms`` from the warm-up's estimate, within [min_rounds, max_rounds].
    """
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    warm = 0
    while True:
        run(warm % num_inputs)
        warm += 1
        sync()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= warmup_ms or (not cuda and warm >= 1):
            break
    estimate_ms = max(elapsed_ms / warm, 1e-3)
    rounds = int(min(max_rounds, max(min_rounds, budget_ms // estimate_ms)))
    samples = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for index, (begin, end) in enumerate(events):
            begin.record()
            run((warm + index) % num_inputs)
            end.record()
        sync()
        samples = [begin.elapsed_time(end) for begin, end in events]
        return summarize(samples, "cuda-events")
    for index in range(rounds):
        begin = time.perf_counter()
        run((warm + index) % num_inputs)
        samples.append((time.perf_counter() - begin) * 1e3)
    return summarize(samples, "perf_counter")


def input_copies(bytes_per_set: float, device: torch.device, l2_bytes: int = 50 * 2**20, most: int = 4) -> int:
    """How many input sets to rotate so that together they exceed twice the L2 cache (1 on CPU)."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    return int(min(most, max(1, math.ceil(2 * l2_bytes / bytes_per_set))))


# ---- measured ceilings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # device-to-device copy, read + write bytes counted
    matmul_tflops: float  # large bf16 matmul


def measure_ceilings(device: torch.device, copy_bytes: int = 1 << 30, matmul_size: int = 8192) -> Ceilings:
    """What this card actually reaches: a large device copy (GB/s) and a large bf16 matmul (TFLOP/s)."""
    if device.type != "cuda":
        raise ValueError(f"measured ceilings need a CUDA device, got {device}")
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy = time_calls(lambda _: target.copy_(source), 1, device, budget_ms=200.0)
    a = torch.randn(matmul_size, matmul_size, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    matmul = time_calls(lambda _: a @ b, 1, device, budget_ms=200.0)
    return Ceilings(
        copy_gbps=2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9,
        matmul_tflops=gemm_flops(matmul_size, matmul_size, matmul_size) / (matmul.median_ms * 1e-3) / 1e12,
    )


# ---- ratios across one run -------------------------------------------------------------------------------


def group_key(row: dict) -> tuple:
    return row["op"], row["shape"], row["mode"], row["dtype"]


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per (op, shape, mode, dtype): ``ratio_to_best_baseline`` = best baseline's time / this row's time
    (above 1: faster than every baseline), and ``ratio_to_bound`` likewise against the lower-bound provider."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    for members in groups.values():
        measured = [r for r in members if r.get("status") == "ok"]
        baselines = [r for r in measured if r["role"] == "baseline"]
        bounds = [r for r in measured if r["role"] == "bound"]
        best = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        bound = min(bounds, key=lambda r: r["median_ms"]) if bounds else None
        for row in measured:
            if best is not None:
                row["best_baseline"] = best["provider"]
                row["ratio_to_best_baseline"] = best["median_ms"] / row["median_ms"]
            if bound is not None:
                row["bound"] = bound["provider"]
                row["ratio_to_bound"] = bound["median_ms"] / row["median_ms"]
    return rows


# ---- where a figure was taken -----------------------------------------------------------------------------


def _commit() -> str:
    if settings.commit():
        return settings.commit()
    root = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if result.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    return result.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict[str, str]:
    """Device name and versions recorded with every figure."""
    import mome

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "mome": mome.__version__,
        "commit": _commit(),
    }
