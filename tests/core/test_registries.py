"""Open registries: capabilities by kind, registry hooks through pluggy, typed registration, dataset options,
evaluator choice."""
from __future__ import annotations

import re

import attrs
import pytest

from lora_run.errors import RecipeError
from lora_run_training.capabilities import capability_problems
from lora_run.hookspecs import hookimpl
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import execute, scan_dataset, validate, with_defaults
from lora_run.schema import option

from .conftest import GOOD, RecordingBackend


def _abs_loss(_options=None):
    def loss(prediction, target, **_info):
        return (prediction - target).abs()
    return loss


class AnyLossBackend:
    """A backend that declares the kind `loss:*`, and one that lists a loss by name."""

    @hookimpl
    def register_backends(self, register):
        caps = {"steps", "timestep_sampling:sigmoid", "targets:attention", "optimizer:adafactor",
                "scheduler:constant_with_warmup"}
        register("any-loss", RecordingBackend, capabilities={"flux.1-dev": caps | {"loss:*"}})
        register("mse-only", RecordingBackend, capabilities={"flux.1-dev": caps | {"loss:mse"}})


class ThirdPartyLoss:
    @hookimpl
    def register_losses(self, register):
        register("third-abs", _abs_loss, description="mean absolute error from another plugin")


def test_a_loss_from_any_plugin_is_honoured_by_a_backend_that_takes_every_loss(plugins_with, write_recipe):
    plugins = plugins_with(AnyLossBackend(), ThirdPartyLoss())
    body = GOOD.replace('backend = "recording"', 'backend = "any-loss"').replace("steps = 3", 'steps = 3\nloss = "third-abs"')
    recipe = with_defaults(load_recipe(write_recipe(body)), plugins).recipe
    assert capability_problems(recipe, "any-loss", plugins.registry["backend"]) == []
    problems = capability_problems(recipe, "mse-only", plugins.registry["backend"])
    ((key, message),) = problems
    assert key == ("train", "loss")
    assert message.startswith('backend "mse-only" cannot honour the `third-abs` loss for flux.1-dev; backends that '
                              "can: any-loss")
    assert "mse-only" not in message.split("can:")[1]
    validate(load_recipe(write_recipe(body)), plugins)  # the whole check passes


def test_registry_hooks_go_through_pluggy_so_monitoring_sees_them(plugins_with, monkeypatch, capsys):
    class Watch:
        @hookimpl
        def register_losses(self, register):
            register("watched", _abs_loss)
    monkeypatch.setenv("LORA_RUN_TRACE_PLUGINS", "1")    # pluggy's hook-call monitoring, printed to stderr
    plugins = plugins_with(Watch())
    seen = re.findall(r"^\[lora-run trace\] (\w+)\(", capsys.readouterr().err, flags=re.M)
    assert "watched" in plugins.names("loss") and plugins.registry["loss"]["watched"].plugin != "losses"
    assert {"register_backends", "register_losses", "register_datasets", "register_evaluators"} <= set(seen)
    assert seen.count("register_losses") >= 2  # once per implementing plugin: `losses` and the test plugin


def test_unknown_registration_keyword_marks_the_plugin_broken(plugins_with):
    class Typo:
        @hookimpl
        def register_losses(self, register):
            register("typo-loss", _abs_loss, descripton="misspelled")
    plugins = plugins_with(Typo())
    assert "typo-loss" not in plugins.names("loss")
    assert any("unknown keyword(s) descripton" in b.error for b in plugins.broken)


@attrs.frozen(kw_only=True)
class ListOptions:
    names: list[str] = option(factory=list, doc="Image file names, relative to [dataset] path.")


class ListDataset:
    def __init__(self, section, recipe, options):
        self.section, self.options = section, options

    def check(self):
        return [] if self.options.names else [(("dataset", "options", "names"), "lists no image")]

    def items(self):
        from pathlib import Path

        from lora_run.dataset import Item
        from lora_run_folder import read_caption
        out = []
        for name in self.options.names:
            image = Path(self.section.path) / name
            text, error = read_caption(image.with_suffix(".txt"))
            out.append(Item(image, text, image.with_suffix(".txt"), "subject", caption_error=error))
        return out


class ListDatasetPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("list", ListDataset, options=ListOptions, description="named images of a folder")


