"""Nothing lost, nothing overwritten, nothing escapes: names that would leave the run folder, --overwrite of
folders lora-run did not create, the run-folder lock, a failed pre-flight, and temporary files."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_run.cli import main

ESCAPING_NAMES = ["../../escaped", "..", ".", "a/b", "/tmp/lora-run-absolute-name", "", " ", "line\nbreak",
                  "~user", "back\\slash", ".hidden", "x" * 200]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_output_names_that_are_not_plain_file_names_are_refused_by_check_plan_and_run(name, tiny_recipe, tmp_path,
                                                                                     capsys, figures):
    recipe = tiny_recipe()
    victim = Path("/tmp/lora-run-absolute-name.safetensors")
    before = _tree(tmp_path)
    setting = f"output.name={json.dumps(name)}"
    for argv in (["check", str(recipe)], ["plan", str(recipe)], [str(recipe), "--overwrite"],
                 [str(recipe), "--output-dir", str(tmp_path / "run")]):
        code = main([*argv, "--set", setting])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "[output.name]" in err and "Traceback" not in err, err
        lines = err.strip().splitlines()
        if argv[0] == "check":    # the rule is a check_recipe problem: `check` ends with its summary line
            assert re.fullmatch(r"check failed: \d+ recipe problem\(s\)", lines.pop()), err
        assert all(line.startswith("error: ") for line in lines), err  # one line each
    assert _tree(tmp_path) == before, "nothing was written anywhere"
    assert not victim.exists()
    figures("run-folder safety", cases=4, faults=4)


def test_overwrite_never_removes_a_folder_lora_run_did_not_create(tiny_recipe, small_dataset, tmp_path, capsys,
                                                                  monkeypatch, figures):
    recipe = tiny_recipe()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    (foreign / "manifest.json").write_text('{"someone": "else"}')      # a manifest that is not ours
    code = main([str(recipe), "--output-dir", str(foreign), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "replaces only a run folder lora-run created" in err, err
    assert (foreign / "holiday.jpg").read_bytes() == b"precious" and len(list(foreign.iterdir())) == 2
    # the dataset, a folder holding it, the working folder and one above it: refused by check, plan and run
    work = tmp_path / "work"
    work.mkdir()
    inner = work / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)
    plan_run, all_three = ("plan", "run"), ("plan", "run", "check")
    cases = [(["--output-dir", str(small_dataset)], "contains [dataset.path]", plan_run),
             (["--output-dir", str(tmp_path)], "contains [dataset.path]", plan_run),
             (["--output-dir", str(work)], "contains the working folder", plan_run),
             (["--set", f'output.dir="{tmp_path}"'], "contains [dataset.path]", all_three),
             (["--set", 'output.dir=".."'], "contains the working folder", all_three),
             (["--output-dir", str(inner)], "--overwrite would replace the working folder", ("run",))]
    tried = 0
    for extra, message, where in cases:
        commands = [{"plan": ["plan", str(recipe)], "run": [str(recipe), "--overwrite"],
                     "check": ["check", str(recipe)]}[w] for w in where]
        for argv in commands:
            code = main([*argv, *extra])
            err = capsys.readouterr().err
            assert code == 2 and message in err and "Traceback" not in err, (argv, extra, err)
            tried += 1
    assert sorted(p.name for p in small_dataset.iterdir()) == sorted(
        [f"img{i:03d}{ext}" for i in range(3) for ext in (".png", ".txt")])
    assert [p.name for p in work.iterdir()] == ["inner"] and not any(inner.iterdir())
    # a recipe file kept inside the run folder would be deleted by --overwrite; our own recipe.toml may be re-run
    old_run = tmp_path / "old-run"
    old_run.mkdir()
    (old_run / "mine.toml").write_text(recipe.read_text())
    (old_run / "recipe.toml").write_text(recipe.read_text())
    code = main(["plan", str(old_run / "mine.toml"), "--output-dir", str(old_run)])
    err = capsys.readouterr().err
    assert code == 2 and "contains the recipe file" in err, err
    assert main(["plan", str(old_run / "recipe.toml"), "--output-dir", str(old_run)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    tried += 1
    figures("run-folder safety", cases=tried + 1, faults=tried + 1)


def test_a_folder_holding_only_our_lock_and_temp_files_is_not_in_the_way(tmp_path):
    """A run SIGKILLed before it wrote recipe.toml leaves its lock and a temp file: the next run starts."""
    from lora_run_rundir.folder import LOCK, RunDir, is_run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("{}")
    (run / ".recipe.toml.k2j4h5g6.tmp").write_text("half")
    rd = RunDir(run)
    rd.prepare(overwrite=False, resume=False)
    rd.release()
    assert is_run_folder(run)
    (run / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match="not empty"):
        RunDir(run).prepare(overwrite=False, resume=False)


OWN_NAMES = [".lora-run.lock", ".lora-run.reserve", ".write-test", ".recipe.toml.k2j4h5g6.tmp"]


def _plant(folder: Path, name: str, kind: str, victim: Path) -> None:
    entry = folder / name
    if kind == "link":
        entry.symlink_to(victim)
    elif kind == "hard link":
        os.link(victim, entry)
    elif kind == "dangling link":
        entry.symlink_to(folder.parent / "nowhere")
    else:
        os.mkfifo(entry)


@pytest.mark.parametrize("kind", ["link", "hard link", "dangling link", "fifo"])
@pytest.mark.parametrize("name", OWN_NAMES)
def test_lora_runs_own_names_are_never_written_through(tiny_recipe, tmp_path, capsys, name, kind, figures):
    """A folder holding only lora-run's own names counts as empty, and the run writes those names in place: a link
    named `.lora-run.reserve` to a user's file had the reserve's megabyte of zeros written through it (exit 0, the
    file lost), a hard link was truncated, a FIFO there hung the run. Such an entry is someone else's: a fresh run
    (and `--overwrite`) stops naming the folder or the entry, exit 2, and the file it reaches is unchanged."""
    victim = tmp_path / "thesis.txt"
    victim.write_bytes(b"precious words\n")
    run = tmp_path / "run"
    run.mkdir()
    _plant(run, name, kind, victim)
    for extra in ([], ["--overwrite"]):
        code = main([str(tiny_recipe()), "--output-dir", str(run), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert any(words in err for words in ("not empty", "lora-run made here", "holds other files",
                                              "no lora-run run wrote")), err
        assert victim.read_bytes() == b"precious words\n" and os.path.lexists(run / name)
        assert sorted(p.name for p in run.iterdir()) == [name], "nothing was written into the folder"
    figures("run-folder safety", cases=2, faults=2)


@pytest.mark.parametrize("kind", ["link", "hard link", "fifo"])
@pytest.mark.parametrize("name", [".lora-run.reserve", ".write-test"])
def test_a_resumed_run_never_writes_through_its_reserve_or_probe_name(tmp_path, name, kind):
    """`--resume` of a folder where the reserve's or the probe's name is a link, a hard link or a FIFO: the reserve
    is skipped (a safety margin; the entry and what it reaches stay as they are), the probe names the entry."""
    from lora_run.errors import OutputError
    from lora_run_rundir.folder import MANIFEST, RunDir

    victim = tmp_path / "thesis.txt"
    victim.write_bytes(b"precious words\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / MANIFEST).write_text(json.dumps({"lora_run_version": "0", "written": [], "status": "interrupted"}))
    _plant(run, name, kind, victim)
    rd = RunDir(run)
    try:
        if name == ".write-test":
            with pytest.raises(OutputError, match="lora-run made here"):
                rd.prepare(overwrite=False, resume=True)
        else:
            rd.prepare(overwrite=False, resume=True)
            rd.reserve()
            rd.unreserve()
    finally:
        rd.release()
    assert victim.read_bytes() == b"precious words\n" and os.path.lexists(run / name)
    assert (run / name).is_symlink() == (kind == "link")


def test_a_failed_pre_flight_removes_only_what_it_wrote(tmp_path):
    """A run that undoes itself (a failed pre-flight) in a folder it found holding only lora-run-looking files (a
    file named like an atomic write's temporary file) leaves them: they were there before it."""
    from lora_run_rundir.folder import RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / ".draft.abcd1234.tmp").write_text("someone's")
    rd = RunDir(run)
    rd.prepare(overwrite=False, resume=False)
    (run / "recipe.toml").write_text("x")
    assert rd.remove_created()
    assert sorted(p.name for p in run.iterdir()) == [".draft.abcd1234.tmp"]


