"""What every benchmark shares: families of cases, providers, one measured row per case, same-run ratios.

A *family* (one per ``bench_<op>.py``) names its shapes, providers, modes and dtypes, makes random
inputs and states its work formula. A *provider* turns one shape into a forward function; the
harness derives ``fwd`` / ``bwd`` / ``fwd+bwd`` from it with autograd, times it (``mome.perf``) and
writes one row. A provider that cannot run a case still gives a row, with its reason.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mome import perf
from mome.ops import BackendUnavailableError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUBSETS = ("tiny", "quick", "full")
ROLES = ("mome", "baseline", "bound")


class Unavailable(Exception):
    """A provider cannot run this case; the message says why."""


@dataclass(frozen=True)
class Work:
    flops: float
    nbytes: float
    unit: str  # "TFLOP/s" or "GB/s": what the row's headline figure is
    formula: str


@dataclass(frozen=True)
class Provider:
    """``setup(shape, inputs, device, mode, notes)`` runs untimed and returns ``forward(inputs) -> Tensor``, or a
    pair ``(prepare, forward)`` where ``prepare(inputs) -> inputs`` converts each input set once (untimed).
    ``notes`` is a dict the provider may fill with figures of its own (e.g. a mask's build time)."""

    name: str
    role: str
    setup: Callable
    applies: Callable = lambda shape: True
    modes: tuple[str, ...] = perf.MODES
    cuda_only: str | None = None  # the reason it is not run on CPU

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"provider {self.name}: role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class Family:
    op: str
    shapes: dict  # name -> shape object with a ``subsets`` attribute
    providers: dict[str, Provider]
    make_inputs: Callable  # (shape, dtype, device, seed, requires_grad) -> dict of tensors
    work: Callable  # (shape, mode, dtype) -> Work
    grad_names: tuple[str, ...] = ()
    modes: tuple[str, ...] = perf.MODES
    dtypes: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"tiny": ("fp32",), "quick": ("bf16",), "full": ("bf16", "fp16")}
    )


@dataclass(frozen=True)
class Case:
    family: Family
    provider: Provider
    shape: str
    mode: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.family.op}-{self.provider.name}-{self.shape}-{self.mode}-{self.dtype}"


def cases(family: Family, subset: str, *, providers=None, shapes=None, modes=None, dtypes=None) -> Iterator[Case]:
    """Every (provider, shape, mode, dtype) of ``subset``; name lists narrow it (explicit shape names are taken
    from any subset)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    for shape_name, shape in family.shapes.items():
        if (shape_name not in shapes) if shapes else (subset not in shape.subsets):
            continue
        for mode in family.modes:
            if modes and mode not in modes:
                continue
            for dtype in dtypes or family.dtypes[subset]:
                for provider in family.providers.values():
                    if providers and provider.name not in providers:
                        continue
                    if provider.applies(shape):
                        yield Case(family, provider, shape_name, mode, dtype)


# ---- one row --------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _forward_and_prepare(case: Case, shape, sample: dict, device: torch.device, notes: dict):
    made = case.provider.setup(shape, sample, device, case.mode, notes)
    if isinstance(made, tuple):
        return made
    return (lambda inputs: inputs), made


def _build_run(case: Case, forward, prepared: list[dict]) -> Callable[[int], object]:
    """``run(i)`` for the case's mode over the prepared input sets."""
    if case.mode == "fwd":

        def run_fwd(i):
            with torch.no_grad():
                return forward(prepared[i])

        return run_fwd
    leaves = [
        [inputs[n] for n in case.family.grad_names if n in inputs and inputs[n].requires_grad] for inputs in prepared
    ]
    if not leaves[0]:
        raise Unavailable("no input takes a gradient in this case")
    if case.mode == "fwd+bwd":
        with torch.no_grad():
            dout = torch.randn_like(forward(prepared[0]))  # one output gradient serves every input set

        def run_fwd_bwd(i):
            out = forward(prepared[i])
            return torch.autograd.grad(out, leaves[i], dout)

        return run_fwd_bwd
    outs = [forward(inputs) for inputs in prepared]
    douts = [torch.randn_like(out) for out in outs]

    def run_bwd(i):
        return torch.autograd.grad(outs[i], leaves[i], douts[i], retain_graph=True)

    return run_bwd


