"""The gate on the generated code: ``python -m mome.kernels.aot --check``.

Every kernel module that defines ``gate_cases()`` returns the compiles its own launch plans make for real
shapes (``GateCase``: a spec, a target, a spill budget). Each distinct compile runs once (Triton's cache keeps it
for the next run), and for 16-bit kernels on sm_90 the gate fails when

- a product lowers to ``mma.sync`` (or stays a plain ``tt.dot``) instead of wgmma;
- the wgmma instructions do more work than the products of the tile need (a product computed twice: every
  warpgroup runs the same instructions, so a 64-row tile under 8 warps is computed by both);
- a loop that runs a product has no asynchronous copy (``cp.async`` or TMA) in its body: its loads were not
  software-pipelined (a load inside an ``scf.if`` never is);
- the SASS holds more local-memory instructions (spills) than the budget beside the configuration.

What it reads is a proxy for speed, not a timing: the figures a GPU measures go beside it in the notes.
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing
import os
import pkgutil
import re
import sys
from dataclasses import dataclass, field

from mome.kernels._compile import KERNEL_MODULES_PACKAGE, GateCase, compile_kernel, cuobjdump

_ASYNC_COPY = ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local")
_DOT = re.compile(r"= (ttng\.warp_group_dot|tt\.dot) ")
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


@dataclass
class Report:
    """What one compile's code shows."""

    name: str
    arch: int
    config: str
    uses: list[str] = field(default_factory=list)
    wgmma: int = 0
    mma_sync: int = 0
    plain_dots: int = 0  # tt.dot left in the TTGIR (not wgmma) on sm_90
    cp_async: int = 0
    tma: int = 0
    registers: int | None = None
    spills: int | None = None
    shared: int = 0
    ctas_per_sm: int = 0
    dot_work: int = 0  # multiply-adds the products of one program need
    wgmma_work: int = 0  # multiply-adds its wgmma instructions do, over all warpgroups
    loops_without_async: list[int] = field(default_factory=list)  # TTGIR lines of such loops
    failures: list[str] = field(default_factory=list)


def _dot_work(ttgir: str) -> tuple[int, int]:
    """``(multiply-adds of every product, number of products that are not wgmma)`` from the TTGIR."""
    work, plain = 0, 0
    for line in ttgir.splitlines():
        match = _DOT.search(line)
        if not match:
            continue
        types = line.rsplit(" : ", 1)[1]
        a_rows, a_cols = re.search(r"<(\d+)x(\d+)x", types).groups()
        c_rows, c_cols = re.search(r"-> tensor<(\d+)x(\d+)x", types).groups()
        work += int(c_rows) * int(c_cols) * int(a_cols)
        plain += match.group(1) == "tt.dot"
    return work, plain


def loops_without_async_copies(ttgir: str) -> list[int]:
    """Line numbers of the ``scf.for`` loops whose own body (nested loops aside) runs a product but issues no
    asynchronous copy."""
    open_loops, found, depth = [], [], 0  # open_loops: [depth inside, line, has product, has async copy]
    for number, line in enumerate(ttgir.splitlines(), 1):
        if open_loops:
            loop = open_loops[-1]
            loop[2] = loop[2] or bool(_DOT.search(line))
            loop[3] = loop[3] or any(op in line for op in _ASYNC_COPY)
        if " scf.for " in line and line.rstrip().endswith("{"):
            open_loops.append([depth + 1, number, False, False])
        depth += line.count("{") - line.count("}")
        while open_loops and depth < open_loops[-1][0]:
            _, start, has_product, has_copy = open_loops.pop()
            if has_product and not has_copy:
                found.append(start)
    return found


def _ctas_per_sm(arch: int, registers: int | None, num_warps: int, shared: int) -> int:
    threads = 32 * num_warps
    by_threads = 2048 // threads
    by_registers = 65536 // (math.ceil((registers or 1) / 8) * 8 * threads)
    by_shared = _SHARED_PER_SM[arch] // (shared + 1024)  # 1 KiB per CTA is reserved
    return min(by_threads, by_registers, by_shared, 32)