# ------------------------------------------------------------------------------------------------ lock
HOLDER = """
import sys, time
from lora_run_rundir.folder import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_one_run_per_folder_and_a_killed_holder_never_leaves_a_stuck_lock(tiny_recipe, tmp_path, capsys, figures):
    recipe = tiny_recipe()
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold(run)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            code = main([str(recipe), "--output-dir", str(run), *extra])
            err = capsys.readouterr().err
            if extra == ["--resume"]:        # nothing to resume yet: refused before the lock is even tried
                assert code == 2 and "nothing to resume" in err, err
                continue
            assert code == 2, err
            assert "another lora-run is using this run folder" in err and f"pid {holder.pid}" in err, err
            assert "started 20" in err and "Traceback" not in err, err
        assert sorted(p.name for p in run.iterdir()) == [".lora-run.lock"], "the refused run wrote nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code = main([str(recipe), "--output-dir", str(run)])        # the kernel dropped the dead holder's lock
    err = capsys.readouterr().err
    assert code == 0, err
    holder = _hold(run)                                         # and a finished run can be locked again
    try:
        for extra in (["--resume", "--set", "train.steps=8"], []):   # a second --resume; a plain run names it too
            code = main([str(recipe), "--output-dir", str(run), *extra])
            err = capsys.readouterr().err
            assert code == 2 and "another lora-run is using this run folder" in err, err
        assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    figures("run-folder lock", cases=4, faults=4)


def test_the_checkpoint_pruner_never_touches_a_live_writers_temp_folder(tmp_path):
    from lora_run_native import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    root.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        live_tmp = root / f".step-000007.tmp-{sleeper.pid}"
        dead_tmp = root / f".step-000005.tmp-{dead.pid}"
        for folder in (live_tmp, dead_tmp):
            (folder / "resume").mkdir(parents=True)
            (folder / "resume" / "state.json").write_text("{}")
        ckpt.prune(root, keep_last=2)
        assert (live_tmp / "resume" / "state.json").is_file(), "a live process's temp folder was deleted"
        assert not dead_tmp.exists(), "a dead process's temp folder is stale and removed"
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------------- failed pre-flight
def test_a_failed_pre_flight_leaves_nothing_and_the_retry_is_not_blocked(tmp_path, monkeypatch, capsys, figures):
    """kohya without an sd-scripts checkout stops in run() with exit 2, after the run folder was begun."""
    from lora_run_devtools.testing import make_images

    from tests.kohya.conftest import model_files, recipe_text

    monkeypatch.delenv("LORA_RUN_SD_SCRIPTS", raising=False)
    data = tmp_path / "data"
    make_images(data, count=3, size=(512, 512))
    recipe = tmp_path / "k.toml"
    recipe.write_text(recipe_text(data, model_files(tmp_path / "models")), encoding="utf-8")
    fresh, empty = tmp_path / "fresh", tmp_path / "empty"
    empty.mkdir()
    for attempt in range(2):                       # the same command twice: the same error, never "not empty"
        for run in (fresh, empty):
            code = main([str(recipe), "--output-dir", str(run)])
            err = capsys.readouterr()
            assert code == 2, err
            assert "[backend.kohya.sd_scripts] no sd-scripts checkout configured" in err.err, err.err
            assert "not empty" not in err.err and "Traceback" not in err.err
            assert "nothing was kept" in err.out
    assert not fresh.exists(), "a folder this run created is removed again"
    assert empty.is_dir() and not any(empty.iterdir()), "an empty folder we found stays, empty"
    figures("failed pre-flight", cases=4, faults=4)


# ------------------------------------------------------------------------------------------ smaller
def test_atomic_writes_honour_the_umask(tmp_path):
    import torch
    from lora_run_formats import save_lora
    from lora_run_rundir import atomic_path, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        save_lora(tmp_path / "d.safetensors", {"x.lora_A.weight": torch.zeros(2, 2)})   # safetensors writes it 0600
        os.umask(0o002)
        atomic_write_text(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d.safetensors").stat().st_mode & 0o777 == 0o640, "a LoRA file others may read (ComfyUI)"


def test_remove_temp_files_takes_only_ours(tmp_path):
    from lora_run_rundir.atomic import remove_temp_files

    ours = [tmp_path / ".tiny.safetensors.a1b2c3d4.tmp", tmp_path / "checkpoints" / ".manifest.json.zz_9yy8x.tmp"]
    theirs = [tmp_path / ".notes.tmp", tmp_path / "draft.a1b2c3d4.tmp", tmp_path / ".x.TOOLONG12.tmp",
              tmp_path / "data.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / ".y.abcdefgh.tmp").write_text("not under the run folder")
    (tmp_path / "link").symlink_to(outside)
    assert sorted(remove_temp_files(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs) and (outside / ".y.abcdefgh.tmp").exists()


def test_file_names_with_control_characters_stay_on_one_line(tiny_recipe, tmp_path, capsys):
    data = tmp_path / "odd"
    data.mkdir()
    (data / "bad\nname.png").write_bytes(b"not a png")
    (data / "bad\nname.txt").write_text("ohwx, a photo")
    code = main(["check", str(tiny_recipe(data=data))])
    out = capsys.readouterr().out
    assert code == 2
    lines = [line for line in out.splitlines() if "bad" in line]
    assert len(lines) == 1 and "bad\\nname.png" in lines[0], out


def test_no_traceback_reaches_the_user_without_debug(tiny_recipe, monkeypatch, capsys):
    import lora_run.recipe as recipe_mod

    def broken(*_a, **_kw):
        raise ValueError("planted\nbug")
    monkeypatch.setattr(recipe_mod, "load_recipe", broken)
    code = main(["check", str(tiny_recipe())])
    err = capsys.readouterr().err
    assert code == 1 and "unexpected ValueError: planted\\nbug" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError):
        main(["check", "--debug", str(tiny_recipe())])


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder(tiny_recipe, tmp_path, figures):
    """Two real `lora-run` processes on one output folder: exactly one trains, the other stops with exit 2."""
    recipe = tiny_recipe()
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-c", "import sys; from lora_run.cli import main; sys.exit(main(sys.argv[1:]))",
            str(recipe), "--output-dir", str(run)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another lora-run is using this run folder" in loser or "not empty" in loser, loser
    assert "Traceback" not in loser
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    figures("run-folder lock", cases=1, faults=1)


@pytest.mark.slow
def test_overwrite_of_our_run_folder_keeps_what_the_user_put_in_it(tiny_recipe, tmp_path, capsys, figures):
    """`--overwrite` replaces a run lora-run created, but a file or folder a user added to it (notes, a folder of
    picked samples) was deleted with the old run; it is now refused, naming them, and nothing is touched. What
    runs write there (the final LoRA the manifest names, the cache, checkpoints, an evaluation) is replaced."""
    recipe = tiny_recipe()
    run = tmp_path / "run"
    assert main([str(recipe), "--output-dir", str(run)]) == 0
    from lora_run_rundir.record import EVALUATION, write_output_record

    evaluation = run / "eval-tiny"                                   # what `lora-run eval` writes by default
    write_output_record(evaluation, EVALUATION, ("metrics.json", "report.html", "images"))   # its record, first
    (evaluation / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("which step looked best")
    (run / "picked").mkdir()
    (run / "picked" / "best.png").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"}
    capsys.readouterr()
    code = main([str(recipe), "--output-dir", str(run), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite would delete 2 entries no lora-run run wrote there (notes.txt, picked)" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"} == before
    (run / "notes.txt").unlink()
    (run / "picked" / "best.png").unlink()
    (run / "picked").rmdir()
    assert main([str(recipe), "--output-dir", str(run), "--overwrite"]) == 0, capsys.readouterr().err
    assert (run / "tiny.safetensors").is_file() and not evaluation.exists()
    figures("run-folder safety", cases=2, faults=2)


# ------------------------------------------------------------------------------------------ eval's folder
def _lora(path: Path) -> Path:
    """A LoRA file of one module that fits the tiny FLUX.1 model (eval checks it before anything loads)."""
    import struct

    header = json.dumps({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight":
                         {"dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256]},
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                         {"dtype": "F32", "shape": [192, 1], "data_offsets": [256, 1024]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1024)
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() or p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _earlier_evaluation(folder: Path) -> None:
    from lora_run_eval.report import REPORT_HEAD

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.html").write_text(REPORT_HEAD + "<title>Identity evaluation</title></head></html>\n")


EVAL_FOLDERS = {   # name: (how the folder given as --output-dir is made from (project, dataset), what the error says)
    "a web page's report.html beside the dataset": (
        lambda project, data: (project / "report.html").write_text("<html>my page</html>"),
        "replaces only an earlier evaluation"),
    "an earlier evaluation beside the dataset named images": (
        lambda project, data: _earlier_evaluation(project), "contains [dataset.path]"),
    "an earlier evaluation beside the user's notes": (
        lambda project, data: (_earlier_evaluation(project / "ev"), (project / "ev" / "notes.txt").write_text("mine")),
        "did not write (notes.txt)"),
    "images a link to the dataset": (
        lambda project, data: ((project / "ev").mkdir(), (project / "ev" / "images").symlink_to(data)),
        "is a link or not a folder"),
    "a folder in the dataset": (lambda project, data: None, "lies in the dataset folder [dataset.path]"),
    "a web page that begins as lora-run's reports once did, beside the user's images": (
        lambda project, data: _web_page(project / "ev"), "replaces only an earlier evaluation"),
}


def _web_page(folder: Path) -> None:
    """A user's gallery: a minified page whose head is the one lora-run's report pages began with before they carried
    its generator mark (any minified page's), and its pictures in `images/`."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "holiday.png").write_bytes(b"mine")
    (folder / "report.html").write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>My '
                                        "holiday</title></head><body><img src=images/holiday.png></body></html>")


