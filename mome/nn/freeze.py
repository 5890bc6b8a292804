"""Freezing single experts of stacked multiway weights (VLMo's stagewise pre-training).

Every multiway module stores its experts stacked in one Parameter, ``(E, ...)``, so ``requires_grad``
freezes all experts or none. :func:`freeze_experts` freezes slices instead: a gradient hook zeroes the
frozen experts' rows of each stacked weight's gradient, and, given the optimizer, a step pre-hook saves
those rows and a post-hook writes them back bit for bit and zeroes their rows of the optimizer state
(AdamW's moments, SGD's momentum). That is needed because a zero gradient does not stop an optimizer:
AdamW's decoupled weight decay shrinks every element, and its running moments keep moving elements
whose gradient has become zero.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from mome.nn.multiway import LANGUAGE, VISION, VISION_LANGUAGE, MultiwayLayerNorm, MultiwayLinear

EXPERT_NAMES = {"vision": VISION, "language": LANGUAGE, "vision-language": VISION_LANGUAGE}
_STACKED = (MultiwayLinear, MultiwayLayerNorm)  # the modules that own stacked (E, ...) parameters


def _stacked_modules(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = [m for m in model.modules() if isinstance(m, _STACKED)]
    if not modules:
        raise ValueError(
            f"model ({type(model).__name__}) holds no multiway module (MultiwayLinear, MultiwayLayerNorm, "
            "ModalityFFN or a MoME layer): there are no experts to freeze"
        )
    return modules


def _expert_indices(experts, num_experts: int) -> set[int]:
    """``experts`` (an index, a name, or an iterable of them) as a set of indices in ``[0, num_experts)``."""
    items = [experts] if isinstance(experts, (int, str)) else experts
    if not isinstance(items, Iterable):
        raise TypeError(f"experts must be an int, a name or a sequence of them, got {type(experts).__name__}")
    names = ", ".join(f"{name!r} ({index})" for name, index in EXPERT_NAMES.items() if index < num_experts)
    indices = set()
    for item in items:
        if isinstance(item, str):
            if item not in EXPERT_NAMES or EXPERT_NAMES[item] >= num_experts:
                raise ValueError(f"experts: unknown expert name {item!r}; this model's experts are {names}")
            indices.add(EXPERT_NAMES[item])
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < num_experts:
                raise ValueError(
                    f"experts: index {item} is out of range [0, {num_experts}) (the model's multiway modules have "
                    f"at most {num_experts} experts: {names})"
                )
            indices.add(item)
        else:
            raise TypeError(f"experts must hold int indices or names ({names}), got {item!r}")
    if not indices:
        raise ValueError(f"experts must name at least one expert ({names}), got {experts!r}")
    return indices


class _Frozen:
    """A stacked parameter's frozen rows and its gradient hook (held here, not on the module, so that a
    ``deepcopy`` of a model, which copies no tensor hooks, comes out wholly unfrozen rather than half)."""

    def __init__(self, param: Tensor):
        self.rows: set[int] = set()
        self.handle = param.register_hook(self._mask) if param.requires_grad else None  # no gradient: no hook

    def index(self, device: torch.device) -> Tensor:
        return torch.tensor(sorted(self.rows), dtype=torch.int64, device=device)

    def _mask(self, grad: Tensor) -> Tensor:
        return grad.index_fill(0, self.index(grad.device), 0) if self.rows else grad


_FROZEN = WeakIdKeyDictionary()  # stacked Parameter -> _Frozen


class _StepGuard:
    """Optimizer step hooks: the frozen rows of the optimizer's parameters are saved before the step and written
    back after it, and their rows of every state tensor shaped like the parameter are zeroed, so the step neither
    moves nor remembers them."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.saved: list[tuple[Tensor, Tensor, Tensor]] = []
        self.handles = (optimizer.register_step_pre_hook(self._save), optimizer.register_step_post_hook(self._restore))

    @torch.no_grad()
    def _save(self, optimizer, args, kwargs) -> None:
        self.saved = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                frozen = _FROZEN.get(param)
                if frozen is not None and frozen.rows:
                    rows = frozen.index(param.device)
                    self.saved.append((param, rows, param.index_select(0, rows)))

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for param, rows, values in self.saved:
            param.index_copy_(0, rows, values)
            for state in optimizer.state.get(param, {}).values():
                if isinstance(state, Tensor) and state.shape == param.shape:
                    state.index_fill_(0, rows, 0)
        self.saved = []


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its _StepGuard


def freeze_experts(model: nn.Module, experts, *, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Freeze some experts of every multiway module inside ``model``; the other experts keep training.

    Args:
        model: any module holding ``MultiwayLinear`` / ``MultiwayLayerNorm`` (so ``ModalityFFN``,
            ``MoMELayer``, ``MoMETransformer``); pass a submodule (``model.layers[-1].ffn``) to freeze
            only there. Modules with fewer experts than an index skip it (the V/L-only layers of a VLMo
            have no vision-language expert).
        experts: an index, a name (``"vision"`` 0, ``"language"`` 1, ``"vision-language"`` 2), or a
            sequence of them. Freezing adds to what is already frozen.
        optimizer: the optimizer that steps the model's parameters. Without it only the gradients are
            masked, which is exact for plain SGD; AdamW (weight decay, moments) still changes the frozen
            rows. With it, each ``optimizer.step()`` leaves the frozen rows bit-identical and keeps their
            optimizer state at zero. Passing the same optimizer again adds no second set of hooks.

    Returns the names of the parameters whose rows are now (partly) frozen. Undo with
    :func:`unfreeze_experts`. Shared, non-expert weights (VLMo's self-attention) are frozen the usual way,
    ``requires_grad_(False)``. Equivalent, for one stacked weight ``w`` and frozen rows ``r``::

        w.register_hook(lambda g: g.index_fill(0, r, 0))  # no gradient reaches the frozen experts
        saved = w[r].clone(); optimizer.step(); w.data[r] = saved  # nor does the optimizer step
    """
    modules = _stacked_modules(model)
    indices = _expert_indices(experts, max(m.num_experts for m in modules))
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer not in _GUARDS:
            _GUARDS[optimizer] = _StepGuard(optimizer)
    names = {id(p): name for name, p in model.named_parameters()}
    frozen = []
    for module in modules:
        rows = {index for index in indices if index < module.num_experts}
        if not rows:
            continue
        for param in module.parameters(recurse=False):
            if param not in _FROZEN:
                _FROZEN[param] = _Frozen(param)
            _FROZEN[param].rows |= rows
            frozen.append(names[id(param)])
    return frozen


def unfreeze_experts(model: nn.Module, experts=None) -> None:
    """Let frozen experts train again: ``experts`` as in :func:`freeze_experts`, or None for all of them.

    Their optimizer state resumes from zero (where the optimizer hooks kept it) under the optimizer's step
    count, whose bias correction has run its course: Adam's first updates of these rows are then up to
    ``(1 - beta1) / sqrt(1 - beta2)`` (about 3) times lr in size; warm the learning rate up again if that matters.
    """
    modules = _stacked_modules(model)
    indices = None if experts is None else _expert_indices(experts, max(m.num_experts for m in modules))
    for module in modules:
        for param in module.parameters(recurse=False):
            frozen = _FROZEN.get(param)
            if frozen is None:
                continue
            frozen.rows = set() if indices is None else frozen.rows - indices
            if not frozen.rows:
                if frozen.handle is not None:
                    frozen.handle.remove()
                del _FROZEN[param]
