"""Triton backend of modality_linear / modality_ffn / modality_layer_norm against the float64 reference.

Forward and every gradient, odd sizes (not multiples of the tiles or of 16), E = 1, 2, 3, an empty expert,
all tokens in one expert, interleaved and split layouts, every activation; launcher outputs are poisoned.
"""

from __future__ import annotations

import re

import pytest
import torch

from mome.ops import modality_ffn, modality_layer_norm, modality_linear
from mome.ops.modality import ExpertLinear, Routing
from mome.reference import modality_ffn_ref, modality_layer_norm_ref, modality_linear_ref
from tests.helpers import TOLERANCE, assert_close
from tests.test_modality_routing import make_ids

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

INTERPRETER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 widened in the interpreter


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed: int, dtype: torch.dtype, *shapes_and_scales) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, scale in shapes_and_scales:
        if shape is None:
            tensors.append(None)
            continue
        tensors.append((torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(_device(), dtype))
    return tensors


def _check_against_reference(run, reference, inputs, dtype, tol=None):
    """Forward and the gradient of every tensor input against the float64 reference with one random cotangent."""
    tol = TOLERANCE[dtype] if tol is None else tol
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad.to(out.device, dtype))
    wide = [None if t is None else t.detach().double().cpu().requires_grad_() for t in inputs]
    expected = reference(*wide)
    expected.backward(grad)
    assert_close(out.detach().cpu(), expected.detach(), tol, "forward")
    for index, (leaf, ref) in enumerate(zip(leaves, wide, strict=True)):
        if leaf is not None:
            assert_close(leaf.grad.cpu(), ref.grad, tol, f"gradient of input {index}")


LINEAR_CASES = [
    # name, tokens, experts, din, dout, layout, activation, bias
    ("T1", 1, 2, 24, 40, "interleaved", "gelu", True),
    ("E1_plain_gemm", 45, 1, 20, 33, "interleaved", "relu", False),
    ("E2_interleaved", 77, 2, 40, 24, "interleaved", "gelu", True),
    ("E3_empty_expert", 70, 3, 17, 50, "empty", "gelu_tanh", True),
    ("E3_all_in_one", 40, 3, 33, 20, "one", "relu", True),
    ("E2_split_no_activation", 90, 2, 48, 36, "split", None, False),
]


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c[0])
def test_linear_forward_and_gradients(case, dtype):
    _, tokens, experts, din, dout, layout, activation, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens)).to(_device())
    x, weight, bias = _inputs(
        tokens,
        dtype,
        ((tokens, din), 1.0),
        ((experts, dout, din), din**-0.5),
        ((experts, dout) if has_bias else None, 1.0),
    )
    _check_against_reference(
        lambda x_, w_, b_: modality_linear(x_, ids, w_, b_, activation=activation, backend="triton"),
        lambda x_, w_, b_: modality_linear_ref(x_, ids.cpu(), w_, b_, activation=activation),
        [x, weight, bias],
        dtype,
    )


