"""``python -m mome info``: versions, devices, and per op which backends can run and why not."""

from __future__ import annotations

import importlib
import platform

import torch

import mome
from mome.ops._backend import AUTO_ORDER, CPU_AUTO_ORDER
from mome.settings import triton_interpreting

# Modules by path: ``mome.ops.attention`` as an attribute is the function, not its module.
OP_BACKENDS = tuple(
    getattr(importlib.import_module(f"mome.ops.{module}"), name)
    for module, name in (
        ("attention", "BACKENDS"),
        ("decode", "BACKENDS"),
        ("modality", "LINEAR_BACKENDS"),
        ("modality", "FFN_BACKENDS"),
        ("modality", "LAYER_NORM_BACKENDS"),
        ("modality", "ROUTING_BACKENDS"),
        ("itc", "BACKENDS"),
    )
)


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "not installed"


def _extension_lines() -> list[str]:
    try:
        from mome.cuda import extension_status
    except ImportError as error:
        return [f"mome._C: status unknown ({error})"]
    status = extension_status()
    if status.get("built"):
        return [f"mome._C: built for {status.get('archs')} with {status.get('built_with')}"]
    return [f"mome._C: not available ({status.get('reason')})"]


def _integration_lines() -> list[str]:
    from mome.integrations import installed

    found = [
        f"{name} ({version})" if version else f"{name} (library not installed)" for name, version in installed().items()
    ]
    return ["integrations (mome.integrations.*): " + ", ".join(found)]


def report() -> str:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    lines = [
        f"mome {mome.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
        f"triton {_version('triton')}  numpy {_version('numpy')}",
        f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'}"
        f"{'  (TRITON_INTERPRET=1: triton runs on CPU tensors)' if triton_interpreting() else ''}",
        *_extension_lines(),
        *_integration_lines(),
        "",
    ]
    for device in devices:
        order = ", ".join(CPU_AUTO_ORDER if device.type == "cpu" else AUTO_ORDER)
        lines.append(f"backends for {device.type} tensors (auto picks the first usable of {order}):")
        for op in OP_BACKENDS:
            for backend, why in op.report(device).items():
                state = "available" if why is None else f"unavailable: {why}"
                lines.append(f"  {op.op:<20} {backend:<10} {state}")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    print(report())
    return 0