def _peak_memory_mb(run: Callable[[int], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = run(0)
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated(device) - before) / 1e6


def _headline(work: Work, median_ms: float) -> float:
    seconds = median_ms * 1e-3
    return work.flops / seconds / 1e12 if work.unit == "TFLOP/s" else work.nbytes / seconds / 1e9


def _roofline_fields(work: Work, median_ms: float, dtype: torch.dtype, device: torch.device, ceilings) -> dict:
    fields = {}
    limits = perf.device_limits(perf.device_name(device)) if device.type == "cuda" else None
    if limits is not None:
        floor = perf.roofline_floor_ms(work.flops, work.nbytes, limits.peak_tflops(dtype), limits.hbm_gbps)
        fields.update(roofline=limits.name, floor_ms=floor, pct_roofline=100.0 * floor / median_ms)
        if work.unit == "TFLOP/s":  # model FLOP utilisation: achieved / datasheet peak
            fields["mfu_pct"] = 100.0 * work.flops / (median_ms * 1e-3) / 1e12 / limits.peak_tflops(dtype)
    if ceilings is not None:
        peak = ceilings.matmul_tflops if dtype in (torch.bfloat16, torch.float16) else None
        floor = perf.roofline_floor_ms(work.flops if peak else 0.0, work.nbytes, peak, ceilings.copy_gbps)
        fields.update(floor_measured_ms=floor, pct_roofline_measured=100.0 * floor / median_ms)
    return fields


def run_case(case: Case, device: torch.device, *, ceilings=None, budget_ms: float = 100.0) -> dict:
    """Measure one case; always returns a row (``status``: ok, unavailable or error, with ``reason``)."""
    family, shape = case.family, case.family.shapes[case.shape]
    dtype = DTYPES[case.dtype]
    work = family.work(shape, case.mode, dtype)
    row = dict(
        op=family.op, provider=case.provider.name, role=case.provider.role, shape=case.shape, mode=case.mode,
        dtype=case.dtype, unit=work.unit, formula=work.formula, flops=work.flops, bytes=work.nbytes,
    )  # fmt: skip
    try:
        row.update(_measure(case, shape, dtype, device, work, ceilings, budget_ms))
        row["status"] = "ok"
    except (Unavailable, BackendUnavailableError) as why:
        row.update(status="unavailable", reason=str(why))
    except Exception as error:  # an error is a result too: report it, keep running the other cases
        row.update(status="error", reason=_first_line(error))
    finally:
        if device.type == "cuda":  # free this case's tensors before the next one allocates
            gc.collect()
            torch.cuda.empty_cache()
    return row


def _measure(case: Case, shape, dtype, device, work: Work, ceilings, budget_ms: float) -> dict:
    provider = case.provider
    if provider.cuda_only and device.type != "cuda":
        raise Unavailable(provider.cuda_only)
    if case.mode not in provider.modes:
        raise Unavailable(f"{provider.name} has no {case.mode} (it supports {', '.join(provider.modes)})")
    requires_grad = case.mode != "fwd"
    first = case.family.make_inputs(shape, dtype, device, 0, requires_grad)
    set_bytes = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
    copies = perf.input_copies(set_bytes, device)
    raw = [first] + [case.family.make_inputs(shape, dtype, device, seed, requires_grad) for seed in range(1, copies)]
    build = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    prepare, forward = _forward_and_prepare(case, shape, first, device, build)
    prepared = [prepare(inputs) for inputs in raw]
    run = _build_run(case, forward, prepared)
    run(0)  # first call: compiles / autotunes, and surfaces "cannot run" errors before timing
    if device.type == "cuda":
        torch.cuda.synchronize()
    build["setup_ms"] = (time.perf_counter() - started) * 1e3
    if device.type != "cuda":  # CPU figures only show the harness works: keep them short
        budget_ms = min(budget_ms, 20.0)
    timing = perf.time_calls(
        run, len(prepared), device, budget_ms=budget_ms, max_rounds=200 if device.type == "cuda" else 10
    )
    result = dict(
        median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, rounds=timing.rounds,
        timer=timing.timer, input_sets=len(prepared), **build,
    )  # fmt: skip
    result["value"] = _headline(work, timing.median_ms)
    result["tflops"] = work.flops / (timing.median_ms * 1e-3) / 1e12
    result["gbps"] = work.nbytes / (timing.median_ms * 1e-3) / 1e9
    result.update(_roofline_fields(work, timing.median_ms, dtype, device, ceilings))
    result["peak_mem_mb"] = _peak_memory_mb(run, device)
    return result


# ---- providers every family has ---------------------------------------------------------------------------

KERNELS_NEED_A_GPU = (
    "kernel figures need a GPU (on CPU, Triton runs only in its interpreter, whose timings mean nothing)"
)


def mome_providers(call: Callable, *, setup: Callable | None = None) -> dict[str, Provider]:
    """``mome-triton``, ``mome-cuda``, ``mome-reference``: the public op with a forced backend.

    ``call(inputs, backend, context)`` runs the op; ``setup(shape, inputs, device)`` (optional) builds the
    ``context`` once, untimed. The reference backend runs the materialising specification, so it is only
    benchmarked at the tiny shapes (the CPU path); a backend that cannot run a case reports why.
    """

    def provider(backend: str) -> Provider:
        def make(shape, inputs, device, mode, notes):
            context = None if setup is None else setup(shape, inputs, device)
            return lambda batch: call(batch, backend, context)

        return Provider(
            f"mome-{backend}",
            "mome",
            make,
            applies=(lambda shape: "tiny" in shape.subsets) if backend == "reference" else (lambda shape: True),
            cuda_only=None if backend == "reference" else KERNELS_NEED_A_GPU,
        )

    return {p.name: p for p in (provider("triton"), provider("cuda"), provider("reference"))}


def randn(shape, dtype, device, generator, requires_grad=False, scale=1.0) -> torch.Tensor:
    """Random normal input made in fp32 on the device from a seeded generator, then cast."""
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale
    return values.to(dtype).requires_grad_(requires_grad)


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1234 + seed)
