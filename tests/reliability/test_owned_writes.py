"""What lora-run writes *through*, closed at the root (docs/reliability.md, "Found by a hostile sweep …"): a
`[train] cache_dir` that is not lora-run's, a log appended through a hard link of a copied run folder, and an
`eval-*` folder of a run folder that `run --overwrite` would delete without proof that lora-run wrote it. Each
hostile case: exit 2, the key or file named, no traceback, every file that was there unchanged (bytes and mtime);
each control: the legitimate case still works."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lora_run.cli import main


def _state(root: Path) -> dict[str, tuple[bytes | str | None, int]]:
    """Every entry under ``root`` (links not followed): its bytes (a file), its target (a link) or None (a folder),
    and its mtime in ns."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if path.is_symlink():
            what: bytes | str | None = os.readlink(path)
        elif path.is_dir():
            what = None
        else:
            what = path.read_bytes()
        out[str(path.relative_to(root))] = (what, st.st_mtime_ns)
    return out


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text, text[-3000:]
    return code, text


# ------------------------------------------------------------------------------- appends through hard links
@pytest.mark.slow     # real tiny runs (about 5 s each on CPU)
def test_a_resumed_copy_made_with_hard_links_never_grows_the_originals_files(tiny_recipe, tmp_path, capsys, figures):
    """`cp -al run copy` then `--resume --output-dir copy`: run.log (and the loss log, appended row by row) were
    appended in place, so the original's log grew with the copy's resume. Now a file with other names gets its own
    copy before an append; the original stays as it was, bytes and mtime. The control: the resumed copy's own log
    holds the run's earlier lines and the resume's."""
    recipe = tiny_recipe()
    run, copy = tmp_path / "run", tmp_path / "copy"
    code, text = _cli([str(recipe), "--output-dir", str(run), "--set", "train.steps=2"], capsys)
    assert code == 0, text
    subprocess.run(["cp", "-al", str(run), str(copy)], check=True)
    assert os.stat(copy / "run.log").st_nlink == 2 and os.stat(copy / "eval" / "loss.jsonl").st_nlink == 2
    before = _state(run)
    earlier_log = (run / "run.log").read_text()
    resume = [str(recipe), "--resume", "--output-dir", str(copy), "--set", "train.steps=4"]
    code, text = _cli(resume, capsys)    # the lock is never written through another name: refused, named
    assert code == 2 and "copy/.lora-run.lock: is not a file lora-run made here" in text, text
    assert _state(run) == before
    (copy / ".lora-run.lock").unlink()   # as the message says: move it away
    code, text = _cli(resume, capsys)
    assert code == 0, text
    assert _state(run) == before, "the original run folder is untouched"
    log = (copy / "run.log").read_text()
    assert log.startswith(earlier_log) and len(log) > len(earlier_log), "a resume appends to its own log"
    assert os.stat(copy / "run.log").st_nlink == 1
    steps = [line for line in (copy / "eval" / "loss.jsonl").read_text().splitlines() if line]
    assert len(steps) == 4
    figures("run-folder safety", cases=1, faults=1)


def test_appends_never_reach_another_name_of_the_file(tmp_path):
    """``open_append``: a hard link is broken (the other name keeps its bytes and mtime), a link, FIFO or folder under
    the name is refused naming it, a plain file is appended to in place."""
    from lora_run.errors import OutputError
    from lora_run_rundir import open_append

    plain = tmp_path / "plain.log"
    plain.write_text("a\n")
    inode = os.stat(plain).st_ino
    with open_append(plain) as fh:
        fh.write("b\n")
    assert plain.read_text() == "a\nb\n" and os.stat(plain).st_ino == inode       # in place: no copy made
    other = tmp_path / "other.log"
    os.link(plain, other)
    before = _state(tmp_path)[other.name]
    with open_append(plain) as fh:
        fh.write("c\n")
    assert plain.read_text() == "a\nb\nc\n" and _state(tmp_path)[other.name] == before
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name, make in (("link.log", lambda p: p.symlink_to(victim)), ("fifo.log", os.mkfifo),
                       ("folder.log", os.mkdir)):
        path = tmp_path / name
        make(path)
        with pytest.raises(OutputError, match=name):
            open_append(path)
    assert victim.read_text() == "mine"


