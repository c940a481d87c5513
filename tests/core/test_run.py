from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_run.errors import BackendError, DatasetError, OutputError, RecipeError, TrainingInterrupted
from lora_run.hookspecs import hookimpl
from lora_run.recipe import load_recipe, replace
from lora_run.run import execute, validate

from .conftest import ALL_FLUX, GOOD


def quiet(_line):
    pass


def test_run_writes_recipe_manifest_plan_files_and_calls_hooks(recording, write_recipe, tmp_path):
    plugin, plugins = recording
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(tmp_path / "out"), echo=quiet)
    out = tmp_path / "out"
    assert (out / "lora.txt").read_text() == "weights"
    assert load_recipe(out / "recipe.toml").recipe == ctx.recipe
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["seed"] == 42 and manifest["lora"]["rank"] == 32 and manifest["steps"] == 3
    assert len(manifest["dataset"]["hash"]) == 64 and manifest["dataset"]["subject images"] == 4
    assert manifest["plan"]["commands"] == [["echo", "it's a plan"]]
    assert json.loads((out / "recording" / "config.json").read_text()) == {"steps": 3}
    assert plugin.events == [("run_started",), ("step", 1, 1.0), ("step", 2, 0.5), ("step", 3, 1 / 3),
                             ("run_finished", "completed", None)]


def test_non_empty_output_is_never_overwritten(recording, write_recipe, tmp_path):
    _, plugins = recording
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.safetensors").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(out), echo=quiet)
    assert (out / "precious.safetensors").read_text() == "keep me"
    # --overwrite replaces only a folder lora-run created: someone else's files are never deleted
    with pytest.raises(OutputError, match="replaces only a run folder lora-run created"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(out), overwrite=True, echo=quiet)
    assert (out / "precious.safetensors").read_text() == "keep me"
    run = tmp_path / "run"
    execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(run), echo=quiet)
    (run / "lora.txt").write_text("the old run's")                    # written by the (test) backend: replaced
    (run / "user-notes.txt").write_text("mine")                        # added by the user: never deleted
    with pytest.raises(OutputError, match=r"--overwrite would delete 1 entry no lora-run run wrote there \(user-notes"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(run), overwrite=True, echo=quiet)
    assert (run / "user-notes.txt").read_text() == "mine"
    (run / "user-notes.txt").unlink()
    execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(run), overwrite=True, echo=quiet)
    assert (run / "lora.txt").exists() and (run / "lora.txt").read_text() != "the old run's"


def test_resume_needs_a_run_and_the_same_recipe(recording, write_recipe, tmp_path):
    _, plugins = recording
    out = str(tmp_path / "out")
    with pytest.raises(OutputError, match="nothing to resume"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=out, resume=True, echo=quiet)
    execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=out, echo=quiet)
    longer = load_recipe(write_recipe(GOOD), ["train.steps=5"])
    execute(longer, plugins, output_dir=out, resume=True, echo=quiet)
    with pytest.raises(RecipeError, match=r"the recipe changed at \[lora.alpha\], \[lora.rank\]"):
        execute(load_recipe(write_recipe(GOOD), ["lora.rank=8", "lora.alpha=8.0"]), plugins, output_dir=out,
                resume=True, echo=quiet)


def test_backend_crash_is_reported_and_recorded(recording, write_recipe, tmp_path):
    plugin, plugins = recording
    loaded = load_recipe(write_recipe(GOOD), ["backend.recording.fail_at=2"])
    with pytest.raises(BackendError, match="boom at step 2"):
        execute(loaded, plugins, output_dir=str(tmp_path / "out"), echo=quiet)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "boom" in manifest["error"]
    assert plugin.events[-1] == ("run_finished", "failed", "RuntimeError")


def test_capability_refusal_names_key_and_capable_backends(recording, write_recipe):
    _, plugins = recording
    loaded = load_recipe(write_recipe(GOOD), ["train.min_snr_gamma=5.0", "lora.dropout=0.1"])
    with pytest.raises(RecipeError) as info:
        validate(loaded, plugins)
    problems = info.value.problems
    assert any(p.startswith("recipe.toml (--set): [train.min_snr_gamma] backend \"recording\" cannot honour Min-SNR-γ "
                            "weighting for flux.1-dev (it records, it does not weight)") for p in problems), problems
    assert any(p.startswith("recipe.toml (--set): [lora.dropout]") for p in problems)
    loaded = load_recipe(write_recipe(GOOD), ["model.family=hunyuan-dit-1.2"])
    with pytest.raises(RecipeError, match=r"\[model.family\] backend \"recording\" does not train hunyuan-dit-1.2"):
        validate(loaded, plugins)


