"""A hostile-input sweep of the CLI (recipes, `--set`, run folders, evaluation folders, `recipes`/`docs` names): each
class of defect it found, fixed at its root, with the case that showed it. CPU, fast (no training)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_run.cli import main
from lora_run.errors import RecipeError
from lora_run.recipe import MAX_NESTING, load_recipe, parse_set


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------------------------------- deep nesting
@pytest.mark.parametrize("body", [
    "[" + ".".join(["a"] * 3000) + "]\nx = 1\n",                 # a table header 3000 tables deep
    "[train]\n" + ".".join(["a"] * 3000) + " = 1\n",              # a dotted key, the same
    "[[" + ".".join(["a"] * 3000) + "]]\n",                       # an array of tables
])
def test_a_recipe_nested_thousands_deep_is_bad_input_not_a_crash(tmp_path, capsys, body):
    # TOML's dotted keys and headers nest without a parser's limit; every reader of the data recursed
    # (RecursionError, "unexpected", exit 1)
    path = tmp_path / "deep.toml"
    path.write_text(body, encoding="utf-8")
    for command in ("check", "plan"):
        code, text = _run([command, path], capsys)
        assert code == 2, text
        assert "deep.toml: [" in text and f"more than {MAX_NESTING} levels deep" in text, text
        assert "unexpected" not in text and "Traceback" not in text
    with pytest.raises(RecipeError, match="levels deep"):
        load_recipe(path)


def test_a_set_value_or_key_nested_too_deeply_is_refused():
    with pytest.raises(RecipeError, match="levels deep"):
        parse_set("train.loss_options=" + "{a=" * 100 + "1" + "}" * 100)
    with pytest.raises(RecipeError, match="levels deep"):
        parse_set(".".join(["a"] * 3000) + "=1")
    assert parse_set("backend.kohya.extra_args={lr_scheduler_args=[\"a=1\"]}")[1] == {"lr_scheduler_args": ["a=1"]}


# ---------------------------------------------------------------------------------- one line per problem
def test_a_line_break_in_any_argument_never_splits_an_error_line(tmp_path, capsys, write_recipe):
    # a name from a script's variable may hold a line break; the message of the command that refuses it stays one
    # `error:` line per problem (`recipes` and `docs` printed the name raw, its second half on a line of its own)
    odd = "a\nZQ1\rZQ2"
    recipe = write_recipe("[model]\nsource = \"x\"\n[dataset]\npath = \"{dataset}\"\n")
    cases = [["recipes", odd], ["docs", odd], ["docs", "--path", odd],
             ["score", "--subject", tmp_path, "--images", tmp_path, "--embedder", odd],
             ["check", tmp_path / odd], ["plan", tmp_path / f"{odd}.toml"],
             ["eval", recipe, "--lora", tmp_path / odd],
             ["check", recipe, "--set", f"output.name={odd}"], ["check", recipe, "--unset", odd]]
    for argv in cases:
        code, text = _run(argv, capsys)
        assert code == 2, (argv, text)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if not ln.startswith(("usage:", " ", "dataset:", "  ", "check failed"))]
        assert errors and all(ln.startswith("error: ") for ln in errors), (argv, text)
        # the name's second half never begins a line of its own (`_fail` starts every line with "error: ")
        assert not any(ln.startswith(("error: ZQ", "ZQ")) for ln in lines), (argv, text)


# ------------------------------------------------------------------------------ evaluation image folders
def test_each_evaluated_lora_gets_its_own_image_folder(tmp_path):
    # `eval --lora "a/x y.safetensors" --lora b/x-y.safetensors`: both labels made the folder `x-y`, the second LoRA's
    # images replaced the first's and the report showed them under the first; `Step`/`step` are one folder on macOS
    from lora_run_eval.evaluator import evaluate_loras, image_folders

    labels = ["x y", "x-y", "x_y", "Step 2", "step-2", "STEP 2", "..", "", "final (step 4)"]
    folders = image_folders(tmp_path / "images", labels)
    names = [f.name for f in folders]
    assert len({n.casefold() for n in names}) == len(labels), names
    assert all(f.parent == tmp_path / "images" and f.name not in ("", ".", "..") for f in folders), names
    assert names[0] == "x-y" and names[2] == "x_y" and names[-1] == "final-step-4"    # ordinary names as before

    class Ev:
        echo = staticmethod(lambda _m: None)
        embedder, subject_paths = None, []       # no embedder: no pool of workers
        added: list = []

        def add(self, label, step, path, samples):
            self.added.append((label, {s.path for s in samples}))

    class Recipe:
        class eval:
            prompts, strengths, seeds = ["a photo of ohwx"], [1.0], [1]
            steps, guidance, width, height = 2, 3.5, 64, 64
        class dataset:
            trigger = "ohwx"
            class_word = None

    written = []

    def generate(recipe, lora, jobs, out_dir):
        written.append(out_dir)
        return [{"name": j["name"], "path": f"{out_dir}/{j['name']}.png"} for j in jobs]

    loras = [("x y", None, tmp_path / "a.safetensors"), ("x-y", None, tmp_path / "b.safetensors")]
    evaluate_loras(Ev(), generate, Recipe(), loras, tmp_path / "images")
    assert len(set(written)) == 2, written


# ------------------------------------------------------------------- what a user adds inside a run's folders
NESTED = """
backend = "nested"
[model]
source = "black-forest-labs/FLUX.1-dev"
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[train]
steps = 2
[eval]
enabled = false
"""


class NestedBackend:
    """Writes what a trainer writes inside its folders: samples, a checkpoint, the loss log (a hook may add more)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def plan(self):
        from lora_run.run import Plan

        return Plan(backend="nested", family=self.ctx.recipe.model.family, steps=2)

    def run(self):
        d = self.ctx.run_dir            # what it writes, it says: a folder it writes into, or a path it names
        with d.writing("cache"):
            d.file("cache", "latents").mkdir(parents=True, exist_ok=True)
            d.file("cache", "latents", "index.json").write_text("{}")       # the run's own (empty) latent cache
        d.claim("eval/loss.jsonl")
        for rel in ("samples/step-000002/0.png", "checkpoints/step-000002/lora.safetensors", "eval/loss.jsonl"):
            with d.writing(rel.split("/")[0]):
                d.file(rel).parent.mkdir(parents=True, exist_ok=True)
                d.file(rel).write_bytes(b"the run's")
            self.ctx.hook.step_finished(run=self.ctx, step=1, metrics={"loss": 1.0})   # between its writes
        d.write_text("lora.safetensors", "weights")
        self.ctx.artifacts["lora"] = str(d.file("lora.safetensors"))