def analyze(case: GateCase) -> Report:
    spec = case.spec
    compiled = compile_kernel(spec, case.arch)
    ptx, ttgir, cubin = compiled.asm["ptx"], compiled.asm["ttgir"], compiled.asm["cubin"]
    resources = cuobjdump(cubin, "--dump-resource-usage")
    sass = cuobjdump(cubin, "--dump-sass")
    registers = re.search(r"REG:(\d+)", resources or "")
    report = Report(spec.name, case.arch, f"w{spec.num_warps} s{spec.num_stages}")
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k(\d+)", ptx)
    report.wgmma = len(wgmma)
    report.wgmma_work = sum(64 * int(n) * int(k) for n, k in wgmma) * (spec.num_warps // 4)
    report.mma_sync = len(re.findall(r"\bmma\.sync\.", ptx))
    report.cp_async = len(re.findall(r"\bcp\.async\.c[ag]\.", ptx))
    report.tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    report.registers = int(registers.group(1)) if registers else None
    report.spills = None if sass is None else len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass))
    report.shared = compiled.metadata.shared
    report.ctas_per_sm = _ctas_per_sm(case.arch, report.registers, spec.num_warps, report.shared)
    report.dot_work, report.plain_dots = _dot_work(ttgir)
    report.loops_without_async = loops_without_async_copies(ttgir)
    if case.arch == 90 and case.sixteen_bit:
        report.failures = _rule_failures(case, report)
    return report


def _rule_failures(case: GateCase, report: Report) -> list[str]:
    failures = []
    if case.mma_sync_reason is None and (report.mma_sync or report.plain_dots):
        failures.append(f"{report.mma_sync} mma.sync instructions, {report.plain_dots} products not on wgmma")
    if report.wgmma_work > report.dot_work:
        failures.append(f"wgmma does {report.wgmma_work / report.dot_work:.2f}x the products' work (computed twice)")
    if report.loops_without_async:
        failures.append(f"loops at TTGIR lines {report.loops_without_async} run products with no asynchronous copy")
    if report.spills is None:
        failures.append("no cuobjdump to read the SASS: spills unknown")
    elif report.spills > case.spill_budget:
        failures.append(f"{report.spills} spill instructions, budget {case.spill_budget}")
    return failures


def gate_cases(package: str = KERNEL_MODULES_PACKAGE) -> list[GateCase]:
    root = importlib.import_module(package)
    cases = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("aot", "gate"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if hasattr(module, "gate_cases"):
            cases.extend(module.gate_cases())
    return cases


def _distinct(cases: list[GateCase]) -> dict[tuple, tuple[GateCase, list[str]]]:
    """One entry per distinct compile, with every use that asks for it."""
    distinct = {}
    for case in cases:
        spec = case.spec
        key = (spec.fn.__name__, tuple(spec.signature.items()), tuple(sorted(spec.constexprs.items())),
               spec.num_warps, spec.num_stages, tuple(sorted(spec.divisible_by_16)), case.arch)  # fmt: skip
        distinct.setdefault(key, (case, []))[1].append(case.uses)
    return distinct


HEADER = ("| kernel | arch | config | wgmma | mma.sync | cp.async | TMA | regs | spills | shared B | CTAs/SM "
          "| work ratio | gate |")  # fmt: skip


def table_row(report: Report) -> str:
    ratio = f"{report.wgmma_work / report.dot_work:.2f}" if report.dot_work and report.wgmma else "-"
    verdict = "FAIL" if report.failures else "ok"
    return (f"| {report.name} | sm_{report.arch} | {report.config} | {report.wgmma} | {report.mma_sync} | "
            f"{report.cp_async} | {report.tma} | {report.registers} | {report.spills} | {report.shared} | "
            f"{report.ctas_per_sm} | {ratio} | {verdict} |")  # fmt: skip


_PENDING: list[GateCase] = []  # what the forked workers compile, by index


def _analyze_pending(index: int) -> Report:
    case = _PENDING[index]
    print(f"[{index + 1}/{len(_PENDING)}] {case.spec.name} sm_{case.arch}", file=sys.stderr, flush=True)
    return analyze(case)


def run_gate(json_path: str | None = None, workers: int | None = None) -> int:
    distinct = list(_distinct(gate_cases()).values())
    _PENDING[:] = [case for case, _uses in distinct]
    with multiprocessing.get_context("fork").Pool(workers or os.cpu_count()) as pool:  # compiles are CPU-bound
        reports = pool.map(_analyze_pending, range(len(_PENDING)), chunksize=1)
    for report, (_case, uses) in zip(reports, distinct, strict=True):
        report.uses = uses
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for report in reports:
        print(table_row(report))
    failed = [report for report in reports if report.failures]
    for report in failed:
        print(f"FAILED {report.name} sm_{report.arch} (used by {report.uses[0]}, ...): {'; '.join(report.failures)}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump([report.__dict__ for report in reports], handle, indent=1)
    print(f"{len(reports)} compiles checked, {len(failed)} failed the gate")
    return 1 if failed else 0
