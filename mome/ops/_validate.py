"""Argument checks shared by the ops: each error names the argument, what it got and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from mome import settings

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, value, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {describe(value)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {describe(value)}")
    return value


def check_float(name: str, value, *, ndim: int) -> Tensor:
    return check_tensor(name, value, ndim=ndim, dtypes=FLOAT_DTYPES)


def check_shape(name: str, value: Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``expected`` holds sizes, or None where any size is fine; ``what`` explains where the sizes come from."""
    ok = value.dim() == len(expected) and all(e is None or s == e for s, e in zip(value.shape, expected, strict=False))
    if not ok:
        pretty = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        suffix = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {pretty}{suffix}, got {describe(value)}")


def check_same(name: str, value: Tensor, reference_name: str, reference: Tensor, *, dtype: bool = True) -> None:
    """Same device (and dtype) as the op's main input."""
    check_device(name, value, reference.device, reference_name)
    if dtype and value.dtype != reference.dtype:
        raise TypeError(f"{name} must have dtype {reference.dtype} like {reference_name}, got {describe(value)}")


def check_device(name: str, value: Tensor, device: torch.device, like: str) -> None:
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like {like}, got {describe(value)}")


def check_int_range(name: str, values: Tensor, low: int, high: int, what: str) -> None:
    """Integers in ``[low, high]`` (inclusive).

    The range check reads min/max back to the host: one sync per call. It is skipped
    while torch.compile traces (values are unknown there) and with ``MOME_CHECK_IDS=0``.
    """
    check_tensor(name, values, dtypes=INT_DTYPES)
    if values.numel() == 0 or values.is_meta or torch.compiler.is_compiling() or not settings.check_ids():
        return
    got_low, got_high = int(values.min()), int(values.max())
    if got_low < low or got_high > high:
        raise ValueError(f"{name} must lie in [{low}, {high}] ({what}), got values in [{got_low}, {got_high}]")


def check_ids(name: str, ids: Tensor, num: int, what: str) -> None:
    """Integer ids in ``[0, num)``."""
    check_int_range(name, ids, 0, num - 1, what)


def check_bool(name: str, value: Tensor) -> None:
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked out), got {describe(value)}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool_flag(name: str, value) -> bool:
    """A Python bool (or numpy/torch bool scalar): ``causal="no"`` must not mean True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Tensor) and value.dtype == torch.bool and value.numel() == 1 and not value.is_meta:
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_scale(name: str, value, default: float) -> float:
    """A real number (int or float; NaN and inf allowed: they propagate), or None for ``default``.

    A tensor scale is accepted when it is a one-element real tensor that does not require grad (read once on the
    host); a learnable scale is refused rather than silently cut from the graph.
    """
    if value is None:
        return float(default)
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise TypeError(
                f"{name} is a tensor that requires grad, but mome does not differentiate through {name}: pass a "
                f"float, or multiply the learnable factor into q (its gradient then flows)"
            )
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.is_meta:
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got {describe(value)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    return float(value)


def ids_for_launch(name: str, ids: Tensor, low: int, high: int, what: str) -> tuple[Tensor, Tensor | None]:
    """Range-check ids inside a custom op's implementation, which runs eagerly with real tensors even in
    compiled code, so a bad id is caught the same way under ``torch.compile``.

    With the check on (``MOME_CHECK_IDS``, the default) a bad id raises the ValueError of
    :func:`check_int_range` (one host sync per call) and the ids come back as they are, with no mask. With it
    off there is no sync: bad ids are replaced by ``low`` and their mask comes back, so the op can poison the
    outputs they would have produced (NaN) instead of reading or returning memory no kernel wrote.
    """
    if settings.check_ids():
        check_int_range(name, ids, low, high, what)
        return ids, None
    bad = (ids < low) | (ids > high)
    return torch.where(bad, low, ids), bad


def poison_where(out: Tensor, bad: Tensor | None) -> Tensor:
    """``out`` with NaN where ``bad`` (broadcast against it) is True; ``out`` itself when nothing was flagged."""
    if bad is None:
        return out
    return torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def check_positive_float(name: str, value) -> float:
    """A real number > 0 (an int is fine; bool, str, None and NaN are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def is_int(value) -> bool:
    """Python or numpy ints; not bools (``True`` is an int to Python, never a token id or a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Python or numpy real numbers; not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