class NestedPlugin:
    from lora_run.hookspecs import hookimpl

    @hookimpl
    def register_backends(self, register):
        register("nested", NestedBackend, capabilities={"flux.1-dev": {
            "steps", "epochs", "timestep_sampling:sigmoid", "targets:attention", "optimizer:adafactor",
            "scheduler:constant_with_warmup", "loss:mse"}})

    @hookimpl
    def run_finished(self, run):          # written after the final manifest, claimed: still the run's
        run.run_dir.claim("eval/after-finish.json")
        run.run_dir.file("eval", "after-finish.json").write_text("{}")


class MeanwhileUser:
    """A user (or a plugin writing without saying so) adding files inside the run's folders while it runs: between
    two of the run's own writes into the same folders."""

    from lora_run.hookspecs import hookimpl

    def __init__(self):
        self.added: dict[Path, bytes] = {}
        self.active = True

    @hookimpl
    def step_finished(self, run, step, metrics):
        if not self.active:
            return
        for rel, data in (("samples/picked/best.png", b"mine"), ("checkpoints/notes.txt", b"step 1 looks best"),
                          ("eval/my-notes.txt", b"mine too")):
            path = run.run_dir.file(rel)
            if rel.split("/")[0] in {p.name for p in run.run_dir.path.iterdir()} and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                self.added[path] = data


