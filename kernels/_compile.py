"""What the ahead-of-time compile check and the generated-code gate share: the spec of one compile, the
compile itself, and the ``cuobjdump`` that reads its cubin (no GPU needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

KERNEL_MODULES_PACKAGE = "mome.kernels"


@dataclass(frozen=True)
class AotSpec:
    """One compile: ``signature`` maps every argument to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the constexpr values.

    Like Triton's launch-time specialisation, every pointer is taken as 16-byte aligned (torch allocations
    are); ``divisible_by_16`` names the integer arguments (sizes, strides) to specialise the same way.
    """

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateCase:
    """One compile the generated-code gate checks: a spec from a launch plan, its target, and what it may do.

    ``spill_budget`` is the number of local-memory instructions (LDL/STL) its SASS may hold; ``mma_sync_reason``
    says why a memory-bound kernel may keep ``mma.sync`` on sm_90 (None: it may not).
    """

    spec: AotSpec
    arch: int
    sixteen_bit: bool
    uses: str
    spill_budget: int = 0
    mma_sync_reason: str | None = None


def _cuobjdump() -> str | None:
    """The cuobjdump that ships inside triton's NVIDIA backend, else one on the PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def cuobjdump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump <flag>`` of a cubin (``--dump-resource-usage``, ``--dump-sass``), or None without the tool."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, flag, handle.name], capture_output=True, text=True).stdout


def compile_kernel(spec: AotSpec, arch: int):
    """The compiled kernel of one spec for ``sm_<arch>`` (its ``asm`` holds TTGIR, PTX and the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = [name for name, kind in spec.signature.items() if kind.startswith("*")] + list(spec.divisible_by_16)
    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
