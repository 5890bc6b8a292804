"""Build of mome: pure Python, plus the CUDA extension mome._C where it can be built and used.

Rule (csrc/ninja_build.py, ``decide``): ``MOME_SKIP_CUDA_BUILD=1`` never builds;
``MOME_FORCE_CUDA_BUILD=1`` builds whenever a CUDA toolkit (nvcc) is found; otherwise the
extension is built when nvcc is found *and* the machine has a CUDA driver (libcuda.so.1 loads
or /dev/nvidiactl exists). The test needs no torch, so it holds under pip's build isolation.
``MOME_CUDA_ARCHS`` (default "80;90"), ``MAX_JOBS`` and ``NVCC_THREADS`` tune the build.
Nothing is downloaded at build time beyond the build requirements in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_ninja_build():
    spec = importlib.util.spec_from_file_location("mome_ninja_build", ROOT / "csrc" / "ninja_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ninja_build = _load_ninja_build()


BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


class BuildCudaExtension(build_ext):
    """Compiles mome._C with csrc/ninja_build.py (ninja runs the nvcc jobs in parallel)."""

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "mome_C"
        config = ninja_build.config_from_env(dict(os.environ), build_dir, build_dir / output.name)
        seconds = ninja_build.build(config)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config.output, output)
        print(f"mome: built mome._C in {seconds:.1f} s", flush=True)


def cuda_decision():
    env = dict(os.environ)
    decision = ninja_build.decide(env, ninja_build.cuda_home(env), ninja_build.cuda_driver_present())
    archs = ninja_build.parse_archs(env.get("MOME_CUDA_ARCHS")) if decision.build else None
    return decision, archs


decision, archs = cuda_decision()
if BUILD_COMMANDS.intersection(sys.argv[1:]):  # pip also runs setup.py for metadata: say it once, when building
    print(decision.line(archs), flush=True)

setup(
    ext_modules=[Extension("mome._C", sources=[])] if decision.build else [],
    cmdclass={"build_ext": BuildCudaExtension},
)