def _nested_runs(write_recipe, plugins_with, tmp_path, monkeypatch, *extra):
    """``(go, run)``: ``go(**flags)`` runs the stand-in backend's recipe (with the ``extra`` plugins) through
    ``execute`` into ``run``, ``tmp_path / "run"``."""
    from lora_run.run import execute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plugins = plugins_with(NestedPlugin(), *extra)
    recipe, run = write_recipe(NESTED), tmp_path / "run"

    def go(**flags):
        return execute(load_recipe(recipe, plugins=plugins), plugins, output_dir=str(run), echo=lambda _m: None,
                       **flags)
    return go, run


def test_overwrite_keeps_what_a_user_added_inside_the_run_folders(write_recipe, plugins_with, tmp_path, monkeypatch):
    # `--overwrite` deleted everything inside a run's own folders (`samples/`, `checkpoints/`, `eval/`, `diffusers/`):
    # a folder of picked samples or notes added there went with the old run; only the top level was checked
    import json

    from lora_run.errors import OutputError

    go, run = _nested_runs(write_recipe, plugins_with, tmp_path, monkeypatch)

    go()
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert {"samples/step-000002/0.png", "eval/after-finish.json", "checkpoints/step-000002"} <= set(files), files
    go(overwrite=True)                                             # the control: a run's own folders are replaced
    added = {run / "samples" / "picked" / "best.png": b"mine", run / "checkpoints" / "notes.txt": b"step 2 was best",
             run / "eval" / "step-000002" / "mine.txt": b"mine too", run / "cache" / "latents" / "keep.txt": b"mine"}
    for path, data in added.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.raises(OutputError) as info:
        go(overwrite=True)
    message = str(info.value)
    assert "--overwrite would delete 4 entries no lora-run run wrote there" in message, message
    assert "cache/latents/keep.txt" in message        # the run's cache: by what lora-run's cache holds
    assert "samples/picked" in message and "checkpoints/notes.txt" in message and "eval/step-000002" in message
    assert "samples/picked/best.png" not in message                # a folder added stands for what it holds
    assert all(p.read_bytes() == data for p, data in added.items())
    # a resume keeps them the user's: a later --overwrite still refuses
    (run / "samples" / "picked" / "best.png").unlink()
    (run / "samples" / "picked").rmdir()
    (run / "eval" / "step-000002" / "mine.txt").unlink()
    (run / "eval" / "step-000002").rmdir()
    (run / "cache" / "latents" / "keep.txt").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    go(resume=True)
    assert "checkpoints/notes.txt" not in json.loads((run / "manifest.json").read_text())["files"]
    with pytest.raises(OutputError, match="checkpoints/notes.txt"):
        go(overwrite=True)
    assert (run / "checkpoints" / "notes.txt").read_bytes() == b"step 2 was best"
    (run / "checkpoints" / "notes.txt").unlink()
    go(overwrite=True)
    # a run that was killed (its manifest still "running") while it wrote samples: what it wrote there after its
    # last record is the run's (the manifest said it was writing there, before it did) ...
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running", "writing": ["samples"]}))
    (run / "samples" / "step-000002" / "1.png").write_bytes(b"written after the last record")
    go(overwrite=True)
    assert not (run / "samples" / "step-000002" / "1.png").exists()
    # ... but a killed run writing nothing there makes a file added there no run's
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running", "writing": ["checkpoints"]}))
    (run / "samples" / "step-000002" / "1.png").write_bytes(b"the user's")
    with pytest.raises(OutputError, match="samples/step-000002/1.png"):
        go(overwrite=True)
    assert (run / "samples" / "step-000002" / "1.png").read_bytes() == b"the user's"