FFN_CASES = [
    # name, tokens, experts, dim, hidden, dout, layout, activation, biases
    ("E3_interleaved_gelu", 61, 3, 24, 40, 24, "interleaved", "gelu", True),
    ("E2_empty_tanh", 50, 3, 17, 33, 20, "empty", "gelu_tanh", True),
    ("E1_relu_no_bias", 37, 1, 20, 36, 20, "interleaved", "relu", False),
    ("E2_split_no_activation", 45, 2, 16, 24, 18, "split", None, True),
]


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: c[0])
def test_ffn_forward_and_gradients(case, dtype):
    _, tokens, experts, dim, hidden, dout, layout, activation, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens)).to(_device())
    tensors = _inputs(
        tokens + 1,
        dtype,
        ((tokens, dim), 1.0),
        ((experts, hidden, dim), dim**-0.5),
        ((experts, hidden) if has_bias else None, 1.0),
        ((experts, dout, hidden), hidden**-0.5),
        ((experts, dout) if has_bias else None, 1.0),
    )
    _check_against_reference(
        lambda *t: modality_ffn(t[0], ids, *t[1:], activation=activation, backend="triton"),
        lambda *t: modality_ffn_ref(t[0], ids.cpu(), *t[1:], activation=activation),
        tensors,
        dtype,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans a CPU launch as sm_90")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ffn_as_planned_for_sm90_weights_by_tma(dtype, monkeypatch):
    """sm_90's plan (weights by tensor descriptors, BLOCK_K of the Hopper table) run by the interpreter, with
    widths that are multiples of 8 (TMA rows) but not of the tiles."""
    from mome.kernels import modality_gemm

    monkeypatch.setattr(modality_gemm, "target", lambda device: (90, 132))
    assert modality_gemm.gemm_plan(90, dtype, 61, 40, 24, 3, b_transposed=True, has_bias=True).constexprs["USE_TMA"]
    test_ffn_forward_and_gradients(FFN_CASES[0], dtype)


LAYER_NORM_CASES = [
    # name, tokens, experts, dim, layout, bias
    ("T1", 1, 2, 40, "interleaved", True),
    ("E1", 33, 1, 24, "interleaved", True),
    ("E3_empty_expert", 70, 3, 17, "empty", True),
    ("E3_all_in_one_no_bias", 40, 3, 50, "one", False),
    ("E2_split_wide", 37, 2, 200, "split", True),
]


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=lambda c: c[0])
def test_layer_norm_forward_and_gradients(case, dtype):
    _, tokens, experts, dim, layout, has_bias = case
    ids = make_ids(tokens, experts, layout, torch.Generator().manual_seed(tokens)).to(_device())
    x, weight, bias = _inputs(
        tokens + 2, dtype, ((tokens, dim), 3.0), ((experts, dim), 1.0), ((experts, dim) if has_bias else None, 1.0)
    )
    x = x + 0.5  # a mean far from zero exercises the centring
    _check_against_reference(
        lambda x_, w_, b_: modality_layer_norm(x_, ids, w_, b_, 1e-5, backend="triton"),
        lambda x_, w_, b_: modality_layer_norm_ref(x_, ids.cpu(), w_, b_, 1e-5),
        [x, weight, bias],
        dtype,
    )


def test_no_tokens_gives_empty_outputs_and_zero_parameter_gradients():
    ids = torch.zeros(0, dtype=torch.int64, device=_device())
    x, w1, b1, w2, gamma = (
        t.requires_grad_()
        for t in _inputs(
            1, torch.float32, ((0, 8), 1.0), ((2, 12, 8), 1.0), ((2, 12), 1.0), ((2, 8, 12), 1.0), ((2, 8), 1.0)
        )
    )
    hidden = modality_ffn(x, ids, w1, b1, w2, None, backend="triton")
    out = hidden + modality_layer_norm(x, ids, gamma, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 8) and x.grad.shape == (0, 8)
    for name, param in dict(w1=w1, b1=b1, w2=w2, gamma=gamma).items():
        assert torch.equal(param.grad, torch.zeros_like(param)), f"{name}: gradient of no tokens must be zero"


def test_ffn_and_layer_norm_trace_under_torch_compile():
    ids = make_ids(20, 3, "interleaved", torch.Generator().manual_seed(3)).to(_device())
    x, w1, b1, w2, b2, gamma = _inputs(
        5,
        torch.float32,
        ((20, 16), 1.0),
        ((3, 24, 16), 0.25),
        ((3, 24), 1.0),
        ((3, 16, 24), 0.2),
        ((3, 16), 1.0),
        ((3, 16), 1.0),
    )

    def block(x_):
        normed = modality_layer_norm(x_, ids, gamma, None, backend="triton")
        return x_ + modality_ffn(normed, ids, w1, b1, w2, b2, backend="triton")

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_beit3_like_shapes(dtype):
    """Tile-sized GPU configs on a split + interleaved mix: 197 image tokens then 64 text tokens, per sample."""
    ids = torch.cat([torch.zeros(197, dtype=torch.int64), torch.ones(64, dtype=torch.int64)]).repeat(3)
    ids[::7] = 2
    ids = ids.cuda()
    tokens = ids.numel()
    tensors = _inputs(
        11,
        dtype,
        ((tokens, 768), 1.0),
        ((3, 3072, 768), 768**-0.5),
        ((3, 3072), 1.0),
        ((3, 768, 3072), 3072**-0.5),
        ((3, 768), 1.0),
    )
    _check_against_reference(
        lambda *t: modality_ffn(t[0], ids, *t[1:], activation="gelu", backend="triton"),
        lambda *t: modality_ffn_ref(t[0], ids.cpu(), *t[1:], activation="gelu"),
        tensors,
        dtype,
        tol=TOLERANCE[dtype] * (3 if dtype == torch.float32 else 1),
    )
    x, gamma, beta = _inputs(12, dtype, ((tokens, 1024), 2.0), ((3, 1024), 1.0), ((3, 1024), 1.0))
    _check_against_reference(
        lambda x_, w_, b_: modality_layer_norm(x_, ids, w_, b_, backend="triton"),
        lambda x_, w_, b_: modality_layer_norm_ref(x_, ids.cpu(), w_, b_),
        [x, gamma, beta],
        dtype,
    )


