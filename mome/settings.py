"""mome's runtime settings: every ``MOME_*`` variable is read here and nowhere else.

Code that changes a setting for a while (``mome bench`` timing without id checks, a test) uses
:func:`override`, which is scoped to the ``with`` block and the current thread or task, and never
touches ``os.environ``::

    with mome.settings.override(check_ids=False):
        ...

Build-time variables (``MOME_SKIP_CUDA_BUILD``, ``MOME_FORCE_CUDA_BUILD``, ``MOME_CUDA_ARCHS``) belong
to ``setup.py`` and ``csrc/ninja_build.py``, which run before mome is importable.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType

BACKEND_CHOICES = ("auto", "reference", "native", "triton", "cuda")

# name -> (environment variable, default when unset)
_VARIABLES = {
    "backend": ("MOME_BACKEND", "auto"),
    "check_ids": ("MOME_CHECK_IDS", "1"),
    "commit": ("MOME_COMMIT", ""),
}
_NO_OVERRIDES: Mapping[str, object] = MappingProxyType({})
_overrides: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "mome_settings", default=_NO_OVERRIDES
)


def _raw(name: str) -> object:
    overridden = _overrides.get()
    if name in overridden:
        return overridden[name]
    variable, default = _VARIABLES[name]
    return os.environ.get(variable, default)


def backend() -> str:
    """``MOME_BACKEND``: the backend that ``backend="auto"`` means (default ``auto``)."""
    value = str(_raw("backend"))
    if value not in BACKEND_CHOICES:
        raise ValueError(f"MOME_BACKEND must be one of {BACKEND_CHOICES}, got {value!r}")
    return value


def check_ids(*, when_unset: bool = True) -> bool:
    """``MOME_CHECK_IDS``: range-check id tensors on the host (one sync per call); ``0`` skips it.

    ``when_unset`` is the answer when neither the variable nor an override says (the benchmarks time without
    the check unless the user asks for it)."""
    overridden = _overrides.get()
    if "check_ids" not in overridden and "MOME_CHECK_IDS" not in os.environ:
        return when_unset
    value = _raw("check_ids")
    return value if isinstance(value, bool) else str(value) != "0"


def commit() -> str | None:
    """``MOME_COMMIT``: the commit that benchmark rows record when git cannot tell (a copied tree)."""
    return str(_raw("commit")) or None


def triton_interpreting() -> bool:
    """``TRITON_INTERPRET`` (triton's own variable): Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def override(**values: object) -> Iterator[None]:
    """Set ``backend``, ``check_ids`` or ``commit`` inside the block only (thread- and task-local)."""
    unknown = sorted(set(values) - set(_VARIABLES))
    if unknown:
        raise TypeError(f"mome.settings.override takes {sorted(_VARIABLES)}, got {unknown}")
    if "backend" in values and values["backend"] not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {values['backend']!r}")
    token = _overrides.set({**_overrides.get(), **values})
    try:
        yield
    finally:
        _overrides.reset(token)
