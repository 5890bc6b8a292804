"""Python side of the CUDA extension mome._C: loading, status, and the ops it implements.

``mome._C`` is a torch-independent pybind11 module (device pointers in); the tensor API is
in :mod:`mome.cuda.decode` and :mod:`mome.cuda.modality`, the backend modules of their op families.
Nothing here raises at import: a missing, stale or unusable extension becomes a *reason*
that the backends report, and the ``auto`` backend falls back with a one-time warning.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

# Must equal mome::kAbiVersion (csrc/launchers.h): the launchers' argument lists.
EXPECTED_ABI = 1

NOT_BUILT_HINT = (
    "it is built by `pip install` only where nvcc and a CUDA driver are found "
    "(MOME_FORCE_CUDA_BUILD=1 builds it wherever nvcc is; MOME_SKIP_CUDA_BUILD=1 skips it)"
)

_warned: set[str] = set()


def _import_extension() -> ModuleType:
    return importlib.import_module("mome._C")


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """The extension module, or None and the reason it cannot be used."""
    try:
        module = _import_extension()
    except ModuleNotFoundError:
        return None, f"mome._C is not built: {NOT_BUILT_HINT}"
    except ImportError as error:  # built for another Python, or a library it links is missing
        return None, f"mome._C cannot be imported ({error}); rebuild it with pip install"
    abi = getattr(module, "ABI_VERSION", None)
    if abi != EXPECTED_ABI:
        return None, f"mome._C was built from another mome version (ABI {abi}, expected {EXPECTED_ABI}); rebuild it"
    return module, None


def extension() -> ModuleType | None:
    """The loaded ``mome._C``, or None (see :func:`unavailable_reason`)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why ``mome._C`` cannot be used at all, or None when it loaded."""
    return _load()[1]


@functools.cache
def _device_reason(index: int) -> str | None:
    module = extension()
    with torch.cuda.device(index):
        why = module.device_check()
    return why or None


def device_reason(device: torch.device) -> str | None:
    """Why the extension cannot run on ``device`` (not built, not a CUDA device, driver, kernel image), or None."""
    why = unavailable_reason()
    if why is not None:
        return why
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors (got {device.type})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


@torch._dynamo.assume_constant_result  # torch.compile takes the answer as a constant: no tracing of imports
def fallback_reason(device: torch.device) -> str | None:
    """:func:`device_reason` for the backends' ``unsupported_reason``: warns once when the extension itself
    is unusable (not built, stale, no driver, no kernel image for this GPU), since ``auto`` then falls back."""
    why = device_reason(device)
    if why is not None and (unavailable_reason() is not None or device.type == "cuda"):
        warn_fallback_once(why)
    return why


def warn_fallback_once(reason: str) -> None:
    """One warning per distinct reason: the CUDA backend is skipped and another one runs instead."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"mome: the CUDA backend is unavailable, falling back: {reason}", RuntimeWarning, stacklevel=4)


def extension_status() -> dict:
    """What ``python -m mome info`` shows about ``mome._C``.

    Keys: ``built`` (it loaded), ``archs`` (list of compute capabilities), ``built_with``
    (nvcc, CUDA runtime, pybind11, host compiler versions), ``reason`` (why it is unavailable,
    or why the current GPU cannot use it; None when usable), ``path``.
    """
    module, why = _load()
    status = {"built": module is not None, "archs": [], "built_with": {}, "reason": why, "path": None}
    if module is None:
        return status
    info = module.build_info()
    status["archs"] = [a for a in info["archs"].split(";") if a]
    status["built_with"] = {key: info[key] for key in ("nvcc", "cudart", "pybind11", "compiler")}
    status["path"] = getattr(module, "__file__", None)
    if torch.cuda.is_available():
        status["reason"] = device_reason(torch.device("cuda", torch.cuda.current_device()))
    else:
        status["reason"] = "built, but torch sees no CUDA device here"
    return status


__all__ = [
    "EXPECTED_ABI",
    "device_reason",
    "extension",
    "extension_status",
    "fallback_reason",
    "unavailable_reason",
]
