"""CPU tests of the CUDA extension's build logic and of the CUDA backend when mome._C is absent or unusable."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mome.cuda
import mome.cuda.decode as cuda_decode
import mome.cuda.modality as cuda_routing
from mome.ops import BackendUnavailableError, decode_attention

ROOT = Path(__file__).resolve().parent.parent


def _load_ninja_build():
    spec = importlib.util.spec_from_file_location("mome_ninja_build_under_test", ROOT / "csrc" / "ninja_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


nb = _load_ninja_build()
HOME = Path("/opt/fake-cuda")


# ---- the build rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, home, driver, build, words",
    [
        ({"MOME_SKIP_CUDA_BUILD": "1", "MOME_FORCE_CUDA_BUILD": "1"}, HOME, True, False, "MOME_SKIP_CUDA_BUILD=1"),
        ({"MOME_FORCE_CUDA_BUILD": "1"}, HOME, False, True, "MOME_FORCE_CUDA_BUILD=1"),
        ({"MOME_FORCE_CUDA_BUILD": "1"}, None, True, False, "no CUDA toolkit"),
        ({}, None, True, False, "no CUDA toolkit"),
        ({}, HOME, False, False, "no CUDA driver"),
        ({}, HOME, True, True, "CUDA driver found"),
        ({"MOME_SKIP_CUDA_BUILD": "0"}, HOME, True, True, "CUDA driver found"),
    ],
)
def test_build_decision(env, home, driver, build, words):
    decision = nb.decide(env, home, driver)
    assert decision.build is build
    assert words in decision.reason
    line = decision.line(["80", "90"] if build else None)
    assert "\n" not in line and line.startswith("mome: ")
    assert ("building the CUDA extension" in line) is build
    assert ("sm_80, sm_90" in line) is build


def test_cuda_home_from_env(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert nb.cuda_home({"CUDA_HOME": str(tmp_path), "PATH": ""}) == tmp_path
    assert nb.cuda_home({"CUDA_HOME": str(tmp_path / "missing"), "PATH": ""}) in (None, Path("/usr/local/cuda"))


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ["80", "90"]),
        ("", ["80", "90"]),
        ("90", ["90"]),
        ("8.0; 9.0", ["80", "90"]),
        ("sm_90a,80,80", ["90a", "80"]),
    ],
)
def test_parse_archs(value, expected):
    assert nb.parse_archs(value) == expected


@pytest.mark.parametrize("value", ["70", "sm_75", "abc", ";", "80;x"])
def test_parse_archs_rejects(value):
    with pytest.raises(ValueError, match="MOME_CUDA_ARCHS"):
        nb.parse_archs(value)


def test_positive_int_env():
    assert nb.positive_int({}, "MAX_JOBS", 7) == 7
    assert nb.positive_int({"MAX_JOBS": "3"}, "MAX_JOBS", 7) == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="MAX_JOBS must be a positive integer"):
            nb.positive_int({"MAX_JOBS": bad}, "MAX_JOBS", 7)


def _config(tmp_path, archs=("80", "90"), jobs=5, threads=3):
    return nb.BuildConfig(
        home=HOME,
        archs=list(archs),
        out_dir=tmp_path,
        output=tmp_path / "_C.so",
        jobs=jobs,
        nvcc_threads=threads,
        pybind11_include="/pybind11/include",
        python_include="/python/include",
    )


def test_ninja_file_compiles_each_source_for_each_arch(tmp_path):
    text = nb.ninja_text(_config(tmp_path, archs=("80", "90"), threads=3))
    for source in nb.CUDA_SOURCES:
        assert f"{source}.o: nvcc " in text, source
    assert "bindings.cpp.o: cxx " in text
    assert "-gencode=arch=compute_80,code=sm_80" in text
    assert "-gencode=arch=compute_90,code=sm_90" in text
    assert "-gencode=arch=compute_90,code=compute_90" in text  # PTX of the newest arch
    assert "-gencode=arch=compute_80,code=compute_80" not in text
    assert "-Xptxas=-v" in text and "--threads=3" in text
    assert "-lcudart_static" in text and "torch" not in text


def test_ninja_command_uses_max_jobs(tmp_path):
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        pytest.skip("ninja is not installed here")
    command = nb.ninja_command(_config(tmp_path, jobs=5))
    assert command[-2:] == ["-j", "5"]


def test_config_from_env_reads_the_variables(tmp_path):
    pytest.importorskip("pybind11")
    env = {"MOME_CUDA_ARCHS": "90", "MAX_JOBS": "4", "NVCC_THREADS": "1"}
    config = nb.config_from_env(env, tmp_path, tmp_path / "_C.so", home=HOME)
    assert (config.archs, config.jobs, config.nvcc_threads) == (["90"], 4, 1)
    with pytest.raises(ValueError, match="NVCC_THREADS"):
        nb.config_from_env({"NVCC_THREADS": "zero"}, tmp_path, tmp_path / "_C.so", home=HOME)


def _setup_py(*args, **env):
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOME_")} | env
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_setup_py_says_once_what_it_installs():
    result = _setup_py("build_ext", MOME_SKIP_CUDA_BUILD="1")  # nothing to compile: a no-op
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("mome:")]
    assert lines == ["mome: installing pure Python, without the CUDA extension mome._C (MOME_SKIP_CUDA_BUILD=1)"]


def test_setup_py_rejects_bad_archs():
    if nb.cuda_home() is None:
        pytest.skip("no CUDA toolkit here: the forced build is skipped before the archs are read")
    result = _setup_py("--name", MOME_FORCE_CUDA_BUILD="1", MOME_CUDA_ARCHS="75")
    assert result.returncode != 0
    assert "MOME_CUDA_ARCHS must list compute capabilities" in result.stderr


def test_real_nvcc_compile_of_one_source(tmp_path):
    """The generated ninja file drives nvcc correctly: compile the smallest source for one arch."""
    home = nb.cuda_home()
    if home is None or importlib.util.find_spec("pybind11") is None:
        pytest.skip("no CUDA toolkit or pybind11 here")
    config = nb.config_from_env({"MOME_CUDA_ARCHS": "80", "MAX_JOBS": "1"}, tmp_path, tmp_path / "_C.so", home=home)
    nb.write_build_info(config)
    (tmp_path / "build.ninja").write_text(nb.ninja_text(config))
    target = str(tmp_path / "device_info.cu.o")
    result = subprocess.run(nb.ninja_command(config) + [target], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Used" in result.stdout and "registers" in result.stdout  # the -Xptxas -v resource report
    assert (tmp_path / "device_info.cu.o").stat().st_size > 0
    assert '#define MOME_CUDA_ARCHS "80"' in (tmp_path / "build_info.h").read_text()


# ---- mome.cuda when the extension is absent, stale or unusable --------------------------------------


@pytest.fixture
def extension_as(monkeypatch):
    """Replace ``import mome._C`` with a given outcome; restores the caches afterwards."""

    def use(outcome):
        def fake_import():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        monkeypatch.setattr(mome.cuda, "_import_extension", fake_import)
        mome.cuda._load.cache_clear()
        mome.cuda._device_reason.cache_clear()
        monkeypatch.setattr(mome.cuda, "_warned", set())

    yield use
    mome.cuda._load.cache_clear()
    mome.cuda._device_reason.cache_clear()


def test_status_when_not_built(extension_as):
    extension_as(ModuleNotFoundError("No module named 'mome._C'"))
    status = mome.cuda.extension_status()
    assert status["built"] is False and status["archs"] == [] and status["built_with"] == {}
    assert "mome._C is not built" in status["reason"] and "MOME_FORCE_CUDA_BUILD" in status["reason"]


def test_status_when_import_fails(extension_as):
    extension_as(ImportError("undefined symbol: PyFoo"))
    status = mome.cuda.extension_status()
    assert status["built"] is False and "undefined symbol: PyFoo" in status["reason"]


def test_status_when_built_for_another_version(extension_as):
    extension_as(SimpleNamespace(ABI_VERSION=mome.cuda.EXPECTED_ABI + 1))
    assert mome.cuda.extension() is None
    assert "another mome version" in mome.cuda.extension_status()["reason"]


def test_status_when_built(extension_as):
    info = {"archs": "80;90", "nvcc": "13.0.88", "cudart": "13.0", "pybind11": "3.1.0", "compiler": "12.2.0"}
    extension_as(SimpleNamespace(ABI_VERSION=mome.cuda.EXPECTED_ABI, build_info=lambda: info, __file__="/x/_C.so"))
    status = mome.cuda.extension_status()
    assert status["built"] is True and status["archs"] == ["80", "90"]
    assert status["built_with"]["nvcc"] == "13.0.88" and status["built_with"]["pybind11"] == "3.1.0"
    if not torch.cuda.is_available():
        assert "no CUDA device" in status["reason"]


def _decode_inputs(dtype=torch.float16, head_dim=64, batch=2, heads=4, kv_heads=2, nmax=9):
    q = torch.randn(batch, heads, head_dim).to(dtype)
    k = torch.randn(batch, kv_heads, nmax, head_dim).to(dtype)
    return dict(q=q, k_cache=k, v_cache=torch.randn_like(k), cache_seqlens=torch.tensor([3, nmax] * (batch // 2)))


def test_backends_decline_and_warn_once_when_not_built(extension_as):
    extension_as(ModuleNotFoundError("No module named 'mome._C'"))
    inputs = _decode_inputs()
    inputs["cache_seqlens"] = inputs["cache_seqlens"].int()
    with pytest.warns(RuntimeWarning, match="falling back: mome._C is not built"):
        why = cuda_decode.available(inputs["q"].device)
    assert "mome._C is not built" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second decline of the same reason stays quiet
        assert cuda_decode.available(inputs["q"].device) == why
        assert cuda_routing.available(torch.zeros(5).long().device) == why


def test_forced_cuda_backend_on_cpu_names_the_reason():
    inputs = _decode_inputs(dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run these inputs: .*CUDA tensors"):
        decode_attention(**inputs, backend="cuda")
    out = decode_attention(**inputs, backend="auto")  # CPU tensors: the reference runs
    assert out.shape == inputs["q"].shape and torch.isfinite(out).all()


def test_custom_ops_trace_with_fake_tensors():
    meta = {name: t.to("meta") for name, t in _decode_inputs().items()}
    meta["cache_seqlens"] = meta["cache_seqlens"].int()
    out = torch.ops.mome.cuda_decode_attention(*meta.values(), 0.125)
    assert out.shape == meta["q"].shape and out.dtype == torch.float16
    ids = torch.empty(11, dtype=torch.int64, device="meta")
    perm, inv_perm, offsets = torch.ops.mome.modality_routing(ids, 3, "cuda")
    assert [t.shape for t in (perm, inv_perm, offsets)] == [(11,), (11,), (4,)]
    assert {t.dtype for t in (perm, inv_perm, offsets)} == {torch.int32}


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(dtype=torch.float32), "float16 or bfloat16"),
        (dict(head_dim=96), "head dims (64, 128)"),
    ],
)
def test_decode_input_problems(change, words):
    inputs = _decode_inputs(**change)
    inputs["cache_seqlens"] = inputs["cache_seqlens"].int()
    assert words in cuda_decode.input_problem(**inputs)


def test_decode_input_problems_lengths():
    inputs = _decode_inputs()
    assert "int32" in cuda_decode.input_problem(**inputs)  # int64 lengths
    inputs["cache_seqlens"] = inputs["cache_seqlens"].int()
    assert cuda_decode.input_problem(**inputs) is None


def test_backend_choice_traces_under_torch_compile(extension_as):
    """The dispatcher asks the backend's availability while torch.compile traces: it must not break the graph."""
    extension_as(ModuleNotFoundError("No module named 'mome._C'"))
    inputs = _decode_inputs()
    inputs["cache_seqlens"] = inputs["cache_seqlens"].int()

    def declined(q, k_cache, v_cache, cache_seqlens):
        why = cuda_decode.available(q.device)
        return q + (0.0 if why is None else 1.0)

    with pytest.warns(RuntimeWarning, match="mome._C is not built"):
        out = torch.compile(declined, fullgraph=True, backend="eager")(**inputs)
    torch.testing.assert_close(out, inputs["q"] + 1.0)