@pytest.mark.parametrize("planted", [False, True], ids=["claims", "planted-walk"])
def test_overwrite_keeps_what_a_user_added_inside_the_run_folders_while_it_ran(write_recipe, plugins_with, tmp_path,
                                                                             monkeypatch, planted):
    # the manifest's list of a run's files was a walk of its folders at each record: a file a user added inside them
    # while the run went on (picked samples, notes) was recorded as the run's at the next record and deleted by
    # `--overwrite`. Now the list holds what the run's writers said they wrote. The planted control puts the walk
    # back: the user's files are listed as the run's, and `--overwrite` deletes them
    import json

    from lora_run.errors import OutputError
    from lora_run_rundir import folder
    from lora_run_rundir.record import tree

    if planted:
        monkeypatch.setattr(folder.RunDir, "_files",
                            lambda self: sorted(tree(self.path, folder.own_folders(self.path, self.read_manifest()))))
    user = MeanwhileUser()
    go, run = _nested_runs(write_recipe, plugins_with, tmp_path, monkeypatch, user)

    go()
    user.active = False                 # the user adds them during this first run only
    assert len(user.added) == 3, user.added
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert {"samples/step-000002/0.png", "checkpoints/step-000002/lora.safetensors", "eval/loss.jsonl"} <= set(files)
    listed = {"samples/picked", "samples/picked/best.png", "checkpoints/notes.txt", "eval/my-notes.txt"} & set(files)
    if planted:
        assert listed, files                           # the walk took them for the run's ...
        go(overwrite=True)
        assert not any(p.exists() for p in user.added)  # ... and --overwrite deleted them: what the test catches
        return
    assert not listed, files
    with pytest.raises(OutputError) as info:
        go(overwrite=True)
    message = str(info.value)
    assert "samples/picked" in message and "checkpoints/notes.txt" in message and "eval/my-notes.txt" in message
    assert all(p.read_bytes() == data for p, data in user.added.items())


def test_eval_overwrite_keeps_what_a_user_added_among_its_images(tmp_path):
    # `eval --overwrite` removed the whole `images/` folder of the earlier evaluation, a user's picks in it too;
    # `run --overwrite` deleted such an `eval-*` folder with the run
    from lora_run.errors import OutputError
    from lora_run_eval.evaluator import OWN_ENTRIES, _check_output
    from lora_run_rundir.record import EVALUATION, recorded_output, unrecorded

    out = tmp_path / "eval-tiny"
    with recorded_output(out, EVALUATION, OWN_ENTRIES):
        (out / "images" / "final").mkdir(parents=True)
        (out / "images" / "final" / "p0.png").write_bytes(b"generated")
        (out / "metrics.json").write_text("{}")
    assert unrecorded(out, EVALUATION) == []
    _check_output(out, overwrite=True)                             # the control: its own evaluation is replaced
    (out / "images" / "final" / "favourite.png").write_bytes(b"picked")
    assert unrecorded(out, EVALUATION) == ["images/final/favourite.png"]
    with pytest.raises(OutputError, match="images/final/favourite.png"):
        _check_output(out, overwrite=True)
    # an evaluation that stopped after its first image records what it wrote too
    other = tmp_path / "eval-other"
    with pytest.raises(RuntimeError), recorded_output(other, EVALUATION, OWN_ENTRIES):
        (other / "images").mkdir(parents=True)
        (other / "images" / "p0.png").write_bytes(b"generated")
        raise RuntimeError("the second image failed")
    assert unrecorded(other, EVALUATION) == []


