"""pytest-benchmark wiring: each ``bench_<op>.py`` exposes ``FAMILIES``; their cases become parameters.

Options: ``--subset tiny|quick|full`` (default: quick on a GPU, tiny on CPU), ``--budget-ms`` (timed
milliseconds per case). Every row lands in pytest-benchmark's ``extra_info`` (the authoritative
timings: CUDA events per call; pytest-benchmark's own stats time the whole measurement once).
"""

from __future__ import annotations

import json

import pytest
import torch

from mome import perf, settings

from . import harness


@pytest.fixture(scope="session", autouse=True)
def _no_id_checks_while_timing():
    """The id range check reads ids back to the host on every call; it is off while timing kernels (each row
    records the setting). MOME_CHECK_IDS=1 measures what a default call costs."""
    with settings.override(check_ids=settings.check_ids(when_unset=False)):
        yield


_ROWS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("mome benchmarks")
    group.addoption("--subset", choices=harness.SUBSETS, default=None, help="which shapes (default: quick on GPU)")
    group.addoption("--budget-ms", type=float, default=100.0, help="timed milliseconds per case")
    group.addoption("--rows-jsonl", default=None, help="append each row to this file as it is measured")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _subset(config) -> str:
    chosen = config.getoption("--subset")
    return chosen or ("quick" if _device().type == "cuda" else "tiny")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    subset = _subset(metafunc.config)
    dtypes = None if _device().type == "cuda" else ("fp32",)  # CPU: no fast half-precision matmuls
    selected = [case for family in metafunc.module.FAMILIES for case in harness.cases(family, subset, dtypes=dtypes)]
    # Providers that compile on first use (FlexAttention) go last: a run cut short by its time limit then
    # loses the fewest rows.
    selected.sort(key=lambda case: case.provider.name == "flex")
    metafunc.parametrize("case", selected, ids=[case.id for case in selected])


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return _device()


@pytest.fixture(scope="session")
def ceilings(bench_device):
    """Copy bandwidth and bf16 matmul throughput measured once per run (None on CPU or on failure)."""
    if bench_device.type != "cuda":
        return None
    try:
        measured = perf.measure_ceilings(bench_device)
    except Exception as error:  # the run goes on with datasheet limits only
        print(f"measuring the ceilings failed: {error}")
        return None
    print(f"\nmeasured ceilings: copy {measured.copy_gbps:.0f} GB/s, bf16 matmul {measured.matmul_tflops:.0f} TFLOP/s")
    return measured


@pytest.fixture(scope="session")
def environment(bench_device) -> dict:
    return perf.environment(bench_device)


@pytest.fixture
def measure(benchmark, bench_device, ceilings, environment, request):
    """``measure(case)``: one row into ``benchmark.extra_info``, unavailable providers included."""
    budget_ms = request.config.getoption("--budget-ms")

    def run(case):
        row = {}
        benchmark.pedantic(
            lambda: row.update(harness.run_case(case, bench_device, ceilings=ceilings, budget_ms=budget_ms)),
            rounds=1,
            iterations=1,
        )
        row.update(environment, check_ids="1" if settings.check_ids() else "0")
        if ceilings is not None:
            row.update(copy_gbps=ceilings.copy_gbps, matmul_tflops=ceilings.matmul_tflops)
        benchmark.extra_info.update(row)
        _ROWS.append(benchmark.extra_info)
        rows_file = request.config.getoption("--rows-jsonl")
        if rows_file:  # survives a run cut short by a timeout, unlike pytest-benchmark's JSON
            with open(rows_file, "a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
        return row

    return run


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark saves its JSON: the ratios need every provider of the run.
    perf.add_ratios(_ROWS)
    yield


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from .report import text_table

    terminalreporter.write_sep("=", "mome benchmark rows (median ms per call; ratio = best baseline time / this time)")
    terminalreporter.write_line(text_table(_ROWS))