@pytest.mark.parametrize("case", list(EVAL_FOLDERS))
def test_eval_overwrite_replaces_only_an_earlier_evaluation_and_never_the_dataset(tiny_recipe, tmp_path, capsys,
                                                                                  case, figures):
    """`lora-run eval --output-dir DIR --overwrite` took any folder holding a `report.html` or `metrics.json` for an
    earlier evaluation and deleted its `images/` folder: a project folder whose dataset is `images/` lost every photo
    and caption (and its own report.html), then the evaluation wrote there. Now an earlier evaluation is one whose
    report lora-run wrote (or whose metrics hold the evaluation's keys), holding nothing else; the folder may neither
    hold nor lie in a dataset folder, and its `images` may not be a link. Each is exit 2 before any model loads,
    nothing touched."""
    from lora_run_devtools.testing import make_images

    project = tmp_path / "project"
    data = project / "images"
    make_images(data, count=3, size=(96, 80))
    make, words = EVAL_FOLDERS[case]
    make(project, data)
    out = {"a web page's report.html beside the dataset": project,
           "an earlier evaluation beside the dataset named images": project,
           "a folder in the dataset": data / "eval"}.get(case, project / "ev")
    lora = _lora(tmp_path / "x.safetensors")
    before = _snapshot(project)
    code = main(["eval", str(tiny_recipe(data=data)), "--lora", str(lora), "--output-dir", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert _snapshot(project) == before, "nothing was touched"
    figures("run-folder safety", cases=1, faults=1)


def test_an_evaluation_or_demo_folder_in_use_is_refused_to_a_second_one(tiny_recipe, tmp_path, capsys, monkeypatch,
                                                                         figures):
    """Two `lora-run eval` into one folder at once: the second's `--overwrite` took the first's folder (its record
    written, images coming) for an earlier evaluation and cleared it, and the first ended "cannot be scored: not found"
    (exit 1). Two `lora-run demo` into one folder at once deleted each other's half-built model (`.tiny-flux.building`):
    "unexpected FileNotFoundError" or "SafetensorError", exit 1, the first demo included. Each now holds a lock on its
    folder (``folder_lock``, a flock on the folder itself) while it writes there; the second is refused, exit 2,
    nothing touched. Here the first writer is stood in for by holding that lock; the control: without it, each goes
    on past the point where it is refused."""
    import contextlib
    import fcntl

    import lora_run_eval.evaluator as evaluator
    import lora_run_native.demo as demo

    @contextlib.contextmanager
    def held(folder):      # what the first writer holds (``lora_run_rundir.atomic.folder_lock``)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)

    class PastTheLock(Exception):
        pass

    def past(*_a, **_k):
        raise PastTheLock("went on past the lock")
    monkeypatch.setattr(evaluator, "make_embedder", past)
    monkeypatch.setattr(demo, "build_demo", past)
    ev = tmp_path / "ev"
    _earlier_evaluation(ev)
    (ev / "images").mkdir()
    (ev / "images" / "p0.png").write_bytes(b"png")
    lora = _lora(tmp_path / "x.safetensors")
    eval_argv = ["eval", str(tiny_recipe()), "--lora", str(lora), "--output-dir", str(ev), "--overwrite"]
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    for argv, folder, what in ((eval_argv, ev, "an evaluation"), (["demo", "--output-dir", str(demo_dir)], demo_dir,
                                                                  "a demo")):
        before = _snapshot(folder)
        with held(folder):
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"{folder}: another lora-run is writing {what} in this folder now" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert _snapshot(folder) == before, "nothing touched"
        code = main(argv)       # the control: no other writer
        err = capsys.readouterr().err
        assert code == 1 and "went on past the lock" in err, err
        figures("run-folder lock", cases=1, faults=1)
    assert not (ev / "images").exists(), "the control's --overwrite cleared the earlier evaluation"


def test_an_earlier_evaluation_is_known_by_what_lora_run_wrote(tmp_path):
    """The control: a folder holding only an earlier evaluation (its report, or its metrics, and images) may be
    replaced; files merely named so may not."""
    from lora_run_eval.evaluator import _check_output, _is_evaluation

    ours = tmp_path / "ours"
    _earlier_evaluation(ours)
    (ours / "images").mkdir()
    _check_output(ours, overwrite=True)
    metrics = tmp_path / "metrics-only"
    metrics.mkdir()
    (metrics / "metrics.json").write_text(json.dumps({"results": {}, "loras": [], "final": "x", "subject_images": []}))
    assert _is_evaluation(metrics)
    (metrics / "metrics.json").write_text('{"accuracy": 0.9}')
    assert not _is_evaluation(metrics)


# ------------------------------------------------------------------------------------ a local model's folder
def test_no_run_evaluation_or_cache_folder_goes_inside_a_local_model_folder(tiny_recipe, tiny_model, tmp_path, capsys,
                                                                            figures):
    """A run folder (`--output-dir`, `[output] dir`), an evaluation folder (`eval --output-dir`, or its default next
    to a LoRA kept there) and a `[train] cache_dir` inside the `[model] source` folder passed `check` and `plan`, and
    the run wrote its LoRAs, checkpoints and cache among the model's files, where the run's own record took every one
    of them for a file of the base model. Each is refused as a dataset folder is (exit 2 naming the key or option, the
    model folder and `[model.source]`), before anything is written; the model's files are untouched."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    path = tiny_recipe()
    path.write_text(path.read_text().replace(str(tiny_model), str(model)))
    recipe = str(path)
    lora = _lora(model / "x.safetensors")
    before = _snapshot(model)
    says = f"lies in the model folder [model.source] ({model}); lora-run never writes into a model folder"
    cases = {("check", recipe, "--set", f'output.dir="{model}/runs/x"'): "recipe.toml (--set): [output.dir]",
             ("plan", recipe, "--output-dir", str(model / "runs" / "x")): f"--output-dir {model / 'runs' / 'x'}",
             (recipe, "--output-dir", str(model / "run")): f"--output-dir {model / 'run'}",
             (recipe, "--output-dir", str(model / "transformer" / "run"), "--overwrite"): "--output-dir",
             ("check", recipe, "--set", f'train.cache_dir="{model}/cache"'): "(--set): [train.cache_dir]",
             ("eval", recipe, "--lora", str(lora), "--output-dir", str(model / "ev")): f"--output-dir {model / 'ev'}",
             ("eval", recipe, "--lora", str(lora)): f"--output-dir {model / 'eval-x'}"}
    for argv, named in cases.items():
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 2 and f"{named}" in err and says in err and "Traceback" not in err, (argv, err[-1500:])
        assert _snapshot(model) == before, argv
    # the control: a folder beside the model folder is a run folder as before
    assert main(["check", recipe, "--set", f'output.dir="{tmp_path}/runs/x"']) == 0, capsys.readouterr().err
    figures("run-folder safety", cases=len(cases) + 1, faults=len(cases))