# ------------------------------------------------------------------------------------ [train] cache_dir
def _someones_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "latents").mkdir()
    (folder / "latents" / "index.json").write_text('{"my": "index"}')     # replaced by a run before the fix


def _model_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")


def _marked_cache_linking_out(folder: Path) -> None:
    """A cache lora-run made, whose `latents` is now a link to a user's folder (entries would be written there)."""
    from lora_run_rundir.cachedir import CACHE_MARKER, MARKER_TEXT

    folder.mkdir()
    (folder / CACHE_MARKER).write_text(MARKER_TEXT)
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "index.json").write_text('{"my": "index"}')
    (folder / "latents").symlink_to(elsewhere)


def _index_not_ours(folder: Path) -> None:
    """lora-run's names, but an index.json that is no cache index of lora-run's (an old-looking cache, no marker)."""
    (folder / "text" / "ab").mkdir(parents=True)
    (folder / "text" / "index.json").write_text('{"settings": {"theme": "dark"}}')


HOSTILE_CACHES = {   # name: (how it is made, an entry the message must name)
    "a folder of someone's files": (_someones_files, "notes.txt"),
    "a model folder": (_model_folder, "config.json"),
    "a marked cache whose latents is a link": (_marked_cache_linking_out, "latents (a link"),
    "an index.json that is not lora-run's": (_index_not_ours, "text/index.json (not lora-run's cache index)"),
}

BACKEND_SETTINGS = {   # what each backend's pre-flight needs of the tiny recipe to reach the run folder's checks
    "native": [],
    "kohya": ["dataset.bucket_step=32", "dataset.bucket_max=128", "train.noise_offset=0.0", "lora.dropout=0.0"],
    "diffusion-pipe": ['scheduler.name="constant_with_warmup"', "train.noise_offset=0.0", "lora.dropout=0.0"],
}


@pytest.fixture(scope="module")
def kohya_models(tmp_path_factory) -> dict[str, str]:
    """sd-scripts loads single files: the released files' headers (their data a hole; nothing loads before the
    refusal), outside each test's folder, whose every byte `_state` reads."""
    from lora_run_devtools.testing import header_only_files

    slots = ("transformer", "clip_l", "t5xxl", "vae")
    return header_only_files(tmp_path_factory.mktemp("kohya-models"), {"flux.1-dev": slots})["flux.1-dev"]


def _backend_sets(backend: str, kohya_models: dict[str, str]) -> list[str]:
    sets = [f'backend.name="{backend}"', *BACKEND_SETTINGS[backend]]
    if backend == "kohya":
        sets += [f'model.files.{key}="{path}"' for key, path in kohya_models.items()]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("case", list(HOSTILE_CACHES))
def test_a_cache_folder_that_is_not_lora_runs_is_refused_before_anything_is_written(tiny_recipe, tmp_path, capsys,
                                                                                    case, figures, kohya_models):
    """`[train] cache_dir` was taken as lora-run's own: pointed at a folder of someone's files or a model folder,
    a run wrote `latents/`, `text/` (and the engines' staged folders) there and replaced the `index.json` it found.
    Now `check` and every backend's run refuse a cache folder that is not provably lora-run's (exit 2, naming
    `[train.cache_dir]` and the entry) and nothing anywhere changes."""
    make, entry = HOSTILE_CACHES[case]
    cache = tmp_path / "cache"
    make(cache)
    recipe = tiny_recipe()
    before = _state(tmp_path)
    tried = 0
    for backend in BACKEND_SETTINGS:
        sets = [*_backend_sets(backend, kohya_models), "--set", f'train.cache_dir="{cache}"']
        for argv in (["check", str(recipe)], [str(recipe), "--output-dir", str(tmp_path / "run")]):
            code, text = _cli([*argv, *sets], capsys)
            assert code == 2, (backend, argv, text)
            lines = [line for line in text.splitlines() if "[train.cache_dir]" in line]
            assert lines and entry in lines[0] and "not a cache folder lora-run made" in lines[0], (backend, text)
            assert _state(tmp_path) == before, (backend, argv, "nothing was written or changed")
            tried += 1
    figures("run-folder safety", cases=tried, faults=tried)


