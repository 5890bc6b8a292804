"""The backend contract of every op family, and the choice of a backend for each call.

A backend of a family is a module (``mome.reference.attention``, ``mome.kernels.attention``,
``mome.cuda.decode``, ...) that provides

- the launcher functions of the family's :class:`typing.Protocol` (contiguous tensors in, tensors out; the
  same parameter names as the protocol), and
- ``LIMITS``: a dict declaring what it runs. ``"dtypes"`` is a tuple of torch dtypes, or a dict from device
  type (``"cuda"``, ``"cpu"``) to such a tuple; every other key is one of the family's named sizes with an
  inclusive ``(low, high)`` range (``high`` may be None: unbounded) or a frozenset of the values it runs
  (a kernel built for head dims 64 and 128). A size the module does not name is unbounded.
- optionally ``available(device) -> str | None``: why the backend cannot run on that device at all (an
  extension that is not built, a driver that is too old), or None.

The first import of a backend module checks it against the protocol and its limits against the family's
names, and fails loudly on a mismatch (a programming error, not a fallback). Each op computes its named sizes
from its inputs; :meth:`OpBackends.reason` compares them with the declared limits, so an input a launcher
would reject is declined before any launch, and ``auto`` moves on to the next backend.

The choice is made inside each op's custom-op implementation, which runs eagerly with real tensors even under
``torch.compile``: dynamo never traces imports or the limit checks, and the fake implementations do not depend
on the backend. A backward op repeats the forward's choice from the same inputs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

from mome import settings

BACKENDS = ("reference", "native", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "reference")  # CUDA tensors
CPU_AUTO_ORDER = ("native", "reference")  # CPU tensors: torch's own fused CPU kernels, then the spec


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs; the message says why."""


class BackendContractError(TypeError):
    """A backend module does not provide what its family's contract asks for."""


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per family
class Family:
    """One op family's contract: the launchers (a Protocol) and the sizes a backend may bound."""

    name: str
    protocol: type
    sizes: Mapping[str, str]  # size name -> what it measures, for the messages

    def launchers(self) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(self.protocol).items()
            if callable(member) and not name.startswith("_")
        }


@dataclass(frozen=True)
class Limits:
    """A backend module's ``LIMITS``, checked against its family."""

    dtypes: Mapping[str, tuple[torch.dtype, ...]] | tuple[torch.dtype, ...]
    ranges: Mapping[str, tuple[int, int | None] | frozenset[int]] = field(default_factory=dict)

    def dtypes_on(self, device_type: str) -> tuple[torch.dtype, ...]:
        if isinstance(self.dtypes, Mapping):
            return tuple(self.dtypes.get(device_type, ()))
        return tuple(self.dtypes)


def _parameters(signature: inspect.Signature) -> list[str]:
    return [name for name in signature.parameters if name != "self"]


def check_contract(module: ModuleType, family: Family) -> Limits:
    """The module's declared limits, after checking its launchers and ``LIMITS`` against ``family``."""
    problems = []
    for name, signature in family.launchers().items():
        function = getattr(module, name, None)
        if not callable(function):
            problems.append(f"no launcher {name}{signature}")
            continue
        expected, got = _parameters(signature), list(inspect.signature(function).parameters)
        if got != expected:
            problems.append(f"{name} takes ({', '.join(got)}) where the contract says ({', '.join(expected)})")
    declared = getattr(module, "LIMITS", None)
    if not isinstance(declared, Mapping) or "dtypes" not in declared:
        problems.append("no LIMITS dict with a 'dtypes' entry")
        declared = {"dtypes": ()}
    unknown = sorted(set(declared) - {"dtypes"} - set(family.sizes))
    if unknown:
        problems.append(f"LIMITS names {unknown}, which the family does not measure (it has {sorted(family.sizes)})")
    ranges = {}
    for name, bounds in declared.items():
        if name == "dtypes" or name in unknown:
            continue
        is_range = isinstance(bounds, tuple) and len(bounds) == 2 and isinstance(bounds[0], int)
        is_set = isinstance(bounds, frozenset) and bounds and all(isinstance(b, int) for b in bounds)
        if not (is_range or is_set):
            expected = "an inclusive (low, high) pair or a frozenset of ints"
            problems.append(f"LIMITS[{name!r}] must be {expected}, got {bounds!r}")
            continue
        ranges[name] = bounds
    if problems:
        details = "; ".join(problems)
        raise BackendContractError(f"{module.__name__} does not follow the {family.name} backend contract: {details}")
    return Limits(declared["dtypes"], ranges)


