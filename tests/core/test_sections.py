"""Recipe tables that plugins register (`register_sections`): as strict as core's own tables, with their
defaults, rules, paths and features; `[eval]` is one (the built-in evaluator plugin's)."""
from __future__ import annotations

import subprocess
import sys

import attrs
import pytest

from lora_run.errors import RecipeError
from lora_run_training.capabilities import used_features
from lora_run.hookspecs import hookimpl
from lora_run.recipe import dump_recipe, load_recipe
from lora_run.run import validate, with_defaults
from lora_run.schema import option
from lora_run_training import Feature

from .conftest import GOOD


@attrs.frozen(kw_only=True)
class NotifySection:
    """Where to say that a run ended."""

    url: str | None = option(None, "Webhook URL; unset: the default channel.")
    retries: int = option(2, "How often to retry.", ge=0, le=10)
    template: str | None = option(None, "A message template file.", path=True)
    loud: bool = option(False, "Ring a bell.", features=(Feature("notify_loud", "a loud notification"),))


class Notify:
    @hookimpl
    def register_sections(self, register):
        def with_defaults(section, plugins):
            return section if section.url is not None else attrs.evolve(section, url="https://example.invalid/hook")

        def check(recipe, plugins, problems):
            if not recipe.notify.url.startswith("https://"):
                problems.add(("notify", "url"), f"must be an https:// URL, got {recipe.notify.url!r}")

        register("notify", options=NotifySection, check=check, with_defaults=with_defaults,
                 description="a message when a run ends")


def test_a_plugin_table_is_read_with_its_defaults_paths_and_rules(plugins_with, write_recipe, tmp_path):
    plugins = plugins_with(Notify())
    assert "notify" in plugins.names("section") and "eval" in plugins.names("section")
    plain = load_recipe(write_recipe(GOOD), plugins=plugins).recipe
    assert plain.notify == NotifySection()                         # no table: every default
    body = GOOD + '[notify]\nretries = 4\ntemplate = "msg.txt"\n'
    recipe = load_recipe(write_recipe(body), plugins=plugins).recipe
    assert recipe.notify.retries == 4 and recipe.notify.template == str(tmp_path / "msg.txt")
    resolved = with_defaults(load_recipe(write_recipe(body), plugins=plugins), plugins).recipe
    assert resolved.notify.url == "https://example.invalid/hook"
    # the resolved recipe a run folder keeps loads back equal, table included
    (tmp_path / "resolved.toml").write_text(dump_recipe(resolved))
    assert load_recipe(tmp_path / "resolved.toml", plugins=plugins).recipe == resolved
    # the table's own rule, reported by validate with the file and key
    bad = write_recipe(body.replace("retries = 4", 'retries = 4\nurl = "http://plain"'))
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(bad, plugins=plugins), plugins)
    assert "recipe.toml: [notify.url] must be an https:// URL, got 'http://plain'" in str(err.value)


def test_a_plugin_table_is_as_strict_as_cores(plugins_with, write_recipe):
    plugins = plugins_with(Notify())
    body = GOOD + '[notify]\nretries = 2.5\nretrys = 1\n[notfy]\nurl = "x"\n'
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(body), plugins=plugins)
    problems = err.value.problems
    assert "recipe.toml: [notify.retries] expected int, got float 2.5" in problems
    assert any(p.startswith("recipe.toml: [notify] unknown key 'retrys' (did you mean 'retries'?)") for p in problems)
    assert any(p.startswith("recipe.toml: top level: unknown key 'notfy' (did you mean 'notify'?)") for p in problems)
    with pytest.raises(RecipeError, match=r"\[notify.retries\] must be <= 10, got 11"):
        load_recipe(write_recipe(GOOD + "[notify]\nretries = 11\n"), plugins=plugins)
    with pytest.raises(RecipeError, match=r"--unset notify.volume: \[notify.volume\] is not a recipe key"):
        load_recipe(write_recipe(GOOD), unsets=["notify.volume"], plugins=plugins)
    # control: without the plugin that registers it, the table is an unknown key like any other
    with pytest.raises(RecipeError, match=r"top level: unknown key 'notify'"):
        load_recipe(write_recipe(GOOD + "[notify]\nretries = 1\n"), plugins=plugins_with())


def test_a_table_of_a_plugin_that_failed_to_load_is_named_with_the_failure(plugins_with, write_recipe):
    class Broken:
        @hookimpl
        def register_sections(self, register):
            raise ImportError("No module named 'webhooks'")

    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(GOOD + "[notify]\nretries = 1\n"), plugins=plugins_with(Broken()))
    assert "recipe.toml: top level: unknown key 'notify'" in str(err.value)
    assert "the tables of plugins that failed to load are unknown" in str(err.value)
    assert "register_sections failed: ImportError: No module named 'webhooks'" in str(err.value)
    # control: no broken plugin, no such line
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(GOOD + "[notify]\nretries = 1\n"), plugins=plugins_with())
    assert "failed to load" not in str(err.value)


