"""benchmarks/report.py on a small synthetic run: markdown table, summary, JSON round trip and PNG plot."""

import json

import pytest

from mome.bench import benchmarks_module

report = benchmarks_module("report")

ENV = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", mome="0.1.0", commit="abc123")


def _row(provider, role, ms, *, shape="vlm237-none", status="ok", reason=None):
    row = dict(op="attention", shape=shape, mode="fwd", dtype="bf16", provider=provider, role=role, status=status,
               unit="TFLOP/s", formula="4·B·H·N²·D", flops=2e12, bytes=1e9, **ENV)  # fmt: skip
    if status == "ok":
        row.update(median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, value=2e12 / (ms * 1e-3) / 1e12, floor_ms=2.0,
                   pct_roofline=100 * 2.0 / ms, peak_mem_mb=12.5)  # fmt: skip
    else:
        row["reason"] = reason
    return row


def _synthetic(tmp_path):
    rows = [
        _row("mome-triton", "mome", 4.0),
        _row("sdpa-flash", "baseline", 5.0),
        _row("eager", "baseline", 20.0),
        _row("mome-cuda", "mome", None, status="unavailable", reason="mome has no cuda implementation of attention"),
        _row("sdpa-flash", "baseline", 8.0, shape="fa-s2048-d128-causal"),
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": [{"name": str(i), "extra_info": r} for i, r in enumerate(rows)]}))
    return path


def test_load_rows_recomputes_ratios(tmp_path):
    rows = report.load_rows(_synthetic(tmp_path))
    triton = next(r for r in rows if r["provider"] == "mome-triton")
    assert triton["best_baseline"] == "sdpa-flash" and triton["ratio_to_best_baseline"] == pytest.approx(1.25)
    eager = next(r for r in rows if r["provider"] == "eager")
    assert eager["ratio_to_best_baseline"] == pytest.approx(0.25)


def test_markdown_table_has_every_row_and_reason(tmp_path):
    table = report.markdown_table(report.load_rows(_synthetic(tmp_path)))
    lines = [line for line in table.splitlines() if line.startswith("| attention")]
    assert len(lines) == 5
    assert "NVIDIA H100 80GB HBM3" in table and "commit abc123" in table
    triton = next(line for line in lines if "mome-triton" in line)
    assert "500 TFLOP/s" in triton and "50%" in triton and "1.25× sdpa-flash" in triton
    assert "unavailable: mome has no cuda implementation of attention" in table
    assert "attention: 4·B·H·N²·D" in table


def test_summary_names_fastest_mome_and_best_baseline(tmp_path):
    summary = report.summary_table(report.load_rows(_synthetic(tmp_path))).splitlines()
    assert len(summary) == 3  # header + two (shape, mode, dtype) groups
    vlm = next(line for line in summary if "vlm237-none" in line)
    assert "mome-triton" in vlm and "sdpa-flash" in vlm and "1.25×" in vlm
    fa = next(line for line in summary if "fa-s2048" in line)
    assert "none ran" in fa


def test_main_writes_markdown_json_and_png(tmp_path, capsys):
    source = _synthetic(tmp_path)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps(_row("flex", "baseline", 2.0)) + "\n")
    out_md, out_png, out_json = tmp_path / "t.md", tmp_path / "p.png", tmp_path / "all.json"
    argv = [str(source), str(jsonl), "--markdown", str(out_md), "--png", str(out_png), "--json-out", str(out_json)]
    assert report.main([*argv, "--summary"]) == 0
    assert "flex" in capsys.readouterr().out  # the JSON-lines row joined the group and is now its best baseline
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    assert "Summary:" in out_md.read_text()
    again = report.load_rows(out_json)
    assert len(again) == 6
    assert next(r for r in again if r["provider"] == "mome-triton")["best_baseline"] == "flex"


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="'benchmarks' list"):
        report.load_rows(wrong)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert report.main([str(empty)]) == 1
    assert "no benchmark rows" in capsys.readouterr().err