def test_dataset_type_takes_its_own_options_table(plugins_with, write_recipe, recording):
    plugins = plugins_with(ListDatasetPlugin(), recording[0])
    body = GOOD.replace("[dataset]\n", '[dataset]\ntype = "list"\n')
    ok = body + '\n[dataset.options]\nnames = ["img000.png", "img002.png"]\n'
    recipe = load_recipe(write_recipe(ok)).recipe
    validate(load_recipe(write_recipe(ok)), plugins)
    assert [item.image.name for item in scan_dataset(recipe, plugins)] == ["img000.png", "img002.png"]
    with pytest.raises(RecipeError) as info:  # a typo in the type's table: named with the full key
        validate(load_recipe(write_recipe(body + '\n[dataset.options]\nname = ["a.png"]\n')), plugins)
    assert "[dataset.options]" in str(info.value) and "did you mean 'names'" in str(info.value)
    with pytest.raises(RecipeError) as info:  # the type's own check
        validate(load_recipe(write_recipe(body + '\n[dataset.options]\nnames = []\n')), plugins)
    assert "[dataset.options.names] lists no image" in str(info.value)
    with pytest.raises(RecipeError) as info:  # folder takes no options
        validate(load_recipe(write_recipe(GOOD + '\n[dataset.options]\nnames = []\n')), plugins)
    assert 'dataset "folder" takes no options' in str(info.value)


def test_folder_dataset_requires_a_path(plugins_with, write_recipe, recording):
    plugins = plugins_with(recording[0])
    body = GOOD.replace('path = "{dataset}"\n', "")
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(body)), plugins)
    assert '[dataset.path] is required for dataset type "folder"' in str(info.value)


class Evaluators:
    def __init__(self):
        self.ran = []

    @hookimpl
    def register_evaluators(self, register):
        for name in ("first", "second"):
            register(name, lambda ctx, name=name: _Eval(self, name), kind="evaluator")


class _Eval:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def evaluate(self):
        self.owner.ran.append(self.name)


@pytest.mark.parametrize("chosen, expected", [('["second"]', ["second"]), ("[]", []),
                                              ('["second", "first"]', ["second", "first"])])
def test_eval_evaluators_chooses_which_run(plugins_with, write_recipe, recording, tmp_path, chosen, expected):
    evaluators = Evaluators()
    plugins = plugins_with(recording[0], evaluators)
    body = GOOD.replace("enabled = false", f"evaluators = {chosen}")
    execute(load_recipe(write_recipe(body)), plugins, output_dir=str(tmp_path / "run"), echo=lambda _: None)
    assert evaluators.ran == expected


def test_unknown_evaluator_is_named_with_did_you_mean(plugins_with, write_recipe, recording):
    plugins = plugins_with(recording[0], Evaluators())
    body = GOOD.replace("enabled = false", 'evaluators = ["secnod"]')
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(body)), plugins)
    assert '[eval.evaluators[0]] unknown evaluator "secnod" (did you mean "second"?)' in str(info.value)


def test_family_is_looked_up_in_the_registry_with_did_you_mean(run_cli, write_recipe):
    result = run_cli("check", write_recipe(GOOD.replace('backend = "recording"', "")), "--set",
                     'model.family="flux.1-dve"')
    assert result.returncode == 2, result.stderr
    assert '[model.family] unknown family "flux.1-dve" (did you mean "flux.1-dev"?)' in result.stderr
    installed = sorted(load_plugins().registry["family"])          # the built-ins and any installed family plugin
    assert {"flux.1-dev", "hunyuan-dit-1.2", "hunyuan-image-2.1"} <= set(installed)
    assert f"available: {', '.join(installed)}" in result.stderr
    assert "Traceback" not in result.stderr


def test_builtin_families_are_plugins_listed_with_their_backends(run_cli):
    import json

    listing = json.loads(run_cli("plugins", "--json").stdout)["plugins"]
    by_family = {f: p for p in listing for f in p.get("families", [])}
    assert set(by_family) >= {"flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2"}
    assert by_family["flux.1-dev"]["name"] == "flux.1-dev" and by_family["flux.1-dev"]["module"] == "lora_run_flux"
    assert "native" in by_family["hunyuan-dit-1.2"]["trained_by"]["hunyuan-dit-1.2"]
    assert "kohya" not in by_family["hunyuan-dit-1.2"]["trained_by"]["hunyuan-dit-1.2"]
    assert "flux" not in by_family["flux.1-dev"]["trained_by"]["flux.1-dev"]  # an alias is listed once


