"""Backend choice for every op.

Each op names, per backend, the module that implements it. Every backend module
exposes the same launcher functions (contiguous tensors in, tensors out) and may
expose ``unsupported_reason(op, **inputs) -> str | None`` to decline inputs it does
not handle. ``auto`` walks the priority list and takes the first backend that can
run the inputs; forcing one that cannot raises with every reason.

The choice is made inside each op's custom-op implementation (``OpBackends.module``),
which runs eagerly with real tensors even under torch.compile: dynamo never traces
imports or the backends' ``unsupported_reason``, and the fake implementations do not
depend on the backend. A backward op repeats the forward's choice from the same inputs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs; the message says why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _import(module_name: str) -> ModuleType | str:
    """The module, or the reason it cannot be imported (remembered: a failed import is not retried)."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        return f"{module_name} cannot be imported ({error})"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` at all, or None."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install 'mome[triton]')"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (got {device.type}); TRITON_INTERPRET=1 runs it on CPU tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension runs on CUDA tensors (got {device.type})"
        return None
    raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")


@dataclass(frozen=True)
class OpBackends:
    """Where each backend of one op lives: ``{"triton": "mome.kernels.attention", ...}``."""

    op: str
    modules: dict[str, str]

    def reason(self, backend: str, device: torch.device, inputs: dict) -> str | None:
        """Why ``backend`` cannot run these inputs, or None when it can."""
        if backend not in self.modules:
            return f"mome has no {backend} implementation of {self.op}"
        why = device_reason(backend, device)
        if why is not None:
            return why
        module = _import(self.modules[backend])
        if isinstance(module, str):
            return module
        unsupported = getattr(module, "unsupported_reason", None)
        return None if unsupported is None else unsupported(self.op, **inputs)

    def choose(self, backend: str, device: torch.device, inputs: dict) -> tuple[str, ModuleType]:
        """The backend to run and its module; ``auto`` takes the first that can run the inputs."""
        if backend == "auto":
            backend = os.environ.get("MOME_BACKEND", "auto")
        if backend != "auto":
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
            why = self.reason(backend, device, inputs)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} cannot run these inputs: {why}")
            return backend, _import(self.modules[backend])
        order = AUTO_ORDER if device.type != "cpu" else ("reference",)
        reasons = {}
        for candidate in order:
            why = self.reason(candidate, device, inputs)
            if why is None:
                return candidate, _import(self.modules[candidate])
            reasons[candidate] = why
        details = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        raise BackendUnavailableError(f"{self.op}: no backend can run these inputs ({details})")

    def module(self, backend: str, device: torch.device, inputs: dict) -> ModuleType:
        """The module of the backend that runs these inputs (see ``choose``)."""
        return self.choose(backend, device, inputs)[1]

    def report(self, device: torch.device) -> dict[str, str | None]:
        """Per backend, None when it is usable on ``device`` or the reason it is not (``python -m mome info``)."""
        report = {}
        for backend in BACKENDS:
            if backend not in self.modules:
                report[backend] = f"mome has no {backend} implementation of {self.op}"
                continue
            why = device_reason(backend, device)
            if why is None:
                module = _import(self.modules[backend])
                why = module if isinstance(module, str) else None
            report[backend] = why
        return report
