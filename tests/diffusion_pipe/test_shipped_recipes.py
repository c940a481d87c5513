"""Every shipped recipe (walked recursively), switched to the diffusion-pipe backend, either plans configs that
diffusion-pipe accepts or is refused with reasons that each name a recipe key."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_run.errors import RecipeError
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import make_backend, validate
from lora_run_diffusion_pipe import keydata
from lora_run_rundir import RunDir

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.toml"))
KEYED = re.compile(r"^.+?: \[[a-z0-9_.\-\[\]]+\] .+")


def test_recipes_exist():
    assert SHIPPED, f"no recipes under {RECIPES}"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(RECIPES)) for p in SHIPPED])
def test_shipped_recipe_plans_or_is_refused_by_key(path, tmp_path):
    import tomllib as toml

    plugins = load_plugins()
    try:
        loaded = load_recipe(path, ["backend.name=diffusion-pipe"])
        prepared = validate(loaded, plugins)
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert KEYED.match(problem), problem
        return
    plan = make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "run")).plan()
    config = toml.loads(plan.files["diffusion-pipe/config.toml"])
    dataset = toml.loads(plan.files["diffusion-pipe/dataset.toml"])
    assert keydata.config_problems(config) == [] and keydata.dataset_problems(dataset) == []
    assert plan.commands and plan.commands[0][2:4] == ["train.py", "--deepspeed"]
