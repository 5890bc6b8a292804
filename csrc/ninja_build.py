"""Build of the CUDA extension ``mome._C``: the decision, the ninja file, the compile.

Shared by ``setup.py`` (``pip install``) and ``csrc/compile_check.sh`` (CI), so the
CI check compiles exactly what an install compiles. Standard library only: it runs
inside pip's isolated build environment, where torch is not importable.

The extension is a torch-independent pybind11 module: ``.cu`` files are compiled by
nvcc, ``bindings.cpp`` by the host C++ compiler, and everything is linked against the
static CUDA runtime, so the module imports on machines without a GPU or driver.

Run it directly to build into a folder::

    python csrc/ninja_build.py --out build/cuda [--archs "80;90"] [--jobs N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CUDA_SOURCES = (
    "routing.cu",
    "decode_fp16_hd64.cu",
    "decode_fp16_hd128.cu",
    "decode_bf16_hd64.cu",
    "decode_bf16_hd128.cu",
    "decode_combine.cu",
    "device_info.cu",
)
HOST_SOURCES = ("bindings.cpp",)
DEFAULT_ARCHS = "80;90"
MIN_ARCH = 80  # the bf16 conversions in csrc/common.cuh need sm_80


@dataclass(frozen=True)
class Decision:
    """Whether ``pip install`` builds ``mome._C``, and the one line that says why."""

    build: bool
    reason: str

    def line(self, archs: list[str] | None = None) -> str:
        if self.build:
            where = ", ".join(f"sm_{a}" for a in archs or [])
            return f"mome: building the CUDA extension mome._C for {where} ({self.reason})"
        return f"mome: installing pure Python, without the CUDA extension mome._C ({self.reason})"


def _flag(env: dict, name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_home(env: dict | None = None) -> Path | None:
    """The CUDA toolkit folder: ``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda``, or the one holding ``nvcc``."""
    env = os.environ if env is None else env
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            if (Path(candidate) / "include" / "cuda_runtime.h").is_file():
                return Path(candidate)
    return None


def cuda_driver_present() -> bool:
    """A CUDA driver on this machine: the driver library loads, or the NVIDIA device nodes exist.

    This is the "CUDA can be used" test of the build rule: no torch needed, so it works
    under pip's build isolation.
    """
    if os.path.exists("/dev/nvidiactl"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def decide(env: dict, home: Path | None, driver: bool) -> Decision:
    """The build rule. ``MOME_SKIP_CUDA_BUILD=1`` wins; then ``MOME_FORCE_CUDA_BUILD=1`` builds whenever
    nvcc exists (CI compile checks, GPU-less build hosts); otherwise build when nvcc and a CUDA driver
    are both present, since without a driver nothing could run the kernels."""
    if _flag(env, "MOME_SKIP_CUDA_BUILD"):
        return Decision(False, "MOME_SKIP_CUDA_BUILD=1")
    if home is None:
        forced = "MOME_FORCE_CUDA_BUILD=1 but " if _flag(env, "MOME_FORCE_CUDA_BUILD") else ""
        return Decision(False, f"{forced}no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH")
    if _flag(env, "MOME_FORCE_CUDA_BUILD"):
        return Decision(True, f"MOME_FORCE_CUDA_BUILD=1, nvcc in {home}")
    if not driver:
        return Decision(False, "nvcc found but no CUDA driver on this machine; MOME_FORCE_CUDA_BUILD=1 builds anyway")
    return Decision(True, f"nvcc in {home} and a CUDA driver found")


def parse_archs(value: str | None) -> list[str]:
    """``MOME_CUDA_ARCHS``: compute capabilities like ``"80;90"`` (``8.0``, ``sm_90`` and commas also accepted)."""
    text = DEFAULT_ARCHS if value is None or not value.strip() else value
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        digits = item.lower().removeprefix("sm_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}a?", digits) or int(digits.rstrip("a")) < MIN_ARCH:
            raise ValueError(
                f"MOME_CUDA_ARCHS must list compute capabilities >= {MIN_ARCH // 10}.{MIN_ARCH % 10} "
                f"like '80;90', got {value!r} (bad entry {item!r})"
            )
        if digits not in archs:
            archs.append(digits)
    if not archs:
        raise ValueError(f"MOME_CUDA_ARCHS must name at least one compute capability, got {value!r}")
    return archs


def positive_int(env: dict, name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest so later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = archs[-1]
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


@dataclass
class BuildConfig:
    home: Path
    archs: list[str]
    out_dir: Path
    output: Path  # the extension file to produce
    jobs: int
    nvcc_threads: int
    pybind11_include: str
    python_include: str = field(default_factory=lambda: sysconfig.get_paths()["include"])
    cxx: str = field(default_factory=lambda: os.environ.get("CXX", "c++"))


def config_from_env(env: dict, out_dir: Path, output: Path, home: Path | None = None) -> BuildConfig:
    """Everything the build reads from the environment, checked (a bad value raises ``ValueError``)."""
    home = home or cuda_home(env)
    if home is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH")
    try:
        import pybind11  # a build requirement (pyproject [build-system]); only needed when compiling
    except ImportError as error:
        raise RuntimeError("pybind11 is needed to build mome._C (pip install pybind11)") from error

    return BuildConfig(
        home=home,
        archs=parse_archs(env.get("MOME_CUDA_ARCHS")),
        out_dir=out_dir,
        output=output,
        jobs=positive_int(env, "MAX_JOBS", os.cpu_count() or 1),
        nvcc_threads=positive_int(env, "NVCC_THREADS", 2),
        pybind11_include=pybind11.get_include(),
    )


def _escape(path: Path | str) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_build_info(config: BuildConfig) -> Path:
    """``build_info.h``: what this build was made with, compiled into the module (rewritten only on change)."""
    header = config.out_dir / "build_info.h"
    text = (
        "#pragma once\n"
        f'#define MOME_CUDA_ARCHS "{";".join(config.archs)}"\n'
        f'#define MOME_NVCC_VERSION "{nvcc_version(config.home / "bin" / "nvcc")}"\n'
    )
    if not header.exists() or header.read_text() != text:
        header.write_text(text)
    return header


def ninja_text(config: BuildConfig) -> str:
    """The ninja file: one nvcc job per ``.cu`` (they run in parallel), one host compile, one link."""
    nvcc = config.home / "bin" / "nvcc"
    includes = f"-I{_escape(CSRC)} -I{_escape(config.out_dir)}"
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "-lineinfo",
        "-Xptxas=-v",
        f"--threads={config.nvcc_threads}",
        "-Xcompiler=-fPIC",
        "-Xcompiler=-fvisibility=hidden",
        *gencode_flags(config.archs),
    ]
    cxx_flags = [
        "-O2",
        "-std=c++17",
        "-fPIC",
        "-fvisibility=hidden",
        f"-isystem {_escape(config.python_include)}",
        f"-isystem {_escape(config.pybind11_include)}",
    ]
    lib_dirs = [config.home / "lib64", config.home / "lib"]
    link_dirs = " ".join(f"-L{_escape(d)}" for d in lib_dirs if d.is_dir())
    headers = sorted(_escape(p) for p in CSRC.glob("*.h*")) + [_escape(config.out_dir / "build_info.h")]
    lines = [
        "ninja_required_version = 1.3",
        f"builddir = {_escape(config.out_dir)}",  # .ninja_log and .ninja_deps go here, not to the cwd
        f"nvcc = {_escape(nvcc)}",
        f"cxx = {config.cxx}",
        f"nvcc_flags = {' '.join(nvcc_flags)} {includes}",
        f"cxx_flags = {' '.join(cxx_flags)} {includes}",
        f"link_flags = -shared {link_dirs} -lcudart_static -ldl -lrt -lpthread",
        "",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -c $in -o $out",
        "  description = nvcc $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -c $in -o $out",
        "  description = c++ $in",
        "rule link",
        "  command = $cxx $in -o $out $link_flags",
        "  description = link $out",
        "",
    ]
    objects = []
    for source in CUDA_SOURCES:
        obj = config.out_dir / (source + ".o")
        objects.append(_escape(obj))
        lines.append(f"build {_escape(obj)}: nvcc {_escape(CSRC / source)} | {' '.join(headers)}")
    for source in HOST_SOURCES:
        obj = config.out_dir / (source + ".o")
        objects.append(_escape(obj))
        lines.append(f"build {_escape(obj)}: cxx {_escape(CSRC / source)} | {' '.join(headers)}")
    lines.append(f"build {_escape(config.output)}: link {' '.join(objects)}")
    lines.append(f"default {_escape(config.output)}")
    return "\n".join(lines) + "\n"


def ninja_command(config: BuildConfig) -> list[str]:
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_package  # the PyPI wheel ships the binary

            ninja = str(Path(ninja_package.BIN_DIR) / "ninja")
        except ImportError as error:
            raise RuntimeError("ninja is needed to build mome._C (pip install ninja)") from error
    return [ninja, "-f", str(config.out_dir / "build.ninja"), "-j", str(config.jobs)]


def build(config: BuildConfig, verbose: bool = True) -> float:
    """Compile and link ``config.output``; returns the wall time. Raises ``RuntimeError`` on a compile error."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_build_info(config)
    (config.out_dir / "build.ninja").write_text(ninja_text(config))
    start = time.perf_counter()
    result = subprocess.run(ninja_command(config), capture_output=not verbose, text=True)
    if result.returncode != 0:
        detail = "" if verbose else f"\n{result.stdout}\n{result.stderr}"
        raise RuntimeError(f"building mome._C failed (ninja exit {result.returncode}){detail}")
    return time.perf_counter() - start


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def resource_report(log: str) -> list[dict]:
    """Per kernel and arch, from nvcc's ``-Xptxas -v`` output: registers, static shared memory, spills."""
    rows: list[dict] = []
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            rows.append({"kernel": match.group(1), "arch": match.group(2), "registers": None, "smem": 0, "spill": 0})
        elif rows and (match := _SPILLS.search(line)):
            rows[-1]["spill"] = int(match.group(1)) + int(match.group(2))
        elif rows and (match := _USED.search(line)):
            rows[-1]["registers"] = int(match.group(1))
            smem = _SMEM.search(line)
            rows[-1]["smem"] = int(smem.group(1)) if smem else 0
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows]), strict=True):
        row["kernel"] = re.sub(r"\(anonymous namespace\)::|mome::|\(.*\)$", "", name)
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"]))