def test_resource_report_parses_ptxas_output():
    log = """ptxas info    : Compiling entry function '_Z13probe_kernelv' for 'sm_90'
ptxas info    : Function properties for _Z13probe_kernelv
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 254 registers, used 1 barriers, 16640 bytes smem
"""
    rows = nb.resource_report(log)
    assert len(rows) == 1 and rows[0]["arch"] == "sm_90"
    assert (rows[0]["registers"], rows[0]["smem"], rows[0]["spill"]) == (254, 16640, 12)
    assert "probe_kernel" in nb.format_report(rows)


@pytest.mark.parametrize(
    "batch, heads, kv_heads, nmax, sms, expected",
    [
        (1, 32, 32, 32768, 132, 9),  # 32 blocks: 9 splits reach 2 blocks per SM
        (1, 32, 8, 32768, 132, 33),  # GQA 4: one block per kv head, more splits
        (64, 32, 32, 4096, 132, 1),  # the batch alone fills the GPU
        (1, 8, 8, 300, 132, 2),  # short caches: at least 256 rows per split
        (1, 1, 1, 10**6, 132, 128),  # capped
        (3, 4, 2, 0, 132, 1),  # empty caches
    ],
)
def test_num_splits(batch, heads, kv_heads, nmax, sms, expected):
    assert cuda_decode.num_splits(batch, heads, kv_heads, nmax, sms) == expected


