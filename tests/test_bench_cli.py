"""``python -m mome bench`` (mome.bench.main) on CPU at a tiny shape, and the benchmark families' wiring."""

import json
import os
from pathlib import Path

import pytest
import torch

from mome import bench
from mome.ops import BackendUnavailableError

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_run_reports_measured_and_unavailable_providers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--op", "decode_attention", "--shape", "tiny-full", "--provider", "mome-reference", "sdpa", "mome-triton",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kernel figures (mome-triton, mome-cuda) need a GPU" in printed
    rows = {entry["extra_info"]["provider"]: entry["extra_info"] for entry in json.loads(out.read_text())["benchmarks"]}
    assert set(rows) == {"mome-reference", "sdpa", "mome-triton"}
    for name in ("mome-reference", "sdpa"):
        row = rows[name]
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["unit"] == "GB/s" and row["value"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__ and row["dtype"] == "fp32"
    assert rows["mome-reference"]["best_baseline"] == "sdpa"
    assert rows["mome-triton"]["status"] == "unavailable" and "need a GPU" in rows["mome-triton"]["reason"]


def test_list_and_bad_options(capsys):
    assert bench.main(["--list"]) == 0
    listing = capsys.readouterr().out
    for op in ("attention", "decode_attention", "modality_ffn", "modality_layer_norm", "itc_loss", "mome_layer"):
        assert f"{op}:" in listing
    assert bench.main(["--op", "nonsense"]) == 2
    assert "unknown --op nonsense" in capsys.readouterr().err
    assert bench.main(["--op", "attention", "--shape", "no-such-shape"]) == 2
    assert "no case matches" in capsys.readouterr().err


def test_every_family_has_tiny_cases_and_a_baseline():
    families = bench.families()
    harness = bench.benchmarks_module("harness")
    for op, family in families.items():
        tiny = list(harness.cases(family, "tiny"))
        assert tiny, f"{op} has no tiny case"
        roles = {case.provider.role for case in tiny}
        assert {"mome", "baseline"} <= roles, f"{op}: roles {roles}"
        assert len({case.id for case in tiny}) == len(tiny), f"{op}: duplicate case ids"


@pytest.mark.parametrize(
    "op, shape_name",
    [
        ("attention", "tiny-prefix"),
        ("attention", "tiny-padding"),
        ("attention", "tiny-bias"),
        ("decode_attention", "tiny-ragged"),
        ("modality_ffn", "tiny-interleaved"),
        ("modality_ffn", "tiny-split"),
        ("modality_layer_norm", "tiny-split"),
        ("itc_loss", "tiny-clip"),
        ("itc_loss", "tiny-albef"),
        ("mome_layer", "tiny-vlmo"),
        ("mome_layer", "tiny-beit3"),
    ],
)
def test_baselines_compute_what_the_reference_computes(op, shape_name):
    """Every baseline of a tiny case gives mome-reference's answer (a benchmark of a wrong baseline proves nothing)."""
    family = bench.families()[op]
    harness = bench.benchmarks_module("harness")
    shape, device = family.shapes[shape_name], torch.device("cpu")
    inputs = family.make_inputs(shape, torch.float32, device, 0, False)
    outputs = {}
    for name, provider in family.providers.items():
        if provider.cuda_only or provider.role == "bound" or not provider.applies(shape) or name == "open_clip":
            continue
        try:
            made = provider.setup(shape, inputs, device, "fwd", {})
        except harness.Unavailable:
            continue
        prepare, forward = made if isinstance(made, tuple) else ((lambda x: x), made)
        try:
            with torch.no_grad():
                outputs[name] = forward(prepare(inputs))
        except harness.Unavailable:
            continue
    assert len(outputs) >= 2, f"{op}: only {list(outputs)} ran"
    expected = outputs.pop("mome-reference")
    for name, value in outputs.items():
        torch.testing.assert_close(value, expected, rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{op} {n}: {m}")


def test_pytest_collects_benchmarks_folder(pytester, tmp_path, monkeypatch):
    """``pytest benchmarks -k ...`` runs a case (in process, sys.path and modules restored afterwards)."""
    monkeypatch.setenv("MOME_CHECK_IDS", os.environ.get("MOME_CHECK_IDS", "1"))  # the benchmarks' conftest sets it
    rows = tmp_path / "rows.jsonl"
    result = pytester.runpytest_inprocess(
        str(ROOT / "benchmarks" / "bench_decode.py"), "-p", "no:cacheprovider", "--benchmark-disable",
        "-k", "reference and tiny-full", "--rows-jsonl", str(rows),
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["provider"] == "mome-reference" and row["status"] == "ok"


@pytest.mark.parametrize("op", ["attention", "decode_attention", "modality_ffn", "itc_loss", "mome_layer"])
def test_mome_triton_provider_matches_reference_under_the_interpreter(op):
    """The providers a GPU run times call the Triton backend with the reference's arguments (tiny, fp32)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    family = bench.families()[op]
    shape_name = next(name for name, shape in family.shapes.items() if "tiny" in shape.subsets)
    shape, device = family.shapes[shape_name], torch.device("cpu")
    inputs = family.make_inputs(shape, torch.float32, device, 0, False)
    results = {}
    for name in ("mome-reference", "mome-triton"):
        forward = family.providers[name].setup(shape, inputs, device, "fwd", {})
        try:
            with torch.no_grad():
                results[name] = forward(inputs)
        except BackendUnavailableError as why:
            pytest.skip(f"{op}: {why}")
    torch.testing.assert_close(results["mome-triton"], results["mome-reference"], rtol=1e-4, atol=1e-5)