def test_unknown_backend_loss_and_tables(recording, write_recipe):
    _, plugins = recording
    loaded = load_recipe(write_recipe(GOOD), ["backend.name=recordin", "train.loss=hubber",
                                              "backend.kohyaa.x=1"])
    with pytest.raises(RecipeError) as info:
        validate(loaded, plugins)
    text = "\n".join(info.value.problems)
    assert '[backend.name] unknown backend "recordin" (did you mean "recording"?)' in text
    assert '[train.loss] unknown loss "hubber" (did you mean "huber"?)' in text
    assert '[backend.kohyaa] table for unknown backend "kohyaa"' in text


def test_loss_options_are_checked_by_the_loss(recording, write_recipe):
    _, plugins = recording
    loaded = load_recipe(write_recipe(GOOD), ["train.loss=huber", "train.loss_options={c=-1.0}"])
    assert load_recipe(write_recipe(GOOD), ["train.loss=huber", "train.loss_options={c=0.2}"])
    # huber is not in the recording backend's capabilities either; both problems are shown at once
    with pytest.raises(RecipeError) as info:
        validate(loaded, plugins)
    assert any("[train.loss_options.c] must be > 0.0, got -1.0" in p for p in info.value.problems)


def test_dataset_errors_stop_before_anything_is_written(recording, write_recipe, tmp_path, subject_dataset):
    _, plugins = recording
    (subject_dataset / "img000.txt").write_text("no trigger here")
    with pytest.raises(DatasetError, match="1 error"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(tmp_path / "out"), echo=quiet)
    assert not (tmp_path / "out").exists()


class OtherLauncher:
    """A third-party ``run_processes``: its own launcher's environment says which process this is."""

    def __init__(self, rank, world):
        self.rank, self.world, self.followed = rank, world, []

    @hookimpl
    def run_processes(self, run, output_dir):
        from lora_run.run import Processes

        run.process = Processes(self.rank, self.world, launched=True)
        run.recipe = replace(run.recipe, train={"gpus": self.world})
        if self.rank == 0:
            return None                 # rank 0 goes on through execute: it writes and calls the hooks
        run.echo, run.hook = quiet, SilentHooks()

        def follow():                   # a real follower trains its share here, writing nothing
            self.followed.append((output_dir, run.recipe.train.gpus, len(run.items)))
            return run
        return follow


class SilentHooks:
    def __getattr__(self, name):
        return lambda **_kw: []


def test_a_third_party_plugin_runs_the_processes_of_a_run(recording, plugins_with, write_recipe, tmp_path,
                                                          monkeypatch):
    plugin, _ = recording
    monkeypatch.setenv("RANK", "1")         # the built-in launcher's variables say otherwise: the plugin is asked first
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = []
    follower = OtherLauncher(rank=1, world=3)
    out = tmp_path / "out"
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin, follower), output_dir=str(out),
                  echo=lines.append)
    assert follower.followed == [(str(out), 3, 4)] and not ctx.process.main
    assert not out.exists() and lines == [] and plugin.events == []    # quiet, silent, nothing written
    main = OtherLauncher(rank=0, world=3)
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin, main), output_dir=str(out), echo=lines.append)
    assert ctx.process.main and main.followed == [] and lines[0].startswith("dataset: ")
    assert load_recipe(out / "recipe.toml").recipe.train.gpus == 3
    assert json.loads((out / "manifest.json").read_text())["processes"] == {"world_size": 3}
    assert plugin.events[0] == ("run_started",) and plugin.events[-1] == ("run_finished", "completed", None)
    # control: without the plugin the built-in reads RANK / WORLD_SIZE (and refuses this backend under a launcher)
    with pytest.raises(RecipeError, match="starts its own processes"):
        execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin), output_dir=str(tmp_path / "x"), echo=quiet)
    monkeypatch.delenv("RANK")
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin), output_dir=str(tmp_path / "one"), echo=quiet)
    assert ctx.process.world == 1 and "processes" not in json.loads((tmp_path / "one" / "manifest.json").read_text())



