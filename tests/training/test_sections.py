"""The built-in `training` plugin: `[train]`, `[lora]`, `[text_encoder]`, `[optimizer]`, `[scheduler]` and
`[sample]` are its tables (core's schema has none of them), their rules keep their messages, and the capability
check runs through the `check_recipe` hook with every other problem."""
from __future__ import annotations

import attrs
import pytest

from lora_run import schema
from lora_run.errors import RecipeError
from lora_run.hookspecs import hookimpl
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import validate
from lora_run_training.sections import SECTIONS

GOOD = """
backend = "native"
[model]
family = "flux.1-dev"
source = "black-forest-labs/FLUX.1-dev"
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[train]
steps = 3
"""
NAMES = ("train", "lora", "text_encoder", "optimizer", "scheduler", "sample")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Messages show paths relative to the working directory, as a user in that folder sees them."""
    monkeypatch.chdir(tmp_path)


def test_the_tables_are_the_plugins_not_cores(write_recipe):
    assert not set(NAMES) & set(attrs.fields_dict(schema.Recipe))
    plugins = load_plugins()
    assert {name: plugins.registry["section"][name].plugin for name in NAMES} == {name: "training" for name in NAMES}
    recipe = load_recipe(write_recipe(GOOD + "[lora]\nrank = 8\n"), plugins=plugins).recipe
    assert recipe.lora.rank == 8 and recipe.lora.alpha == 32.0 and recipe.optimizer.name == "adafactor"
    assert recipe.sample.seeds == [1] and recipe.scheduler.warmup_steps == 0 and not recipe.text_encoder.train
    for _name, cls, _check, _description in SECTIONS:      # every field documented, as core's are
        assert all(f.metadata.get("doc") for f in attrs.fields(cls)), cls


def test_a_wrong_key_in_a_training_table_is_named(write_recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(GOOD + "[lora]\nrnak = 8\n[optimizer]\nlr = \"fast\"\n"))
    text = str(err.value)
    assert "[lora] unknown key 'rnak' (did you mean 'rank'?)" in text
    assert "[optimizer.lr] expected float, got str 'fast'" in text


def test_the_tables_rules_are_reported_by_check_all_at_once(write_recipe, run_cli):
    body = GOOD + ('[lora]\nrank = 2\nalpha = 64.0\n[optimizer]\nbetas = [0.9]\n'
                   '[sample]\nevery_steps = 5\nprompts = []\nseeds = []\n')
    out = run_cli("check", write_recipe(body))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for line in ("recipe.toml: [lora.alpha] is 64.0 for rank 2: a scale alpha/rank above 16 is almost certainly a typo",
                 "recipe.toml: [optimizer.betas] expected two numbers, got 1",
                 "recipe.toml: [sample.prompts] must not be empty when sample.every_steps is set",
                 "recipe.toml: [sample.seeds] must not be empty when sample.every_steps is set"):
        assert f"error: {line}" in out.stderr, out.stderr
    assert "[sample.strengths]" not in out.stderr
    # control: the same tables within the rules pass
    fine = body.replace("alpha = 64.0", "alpha = 32.0").replace("[0.9]", "[0.9, 0.99]").replace(
        "prompts = []\nseeds = []", "prompts = [\"{trigger}\"]")
    ok = run_cli("check", write_recipe(fine))
    assert "[lora" not in ok.stderr and "[optimizer" not in ok.stderr and "[sample" not in ok.stderr, ok.stderr


class Strict:
    """A third-party whole-recipe rule next to the built-in capability check."""

    @hookimpl
    def check_recipe(self, recipe):
        return [(("train", "seed"), "must be 7 here")] if recipe.train.seed != 7 else []


def test_check_recipe_problems_come_with_the_capability_refusal(write_recipe, plugins_with):
    plugins = plugins_with(Strict())
    body = GOOD.replace('backend = "native"', 'backend = "kohya"') + "[lora]\ndropout = 0.1\n"
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(write_recipe(body), plugins=plugins), plugins)
    problems = err.value.problems
    assert "recipe.toml: [train.seed] must be 7 here" in problems
    refused = [p for p in problems if p.startswith("recipe.toml: [lora.dropout] backend \"kohya\" cannot honour "
                                                   "LoRA dropout for flux.1-dev")]
    assert len(refused) == 1 and refused[0].endswith("; backends that can: diffusion-pipe, native")
    # control: the native backend honours LoRA dropout; only the third-party rule is left
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(write_recipe(body.replace('"kohya"', '"native"')), plugins=plugins), plugins)
    assert "recipe.toml: [train.seed] must be 7 here" in err.value.problems
    assert not [p for p in err.value.problems if "[lora.dropout]" in p], err.value.problems


def test_without_the_training_plugin_its_tables_are_unknown(write_recipe, monkeypatch):
    monkeypatch.setenv("LORA_RUN_PLUGINS_DISABLE", "training")
    plugins = load_plugins()
    assert not set(NAMES) & set(plugins.names("section"))
    with pytest.raises(RecipeError, match=r"top level: unknown key 'lora'"):
        load_recipe(write_recipe(GOOD + "[lora]\nrank = 8\n"), plugins=plugins)
