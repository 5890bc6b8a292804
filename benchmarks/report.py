"""Benchmark rows → markdown table, summary and PNG plot.

    python benchmarks/report.py results.json [more.json rows.jsonl ...] --markdown table.md --png plot.png

Inputs: pytest-benchmark JSON (``--benchmark-json``), ``python -m mome bench --json`` (same layout), or
the JSON-lines file the benchmarks append to with ``--rows-jsonl`` (survives a run cut short).

Ratios are recomputed from the rows of the file: best baseline's median / this row's median
(above 1: faster than every baseline of the same op, shape, mode and dtype).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mome.perf import add_ratios, group_key

ENVIRONMENT_KEYS = ("device", "torch", "cuda", "triton", "mome", "commit", "check_ids", "copy_gbps", "matmul_tflops")
COLUMNS = ("op", "shape", "mode", "dtype", "provider", "median ms", "p20–p80 ms", "figure", "% roofline",
           "vs best baseline", "vs bound", "peak MB", "status")  # fmt: skip


def _rows_of(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'benchmarks' list (pytest-benchmark format)")
    return [dict(entry.get("extra_info", {})) for entry in data["benchmarks"]]


def load_rows(*paths: str | Path) -> list[dict]:
    """The rows (one per case) of benchmark JSON / JSON-lines files, ratios recomputed over all of them."""
    rows = [row for path in paths for row in _rows_of(Path(path))]
    return add_ratios([row for row in rows if "op" in row and "provider" in row])


def to_json(rows: list[dict]) -> dict:
    """pytest-benchmark's layout (``benchmarks[].extra_info``), which :func:`load_rows` reads back."""
    names = [f"{r['op']}[{r['provider']}-{r['shape']}-{r['mode']}-{r['dtype']}]" for r in rows]
    machine = {key: rows[0].get(key) for key in ENVIRONMENT_KEYS} if rows else {}
    return {
        "machine_info": machine,
        "benchmarks": [{"name": n, "extra_info": r} for n, r in zip(names, rows, strict=True)],
    }


def _number(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _cells(row: dict) -> list[str]:
    ok = row.get("status") == "ok"
    status = "ok" if ok else f"{row.get('status', '?')}: {row.get('reason', '')}"
    if not ok:
        return [row["op"], row["shape"], row["mode"], row["dtype"], row["provider"], *[""] * 7, status]
    spread = f"{_number(row['p20_ms'])}–{_number(row['p80_ms'])}"
    figure = f"{_number(row['value'])} {row['unit']}"
    roof = row.get("pct_roofline", row.get("pct_roofline_measured"))
    ratio = row.get("ratio_to_best_baseline")
    versus = f"{ratio:.2f}× {row['best_baseline']}" if ratio is not None else ""
    bound = f"{row['ratio_to_bound']:.2f}× {row['bound']}" if row.get("ratio_to_bound") is not None else ""
    key = [row["op"], row["shape"], row["mode"], row["dtype"], row["provider"]]
    memory = _number(row.get("peak_mem_mb"))
    roof_text = "" if roof is None else f"{roof:.0f}%"
    return [*key, _number(row["median_ms"], 4), spread, figure, roof_text, versus, bound, memory, status]


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (group_key(r), r.get("role") != "mome", r["provider"]))


def environment_line(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    first = rows[0]
    parts = [f"{key} {first[key]:.0f}" if isinstance(first.get(key), float) else f"{key} {first.get(key)}"
             for key in ENVIRONMENT_KEYS if first.get(key) is not None]  # fmt: skip
    return ", ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    lines = [f"Device and versions: {environment_line(rows)}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |" for row in _sorted(rows)]
    formulas = sorted({f"{row['op']}: {row['formula']}" for row in rows if row.get("formula")})
    lines += ["", "Formulas (figure = work / median time):", *[f"- {formula}" for formula in formulas]]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict]) -> str:
    """A plain aligned table for terminals."""
    table = [list(COLUMNS)] + [_cells(row) for row in _sorted(rows)]
    widths = [max(len(line[i]) for line in table[:]) for i in range(len(COLUMNS) - 1)]
    out = []
    for line in table:
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1])
    return "\n".join(out)


