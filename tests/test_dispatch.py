"""Backend choice: the contract check, declared limits, auto and forced choice, MOME_BACKEND, `mome info`."""

import subprocess
import sys
import types
from typing import Protocol

import pytest
import torch

from mome import settings
from mome.ops import BackendUnavailableError, attention
from mome.ops._backend import BackendContractError, Family, OpBackends, check_contract


class _FakeBackend(Protocol):
    def fake_fwd(self, x, scale): ...


FAKE_FAMILY = Family("fake", _FakeBackend, sizes={"width": "the last dim of x"})


def _measure(inputs):
    x = inputs["x"]
    return x.dtype, x.device, {"width": x.shape[-1]}


def _module(name, **attributes):
    module = types.ModuleType(name)
    vars(module).update(attributes)
    return module


def _fake_backends(monkeypatch, **modules):
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return OpBackends("fake_op", FAKE_FAMILY, {"reference": "fake_reference", "triton": "fake_triton"}, _measure)


GOOD = dict(fake_fwd=lambda x, scale: x * scale, LIMITS={"dtypes": (torch.float32,), "width": (1, 8)})


def test_auto_on_cpu_tensors_is_native_then_the_reference(monkeypatch):
    backends = _fake_backends(monkeypatch, fake_reference=_module("fake_reference", **GOOD))
    assert backends.choose("auto", {"x": torch.ones(3)})[0] == "reference"  # an op without a native module
    narrow_limits = {"dtypes": {"cpu": (torch.float32,)}, "width": (1, 4)}
    narrow = _module("fake_native", fake_fwd=GOOD["fake_fwd"], LIMITS=narrow_limits)
    monkeypatch.setitem(sys.modules, "fake_native", narrow)
    with_native = OpBackends("fake_op", FAKE_FAMILY, {"reference": "fake_reference", "native": "fake_native"}, _measure)
    assert with_native.choose("auto", {"x": torch.ones(3)})[0] == "native"
    assert with_native.choose("auto", {"x": torch.ones(8)})[0] == "reference"  # native declines: the spec runs
    with pytest.raises(BackendUnavailableError) as raised:
        with_native.choose("native", {"x": torch.ones(8)})
    message = str(raised.value)
    assert "backend 'native' cannot run these inputs: it supports width (the last dim of x) in [1, 4], got 8" in message
    assert message.endswith("; the reference backend can")
    assert "the native backend runs on CPU tensors (got cuda)" == with_native.reason("native", {"x": _CudaLike()})


