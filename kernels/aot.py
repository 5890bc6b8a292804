"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU.

Each kernel module lists ``AOT_SPECS``: ``AotSpec`` entries naming a ``@triton.jit``
function, an example signature and the constexpr values of one variant. Compiling
them here catches what the interpreter never sees (layouts, shared memory, PTX),
and the metadata gives shared-memory use; registers come from the ``cuobjdump``
that ships with triton.

Run it with the interpreter off (``TRITON_INTERPRET`` unset or 0)::

    python -m mome.kernels.aot [--arch 80 90] [--json PATH]
    python -m mome.kernels.aot --check [--json PATH]

``--check`` is the gate on the generated code (``mome.kernels.gate``): it compiles the launches the kernel
modules' own launch plans make for a list of real shapes, and fails when a 16-bit kernel on sm_90 lowers a
product to ``mma.sync``, computes a product twice, has a main loop without asynchronous copies, or spills past
the budget written beside its configuration. It is a proxy for speed read from the compiled code, not a timing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import sys

from mome.kernels._compile import KERNEL_MODULES_PACKAGE, AotSpec, GateCase, compile_kernel, cuobjdump

__all__ = ["AotSpec", "GateCase", "collect_specs", "compile_spec", "main"]


def collect_specs(package: str = KERNEL_MODULES_PACKAGE) -> list[AotSpec]:
    """``AOT_SPECS`` of every module in the kernels package, in module order."""
    root = importlib.import_module(package)
    specs: list[AotSpec] = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("aot", "gate"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        specs.extend(getattr(module, "AOT_SPECS", []))
    return specs


def _registers(cubin: bytes) -> int | None:
    report = cuobjdump(cubin, "--dump-resource-usage")
    match = re.search(r"REG:(\d+)", report or "")
    return int(match.group(1)) if match else None


def compile_spec(spec: AotSpec, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; returns its resource use."""
    compiled = compile_kernel(spec, arch)
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
    parser.add_argument("--check", action="store_true", help="run the generated-code gate instead")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU target", file=sys.stderr)
        return 2
    if args.check:
        from mome.kernels.gate import run_gate

        return run_gate(args.json)
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