def summary_table(rows: list[dict]) -> str:
    """One line per (op, shape, mode, dtype): the fastest mome provider against the best baseline."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    header = ["op", "shape", "mode", "dtype", "mome (fastest)", "figure", "% roofline", "best baseline", "figure",
              "mome / baseline speed"]  # fmt: skip
    table = [header]
    for key in sorted(groups):
        members = groups[key]
        mome = [r for r in members if r["role"] == "mome" and r.get("status") == "ok"]
        baselines = [r for r in members if r["role"] == "baseline" and r.get("status") == "ok"]
        best_mome = min(mome, key=lambda r: r["median_ms"]) if mome else None
        best_base = min(baselines, key=lambda r: r["median_ms"]) if baselines else None
        if best_mome is None:
            reasons = {
                r.get("reason", "")[:48] for r in members if r["role"] == "mome" and r["provider"] != "mome-reference"
            }
            mome_cells = ["none ran", "; ".join(sorted(reasons))[:60], ""]
        else:
            roof = best_mome.get("pct_roofline", best_mome.get("pct_roofline_measured"))
            mome_cells = [best_mome["provider"], f"{_number(best_mome['value'])} {best_mome['unit']}",
                          "" if roof is None else f"{roof:.0f}%"]  # fmt: skip
        base_cells = ["none ran", ""] if best_base is None else [best_base["provider"], _number(best_base["value"])]
        ratio = ""
        if best_mome is not None and best_base is not None:
            ratio = f"{best_base['median_ms'] / best_mome['median_ms']:.2f}×"
        table.append([*key, *mome_cells, *base_cells, ratio])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)


def plot(rows: list[dict], path: str | Path) -> Path:
    """One panel per (op, dtype), in its fwd+bwd mode where measured (else fwd): bars per provider and shape,
    the roofline (the figure a kernel at the floor would show) as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("status") == "ok"]
    modes = {}
    for row in measured:
        best = modes.get((row["op"], row["dtype"]))
        modes[(row["op"], row["dtype"])] = "fwd+bwd" if "fwd+bwd" in (best, row["mode"]) else row["mode"]
    panels: dict[tuple, list[dict]] = {}
    for row in measured:
        if row["mode"] == modes[(row["op"], row["dtype"])]:
            panels.setdefault((row["op"], row["mode"], row["dtype"]), []).append(row)
    keys = sorted(panels)[:12] or [("no measured rows", "", "")]
    figure, axes = plt.subplots(len(keys), 1, figsize=(11, 3.2 * len(keys)), squeeze=False)
    for axis, key in zip(axes[:, 0], keys, strict=True):
        members = panels.get(key, [])
        shapes = sorted({r["shape"] for r in members})
        providers = sorted({r["provider"] for r in members})
        width = 0.8 / max(1, len(providers))
        for index, provider in enumerate(providers):
            values = {r["shape"]: r["value"] for r in members if r["provider"] == provider}
            positions = [s + index * width for s in range(len(shapes))]
            axis.bar(positions, [values.get(shape, 0.0) for shape in shapes], width, label=provider)
        for slot, shape in enumerate(shapes):
            floors = [r for r in members if r["shape"] == shape and r.get("floor_ms")]
            if floors:  # the value a kernel at the roofline floor would show
                best = floors[0]["value"] * floors[0]["median_ms"] / floors[0]["floor_ms"]
                axis.hlines(best, slot - width / 2, slot + 0.8 - width / 2, colors="black", linewidth=2)
        unit = members[0]["unit"] if members else ""
        has_roofline = any(r.get("floor_ms") for r in members)
        axis.set_title(" · ".join(k for k in key if k) + ("  (black: roofline)" if has_roofline else ""))
        axis.set_ylabel(unit)
        axis.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, rotation=20, fontsize=7)
        if providers:
            axis.legend(fontsize=7, ncol=4)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="benchmark JSON or JSON-lines files")
    parser.add_argument("--markdown", help="write the markdown table here (default: print it)")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--json-out", help="write all rows here, ratios included (pytest-benchmark layout)")
    parser.add_argument("--summary", action="store_true", help="print the one-line-per-case summary")
    args = parser.parse_args(argv)
    rows = load_rows(*args.inputs)
    if not rows:
        print(f"no benchmark rows in {', '.join(args.inputs)}", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    if args.markdown:
        Path(args.markdown).write_text(table + "\nSummary:\n\n```\n" + summary_table(rows) + "\n```\n")
    elif not args.summary:
        print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(to_json(rows), indent=1, default=str))
    if args.png:
        plot(rows, args.png)
    if args.summary:
        print(summary_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