@pytest.mark.parametrize("group, tile", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (16, 8)])
def test_group_tile_matches_the_kernel(group, tile):
    assert cuda_decode.group_tile(group) == tile


def test_routing_argument_errors():
    with pytest.raises(TypeError, match="modality must be an integer"):
        cuda_routing.modality_routing(torch.zeros(4), 3)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        cuda_routing.modality_routing(torch.zeros(4, dtype=torch.int64), 3.0)
    with pytest.raises(ValueError, match=r"num_experts must be an int in \[1, 256\]"):
        cuda_routing.modality_routing(torch.zeros(4, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="1-D"):
        cuda_routing.modality_routing(torch.zeros(2, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="CUDA"):  # CPU tensors: the custom op names the device reason
        cuda_routing.modality_routing(torch.zeros(4, dtype=torch.int64), 3)


@pytest.mark.gpu
def test_auto_falls_back_with_one_warning_on_cuda_tensors(extension_as):
    extension_as(ModuleNotFoundError("No module named 'mome._C'"))
    inputs = {name: t.cuda() for name, t in _decode_inputs().items()}
    with pytest.warns(RuntimeWarning, match="falling back: mome._C is not built"):
        out = decode_attention(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(decode_attention(**inputs), out)
    with pytest.raises(BackendUnavailableError, match="mome._C is not built"):
        decode_attention(**inputs, backend="cuda")