def test_a_launched_process_no_plugin_takes_part_in_is_refused(recording, plugins_with, write_recipe, tmp_path,
                                                             monkeypatch):
    """Under a launcher (WORLD_SIZE > 1) with no plugin answering ``run_processes`` (the built-in one disabled),
    every rank ran as if alone and they all wrote the same run folder; now each refuses before anything is written."""
    from lora_run.errors import PluginError

    plugin, _ = recording
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LORA_RUN_PLUGINS_DISABLE", "native")
    plugins = plugins_with(plugin)
    assert "native" not in dict(plugins.pm.list_name_plugin()) and not plugins.hook.run_processes.get_hookimpls()
    out = tmp_path / "out"
    with pytest.raises(PluginError) as err:
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(out), echo=quiet)
    assert str(err.value) == ("WORLD_SIZE=2 in the environment: this process was started by a multi-process launcher, "
                              "but no installed backend takes part in multi-process runs (no plugin answers the "
                              "run_processes hook); every process would write the same run folder")
    assert err.value.exit_code == 2 and not out.exists() and plugin.events == []
    # controls: one process (or a launcher's single one) runs as before; so does a launched one the built-in places
    monkeypatch.delenv("RANK")      # WORLD_SIZE alone is no launcher's (the built-in reads both too)
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(tmp_path / "alone"), echo=quiet)
    assert ctx.process.world == 1 and (tmp_path / "alone" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(out), echo=quiet)
    assert ctx.process.world == 1 and (out / "manifest.json").exists()
    monkeypatch.delenv("LORA_RUN_PLUGINS_DISABLE")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="starts its own processes"):     # the built-in's answer, not core's
        execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin), output_dir=str(tmp_path / "x"), echo=quiet)

def test_dataset_errors_stop_a_run_of_several_processes_before_it_starts(recording, plugins_with, write_recipe,
                                                                         tmp_path, subject_dataset):
    plugin, _ = recording
    follower = OtherLauncher(rank=1, world=2)
    (subject_dataset / "img000.txt").write_text("no trigger here")
    with pytest.raises(DatasetError, match="1 error"):
        execute(load_recipe(write_recipe(GOOD)), plugins_with(plugin, follower), output_dir=str(tmp_path / "out"),
                echo=quiet)
    assert follower.followed == [] and not (tmp_path / "out").exists()


class FolderHooks:
    """A run folder from another plugin (answered before the built-in one), a resume rule and an evaluation step."""

    def __init__(self, fail_evaluation=False):
        self.logged, self.evaluated, self.fail_evaluation = [], [], fail_evaluation

    @hookimpl
    def open_run_folder(self, loaded, output_dir):
        from lora_run_rundir import RunDir

        logged = self.logged

        class Mirrored(RunDir):
            def log(self, message):
                super().log(message)
                logged.append(message)
        return Mirrored(Path(output_dir))

    @hookimpl
    def check_resume(self, run_dir, recipe, loaded):
        if recipe.train.steps > 10:
            raise RecipeError(f"{loaded.shown}: cannot resume {run_dir.path}: more than 10 steps")

    @hookimpl
    def evaluate_run(self, run):
        self.evaluated.append(sorted(run.artifacts))
        if self.fail_evaluation:
            raise RuntimeError("evaluation broke")


def test_the_run_folder_resume_rules_and_evaluation_come_from_hooks(recording, plugins_with, write_recipe, tmp_path):
    plugin, _ = recording
    hooks = FolderHooks()
    plugins = plugins_with(plugin, hooks)
    out = tmp_path / "out"
    execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(out), echo=quiet)
    assert hooks.logged[-1] == "run completed" and "run completed" in (out / "run.log").read_text()
    # the built-in folder answers last whatever the load order, so another plugin's folder is the one used
    (builtin,) = [i for i in plugins.hook.open_run_folder.get_hookimpls() if i.plugin_name == "run-folder"]
    assert builtin.trylast
    assert hooks.evaluated == [["lora"]] and plugin.events[-1] == ("run_finished", "completed", None)
    before = (out / "manifest.json").read_text()
    with pytest.raises(RecipeError, match="more than 10 steps"):
        execute(load_recipe(write_recipe(GOOD), ["train.steps=11"]), plugins, output_dir=str(out), resume=True,
                echo=quiet)
    assert (out / "manifest.json").read_text() == before          # refused before anything was written
    execute(load_recipe(write_recipe(GOOD), ["train.steps=5"]), plugins, output_dir=str(out), resume=True, echo=quiet)
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"


def test_a_failing_evaluation_fails_the_run(recording, plugins_with, write_recipe, tmp_path):
    plugin, _ = recording
    plugins = plugins_with(plugin, FolderHooks(fail_evaluation=True))
    with pytest.raises(BackendError, match="evaluation broke"):
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(tmp_path / "out"), echo=quiet)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and (tmp_path / "out" / "lora.txt").exists()
    assert plugin.events[-1] == ("run_finished", "failed", "RuntimeError")