# ---------------------------------------------------------------------------- a cache folder on the run folder
def test_a_cache_dir_that_is_or_holds_the_run_folder_is_refused_by_check(write_recipe, plugins_with, tmp_path,
                                                                           monkeypatch):
    # `check` and `plan` passed; the run then refused it ("not a cache folder lora-run made: … .lora-run.lock"), after
    # making the run folder, and a run folder inside the cache made the cache unusable for every later run
    from lora_run_rundir.output import output_problems

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plugins = plugins_with(NestedPlugin())
    recipe = load_recipe(write_recipe(NESTED), plugins=plugins).recipe
    runs = tmp_path / "runs"
    cases = {(str(runs / "a"), str(runs / "a")): "is the run folder",
             (str(runs / "b"), str(runs / "b" / "run")): "contains the run folder",
             (str(runs / "c"), str(runs / "c" / "x" / "run")): "contains the run folder"}
    for (cache, out), message in cases.items():
        r = attrs_evolve_cache(recipe, cache)
        found = [p for p in output_problems(r, out) if "[train.cache_dir]" in p]
        assert len(found) == 1 and message in found[0], (cache, out, found)
    # the controls: a cache beside the run folder, or inside it (the run's own to delete with it)
    for cache, out in ((runs / "cache", runs / "d"), (runs / "e" / "cache", runs / "e")):
        assert output_problems(attrs_evolve_cache(recipe, str(cache)), str(out)) == [], (cache, out)
    assert not runs.exists()


def attrs_evolve_cache(recipe, cache):
    from lora_run.recipe import replace

    return replace(recipe, train={"cache_dir": cache})


# ------------------------------------------------------------------------------ score: what is no image file
def test_score_names_a_fifo_or_device_under_an_image_name(tmp_path, capsys, subject_dataset):
    # a FIFO or a link to /dev/zero named `x.png` in --images was left out unseen (exit 0, fewer images scored),
    # while a text file or a dangling link under such a name was named
    import os

    images = tmp_path / "images"
    images.mkdir()
    (images / "real.png").write_bytes((subject_dataset / "img000.png").read_bytes())
    os.mkfifo(images / "pipe.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "folder.png").mkdir()                            # a folder is no image file: still left out
    code, text = _run(["score", "--subject", subject_dataset, "--images", images], capsys)
    assert code == 2, text
    assert "--images" in text and "pipe.png: cannot be scored: is a FIFO" in text, text
    assert "zero.png: cannot be scored: is a character device" in text and "folder.png" not in text, text


# ------------------------------------------------------------------------------- a reader that went away
@pytest.mark.parametrize("argv", [
    ["plan", "--json", "{recipe}", "--output-dir", ""],        # an argument error, as JSON
    ["chek", "{recipe}", "--json"],                             # an unknown command word
    ["eval", "{recipe}", "--lora", "{missing}", "--json"],       # a command that is not read-only
    ["{recipe}", "--output-dir", "{dataset}"],                  # a run's refusal on standard error
])
def test_a_closed_pipe_ends_a_failing_command_quietly_with_its_exit_code(argv, tmp_path, write_recipe,
                                                                         subject_dataset):
    # `lora-run plan --json … | head` where the command fails: writing its error to a reader that had gone away
    # ended in a BrokenPipeError traceback and exit 1 instead of the error's exit 2
    import os
    import subprocess
    import sys

    recipe = write_recipe("[model]\nsource = \"x\"\n[dataset]\npath = \"{dataset}\"\n")
    values = {"{recipe}": str(recipe), "{missing}": str(tmp_path / "none.safetensors"), "{dataset}": str(subject_dataset)}
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "lora_run", *(values.get(a, a) for a in argv)], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["recipes"], ["plugins", "--json"], ["check", "{recipe}"], ["--help"], ["--version"],
                                  ["check", "-h"]])