def test_launchers_take_routing_computed_by_the_caller():
    """The grouped GEMM uses the routing it is handed (the ops layer routes once per call), never its own."""
    from mome.kernels import modality as triton_backend

    device = _device()
    x, weight = _inputs(11, torch.float32, ((23, 12), 1.0), ((3, 9, 12), 0.3))
    x, weight = x.to(device), weight.to(device)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 0, 2, 1, 1, 0, 2, 0, 1, 2, 2, 0, 1, 0], device=device)
    perm = torch.sort(ids, stable=True).indices.to(torch.int32)
    inv_perm = torch.empty_like(perm).scatter_(0, perm.long(), torch.arange(23, dtype=torch.int32, device=device))
    offsets = torch.cat([ids.new_zeros(1), torch.bincount(ids, minlength=3).cumsum(0)]).to(torch.int32)
    expected = modality_linear_ref(x.double(), ids, weight.double(), activation="relu")
    linear = ExpertLinear(weight, None)
    given, _ = triton_backend.modality_linear_fwd(x, ids, Routing(perm, inv_perm, offsets), linear, "relu")
    assert_close(given, expected, TOLERANCE[torch.float32])
    swapped = torch.tensor([0, offsets[2].item(), offsets[2].item(), 23], dtype=torch.int32, device=device)
    misrouted, _ = triton_backend.modality_linear_fwd(x, ids, Routing(perm, inv_perm, swapped), linear, "relu")
    assert (misrouted - given).abs().max() > 1e-3, "the given routing must be the one used"


# ---- declared limits: read before any launch; a forced backend names the limit, auto takes the reference ----

LIMIT_CASES = [
    # name, op, x shape, parameter shapes (weight, [w2]), the limit named in the message
    ("E0_no_tokens", "linear", (0, 8), [(0, 6, 8)], "experts (E, the experts of the parameters) in [1, 256], got 0"),
    ("E257", "linear", (3, 8), [(257, 6, 8)], "experts (E, the experts of the parameters) in [1, 256], got 257"),
    ("E0_ffn", "ffn", (0, 8), [(0, 5, 8), (0, 8, 5)], "in [1, 256], got 0"),
    ("E0_norm", "norm", (0, 8), [(0, 8)], "experts (E, the experts of the parameters) in [1, 256], got 0"),
    ("D0_norm", "norm", (4, 0), [(2, 0)], "norm_width (D, the LayerNorm's row (one row is one tile)) in [1, 65536]"),
    ("D65537_norm", "norm", (2, 65537), [(1, 65537)], "norm_width (D, the LayerNorm's row"),
    ("ExD_norm", "norm", (2, 65536), [(5, 65536)], "norm_params (E * D, the per-expert gamma table"),
]


def _limit_case(op, x_shape, parameter_shapes):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(x_shape, generator=generator)
    ids = torch.zeros(x_shape[0], dtype=torch.int64)
    params = [torch.randn(shape, generator=generator) for shape in parameter_shapes]
    if op == "linear":
        return x, ids, lambda backend, x_, w_: modality_linear(x_, ids, w_, activation="gelu", backend=backend), params
    if op == "ffn":
        return x, ids, lambda backend, x_, w1, w2: modality_ffn(x_, ids, w1, None, w2, None, backend=backend), params
    return x, ids, lambda backend, x_, w_: modality_layer_norm(x_, ids, w_, None, backend=backend), params