def test_without_a_run_folder_plugin_a_run_stops_with_a_clear_error(plugins_with, write_recipe, tmp_path,
                                                                   monkeypatch):
    from lora_run.errors import EXIT_BAD_INPUT, PluginError

    from .conftest import RecordingPlugin

    monkeypatch.setenv("LORA_RUN_PLUGINS_DISABLE", "run-folder")
    plugins = plugins_with(RecordingPlugin())
    with pytest.raises(PluginError, match="no installed plugin provides the run folder") as err:
        execute(load_recipe(write_recipe(GOOD)), plugins, output_dir=str(tmp_path / "o"), echo=quiet)
    assert err.value.exit_code == EXIT_BAD_INPUT and not (tmp_path / "o").exists()


class SwallowedCtrlC:
    """A backend whose plan meets Ctrl-C inside an import that a library turns into another error, as a
    Ctrl-C during `import torch` / transformers' lazy imports does."""

    def __init__(self, ctx):
        self.ctx = ctx

    def plan(self):
        import os
        import signal
        import time

        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            if self.ctx.recipe.train.steps == 3:      # swallowed: a later import fails on the half-loaded module
                pass
            else:                                     # re-raised as an import error, the interrupt as its cause
                raise ModuleNotFoundError("Could not import module 'GenerationMixin'")  # noqa: B904
        raise ImportError("cannot import name 'nn' from partially initialized module 'torch'")

    def run(self):  # pragma: no cover - plan never returns
        raise AssertionError


class SwallowingPlugin:
    @hookimpl
    def register_backends(self, register):
        register("swallowing", SwallowedCtrlC, capabilities={"flux.1-dev": ALL_FLUX})


@pytest.mark.parametrize("steps", [3, 4], ids=["swallowed", "chained"])
def test_ctrl_c_that_a_library_turns_into_an_import_error_is_an_interrupt(plugins_with, write_recipe, tmp_path,
                                                                         steps):
    """Ctrl-C while torch or transformers import ended as 'backend crashed: ImportError' (exit 1); it is an
    interrupt (exit 130, manifest `interrupted`, the resume command named)."""
    plugins = plugins_with(SwallowingPlugin())
    recipe = load_recipe(write_recipe(GOOD.replace('backend = "recording"', 'backend = "swallowing"')),
                         [f"train.steps={steps}"])
    with pytest.raises(TrainingInterrupted, match="resume with: lora-run .* --resume --output-dir"):
        execute(recipe, plugins, output_dir=str(tmp_path / "run"), echo=quiet)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "interrupted"
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # Python's own handler is back


def test_the_resume_command_repeats_the_overrides_and_pastes_as_is(plugins_with, write_recipe, tmp_path):
    """The printed "resume with:" line must rerun the same recipe: its `--unset` and `--set` values (a resume
    without them trains another recipe, e.g. the file's 24 steps instead of 2) and paths with spaces, quoted.
    The multi-process relaunch repeats the same overrides."""
    import shlex

    from lora_run.recipe import resume_command
    from lora_run_native.processes import relaunch_command

    plugins = plugins_with(SwallowingPlugin())
    path = write_recipe(GOOD.replace('backend = "recording"', 'backend = "swallowing"'))
    sets = ["train.steps=4", 'output.name="my lora"']
    recipe = load_recipe(path, sets, ["eval.enabled"])
    out = tmp_path / "my runs" / "ünï"
    with pytest.raises(TrainingInterrupted) as caught:
        execute(recipe, plugins, output_dir=str(out), echo=quiet)
    line = str(caught.value).split("resume with: ", 1)[1]
    assert shlex.split(line) == ["lora-run", recipe.shown, "--unset", "eval.enabled", "--set", sets[0],
                                 "--set", sets[1], "--resume", "--output-dir", str(out)]
    # planted: the old unquoted form splits the folder and loses the overrides
    old = f"lora-run {recipe.shown} --resume --output-dir {out}"
    assert shlex.split(old) != shlex.split(line)
    assert shlex.split(resume_command(None, out)) == ["lora-run", "recipe.toml", "--resume", "--output-dir", str(out)]

    class Ctx:
        loaded, resume, debug = recipe, True, False

    argv = relaunch_command(Ctx(), out, overwrite=False)
    assert argv[argv.index("run") + 2:argv.index("--output-dir")] == recipe.overrides()
    assert recipe.overrides() == ["--unset", "eval.enabled", "--set", sets[0], "--set", sets[1]]