def test_output_to_a_full_device_is_named_not_called_a_bug(argv, tmp_path, write_recipe, subject_dataset):
    # `lora-run recipes > /dev/full` (a full disk under a redirected output) ended in "unexpected OSError ... (a bug
    # in lora-run or a plugin ...)"; it is the machine's state, said as such, exit 1, and nothing more at exit. The
    # help and the version went through argparse, which drops a failed write: they ended with exit 0, having said nothing
    import os
    import subprocess
    import sys

    recipe = write_recipe(f"[model]\nsource = \"x\"\n[dataset]\npath = \"{subject_dataset}\"\n")
    with open("/dev/full", "w") as full:
        args = [str(recipe) if a == "{recipe}" else a for a in argv]
        done = subprocess.run([sys.executable, "-m", "lora_run", *args],
                              stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == (
        "error: writing the output failed: No space left on device (is its disk or device full or gone?)"), done.stderr
    assert "a bug" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv,code", [([], 2), (["--bogus"], 2), (["check", "--bogus"], 2)])
def test_usage_to_a_full_device_keeps_the_exit_code(argv, code, tmp_path):
    # the usage is written to standard error before a usage error's message; both to a full device (and, with no
    # command, the help to a full standard output) must not turn the exit code 2 into a traceback's 1
    import os
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "lora_run", *argv], cwd=tmp_path, timeout=120, stdout=full,
                              stderr=full, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == code, done.returncode


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("stream,extra", [("stderr", []), ("stdout", ["--json"])])
def test_a_failing_commands_exit_code_stands_when_its_error_cannot_be_written(stream, extra, tmp_path):
    # `lora-run check bad.toml 2>/dev/full`: the error's write failed inside the error handler, exit 1 for a bad
    # recipe whose code is 2 (automation reads the code)
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset]\npath = 3\n', encoding="utf-8")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "lora_run", "check", str(bad), *extra], cwd=tmp_path, timeout=120,
                              **{stream: full}, **{"stdout" if stream == "stderr" else "stderr": subprocess.PIPE},
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, (done.returncode, done.stdout if stream == "stderr" else done.stderr)