def test_the_root_folder_as_cache_is_refused(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    for argv in (["check", str(recipe)], [str(recipe), "--output-dir", str(tmp_path / "run")]):
        code, text = _cli([*argv, "--set", 'train.cache_dir="/"'], capsys)
        assert code == 2 and "[train.cache_dir] (= /): is not a cache folder lora-run made" in text, text
    assert not any(os.path.lexists(f"/{name}") for name in ("latents", "text", "lora-run-cache.json"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow     # real tiny runs (about 5 s each on CPU)
def test_an_earlier_cache_without_the_marker_is_reused_with_hits(tiny_recipe, tmp_path, capsys):
    """The control: a cache lora-run wrote before the marker existed (its entries and index, no marker) is still
    lora-run's: a run of another recipe (another run folder) shares it, reads every entry as a hit and marks it."""
    from lora_run_rundir.cachedir import CACHE_MARKER, cache_problems, is_marked

    cache = tmp_path / "shared-cache"
    recipe = tiny_recipe()
    sets = ["--set", f'train.cache_dir="{cache}"', "--set", "train.steps=1"]
    code, text = _cli([str(recipe), "--output-dir", str(tmp_path / "a"), *sets], capsys)
    assert code == 0 and "latents 0 hit(s), 3 built" in text, text
    assert is_marked(cache)
    (cache / CACHE_MARKER).unlink()         # as a cache from before the marker looks
    assert cache_problems(cache) == []
    before = {p: p.read_bytes() for p in cache.rglob("*.safetensors")}
    code, text = _cli([str(recipe), "--output-dir", str(tmp_path / "b"), *sets], capsys)
    assert code == 0 and "latents 3 hit(s), 0 built" in text and "text 4 hit(s), 0 built" in text, text
    assert is_marked(cache) and {p: p.read_bytes() for p in cache.rglob("*.safetensors")} == before


def test_what_a_cache_folder_may_hold(tmp_path):
    """Unit rules of ``cache_problems``/``claim_cache``: a missing or empty folder is taken (and marked), a marked one
    keeps the user's other files untouched, lora-run's names must be what it makes, and an unmarked folder must hold
    lora-run's entries alone (temporary files and the engines' staging leftovers included)."""
    from lora_run.errors import OutputError
    from lora_run_rundir.cachedir import CACHE_MARKER, cache_problems, claim_cache, is_marked

    new = tmp_path / "new" / "cache"
    claim_cache(new)
    assert is_marked(new) and sorted(p.name for p in new.iterdir()) == [CACHE_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_cache(empty)
    assert is_marked(empty)
    (empty / "README.txt").write_text("my notes about this cache")      # marked: the user's file is tolerated
    assert cache_problems(empty) == []
    old = tmp_path / "old"
    key = "ab" + "0" * 62
    (old / "latents" / "ab").mkdir(parents=True)
    (old / "latents" / "ab" / f"{key}.safetensors").write_bytes(b"x")
    (old / "latents" / "ab" / f".{key}.safetensors.k2j4h5g6.tmp").write_bytes(b"x")
    (old / "latents" / "index.json").write_text(f'{{"subject/a.png|64x64": "{key}"}}')
    (old / "text").mkdir()
    (old / "kohya-data" / "dataset-0123456789ab" / "subject").mkdir(parents=True)
    (old / "kohya-data" / ".dataset-0123456789ab.lock").write_text("")
    (old / "diffusion-pipe" / ".dataset-0123456789ab.77.0a1b2c3d.removing").mkdir(parents=True)
    assert cache_problems(old) == []
    (old / "latents" / "ab" / "photo.jpg").write_bytes(b"mine")
    (old / "kohya-data" / "my-dataset").mkdir()
    (old / CACHE_MARKER).symlink_to(new / CACHE_MARKER)                 # a link is no marker
    assert cache_problems(old) == ["kohya-data/my-dataset", "latents/ab/photo.jpg",
                                   CACHE_MARKER + " (not lora-run's marker)"]
    before = _state(old)
    with pytest.raises(OutputError, match=r"\[train.cache_dir\].*kohya-data/my-dataset"):
        claim_cache(old)
    assert _state(old) == before


# ------------------------------------------------------------------------ eval-* folders and run --overwrite
@pytest.mark.slow     # real tiny runs and a real `lora-run eval` (generation and face scoring)
def test_run_overwrite_deletes_only_an_evaluation_lora_run_recorded(tiny_recipe, tmp_path, capsys, figures):
    """`run --overwrite` counted any `eval-*` folder of a run folder holding a file named `metrics.json` or
    `report.html` as a run's and deleted it with the old run: a user's folder of results (their own metrics, their
    page, their images) went. Now an evaluation folder is a run's only with the record `lora-run eval` writes there
    first, listing everything it holds; anything else is refused (exit 2, named), nothing touched. The control: a real
    `lora-run eval` next to the LoRA, then `run --overwrite`, replaces the run with its evaluation."""
    recipe = tiny_recipe()
    run = tmp_path / "run"
    code, text = _cli([str(recipe), "--output-dir", str(run), "--set", "train.steps=1"], capsys)
    assert code == 0, text
    mine = run / "eval-mine"
    (mine / "images").mkdir(parents=True)
    (mine / "metrics.json").write_text('{"accuracy": 0.9}')
    (mine / "report.html").write_text("<html>my results</html>")
    (mine / "images" / "best.png").write_bytes(b"mine")
    overwrite = [str(recipe), "--output-dir", str(run), "--overwrite", "--set", "train.steps=1"]
    before = _state(tmp_path)
    code, text = _cli(overwrite, capsys)
    assert code == 2 and "--overwrite would delete 1 entry no lora-run run wrote there (eval-mine)" in text, text
    assert _state(tmp_path) == before
    for path in sorted(mine.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    mine.rmdir()
    code, text = _cli(["eval", str(run / "recipe.toml"), "--lora", str(run / "tiny.safetensors"),
                       "--set", "eval.prompts=['{trigger}']", "--set", "eval.seeds=[1]",
                       "--set", "eval.strengths=[1.0]"], capsys)
    assert code == 0, text
    evaluation = run / "eval-tiny"
    assert (evaluation / ".lora-run-output.json").is_file() and (evaluation / "report.html").is_file()
    # an evaluation at work there (it holds its folder's lock): deleted with the old run, it failed (exit 1) and wrote
    # its record again into the new run folder
    import fcntl

    fd = os.open(evaluation, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _state(tmp_path)
        code, text = _cli(overwrite, capsys)
    finally:
        os.close(fd)
    assert code == 2 and "--overwrite would delete eval-tiny, which a `lora-run eval` is writing now" in text, text
    assert _state(tmp_path) == before
    (evaluation / "notes.txt").write_text("the second seed looked best")    # the user's file makes it theirs
    before = _state(tmp_path)
    code, text = _cli(overwrite, capsys)
    assert code == 2 and "(eval-tiny)" in text and "other files, is left to you" in text, text
    assert _state(tmp_path) == before
    (evaluation / "notes.txt").unlink()
    code, text = _cli(overwrite, capsys)
    assert code == 0, text
    assert not evaluation.exists() and (run / "tiny.safetensors").is_file()
    figures("run-folder safety", cases=4, faults=3)


def test_an_output_record_proves_only_what_it_lists(tmp_path):
    """``record.unrecorded``: a folder is a writer's only with its record (a regular file of lora-run's form) and
    only the entries it lists (temporary files of atomic writes aside)."""
    from lora_run_rundir.record import OUTPUT_RECORD, unrecorded, write_output_record

    folder = tmp_path / "eval-x"
    write_output_record(folder, "evaluation", ["metrics.json", "images"])
    (folder / "metrics.json").write_text("{}")
    (folder / ".metrics.json.abcd1234.tmp").write_text("")
    assert unrecorded(folder, "evaluation") == [] and unrecorded(folder, "other") is None
    (folder / "report.html").write_text("")
    assert unrecorded(folder, "evaluation") == ["report.html"]
    (folder / "link").symlink_to(folder)
    assert unrecorded(folder / "link", "evaluation") is None
    record = folder / OUTPUT_RECORD
    text = record.read_text()
    record.unlink()
    (tmp_path / "elsewhere.json").write_text(text)
    record.symlink_to(tmp_path / "elsewhere.json")           # a link is no record
    assert unrecorded(folder, "evaluation") is None
    record.unlink()
    record.write_text('{"lora_run_output": "evaluation", "entries": ["../x"]}')
    assert unrecorded(folder, "evaluation") is None


# ----------------------------------------------------------------------- files added inside a run while it runs
class _AddsWhileRunning:
    """A user adding files inside the run's folders between its steps (after its first checkpoint and samples)."""

    from lora_run.hookspecs import hookimpl

    def __init__(self):
        self.added: dict[Path, bytes] = {}

    @hookimpl
    def step_finished(self, run, step, metrics):
        if step != 3 or self.added:
            return
        for rel in ("samples/picked/best.png", "checkpoints/notes.txt", "samples/step-000002/mine.png", "logs/x.txt"):
            path = run.run_dir.file(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"the user's")
            self.added[path] = b"the user's"


@pytest.mark.slow     # a real tiny native run (about 10 s on CPU)
def test_a_native_run_never_takes_a_file_added_inside_its_folders_while_it_runs(tiny_recipe, tmp_path, capsys):
    """The native trainer's checkpoints, samples, loss log and final LoRA are listed as the run's by the writers
    themselves; files a user adds in `samples/`, `checkpoints/` (and a sample round's folder) meanwhile are not,
    and `lora-run --overwrite` refuses to delete them, naming them (exit 2). The tracker's `logs/` is the run's while
    it runs (documented): a file added there is taken. The control: `--overwrite` of the same run without the
    user's files replaces it."""
    import json

    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    recipe = tiny_recipe('[sample]\nevery_steps = 2\nseeds = [1]\nsteps = 2\nwidth = 64\nheight = 64\n'
                         'prompts = ["a photo of {trigger}"]\n')
    run, user = tmp_path / "run", _AddsWhileRunning()
    execute(load_recipe(recipe), load_plugins(extra=[user]), output_dir=str(run), echo=lambda _m: None)
    manifest = json.loads((run / "manifest.json").read_text())
    files = set(manifest["files"])
    assert manifest["status"] == "completed" and manifest["writing"] == []
    assert {"samples/step-000002", "samples/step-000006", "checkpoints/step-000004", "eval/loss.jsonl"} <= files, files
    assert not files & {"samples/picked", "checkpoints/notes.txt", "samples/step-000002/mine.png"}, files
    code, text = _cli([str(recipe), "--output-dir", str(run), "--overwrite"], capsys)
    assert code == 2, text
    for name in ("samples/picked", "checkpoints/notes.txt", "samples/step-000002/mine.png"):
        assert name in text, text
    assert all(p.read_bytes() == data for p, data in user.added.items())
    for path in user.added:                  # the control: without them, the run is replaced
        if not path.name == "x.txt":
            path.unlink()
    (run / "samples" / "picked").rmdir()
    code, text = _cli([str(recipe), "--output-dir", str(run), "--overwrite"], capsys)
    assert code == 0, text