def test_features_a_plugin_table_declares_are_checked_like_cores(plugins_with, write_recipe):
    plugins = plugins_with(Notify())
    recipe = load_recipe(write_recipe(GOOD + "[notify]\nloud = true\n"), plugins=plugins).recipe
    assert ("notify_loud", ("notify", "loud")) in list(used_features(recipe))
    quiet = load_recipe(write_recipe(GOOD), plugins=plugins).recipe
    assert "notify_loud" not in {name for name, _ in used_features(quiet)}


def test_eval_is_the_evaluator_plugins_table_not_cores(write_recipe, plugins_with):
    from lora_run import schema

    assert not hasattr(schema, "EvalSection") and "eval" not in attrs.fields_dict(schema.Recipe)
    assert plugins_with().registry["section"]["eval"].plugin == "eval"
    body = GOOD.replace("enabled = false", "enabled = true\nprompts = []")
    with pytest.raises(RecipeError, match=r"\[eval.prompts\] must not be empty when eval is enabled"):
        validate(load_recipe(write_recipe(body)), plugins_with())


def test_a_recipe_table_of_a_disabled_plugin_is_refused_on_the_command_line(write_recipe, tmp_path):
    recipe = write_recipe(GOOD)
    env = {"LORA_RUN_PLUGINS_DISABLE": "eval", "PATH": ""}
    done = subprocess.run([sys.executable, "-m", "lora_run", "check", str(recipe)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "top level: unknown key 'eval'" in done.stderr


def test_a_run_with_a_plugin_table_resumes_and_refuses_a_changed_table(plugins_with, write_recipe, tmp_path):
    from lora_run.run import execute

    from .conftest import RecordingPlugin

    plugins = plugins_with(RecordingPlugin(), Notify())
    body, out = GOOD + "[notify]\nretries = 3\n", str(tmp_path / "out")
    execute(load_recipe(write_recipe(body), plugins=plugins), plugins, output_dir=out, echo=lambda _: None)
    assert "[notify]" in (tmp_path / "out" / "recipe.toml").read_text()
    execute(load_recipe(write_recipe(body), ["train.steps=5"], plugins=plugins), plugins, output_dir=out,
            resume=True, echo=lambda _: None)
    with pytest.raises(RecipeError, match=r"the recipe changed at \[notify.retries\]"):
        execute(load_recipe(write_recipe(body), ["notify.retries=4"], plugins=plugins), plugins, output_dir=out,
                resume=True, echo=lambda _: None)


@attrs.frozen(kw_only=True)
class OutputExtra:
    webhook: str | None = option(None, "Where to post the LoRA's path.")
    copies: int = option(1, "How many copies to keep.", ge=1)


def test_a_table_named_like_one_of_cores_adds_its_keys_after_cores(plugins_with, write_recipe, tmp_path):
    """`[model]` and `[dataset]` get the `training` plugin's keys this way; a third party's `[output]` keys are read,
    checked and written back with core's, and a table that would replace a key of core's breaks its plugin."""
    class Extra:
        @hookimpl
        def register_sections(self, register):
            register("output", options=OutputExtra)

    plugins = plugins_with(Extra())
    body = GOOD + '[output]\nwebhook = "https://example.invalid"\n'
    recipe = load_recipe(write_recipe(body), plugins=plugins).recipe
    assert (recipe.output.webhook, recipe.output.copies, recipe.output.name) == \
        ("https://example.invalid", 1, "identity-lora")
    assert [f.name for f in attrs.fields(type(recipe.output))][-2:] == ["webhook", "copies"]
    (tmp_path / "resolved.toml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "resolved.toml", plugins=plugins).recipe == recipe
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(body + "copies = 0\nwebhok = 1\n"), plugins=plugins)
    assert "recipe.toml: [output.copies] must be >= 1, got 0" in err.value.problems
    assert any("unknown key 'webhok' (did you mean 'webhook'?)" in p for p in err.value.problems), err.value.problems
    # without the plugin its keys are unknown ones, as the training plugin's keys of [dataset] are without it
    with pytest.raises(RecipeError, match=r"\[output\] unknown key 'webhook'"):
        load_recipe(write_recipe(body), plugins=plugins_with())

    @attrs.frozen(kw_only=True)
    class Clash:
        dir: str = option("elsewhere", "Replaces core's key.")

    for name, options in (("output", Clash), ("description", OutputExtra)):
        class Replacing:
            @hookimpl
            def register_sections(self, register):
                register(name, options=options)

        plugins = plugins_with(Replacing())
        assert name not in plugins.names("section")
        assert any(f"recipe table [{name}] would replace core's key(s) {'dir' if name == 'output' else name}"
                   in b.error for b in plugins.broken), plugins.broken