def format_report(rows: list[dict]) -> str:
    width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [f"{'kernel':<{width}}  arch    regs  smem B  spill B"]
    for r in rows:
        lines.append(f"{r['kernel']:<{width}}  {r['arch']:<6} {r['registers']:>5} {r['smem']:>7} {r['spill']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="build folder")
    parser.add_argument("--archs", help=f"overrides MOME_CUDA_ARCHS (default {DEFAULT_ARCHS})")
    parser.add_argument("--jobs", type=int, help="overrides MAX_JOBS")
    parser.add_argument("--report", type=Path, metavar="LOG", help="only print the resource table of a build log")
    args = parser.parse_args(argv)
    if args.report:
        print(format_report(resource_report(args.report.read_text())))
        return 0
    env = dict(os.environ)
    if args.archs:
        env["MOME_CUDA_ARCHS"] = args.archs
    if args.jobs:
        env["MAX_JOBS"] = str(args.jobs)
    out_dir = args.out.resolve()
    output = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        config = config_from_env(env, out_dir, output)
    except (ValueError, RuntimeError) as error:
        print(f"mome: {error}", file=sys.stderr)
        return 2
    print(f"mome: compiling csrc/ for {', '.join('sm_' + a for a in config.archs)} with {config.jobs} jobs", flush=True)
    try:
        seconds = build(config)
    except RuntimeError as error:
        print(f"mome: {error}", file=sys.stderr)
        return 1
    print(f"mome: built {output} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
