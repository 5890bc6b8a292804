"""Launch plans of the kernel families: one object holds what a launcher runs and what the gate compiles.

A family's plan function takes ``(arch, dtype, sizes, flags)`` and returns ``Launch`` entries; its launcher runs
them (``launch(*arguments)``) and its ``gate_cases()`` turns the same entries, planned for real model shapes, into
``GateCase``s (``python -m mome.kernels.aot --check``). ``divisible_by_16`` records the integer arguments that a
real launch has divisible by 16, as Triton specialises them at launch time, so the compile the gate reads is the
one that runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from mome.kernels._common import SIXTEEN_BIT
from mome.kernels._compile import AotSpec, GateCase

GATE_TARGETS = ((90, 132), (80, 108))  # (arch, multiprocessors): H100/H200 and A100


@dataclass(frozen=True)
class Launch:
    """One kernel launch: grid, runtime signature (argument -> Triton type, in order), constexprs, config."""

    name: str
    kernel: object
    grid: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()
    spill_budget: int = 0  # SASS local-memory instructions the gate accepts (sm_90, 16-bit); reason beside the config
    mma_sync_reason: str | None = None

    def __call__(self, *arguments) -> None:
        self.kernel[self.grid](*arguments, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def spec(self) -> AotSpec:
        signature = {**self.signature, **dict.fromkeys(self.constexprs, "constexpr")}
        return AotSpec(self.name, self.kernel, signature, self.constexprs, self.num_warps, self.num_stages,
                       self.divisible_by_16)  # fmt: skip

    def gate_case(self, arch: int, dtype: torch.dtype | None, uses: str) -> GateCase:
        """The gate's rules apply on sm_90 to 16-bit kernels, and to kernels of no float dtype (``dtype`` None:
        integer work such as the routing, where only the spill rule can bite)."""
        checked = dtype is None or dtype in SIXTEEN_BIT
        return GateCase(self.spec(), arch, checked, uses, self.spill_budget, self.mma_sync_reason)


def divisible_by_16(**sizes: int) -> tuple[str, ...]:
    """The names of the integer arguments whose values Triton would mark divisible by 16 at launch."""
    return tuple(name for name, value in sizes.items() if value % 16 == 0)


def target(device: torch.device) -> tuple[int, int]:
    """``(arch, multiprocessors)`` of the device a launch runs on: 90 for sm_90, 80 for every other GPU and for
    the interpreter (CPU tensors), which plans as sm_80."""
    if device.type != "cuda":
        return 80, 108
    major, _minor = torch.cuda.get_device_capability(device)
    return (90 if major == 9 else 80), torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def install_allocator() -> None:
    """Device-side tensor descriptors (TMA) need a global scratch allocator; install one unless the user has."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(lambda size, _alignment, _stream: torch.empty(size, dtype=torch.int8, device="cuda"))