@pytest.mark.slow     # a real tiny run (about 10 s on CPU)
@pytest.mark.parametrize("output", ["closed pipe", "full device"])
def test_a_run_outlasts_the_reader_of_its_output(output, tiny_recipe, tmp_path):
    # `lora-run r.toml | head -1`: the run's next line raised BrokenPipeError, which crashed the training ("backend
    # crashed: BrokenPipeError", exit 1, manifest failed); a reader gone before its first line made it exit 0 having
    # done nothing. The run now trains to the end, saying the rest to no one. Likewise an output whose device is full
    # (`> /dev/full`; a closed terminal's EIO alike): the run stopped at its first line, exit 1, nothing trained.
    import json
    import os
    import subprocess
    import sys

    if output == "full device" and not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux)")
    recipe = tiny_recipe("", name="r.toml")
    run = tmp_path / "run"
    read, write = os.pipe()
    os.close(read)
    if output == "full device":
        os.close(write)
        write = os.open("/dev/full", os.O_WRONLY)
    try:
        done = subprocess.run([sys.executable, "-m", "lora_run", str(recipe), "--output-dir", str(run),
                               "--set", "train.steps=2", "--set", "train.save_every_steps=1"],
                              stdout=write, stderr=write, cwd=tmp_path, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert (run / "tiny.safetensors").is_file()


def test_a_folder_holding_a_copied_run_recipe_keeps_its_own_folders(write_recipe, plugins_with, tmp_path,
                                                                      monkeypatch):
    # a project folder holding a recipe.toml copied from a run folder (its "Resolved from … by lora-run" header made it
    # a run folder) and folders of the user's named like a run's (`logs/`, `samples/`, `cache/`): `--overwrite` there
    # deleted them as the run's, though no manifest said a run had written anything there
    from lora_run.errors import OutputError
    from lora_run.run import execute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plugins = plugins_with(NestedPlugin())
    run = tmp_path / "run"
    execute(load_recipe(write_recipe(NESTED), plugins=plugins), plugins, output_dir=str(run), echo=lambda _m: None)
    project = tmp_path / "project"
    (project / "logs").mkdir(parents=True)
    (project / "logs" / "notes.txt").write_text("mine")
    (project / "samples").mkdir()
    (project / "recipe.toml").write_bytes((run / "recipe.toml").read_bytes())
    with pytest.raises(OutputError, match=r"would delete 2 entries no lora-run run wrote there \(logs, samples\)"):
        execute(load_recipe(project / "recipe.toml", plugins=plugins), plugins, output_dir=str(project),
                overwrite=True, echo=lambda _m: None)
    assert (project / "logs" / "notes.txt").read_text() == "mine" and (project / "samples").is_dir()
    # a finished run's own folder that it never made is the user's too
    (run / "logs").mkdir()
    with pytest.raises(OutputError, match=r"would delete 1 entry no lora-run run wrote there \(logs\)"):
        execute(load_recipe(write_recipe(NESTED), plugins=plugins), plugins, output_dir=str(run), overwrite=True,
                echo=lambda _m: None)
    (run / "logs").rmdir()
    execute(load_recipe(write_recipe(NESTED), plugins=plugins), plugins, output_dir=str(run), overwrite=True,
            echo=lambda _m: None)


def test_a_claim_names_a_path_inside_the_run_folder(tmp_path):
    # `RunDir.claim` is a plugin's API: a path that leaves the folder (absolute, `..`, empty parts) is a plugin's bug,
    # refused at once, never recorded as the run's
    from lora_run_rundir import RunDir

    folder = RunDir(tmp_path / "run")
    for bad in ("/etc/passwd", "../outside.txt", "eval/../../x", "eval//x", ""):
        with pytest.raises(ValueError):
            folder.claim(bad)
    assert folder.names == set() and folder.claimed == set()
    folder.claim("eval/loss.jsonl", "notes.txt")          # the control
    assert folder.names == {"eval", "notes.txt"} and folder.claimed == {"eval/loss.jsonl"}


def test_a_path_claimed_ahead_is_on_record_when_the_run_is_killed_right_after_writing_it(tmp_path):
    # a claimed path was listed in `files` only once it existed at a later record: a run killed between writing it
    # and its next record (the final LoRA in `diffusers/`, the loss log) had it unlisted, and `--overwrite` refused
    # the run's own file as no run's
    from lora_run_rundir import RunDir
    from lora_run_rundir.folder import unrecorded_files

    folder = RunDir(tmp_path / "run")
    folder.prepare(overwrite=False, resume=False)
    folder.manifest_written = True
    folder.update_manifest(lora_run_version="test", status="running")
    folder.claim("diffusers/tiny.safetensors")
    (folder.path / "diffusers").mkdir()
    (folder.path / "diffusers" / "tiny.safetensors").write_bytes(b"weights")
    killed = folder.read_manifest()                       # no record after the write: the run was killed
    assert "diffusers/tiny.safetensors" in killed["files"] and unrecorded_files(folder.path, killed) == []
    (folder.path / "diffusers" / "mine.txt").write_text("the user's")        # the control: anything else is named
    assert unrecorded_files(folder.path, killed) == ["diffusers/mine.txt"]
    folder.release()


def test_a_resume_takes_over_what_the_killed_start_was_writing_at_the_top(write_recipe, plugins_with, tmp_path,
                                                                          monkeypatch):
    # a start killed inside a write at the top of the run folder (an engine's LoRA files collected there, `writing("")`)
    # left a file its record does not list as written; the resume rewrote it, but as a file that was there when it
    # began, it stayed unlisted, and `--overwrite` of the finished run refused it as no run's
    import json

    go, run = _nested_runs(write_recipe, plugins_with, tmp_path, monkeypatch)

    go()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "lora.safetensors" in manifest["written"]
    (run / "notes.txt").write_text("the user's")         # there before the killed write: stays the user's
    killed = {**manifest, "status": "running", "writing": [""], "writing_found": ["notes.txt"],
              "written": [n for n in manifest["written"] if n != "lora.safetensors"]}
    (run / "manifest.json").write_text(json.dumps(killed))
    go(resume=True)
    written = json.loads((run / "manifest.json").read_text())["written"]
    assert "lora.safetensors" in written and "notes.txt" not in written, written
    from lora_run.errors import OutputError

    with pytest.raises(OutputError, match="notes.txt"):
        go(overwrite=True)
    (run / "notes.txt").unlink()
    go(overwrite=True)


# ------------------------------------------------------------------------------- every key, hostile values
def _leaf_keys(table, prefix=()):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, (*prefix, key))
        else:
            yield (*prefix, key)


