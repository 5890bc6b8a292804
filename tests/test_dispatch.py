"""Backend choice: auto, forced, the MOME_BACKEND override, and what `python -m mome info` reports."""

import subprocess
import sys

import pytest
import torch

from mome.ops import BackendUnavailableError, attention
from mome.ops._dispatch import OpBackends

FAKE = OpBackends("fake_op", {"reference": "mome.ops._reference_backend", "triton": "mome.kernels.no_such_module"})


def test_auto_on_cpu_tensors_is_the_reference():
    assert FAKE.choose("auto", torch.device("cpu"), {})[0] == "reference"


def test_forced_backend_with_a_missing_module_names_the_module(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="mome.kernels.no_such_module cannot be imported"):
        FAKE.choose("triton", torch.device("cpu"), {})


def test_auto_on_gpu_tensors_walks_the_priority_list_and_reports_every_reason():
    only_triton = OpBackends("fake_op", {"triton": "mome.kernels.no_such_module"})
    with pytest.raises(BackendUnavailableError) as raised:
        only_triton.choose("auto", torch.device("cuda"), {})
    message = str(raised.value)
    assert "cuda: mome has no cuda implementation" in message and "no_such_module" in message


def test_mome_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("MOME_BACKEND", "cuda")
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(BackendUnavailableError, match="attention: backend 'cuda'"):
        attention(q, q, q)
    monkeypatch.setenv("MOME_BACKEND", "reference")
    assert attention(q, q, q).shape == q.shape


def test_unsupported_reason_of_a_backend_module_is_reported(monkeypatch):
    import mome.ops._reference_backend as reference

    monkeypatch.setattr(reference, "unsupported_reason", lambda op, **inputs: f"{op} declines", raising=False)
    with pytest.raises(BackendUnavailableError, match="fake_op declines"):
        FAKE.choose("reference", torch.device("cpu"), {})


def test_info_command_lists_every_op_and_backend():
    result = subprocess.run([sys.executable, "-m", "mome", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for op in ("attention", "decode_attention", "modality_linear", "modality_layer_norm", "itc_loss"):
        assert f"{op} " in result.stdout
    assert "reference  available" in result.stdout
    assert "mome._C" in result.stdout
