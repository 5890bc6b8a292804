"""A stand-in for torchvision, for the open_clip and timm integration tests only, used only when the real one
cannot be imported.

open_clip and timm import torchvision when they load (transforms, ``FrozenBatchNorm2d``), and PyPI's torchvision
does not import beside the CPU torch build of these machines. The tests build models from configs and never use
torchvision's code, so every ``torchvision.*`` module here is empty and every name in it a placeholder class.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Placeholder:
    """Any torchvision class or function: constructible, never used by the tests."""

    def __init__(self, *args, **kwargs):
        pass


class _PlaceholderType(type):
    def __getattr__(cls, name):  # enum members such as InterpolationMode.BICUBIC
        if name.startswith("__"):
            raise AttributeError(name)
        return name


def _module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _PlaceholderType(name, (_Placeholder,), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name, "torchvision stand-in (tests/torchvision_standin.py)")
        module.__path__ = []
        module.__getattr__ = _module_getattr
        module.__version__ = "0.0+standin"
        return module

    def exec_module(self, module):
        pass


def install_if_missing() -> bool:
    """Make ``import torchvision`` work; returns True when the stand-in was installed (no usable torchvision)."""
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # not installed, or built for another torch
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
    if not any(isinstance(finder, _StandInFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())
    return True
