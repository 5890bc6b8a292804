"""mome.perf: FLOP/byte formulas against hand-worked cases, device limits, timing and same-run ratios."""

import pytest
import torch

from mome import perf


def test_attention_flops_hand_worked():
    # 4·B·H·Nq·Nk·D = 4·1·1·2·3·4 = 96
    assert perf.attention_flops(1, 1, 2, 3, 4) == 96
    assert perf.attention_flops(1, 1, 2, 3, 4, causal=True) == 48
    assert perf.attention_flops(1, 1, 2, 3, 4, mode="bwd") == 240  # ×2.5
    assert perf.attention_flops(1, 1, 2, 3, 4, mode="fwd+bwd") == 336  # ×3.5
    assert perf.attention_flops(2, 3, 5, 5, 8, density=0.25) == 4 * 2 * 3 * 5 * 5 * 8 * 0.25


def test_attention_bytes_hand_worked():
    # fp16, B1 H2 Hkv1 Nq3 Nk4 D8: q 48 and k 32 elements; fwd 2·(2·48 + 2·32) + LSE 4·6 = 344
    assert perf.attention_bytes(1, 2, 1, 3, 4, 8, torch.float16) == 344
    # bwd: 2·(4·48 + 4·32) + 24 = 664
    assert perf.attention_bytes(1, 2, 1, 3, 4, 8, torch.float16, "bwd") == 664
    assert perf.attention_bytes(1, 2, 1, 3, 4, 8, torch.float16, "fwd+bwd") == 344 + 664


def test_gemm_and_ffn_flops_hand_worked():
    assert perf.gemm_flops(2, 3, 4) == 48
    # T10 D4 F8: 2·10·8·4 + 2·10·4·8 = 1280; backward 2×
    assert perf.ffn_flops(10, 4, 8) == 1280
    assert perf.ffn_flops(10, 4, 8, mode="bwd") == 2560
    assert perf.ffn_flops(10, 4, 8, mode="fwd+bwd") == 3840
    assert perf.ffn_flops(10, 4, 8, dim_out=2) == 2 * 10 * 8 * 4 + 2 * 10 * 2 * 8


def test_ffn_bytes_hand_worked():
    # fp32, T10 D4 F8, 2 experts used: weights 2·(32 + 32 + 8 + 4) = 152; fwd 4·(40 + 40 + 152)
    assert perf.ffn_bytes(10, 4, 8, 2, torch.float32) == 4 * (40 + 40 + 152)
    assert perf.ffn_bytes(10, 4, 8, 2, torch.float32, mode="bwd") == 4 * (80 + 80 + 160 + 456)


def test_decode_formulas_hand_worked():
    # fp16: K and V over 100 cached positions, Hkv 2, D 8 → 2·100·2·8 = 3200 elements; q + out 2·2·4·8 = 128
    assert perf.decode_bytes(100, 2, 4, 2, 8, torch.float16) == 2 * (3200 + 128)
    assert perf.decode_flops(100, 4, 8) == 4 * 100 * 4 * 8


def test_itc_flops_hand_worked():
    # one pass 2·B·(B+Q)·d = 2·4·10·8 = 640; fwd 2 passes, 4 with distillation; bwd 4 passes
    assert perf.itc_flops(4, 6, 8) == 1280
    assert perf.itc_flops(4, 6, 8, distill=True) == 2560
    assert perf.itc_flops(4, 6, 8, mode="fwd+bwd") == 1280 + 2560
    assert perf.itc_bytes(4, 6, 8, torch.float32) == 4 * 8 * (8 + 12)


def test_layer_norm_bytes_and_layer_flops_hand_worked():
    assert perf.layer_norm_bytes(10, 4, 2, torch.float32) == 4 * (80 + 16)
    assert perf.layer_norm_bytes(10, 4, 2, torch.float32, "bwd") == 4 * (120 + 32)
    # B1 S2 D4 H2 F8: projections 2·2·16·4 = 256, FFN 2·2·8·4·2 = 256, attention 4·1·2·2·2·2 = 64
    assert perf.mome_layer_flops(1, 2, 4, 2, 8, mode="fwd") == 576
    assert perf.mome_layer_flops(1, 2, 4, 2, 8, mode="fwd+bwd") == 512 * 3 + 64 * 3.5


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="mode must be one of .*'sideways'"):
        perf.attention_flops(1, 1, 1, 1, 1, mode="sideways")
    with pytest.raises(ValueError, match="mode"):
        perf.layer_norm_bytes(1, 1, 1, torch.float16, "up")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("Tesla T4", None),
    ],
)
def test_device_limits_lookup(name, expected):
    limits = perf.device_limits(name)
    assert (limits.name if limits else None) == expected