@pytest.mark.slow
def test_every_key_of_a_shipped_recipe_takes_hostile_values_as_bad_input(tmp_path, capsys, monkeypatch):
    """Each key the shipped fast recipe sets, given a value of the wrong kind or an extreme one on the command line:
    `lora-run check` answers 0 or 2, never a crash (exit 1, "unexpected", a traceback). A sweep of 4,662 such values
    over every shipped recipe (thirtieth session) found none; this keeps one recipe's sweep. Control: the same
    assertion catches a planted crash in the `check` path."""
    import tomllib

    from PIL import Image

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "flux" / "identity-fast.toml"
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (512, 512), (40 * i, 90, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("ohwx, a photo", encoding="utf-8")
    values = ['""', "-1", "1e308", "nan", "[]", "{a = 1}", '"' + "x" * 5000 + '"', '"\\u0000"', "true"]
    keys = [k for k in _leaf_keys(tomllib.loads(recipe.read_text(encoding="utf-8"))) if k[0] != "extends"]
    assert len(keys) > 25
    crashes = []
    for key in keys:
        for value in values:
            code, text = _run(["check", recipe, "--set", f"dataset.path={data}", "--set", f"{'.'.join(key)}={value}",
                               "--json"], capsys)
            if code not in (0, 2) or "unexpected" in text or "Traceback" in text:
                crashes.append((key, value, code, text[-200:]))
    assert not crashes, crashes[:5]

    from lora_run import run as orchestration

    def planted(*_args, **_kwargs):
        raise ZeroDivisionError("planted")
    monkeypatch.setattr(orchestration, "validate", planted)
    code, text = _run(["check", recipe, "--set", f"dataset.path={data}"], capsys)
    assert code == 1 and "unexpected ZeroDivisionError: planted" in text, (code, text)


# ------------------------------------------------------------------------------------ JSON nested too deeply
def test_json_nested_past_the_recursion_limit_is_damaged_json_for_every_reader(tmp_path):
    # `[[[[…` (a byte a level) made Python's decoder raise RecursionError, which no reader of lora-run's records
    # expected: "unexpected RecursionError" (exit 1) from `--resume`, a plain run or `--overwrite` on such a manifest,
    # a checkpoint's state, a dataset record, a cache index (the manifest and checkpoint cases run end to end in
    # test_resume_integrity.py); here the small records read on the way
    import os

    from lora_run_engines.stage import MARKER, read_marker
    from lora_run_rundir.cachedir import CACHE_MARKER, is_marked
    from lora_run_rundir.folder import _read_holder, is_run_folder

    deep = "[" * 4000      # within the cache marker's 4 KiB limit, far past the decoder's limit
    (tmp_path / CACHE_MARKER).write_text(deep)
    assert is_marked(tmp_path) is False
    (tmp_path / MARKER).write_text(deep)
    assert read_marker(tmp_path) is None
    (tmp_path / "manifest.json").write_text(deep)
    assert is_run_folder(tmp_path) is False
    lock = tmp_path / "lock"
    lock.write_text(deep)
    fd = os.open(lock, os.O_RDONLY)
    try:
        assert _read_holder(fd) == "holder unknown"
    finally:
        os.close(fd)
    from lora_run_rundir import parse_json

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep)
    assert parse_json(b'{"a": [1]}') == {"a": [1]}
