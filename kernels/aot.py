"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU.

Each kernel module lists ``AOT_SPECS``: ``AotSpec`` entries naming a ``@triton.jit``
function, an example signature and the constexpr values of one variant. Compiling
them here catches what the interpreter never sees (layouts, shared memory, PTX),
and the metadata gives shared-memory use; registers come from the ``cuobjdump``
that ships with triton.

Run it with the interpreter off (``TRITON_INTERPRET`` unset or 0)::

    python -m mome.kernels.aot [--arch 80 90] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
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


def collect_specs(package: str = KERNEL_MODULES_PACKAGE) -> list[AotSpec]:
    """``AOT_SPECS`` of every module in the kernels package, in module order."""
    root = importlib.import_module(package)
    specs: list[AotSpec] = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        specs.extend(getattr(module, "AOT_SPECS", []))
    return specs


def _cuobjdump() -> str | None:
    """The cuobjdump that ships inside triton's NVIDIA backend, else one on the PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def _registers(cubin: bytes) -> int | None:
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True)
    match = re.search(r"REG:(\d+)", report.stdout)
    return int(match.group(1)) if match else None


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; returns its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = [name for name, kind in spec.signature.items() if kind.startswith("*")] + list(spec.divisible_by_16)
    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return {
        "name": spec.name,
        "arch": f"sm_{arch}",
        "shared_bytes": compiled.metadata.shared,
        "registers": _registers(compiled.asm["cubin"]),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write the resource report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU target", file=sys.stderr)
        return 2
    rows, failures = [], []
    for spec in collect_specs():
        for arch in args.arch:
            try:
                rows.append(compile_spec(spec, arch))
            except Exception as error:  # report every failing kernel, not only the first
                failures.append(f"{spec.name} sm_{arch}: {type(error).__name__}: {error}")
    for row in rows:
        print(f"{row['name']:<48} {row['arch']}  shared {row['shared_bytes']:>6} B  registers {row['registers']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    print(f"{len(rows)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
