"""``python -m mome demo --model NAME``: the command line onto each recipe's demo options, and one run end to end."""

import dataclasses
import importlib
import json

import pytest

from mome import demo
from mome.demo_models import RECIPES, recipe_options


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_exposes_its_options_training_and_report(name):
    module_name, options_name, train_name = RECIPES[name]
    module = importlib.import_module(module_name)
    assert dataclasses.is_dataclass(getattr(module, options_name))
    assert callable(getattr(module, train_name)) and callable(module.print_report)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_command_line_reaches_the_recipe_options(name):
    options, distributed, recipe = demo._parse(["--model", name, "--seed", "3", "--eval-size", "17", "--out", "x"])
    assert not distributed and recipe[0] == name
    chosen = recipe[1]
    assert (chosen.seed, chosen.eval_size, chosen.out) == (3, 17, "x")
    defaults = type(chosen)()
    step_fields = [f.name for f in dataclasses.fields(chosen) if f.name == "steps" or f.name.endswith("_steps")]
    assert step_fields and all(getattr(chosen, f) == getattr(defaults, f) for f in step_fields)  # its own default


def test_steps_scale_a_staged_recipe_and_set_a_single_one():
    staged = recipe_options("vlmo", steps=60, seed=0, device="cpu", eval_size=8, out="o", quiet=True)
    stages = [f.name for f in dataclasses.fields(staged) if f.name.endswith("_steps")]
    assert len(stages) >= 2 and abs(sum(getattr(staged, f) for f in stages) - 60) <= len(stages)
    assert recipe_options("coca", steps=7, seed=0, device="cpu", eval_size=8, out="o", quiet=True).steps == 7


def test_bad_combinations_are_refused(capsys):
    with pytest.raises(SystemExit):
        demo._parse(["--model", "coca", "--distributed"])
    assert "--model recipes run in one process" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo._parse(["--model", "clip"])
    with pytest.raises(SystemExit):
        demo._parse(["--steps", "0"])


def test_a_recipe_trains_and_reports_through_the_demo_command(tmp_path, capsys):
    assert demo.main(["--model", "coca", "--steps", "3", "--eval-size", "8", "--quiet", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "R@1" in report and "captions" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["held_out_pairs"] == 8
