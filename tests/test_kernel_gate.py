"""The generated-code gate (``python -m mome.kernels.aot --check``): it passes on our kernels, and each of its
rules catches the code it is written against (compiled for sm_90 without a GPU, interpreter off)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILER_ENV = {**os.environ, "TRITON_INTERPRET": "0"}

PROBES = textwrap.dedent(
    """
    import json
    import sys
    import triton
    import triton.language as tl
    from mome.kernels.aot import AotSpec, GateCase
    from mome.kernels.gate import analyze

    K_DIM = tl.constexpr(64)

    @triton.jit
    def chain(a, B, C, start, cols, ks):
        b = tl.load(B + (start + cols)[None, :] * K_DIM + ks[:, None])
        c = tl.load(C + (start + cols)[:, None] * K_DIM + ks[None, :])
        s = tl.dot(a, b)  # feeds the next product from registers, as attention's scores do
        return tl.dot(s.to(tl.float16), c)


    @triton.jit
    def products(Out, A, B, C, n, SKIP_EMPTY: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
        rows = tl.arange(0, M)
        cols = tl.arange(0, N)
        ks = tl.arange(0, K_DIM)
        a = tl.load(A + rows[:, None] * K_DIM + ks[None, :])
        acc = tl.zeros([M, K_DIM], tl.float32)
        for start in range(0, n, N):
            if SKIP_EMPTY:  # the old masked loops: loads behind a branch are never pipelined
                probe = tl.load(B + start + cols)
                if tl.max(probe.to(tl.float32)) > 0:
                    acc += chain(a, B, C, start, cols, ks)
            else:
                acc += chain(a, B, C, start, cols, ks)
        tl.store(Out + rows[:, None] * K_DIM + ks[None, :], acc)

    skip_empty, rows, warps = bool(int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
    signature = {"Out": "*fp32", "A": "*fp16", "B": "*fp16", "C": "*fp16", "n": "i32", "SKIP_EMPTY": "constexpr",
                 "M": "constexpr", "N": "constexpr"}
    constexprs = {"SKIP_EMPTY": skip_empty, "M": rows, "N": 64}
    spec = AotSpec("probe", products, signature, constexprs, num_warps=warps, num_stages=3)
    report = analyze(GateCase(spec, 90, True, "probe"))
    print(json.dumps({"failures": report.failures, "loops": report.loops_without_async,
                      "ratio": report.wgmma_work / report.dot_work, "mma_sync": report.mma_sync}))
    """
)


def probe(tmp_path, skip_empty: bool, rows: int, warps: int) -> dict:
    script = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    script.write_text(PROBES)
    result = subprocess.run([sys.executable, str(script), str(int(skip_empty)), str(rows), str(warps)],
                            capture_output=True, text=True, env=COMPILER_ENV, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_pipelined_product_loop_on_one_warpgroup_passes(tmp_path):
    report = probe(tmp_path, skip_empty=False, rows=64, warps=4)
    assert report["failures"] == [] and report["ratio"] == 1.0 and report["mma_sync"] == 0


def test_loads_behind_a_branch_are_caught(tmp_path):
    report = probe(tmp_path, skip_empty=True, rows=64, warps=4)
    assert report["loops"], report
    assert any("no asynchronous copy" in failure for failure in report["failures"])


def test_a_product_computed_by_both_warpgroups_is_caught(tmp_path):
    report = probe(tmp_path, skip_empty=False, rows=64, warps=8)  # 64 rows: both warpgroups compute the first
    assert report["ratio"] > 1.0  # measured 1.5: the product that feeds the next one from registers runs twice
    assert any("computed twice" in failure for failure in report["failures"])


def test_the_gate_passes_on_every_kernel_the_launchers_plan(tmp_path):
    report = tmp_path / "gate.json"
    result = subprocess.run([sys.executable, "-m", "mome.kernels.aot", "--check", "--json", str(report)],
                            capture_output=True, text=True, env=COMPILER_ENV, timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = json.loads(report.read_text())
    kernels = {row["name"].split("_bf16")[0] for row in rows if row["arch"] == 90}
    assert {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"} <= kernels
    names = [row["name"] for row in rows if row["arch"] == 90]
    # every family's kernels at the configurations their launch plans choose (issue 15)
    families = ("itc_fwd", "itc_bwd_rows", "itc_bwd_cols", "grouped_gemm_fwd", "grouped_gemm_dx", "grouped_weight_grad",
                "modality_layer_norm_fwd", "modality_layer_norm_bwd", "routing_count", "routing_scatter",
                "decode_split", "decode_combine")  # fmt: skip
    assert all(any(name.startswith(family) for name in names) for family in families), sorted(names)
    for family in ("itc_fwd_both", "itc_fwd_has_queue_ids_distill", "itc_bwd_rows", "itc_bwd_cols"):  # d = 256
        assert any(name.startswith(family) and "_whole_" in name for name in names), family
    products = [row for row in rows if row["arch"] == 90 and row["name"].startswith(("itc_", "grouped_"))]
    sixteen_bit = [row for row in products if "fp32" not in row["name"]]
    assert sixteen_bit and all(row["wgmma"] > 0 and row["mma_sync"] == 0 and row["cp_async"] > 0 for row in sixteen_bit)
    hopper = [row for row in rows if row["arch"] == 90 and row["name"].startswith("attention")
              and "fp32" not in row["name"] and "delta" not in row["name"]]  # fmt: skip
    assert hopper and all(row["wgmma"] > 0 and row["mma_sync"] == 0 and row["tma"] > 0 for row in hopper)
    # issue 14: the bias, dropout and bias + dropout + padding variants and the dBias kernel are gated too
    hopper_names = [row["name"] for row in hopper]
    for tag in ("_b_", "_d_", "_kbd_"):
        assert any(name.startswith("attention_fwd_bf16") and tag in name for name in hopper_names), tag
        assert any(name.startswith("attention_bwd_dkdv_bf16") and tag in name for name in hopper_names), tag
    assert any(name.startswith("attention_bias_grad_bf16") for name in hopper_names)
    print(result.stdout)
