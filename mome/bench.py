"""``python -m mome bench``: mome's benchmarks for users, printed as a table with same-run ratios.

    python -m mome bench [--op attention ...] [--shape NAME ...] [--dtype bf16 ...] [--provider ...]
                         [--mode fwd ...] [--subset tiny|quick|full] [--json PATH] [--list]

The cases live in the repository's ``benchmarks/`` folder (the same ones pytest-benchmark runs);
the JSON has pytest-benchmark's layout, so ``benchmarks/report.py`` reads both. On a machine
without a CUDA GPU only the reference and eager providers run, at tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
from pathlib import Path

import torch

from mome import perf, settings

MODULES = ("bench_attention", "bench_decode", "bench_modality", "bench_itc", "bench_layer")
NO_GPU_NOTE = (
    "No CUDA GPU here: running the reference and eager providers at tiny shapes. These CPU timings only show "
    "that the benchmarks run; kernel figures (mome-triton, mome-cuda) need a GPU."
)


def benchmarks_module(name: str):
    """A module of the benchmarks folder, installed as ``mome.benchmarks`` (``harness``, ``report``, ...)."""
    return importlib.import_module(f"mome.benchmarks.{name}")


def families() -> dict[str, object]:
    """Every benchmark family by op name."""
    found = {}
    for module in MODULES:
        for family in benchmarks_module(module).FAMILIES:
            found[family.op] = family
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mome bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", nargs="+", help="op families (default: all); --list shows them")
    parser.add_argument("--shape", nargs="+", help="named shapes (any subset)")
    parser.add_argument("--dtype", nargs="+", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--provider", nargs="+", help="e.g. mome-triton sdpa-flash eager")
    parser.add_argument("--mode", nargs="+", choices=perf.MODES)
    parser.add_argument("--subset", choices=("tiny", "quick", "full"), help="default: quick on GPU, tiny on CPU")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="timed milliseconds per case")
    parser.add_argument("--json", help="write the rows here (pytest-benchmark layout)")
    parser.add_argument("--list", action="store_true", help="list ops, shapes and providers, then exit")
    return parser


def _listing(found: dict) -> str:
    lines = []
    for op, family in found.items():
        lines.append(f"{op}: modes {', '.join(family.modes)}; providers {', '.join(family.providers)}")
        for name, shape in family.shapes.items():
            lines.append(f"    {name:<32} [{', '.join(sorted(shape.subsets))}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # no host sync for the id range check while timing, unless MOME_CHECK_IDS asks for it; scoped to this call
    with settings.override(check_ids=settings.check_ids(when_unset=False)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        harness, report, found = benchmarks_module("harness"), benchmarks_module("report"), families()
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    if args.list:
        print(_listing(found))
        return 0
    unknown = sorted(set(args.op or ()) - set(found))
    if unknown:
        print(f"unknown --op {', '.join(unknown)}; choose from {', '.join(found)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    subset = args.subset or ("quick" if device.type == "cuda" else "tiny")
    dtypes = args.dtype or (None if device.type == "cuda" else ("fp32",))
    selected = [
        case
        for op in args.op or found
        for case in harness.cases(
            found[op], subset, providers=args.provider, shapes=args.shape, modes=args.mode, dtypes=dtypes
        )
    ]
    if not selected:
        print("no case matches these options (python -m mome bench --list shows the names)", file=sys.stderr)
        return 2
    environment = perf.environment(device)
    print(f"{len(selected)} cases on {environment['device']} (torch {environment['torch']}, "
          f"triton {environment['triton']}, mome {environment['mome']}, commit {environment['commit']})")  # fmt: skip
    if device.type != "cuda":
        print(NO_GPU_NOTE)
    ceilings = perf.measure_ceilings(device) if device.type == "cuda" else None
    rows = []
    for case in selected:
        row = harness.run_case(case, device, ceilings=ceilings, budget_ms=args.budget_ms)
        row.update(environment, check_ids="1" if settings.check_ids() else "0")
        if ceilings is not None:
            row.update(copy_gbps=ceilings.copy_gbps, matmul_tflops=ceilings.matmul_tflops)
        rows.append(row)
    perf.add_ratios(rows)
    print(report.text_table(rows))
    if device.type != "cuda":
        print(NO_GPU_NOTE)
    if args.json:
        document = dict(report.to_json(rows), datetime=datetime.datetime.now(datetime.timezone.utc).isoformat())
        Path(args.json).write_text(json.dumps(document, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