def test_device_limits_are_decimal_datasheet_figures():
    h100, h200 = perf.DEVICE_LIMITS["H100 SXM"], perf.DEVICE_LIMITS["H200"]
    assert h100.peak_tflops(torch.bfloat16) == 989.4 and h100.hbm_gbps == 3350.0
    assert h200.peak_tflops("fp16") == 989.4 and h200.hbm_gbps == 4800.0
    assert perf.DEVICE_LIMITS["A100"].peak_tflops(torch.float32) == 19.5


def test_roofline_floor_takes_the_slower_limit():
    # 2e12 FLOP at 1000 TFLOP/s = 2 ms; 1e9 B at 1000 GB/s = 1 ms
    assert perf.roofline_floor_ms(2e12, 1e9, 1000.0, 1000.0) == pytest.approx(2.0)
    assert perf.roofline_floor_ms(1e9, 4e9, 1000.0, 1000.0) == pytest.approx(4.0)
    assert perf.roofline_floor_ms(0.0, 4e9, None, 2000.0) == pytest.approx(2.0)
    assert perf.roofline_floor_ms(1.0, 1.0, None, None) is None


def test_summarize_quantiles():
    timing = perf.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "test")
    assert (timing.median_ms, timing.rounds, timing.timer) == (3.0, 5, "test")
    assert timing.p20_ms == pytest.approx(1.8) and timing.p80_ms == pytest.approx(4.2)
    with pytest.raises(ValueError, match="at least one sample"):
        perf.summarize([], "test")


def test_time_calls_on_cpu_rotates_inputs():
    seen = []
    timing = perf.time_calls(seen.append, 3, torch.device("cpu"), budget_ms=5.0, min_rounds=4, max_rounds=6)
    assert timing.timer == "perf_counter" and 4 <= timing.rounds <= 6
    assert set(seen) == {0, 1, 2} and timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_input_copies_exceed_twice_l2_on_cuda_only():
    assert perf.input_copies(10e6, torch.device("cpu")) == 1
    assert perf.input_copies(60e6, torch.device("cuda"), l2_bytes=50 * 2**20) == 2
    assert perf.input_copies(1e6, torch.device("cuda")) == 4  # capped
    assert perf.input_copies(1e9, torch.device("cuda")) == 1


def test_measure_ceilings_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        perf.measure_ceilings(torch.device("cpu"))


def _row(provider, role, ms, status="ok", shape="s"):
    return dict(op="op", shape=shape, mode="fwd", dtype="bf16", provider=provider, role=role, median_ms=ms,
                status=status)  # fmt: skip


def test_add_ratios_within_each_group():
    rows = [
        _row("mome-triton", "mome", 1.0),
        _row("sdpa", "baseline", 2.0),
        _row("eager", "baseline", 4.0),
        _row("dense", "bound", 0.5),
        _row("mome-cuda", "mome", None, status="unavailable"),
        _row("eager", "baseline", 3.0, shape="other"),
    ]
    perf.add_ratios(rows)
    assert rows[0]["best_baseline"] == "sdpa" and rows[0]["ratio_to_best_baseline"] == 2.0
    assert rows[0]["bound"] == "dense" and rows[0]["ratio_to_bound"] == 0.5
    assert rows[2]["ratio_to_best_baseline"] == 0.5
    assert "ratio_to_best_baseline" not in rows[4]
    assert rows[5]["ratio_to_best_baseline"] == 1.0 and "bound" not in rows[5]


def test_environment_names_device_and_versions():
    env = perf.environment(torch.device("cpu"))
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert set(env) >= {"triton", "mome", "commit", "cuda"}
