"""``python -m mome demo --model NAME``: one of the field's five systems, trained from scratch on the demo's data.

Each recipe's demo lives in its own module (``mome/demo_<name>.py``) with an options dataclass, a training function
returning its metrics and a printed report; this module maps the demo's command-line options onto them.
"""

from __future__ import annotations

import dataclasses
import importlib

# name -> (module, options dataclass, training function); each module also has print_report(metrics)
RECIPES = {
    "albef": ("mome.demo_albef", "ALBEFDemoOptions", "train_albef"),
    "vlmo": ("mome.demo_vlmo", "VLMoDemoOptions", "train_vlmo"),
    "blip": ("mome.demo_blip", "BLIPDemoOptions", "train_blip"),
    "coca": ("mome.demo_coca", "CoCaDemoOptions", "train_coca"),
    "beit3": ("mome.demo_beit3", "BEiT3DemoOptions", "train_beit3"),
}


def _step_overrides(defaults, steps: int) -> dict:
    """``steps`` in all: one ``steps`` field, or a recipe's stages (``*_steps`` fields) scaled to sum to it."""
    if hasattr(defaults, "steps"):
        return {"steps": steps}
    stages = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name.endswith("_steps")}
    total = sum(stages.values())
    scaled = {name: max(1, round(value * steps / total)) for name, value in stages.items()}
    return scaled


def recipe_options(name: str, *, steps: int | None, seed: int, device: str, eval_size: int, out: str, quiet: bool):
    """The recipe's options with the demo's command-line values (its own defaults elsewhere)."""
    if name not in RECIPES:
        raise ValueError(f"model must be one of {sorted(RECIPES)}, got {name!r}")
    module_name, options_name, _ = RECIPES[name]
    defaults = getattr(importlib.import_module(module_name), options_name)()
    overrides = dict(seed=seed, device=device, eval_size=eval_size, out=out, quiet=quiet)
    if steps is not None:
        overrides.update(_step_overrides(defaults, steps))
    return dataclasses.replace(defaults, **overrides)


def run_recipe(name: str, options) -> dict:
    """Train ``name``'s tiny config with ``options``, print its report, return its metrics."""
    module_name, _, train_name = RECIPES[name]
    module = importlib.import_module(module_name)
    metrics = getattr(module, train_name)(options)
    module.print_report(metrics)
    return metrics
