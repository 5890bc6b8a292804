"""benchmarks/gpu_check.sh: argument handling and the plan it prints with --dry-run (no GPU needed)."""

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_every_step_in_order(tmp_path):
    result = run("--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"^\s*\d+\. (\S+)", result.stdout, flags=re.M)
    assert steps[:3] == ["environment", "install", "mome-info"]
    assert steps.index("install") < steps.index("gpu-tests") < steps.index("bench-attention")
    assert {"bench-attention", "bench-decode", "bench-modality", "bench-itc", "bench-layer"} <= set(steps)
    assert steps[-1] == "report"
    assert "pip install --no-build-isolation --no-deps -e ." in result.stdout
    assert "pytest tests -m gpu" in result.stdout
    assert not (tmp_path / "out").exists(), "a dry run must not create the output folder"


def test_dry_run_writes_at_most_eight_files():
    result = run("--dry-run", "--out", "/nonexistent/out")
    logs = set(re.findall(r"-> (\S+)", result.stdout))
    outputs = {log for log in logs if log != "bench.*"} | {"bench.json", "bench.md", "bench.png"}
    assert len(outputs) <= 8, outputs


def test_time_limits_fit_the_budget():
    result = run("--dry-run", "--budget", "470")
    limits = [int(seconds) for seconds in re.findall(r"at most\s+(\d+)s", result.stdout)]
    assert limits and all(limit > 0 for limit in limits)
    assert "budget 470s" in result.stdout  # the steps share it: each is cut to what is left


def test_skips_and_subset():
    result = run("--dry-run", "--skip-install", "--skip-tests", "--subset", "full")
    assert result.returncode == 0
    assert " install " not in result.stdout and "gpu-tests" not in result.stdout
    assert "--subset full" in result.stdout


def test_bench_picks_families():
    result = run("--dry-run", "--bench", "decode,itc")
    steps = re.findall(r"^\s*\d+\. (\S+)", result.stdout, flags=re.M)
    assert [s for s in steps if s.startswith("bench-")] == ["bench-decode", "bench-itc"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--budget", "ten"], "--budget takes whole seconds, got 'ten'"),
        (["--budget"], "--budget needs seconds"),
        (["--subset", "huge"], "--subset takes tiny, quick or full, got 'huge'"),
        (["--out"], "--out needs a directory"),
        (["--out", "--skip-tests"], "--out needs a directory"),
        (["--bench", "attention,warp"], "--bench takes attention, decode, modality, itc, layer; got 'warp'"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    result = run("--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr


def test_help():
    result = run("--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "at most 8 files" in result.stdout