def _backends_inputs(op, x, params):
    from mome.ops import modality

    if op == "norm":
        return modality.LAYER_NORM_BACKENDS, dict(x=x, norm=modality.ExpertNorm(params[0]))
    layers = tuple(modality.ExpertLinear(w) for w in params)
    return (modality.LINEAR_BACKENDS if op == "linear" else modality.FFN_BACKENDS), dict(x=x, layers=layers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: auto never picks triton")
@pytest.mark.parametrize("case", LIMIT_CASES, ids=lambda c: c[0])
def test_limits_decline_triton_before_a_launch_and_auto_falls_back(case):
    from mome.ops import BackendUnavailableError

    _, op, x_shape, parameter_shapes, limit = case
    x, ids, run, params = _limit_case(op, x_shape, parameter_shapes)
    backends, inputs = _backends_inputs(op, x, params)
    assert limit in backends.reason("triton", inputs)
    assert backends.reason("reference", inputs) is None
    with pytest.raises(BackendUnavailableError, match=re.escape(limit)):
        run("triton", x, *params)
    chosen = backends.choose("auto", inputs)[0]
    assert chosen in ("native", "reference")  # CPU tensors: torch's own kernels, else the spec
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    out = run("auto", *leaves)
    out.backward(torch.ones_like(out))
    same = [t.clone().requires_grad_() for t in (x, *params)]
    expected = run(chosen, *same)
    expected.backward(torch.ones_like(expected))
    assert out.shape == expected.shape and torch.equal(out, expected)
    for got, want in zip(leaves, same, strict=True):
        assert got.grad.shape == want.shape and torch.equal(got.grad, want.grad)


@pytest.mark.parametrize(
    "op, sizes, chosen",
    [
        ("linear", dict(experts=3, tokens=10, features=768), "triton"),
        ("linear", dict(experts=300, tokens=10, features=768), "reference"),
        ("linear", dict(experts=3, tokens=10, features=65535 * 128 + 1), "reference"),
        ("norm", dict(experts=3, tokens=10, norm_width=1024, norm_params=3072), "triton"),
        ("norm", dict(experts=3, tokens=10, norm_width=70000, norm_params=210000), "reference"),
        ("norm", dict(experts=16, tokens=10, norm_width=65536, norm_params=16 * 65536), "reference"),
    ],
)
def test_auto_on_cuda_tensors_falls_back_to_the_reference_past_the_triton_limits(op, sizes, chosen):
    """auto's walk (cuda, triton, reference) over the real declared limits, with the inputs measured as CUDA ones."""
    from mome.ops import modality
    from mome.ops._backend import OpBackends

    real = modality.LAYER_NORM_BACKENDS if op == "norm" else modality.LINEAR_BACKENDS
    as_cuda = lambda inputs: (torch.float16, torch.device("cuda"), sizes)  # noqa: E731
    measured = OpBackends(real.op, real.family, real.modules, as_cuda)
    assert measured.choose("auto", {})[0] == chosen


@pytest.mark.parametrize("din, hidden, dout", [(0, 6, 5), (7, 0, 5), (7, 6, 0)])
def test_zero_widths_give_the_reference_answer(din, hidden, dout):
    """Din = 0 (the output is the bias), F = 0 (the second linear sees no inputs), Dout = 0 (an empty output)."""
    ids = make_ids(30, 3, "empty", torch.Generator().manual_seed(1)).to(_device())
    tensors = _inputs(
        9,
        torch.float32,
        ((30, din), 1.0),
        ((3, hidden, din), 0.5),
        ((3, hidden), 1.0),
        ((3, dout, hidden), 0.5),
        ((3, dout), 1.0),
    )
    _check_against_reference(
        lambda *t: modality_ffn(t[0], ids, *t[1:], activation="gelu", backend="triton"),
        lambda *t: modality_ffn_ref(t[0], ids.cpu(), *t[1:], activation="gelu"),
        tensors,
        torch.float32,
    )