@functools.cache
def _load(module_name: str, family: Family) -> tuple[ModuleType, Limits] | str:
    """The checked module and its limits, or the reason it cannot be imported (a failed import is not retried)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return f"{module_name} cannot be imported ({error})"
    return module, check_contract(module, family)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` at all, or None."""
    if backend == "reference":
        return None
    if backend == "native":
        return None if device.type == "cpu" else f"the native backend runs on CPU tensors (got {device.type})"
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install 'mome[triton]')"
        if device.type == "cuda" or (device.type == "cpu" and settings.triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (got {device.type}); TRITON_INTERPRET=1 runs it on CPU tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension runs on CUDA tensors (got {device.type})"
        return None
    raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")


def limits_reason(limits: Limits, family: Family, dtype: torch.dtype, device: torch.device, sizes: Mapping) -> str:
    """Why the declared limits exclude these inputs, or '' when they admit them."""
    dtypes = limits.dtypes_on(device.type)
    if dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes) or "none"
        return f"it runs dtypes ({names}) on {device.type} tensors, got {str(dtype).removeprefix('torch.')}"
    for name, bounds in limits.ranges.items():
        if name not in sizes:
            continue
        value = sizes[name]
        if isinstance(bounds, frozenset):
            if value not in bounds:
                return f"it supports {name} ({family.sizes[name]}) in {sorted(bounds)}, got {value}"
            continue
        low, high = bounds
        if value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            return f"it supports {name} ({family.sizes[name]}) in {bound}, got {value}"
    return ""


@dataclass(frozen=True)
class OpBackends:
    """Where each backend of one op lives, and how the op measures its inputs against the declared limits.

    ``measure(inputs) -> (dtype, device, sizes)`` maps the op's inputs (a dict) to the dtype that the limits'
    ``dtypes`` refer to, the device, and the family's named sizes.
    """

    op: str
    family: Family
    modules: Mapping[str, str]
    measure: Callable[[dict], tuple[torch.dtype, torch.device, dict[str, int]]]

    def loaded(self, backend: str) -> tuple[ModuleType, Limits] | str:
        if backend not in self.modules:
            return f"mome has no {backend} implementation of {self.op}"
        return _load(self.modules[backend], self.family)

    def reason(self, backend: str, inputs: dict) -> str | None:
        """Why ``backend`` cannot run these inputs, or None when it can."""
        dtype, device, sizes = self.measure(inputs)
        why = self.environment_reason(backend, device)
        if why is not None:
            return why
        return limits_reason(self.loaded(backend)[1], self.family, dtype, device, sizes) or None

    def environment_reason(self, backend: str, device: torch.device) -> str | None:
        """Why ``backend`` cannot run on ``device`` whatever the inputs (no implementation, wrong device, not
        importable, an extension that is not built), or None."""
        if backend not in self.modules:
            return f"mome has no {backend} implementation of {self.op}"
        why = device_reason(backend, device)
        if why is not None:
            return why
        loaded = self.loaded(backend)
        if isinstance(loaded, str):
            return loaded
        available = getattr(loaded[0], "available", None)
        return (available(device) if available is not None else None) or None

    def choose(self, backend: str, inputs: dict) -> tuple[str, ModuleType]:
        """The backend to run and its module; ``auto`` takes the first that can run the inputs."""
        if backend == "auto":
            backend = settings.backend()
        device = self.measure(inputs)[1]
        if backend != "auto":
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
            why = self.reason(backend, inputs)
            if why is not None:
                others = [other for other in BACKENDS if other != backend and self.reason(other, inputs) is None]
                hint = f"; the {' and '.join(others)} backend{'s' if len(others) > 1 else ''} can" if others else ""
                raise BackendUnavailableError(f"{self.op}: backend {backend!r} cannot run these inputs: {why}{hint}")
            return backend, self.loaded(backend)[0]
        order = AUTO_ORDER if device.type != "cpu" else CPU_AUTO_ORDER
        reasons = {}
        for candidate in order:
            why = self.reason(candidate, inputs)
            if why is None:
                return candidate, self.loaded(candidate)[0]
            reasons[candidate] = why
        details = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        raise BackendUnavailableError(f"{self.op}: no backend can run these inputs ({details})")

    def module(self, backend: str, inputs: dict) -> ModuleType:
        """The module of the backend that runs these inputs (see ``choose``)."""
        return self.choose(backend, inputs)[1]

    def limits(self, backend: str) -> Limits | None:
        """The declared limits of ``backend`` (None when it cannot be imported here): what the tests read."""
        loaded = self.loaded(backend)
        return None if isinstance(loaded, str) else loaded[1]

    def report(self, device: torch.device) -> dict[str, str | None]:
        """Per backend, None when it is usable on ``device`` or the reason it is not (``python -m mome info``)."""
        return {backend: self.environment_reason(backend, device) for backend in BACKENDS}


def check_backend(backend: str) -> None:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