def test_a_disabled_family_plugin_takes_its_family_away(run_cli, write_recipe):
    result = run_cli("check", write_recipe(GOOD.replace('backend = "recording"', "")),
                     env={"LORA_RUN_PLUGINS_DISABLE": "flux.1-dev"})
    assert result.returncode == 2
    # the family named nowhere: the default went with its plugin, so the recipe must name one of the others
    assert "[model.family] is not set and no single installed family is registered as the default; set it to one of: " \
        "flux.2-dev" in result.stderr, result.stderr
    assert "[output.formats]" not in result.stderr   # no second message for the same missing family
    body = GOOD.replace('backend = "recording"', "").replace("[model]", '[model]\nfamily = "flux.1-dev"')
    named = run_cli("check", write_recipe(body), env={"LORA_RUN_PLUGINS_DISABLE": "flux.1-dev"})
    assert named.returncode == 2 and '[model.family] unknown family "flux.1-dev"' in named.stderr, named.stderr


def test_file_slots_come_from_the_family(plugins_with, write_recipe, recording, tmp_path):
    weights = tmp_path / "qwen.safetensors"
    weights.write_bytes(b"x")
    plugins = plugins_with(recording[0])
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(GOOD), [f"model.files.qwen='{weights}'"]), plugins)
    assert ("[model.files.qwen] is not a file flux.1-dev takes; its [model.files] slots: transformer, vae, clip_l, "
            "t5xxl") in str(info.value)
    with pytest.raises(RecipeError) as info:  # a misspelled slot: named, with the family's closest slot
        validate(load_recipe(write_recipe(GOOD), [f"model.files.clip_I='{weights}'"]), plugins)
    assert "[model.files.clip_I] is not a file flux.1-dev takes (did you mean 'clip_l'?)" in str(info.value)
    with_file = write_recipe(GOOD + f'\n[model.files]\ntransformer = "{weights}"\n', "with-file.toml")
    assert load_recipe(with_file).recipe.model.files == {"transformer": str(weights)}
    assert load_recipe(with_file, (), ["model.files.transformer"]).recipe.model.files == {}  # --unset reaches a slot


class TinyFamily:
    @hookimpl
    def register_families(self, register):
        register("tiny-family", file_slots={"weights": "the one file"}, pixel_multiple=8, versions=("a", "b"))


def test_a_third_party_family_brings_its_own_grid_and_versions(plugins_with, write_recipe, recording):
    plugins = plugins_with(recording[0], TinyFamily())
    assert "tiny-family" in plugins.names("family")
    base = write_recipe(GOOD)
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(base, ["model.family='tiny-family'", "dataset.bucket_step=12", "model.version='c'"]),
                 plugins)
    text = str(info.value)
    assert "[dataset.bucket_step] must be a multiple of 8 for tiny-family, got 12" in text
    assert "[model.version] tiny-family has no release 'c' to choose (it has 'a', 'b')" in text
    assert 'backend "recording" does not train tiny-family' in text


class CountCommand:
    def __init__(self):
        self.seen = []

    @hookimpl
    def register_commands(self, register):
        def configure(parser):
            parser.add_argument("folder")

        def count(args, plugins):
            from pathlib import Path

            folder = Path(args.folder)
            if not folder.is_dir():
                raise RecipeError(f"{folder}: not a folder")
            self.seen.append((len(list(folder.iterdir())), "folder" in plugins.names("dataset")))
            return 0
        register("count", count, configure=configure, description="count the files in a folder")
        register("check", count, description="tries to replace a built-in command")


def test_plugins_add_cli_commands_through_a_hook(monkeypatch, subject_dataset, tmp_path, capsys):
    from lora_run import cli, plugins as plugins_mod

    plugin = CountCommand()
    real = plugins_mod.load_plugins
    monkeypatch.setattr(plugins_mod, "load_plugins", lambda extra=(): real(extra=[*extra, plugin]))
    assert cli.main(["count", str(subject_dataset)]) == 0
    assert plugin.seen == [(8, True)]
    capsys.readouterr()
    assert cli.main(["count", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "nowhere: not a folder" in err and "Traceback" not in err
    assert cli.main(["check", str(tmp_path / "missing.toml")]) == 2  # still the built-in check
    assert plugin.seen == [(8, True)]
    assert "count the files in a folder" in cli.build_parser().format_help()