def _cpu_inputs():
    """One small CPU input per op of mome: (op backends, inputs as the op measures them)."""
    from mome.ops.attention import BACKENDS as ATTENTION
    from mome.ops.attention import AttentionMasks
    from mome.ops.decode import BACKENDS as DECODE
    from mome.ops.itc import BACKENDS as ITC
    from mome.ops.itc import ITCOptions
    from mome.ops.modality import FFN_BACKENDS, LAYER_NORM_BACKENDS, LINEAR_BACKENDS, ExpertLinear, ExpertNorm

    q, x, rows = torch.ones(1, 1, 3, 4), torch.ones(2, 4), torch.ones(2, 4)
    linear = (ExpertLinear(torch.ones(1, 3, 4)),)
    return [
        (ATTENTION, dict(q=q, masks=AttentionMasks())),
        (DECODE, dict(q=q[:, :, 0], k_cache=q)),
        (LINEAR_BACKENDS, dict(x=x, layers=linear)),
        (FFN_BACKENDS, dict(x=x, layers=linear * 2)),
        (LAYER_NORM_BACKENDS, dict(x=x, norm=ExpertNorm(torch.ones(1, 4)))),
        (ITC, dict(image_rows=rows, image_columns=rows, options=ITCOptions())),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_op_runs_native_under_auto_on_cpu_tensors(dtype):
    for op, inputs in _cpu_inputs():
        cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        assert op.choose("auto", cast)[0] == "native", op.op
        assert op.choose("reference", cast)[0] == "reference", op.op  # the spec stays selectable


def test_a_module_that_breaks_the_contract_is_named_with_what_is_wrong(monkeypatch):
    broken = _module("fake_reference", fake_fwd=lambda x, factor: x, LIMITS={"dtypes": (), "depth": (1, 2)})
    with pytest.raises(BackendContractError) as raised:
        check_contract(broken, FAKE_FAMILY)
    message = str(raised.value)
    assert "fake_fwd takes (x, factor) where the contract says (x, scale)" in message
    assert "LIMITS names ['depth']" in message
    with pytest.raises(BackendContractError, match="no launcher fake_fwd"):
        check_contract(_module("empty", LIMITS={"dtypes": ()}), FAKE_FAMILY)
    with pytest.raises(BackendContractError, match="no LIMITS dict"):
        check_contract(_module("no_limits", fake_fwd=GOOD["fake_fwd"]), FAKE_FAMILY)


def test_declared_limits_decline_before_the_launch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_like = _module("fake_triton", **GOOD)
    backends = _fake_backends(monkeypatch, fake_reference=_module("fake_reference", **GOOD), fake_triton=triton_like)
    assert backends.reason("triton", {"x": torch.ones(8)}) is None
    assert backends.reason("triton", {"x": torch.ones(9)}) == "it supports width (the last dim of x) in [1, 8], got 9"
    assert "runs dtypes (float32) on cpu tensors, got float64" in backends.reason(
        "triton", {"x": torch.ones(2).double()}
    )
    with pytest.raises(BackendUnavailableError, match="fake_op: backend 'triton' cannot run these inputs: it supports"):
        backends.choose("triton", {"x": torch.ones(0)})


def test_auto_on_gpu_tensors_walks_the_priority_list_and_reports_every_reason(monkeypatch):
    only_triton = OpBackends("fake_op", FAKE_FAMILY, {"triton": "mome.kernels.no_such_module"}, _measure)
    with pytest.raises(BackendUnavailableError) as raised:
        only_triton.choose("auto", {"x": _CudaLike()})
    message = str(raised.value)
    assert "cuda: mome has no cuda implementation" in message and "no_such_module cannot be imported" in message
    assert "reference: mome has no reference implementation" in message


class _CudaLike:
    """Stands in for a CUDA tensor where only dtype, device and shape are read."""

    dtype, device, shape = torch.float32, torch.device("cuda"), (4,)


def test_mome_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("MOME_BACKEND", "cuda")
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(BackendUnavailableError, match="attention: backend 'cuda'"):
        attention(q, q, q)
    monkeypatch.setenv("MOME_BACKEND", "reference")
    assert attention(q, q, q).shape == q.shape
    monkeypatch.setenv("MOME_BACKEND", "native")
    assert torch.allclose(attention(q, q, q), attention(q, q, q, backend="reference"), atol=1e-6)
    monkeypatch.setenv("MOME_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MOME_BACKEND must be one of"):
        attention(q, q, q)


def test_settings_override_is_scoped_and_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("MOME_CHECK_IDS", raising=False)
    assert settings.check_ids() and not settings.check_ids(when_unset=False)
    with settings.override(check_ids=False, backend="reference"):
        assert not settings.check_ids() and settings.backend() == "reference"
        assert "MOME_CHECK_IDS" not in __import__("os").environ
    assert settings.check_ids() and settings.backend() == "auto"
    with pytest.raises(TypeError, match="override takes"):
        with settings.override(colour="red"):
            pass


def test_every_backend_module_of_mome_follows_its_contract():
    from mome.info import OP_BACKENDS

    for op in OP_BACKENDS:
        for backend in op.modules:
            loaded = op.loaded(backend)
            assert not isinstance(loaded, str) or "cannot be imported" in loaded, (op.op, backend, loaded)


def test_info_command_lists_every_op_and_backend():
    result = subprocess.run([sys.executable, "-m", "mome", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for op in ("attention", "decode_attention", "modality_linear", "modality_layer_norm", "itc_loss"):
        assert f"{op} " in result.stdout
    assert "reference  available" in result.stdout
    assert "native     available" in result.stdout
    assert "backends for cpu tensors (auto picks the first usable of native, reference)" in result.stdout
    assert "mome._C" in result.stdout
