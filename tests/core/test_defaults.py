"""Plugin names a recipe leaves unset come from the registries; names core does not know are checked
against what the plugins register (σ samplers, LoRA formats), each problem naming its key (exit 2)."""
from __future__ import annotations

import pytest

from lora_run.errors import RecipeError
from lora_run.hookspecs import hookimpl
from lora_run.recipe import load_recipe
from lora_run.run import validate, with_defaults

from .conftest import GOOD, RecordingBackend

FEATURES = {"steps", "targets:attention", "optimizer:adafactor", "scheduler:constant_with_warmup", "loss:mse"}


class OwnFamily:
    """A third-party family with its own σ sampler and LoRA format, and a backend that trains it."""

    def __init__(self, default_family: bool = False):
        self.default_family = default_family

    @hookimpl
    def register_families(self, register):
        register("own-fam", description="a family of a test plugin", pixel_multiple=16, default=self.default_family,
                 samplers=("own-shift",), lora_formats=("own-a", "own-b"), default_formats=("own-b",))

    @hookimpl
    def register_backends(self, register):
        register("own-trainer", RecordingBackend, capabilities={
            "own-fam": FEATURES | {"timestep_sampling:own-shift", "timestep_sampling:sigmoid"}})


def test_a_recipe_that_names_no_plugin_gets_the_registered_defaults(write_recipe, plugins_with):
    plugins = plugins_with()
    body = GOOD.replace('backend = "recording"', "").replace("enabled = false", "enabled = true")
    loaded = load_recipe(write_recipe(body))
    r = loaded.recipe
    assert (r.model.family, r.backend.name, r.eval.embedder, r.output.formats) == (None, None, None, None)
    resolved = with_defaults(loaded, plugins).recipe
    default_family = plugins.default("family")
    assert default_family is not None and resolved.model.family == default_family
    family = plugins.registry["family"][default_family]
    assert resolved.output.formats == list(family.default_formats or family.lora_formats)
    assert resolved.backend.name == plugins.default("backend", plugins.trainers(default_family))
    assert plugins.registry["backend"][resolved.backend.name].default
    assert resolved.eval.embedder is not None and plugins.registry["embedder"][resolved.eval.embedder].default
    # what a user had before names moved into the registries
    assert (resolved.model.family, resolved.backend.name, resolved.eval.embedder, resolved.output.formats) == \
        ("flux.1-dev", "native", "dlib", ["kohya", "diffusers"])
    # a value the recipe gives is kept
    given = load_recipe(write_recipe(body.replace("[train]", '[output]\nformats = ["diffusers"]\n[train]')))
    assert with_defaults(given, plugins).recipe.output.formats == ["diffusers"]


def test_a_family_of_a_plugin_brings_its_sampler_formats_and_trainer(write_recipe, plugins_with):
    plugins = plugins_with(OwnFamily())
    body = GOOD.replace('backend = "recording"', "").replace("[model]", '[model]\nfamily = "own-fam"')
    prepared = validate(load_recipe(write_recipe(body.replace("steps = 3", 'steps = 3\ntimestep_sampling = '
                                                                           '"own-shift"'))), plugins)
    r = prepared.recipe
    assert (r.backend.name, r.output.formats, r.train.timestep_sampling) == ("own-trainer", ["own-b"], "own-shift")
    # the sampler is a known name for every family; a backend that does not honour it refuses it by key
    flux = GOOD.replace('backend = "recording"', "").replace("steps = 3", 'steps = 3\ntimestep_sampling = "own-shift"')
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(write_recipe(flux)), plugins)
    (problem,) = [p for p in err.value.problems if "[train.timestep_sampling]" in p]
    assert "[train.timestep_sampling]" in problem and "cannot honour" in problem and "none installed" in problem


def test_several_defaults_decide_nothing(write_recipe, plugins_with):
    plugins = plugins_with(OwnFamily(default_family=True))
    assert plugins.default("family") is None   # two families say "default": the recipe must choose
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(write_recipe(GOOD)), plugins)
    (problem,) = [p for p in err.value.problems if "[model.family]" in p]
    assert "is not set" in problem and "own-fam" in problem and "flux.1-dev" in problem
    assert not [p for p in err.value.problems if "[output.formats]" in p]
    assert plugins.default("backend", ["own-trainer"]) == "own-trainer"   # the only candidate
    assert plugins.default("backend", []) is None


@pytest.mark.parametrize("setting, key, message", [
    ("train.timestep_sampling=sigmod", "[train.timestep_sampling]",
     'unknown timestep sampling "sigmod" (did you mean "sigmoid"?)'),
    ('output.formats=["kohya", "difusers"]', "[output.formats[1]]",
     'unknown LoRA format "difusers" (did you mean "diffusers"?)'),
    ("model.family=flux.1-dv", "[model.family]", 'unknown family "flux.1-dv" (did you mean "flux.1-dev"?)'),
    ("backend.name=nativ", "[backend.name]", 'unknown backend "nativ" (did you mean "native"?)'),
])
def test_a_name_no_plugin_registered_is_a_recipe_error(run_cli, write_recipe, setting, key, message):
    recipe = write_recipe(GOOD.replace('backend = "recording"', ""))
    result = run_cli("check", recipe, "--set", setting)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{key} {message}" in result.stderr, result.stderr
