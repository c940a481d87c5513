"""Resume trusts nothing it finds: a changed dataset is refused, damaged checkpoints are detected by their
recorded sizes and checksums, cache entries are verified, our own temporary files are cleaned up, and a
full disk ends every time with one line naming the file and a manifest in a final state."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from lora_run.cli import main

from .conftest import RECIPE


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model):
    """One finished tiny run (6 steps, checkpoints 2 and 4 kept) that each test copies."""
    from lora_run_devtools.testing import make_images

    root = tmp_path_factory.mktemp("base")
    make_images(root / "data", count=3, size=(96, 80))
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE.replace("{model}", str(tiny_model)).replace("{dataset}", str(root / "data")),
                      encoding="utf-8")
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert main([str(recipe), "--output-dir", str(root / "run")]) == 0
    return root


def _copy(base: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(recipe, run, data) copies of the base run; the recipe points at the copied dataset."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(base / "data", data)
    shutil.copytree(base / "run", run, symlinks=True)
    text = (base / "recipe.toml").read_text("utf-8").replace(str(base / "data"), str(data))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text, encoding="utf-8")
    # the saved resolved recipe names the base dataset: point it at the copy as well
    saved = run / "recipe.toml"
    saved.write_text(saved.read_text("utf-8").replace(str(base / "data"), str(data)), encoding="utf-8")
    return recipe, run, data


def _status(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["status"]


# ----------------------------------------------------------------------------------- dataset changes
@pytest.mark.slow
def test_resume_refuses_a_changed_dataset_naming_the_files(base_run, tmp_path, capsys, figures):
    recipe, run, data = _copy(base_run, tmp_path)
    manifest_before = (run / "manifest.json").read_bytes()
    png = sorted(data.glob("*.png"))
    edits = {
        "added image subject/extra.png": lambda: (shutil.copy(png[0], data / "extra.png"),
                                                  (data / "extra.txt").write_text("ohwx, another")),
        "caption of subject/img001.png changed": lambda: (data / "img001.txt").write_text("ohwx, edited"),
        "removed image subject/img002.png": lambda: ((data / "img002.png").unlink(), (data / "img002.txt").unlink()),
        "image subject/img000.png changed": lambda: png[0].write_bytes(png[1].read_bytes()),
    }
    seen = []
    for text, edit in edits.items():
        edit()
        seen.append(text)
        code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
        err = capsys.readouterr().err
        assert code == 2 and "the dataset changed since the run started" in err, err
        for earlier in seen:
            assert earlier in err, (earlier, err)
        assert "--allow-dataset-change" in err and "Traceback" not in err
        assert (run / "manifest.json").read_bytes() == manifest_before, "a refused resume writes nothing"
    code = main([str(recipe), "--resume", "--allow-dataset-change", "--output-dir", str(run), "--set", "train.steps=8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest.get("dataset_change_allowed_at")
    assert set(json.loads((run / "dataset.json").read_text())["files"]) == {
        "subject/img000.png", "subject/img001.png", "subject/extra.png"}
    code = main([str(recipe), "--allow-dataset-change", "--output-dir", str(tmp_path / "new")])
    assert code == 2 and "only applies with --resume" in capsys.readouterr().err
    figures("resume integrity", cases=len(edits) + 2, faults=len(edits) + 2)


DATASET_RECORD_DAMAGE = {
    "not JSON": lambda p: p.write_text("garbage"),
    "nested too deeply": lambda p: p.write_text("[" * 100_000),
    "a list": lambda p: p.write_text("[1, 2]"),
    "files not a table": lambda p: p.write_text('{"files": 5}'),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DATASET_RECORD_DAMAGE))
def test_a_damaged_dataset_record_never_lets_a_changed_dataset_through(base_run, tmp_path, capsys, damage):
    """The per-file record `dataset.json` damaged (not JSON, of another shape) counted as "no change", and the
    manifest's hash of the whole dataset was compared only when the record was missing: a dataset with an added image
    resumed silently (exit 0). A record that does not read as one now falls back to that hash (the files cannot be
    named), as a missing one did; with the dataset unchanged the resume goes on (RECORD_DAMAGE's cases)."""
    recipe, run, data = _copy(base_run, tmp_path)
    record = run / "dataset.json"
    DATASET_RECORD_DAMAGE[damage](record)
    png = sorted(data.glob("*.png"))
    shutil.copy(png[0], data / "extra.png")
    (data / "extra.txt").write_text("ohwx, another")
    manifest_before = (run / "manifest.json").read_bytes()
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    err = capsys.readouterr().err
    assert code == 2 and "the dataset changed since the run started" in err and "the dataset hash differs" in err, err
    assert "dataset.json is " + ("missing" if damage == "deleted" else "damaged") in err, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert (run / "manifest.json").read_bytes() == manifest_before, "a refused resume writes nothing"


# ------------------------------------------------------------------------------------ checkpoints
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "optimizer truncated": ("resume/optimizer.safetensors", _truncate),
    "trainable emptied": ("resume/trainable.safetensors", lambda p: p.write_bytes(b"")),
    "rng bit flipped": ("resume/rng.safetensors", _flip),
    "state not JSON": ("resume/state.json", lambda p: p.write_text('{"step": ')),
    "state emptied": ("resume/state.json", lambda p: p.write_bytes(b"")),
    "state deleted": ("resume/state.json", lambda p: p.unlink()),
    "state linked to /dev/zero": ("resume/state.json", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
    "optimizer linked to /dev/zero": ("resume/optimizer.safetensors",
                                      lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(base_run, tmp_path, capsys, damage, figures):
    recipe, run, _ = _copy(base_run, tmp_path)
    rel, hurt = DAMAGE[damage]
    newest = run / "checkpoints" / "step-000004"
    hurt(newest / rel)
    # our temp files of an interrupted write are removed on resume; files that only look alike are not
    ours = [run / ".tiny.safetensors.q1w2e3r4.tmp", run / "diffusers" / ".tiny.safetensors.a1s2d3f4.tmp"]
    theirs = [run / ".notes.tmp", run / "keep.q1w2e3r4.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"half")
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text[-2000:]
    assert "warning: checkpoint step-000004 is damaged" in text and rel.split("/")[-1] in text, text[-2000:]
    assert "resumed from" in text and "step-000002 (step 2 of 8)" in text, text[-2000:]
    assert (run / "checkpoints" / "step-000004.damaged").is_dir(), "the damaged checkpoint is kept aside"
    assert "Traceback" not in text
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert _status(run) == "completed"
    figures("resume integrity", cases=1, faults=1)


@pytest.mark.slow
def test_no_usable_checkpoint_names_every_damaged_file(base_run, tmp_path, capsys, figures):
    recipe, run, _ = _copy(base_run, tmp_path)
    (run / "checkpoints" / "step-000004" / "resume" / "state.json").write_bytes(b"")
    _truncate(run / "checkpoints" / "step-000002" / "resume" / "trainable.safetensors")
    for attempt in range(2):          # the damaged ones stay where they are: the second resume says the same
        code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "no usable checkpoint to resume from" in err and "step-000004/resume/state.json" in err, err
        assert "step-000002/resume/trainable.safetensors" in err and "--overwrite" in err, err
        assert "Traceback" not in err
        assert _status(run) == "failed", "the manifest ends in a final state"
    figures("resume integrity", cases=2, faults=2)


# ---------------------------------------------------------------------------------------- cache
def test_cache_entries_are_verified_and_rebuilt(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_run_native.cache import FORMAT_VERSION, Cache, odd_latents, tensor_record

    cache = Cache(tmp_path, "latents")
    z = torch.randn(4, 8, 10)
    bucket = (80, 64)                               # (width, height): latents of 8x smaller sides
    key = "a" * 64

    def ok(t):
        from lora_run_native.cache import latent_geometry
        return None if latent_geometry(t["latent"], bucket) else "shape"

    cache.store(key, {"latent": z})
    assert torch.equal(cache.load(key, {"latent": torch.float32}, check=ok)["latent"], z)
    # one flipped bit in the tensor bytes: the recorded checksum catches it
    path = cache.path(key)
    _flip(path)
    assert cache.load(key, {"latent": torch.float32}, check=ok) is None and not path.exists()
    # the wrong shape with a fully consistent record (key, version and its own checksum): the bucket check
    wrong = torch.randn(4, 9, 10)
    save_file({"latent": wrong}, str(path), metadata={"key": key, "version": FORMAT_VERSION, "kind": "latents",
                                                      "source": "", "tensors": json.dumps({"latent": tensor_record(wrong)})})
    assert cache.load(key, {"latent": torch.float32}, check=ok) is None
    # an old-style entry (key and version right, no per-tensor record) is not trusted either
    save_file({"latent": z}, str(path), metadata={"key": key, "version": FORMAT_VERSION})
    assert cache.load(key, {"latent": torch.float32}) is None
    assert cache.stats.corrupt == 3
    # shaped like some bucket but unlike the run's other latents: rebuilt
    latents = {0: torch.zeros(4, 8, 10), 1: torch.zeros(4, 8, 10), 2: torch.zeros(16, 4, 5)}
    assert odd_latents(latents, [bucket, bucket, bucket]) == [2]
    # planted mistake: the geometry check must reject what it should (a check that accepts all would pass here)
    from lora_run_native.cache import latent_geometry
    assert latent_geometry(torch.zeros(4, 8, 10), bucket) == (4, 8)
    assert latent_geometry(torch.zeros(4, 9, 10), bucket) is None and latent_geometry(torch.zeros(8, 10), bucket) is None


def test_a_tampered_cache_index_never_deletes_outside_the_cache(tmp_path):
    import torch

    from lora_run_native.cache import Cache

    victim = tmp_path / "victim.safetensors"
    victim.write_text("not the cache's")
    root = tmp_path / "cache"
    (root / "latents").mkdir(parents=True)
    (root / "latents" / "index.json").write_text(json.dumps({"img|64x64": "../../victim", "x": "../" * 5 + "etc"}))
    cache = Cache(root, "latents")
    assert cache.load("b" * 64, {"latent": torch.float32}, source="img|64x64") is None
    assert victim.read_text() == "not the cache's"


@pytest.mark.slow
def test_a_bit_flipped_latent_is_rebuilt_in_a_real_run(base_run, tmp_path, capsys):
    recipe, run, _ = _copy(base_run, tmp_path)
    entries = sorted((run / "cache" / "latents").rglob("*.safetensors"))
    assert entries
    _flip(entries[0])
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=7"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 corrupt rebuilt" in out, out[-1500:]


# ------------------------------------------------------------------------------------------ disk full
class FullDisk:
    """os.fsync fails with ENOSPC for files whose path matches: every atomic write (and the checkpoint's
    state.json) fsyncs before its rename, so this is where a real full disk is noticed at the latest."""

    def __init__(self, monkeypatch, match):
        real = os.fsync
        self.hits: list[str] = []

        def fsync(fd):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if match(path):
                self.hits.append(path)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_disk_full_before_recipe_toml_leaves_nothing(tiny_recipe, tmp_path, monkeypatch, capsys, figures):
    full = FullDisk(monkeypatch, lambda p: ".recipe.toml." in p)
    run = tmp_path / "run"
    code = main([str(tiny_recipe()), "--output-dir", str(run)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and full.hits
    assert "recipe.toml: No space left on device (writing it needs about" in line and "free now" in line, line
    assert not run.exists(), "nothing of value was written: nothing is left to block the retry"
    figures("disk-full", cases=1, faults=1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_disk_full_while_caching_names_the_entry_and_finishes_the_manifest(tiny_recipe, tmp_path, monkeypatch,
                                                                         capsys, figures):
    full = FullDisk(monkeypatch, lambda p: "/cache/latents/" in p)
    run = tmp_path / "run"
    code = main([str(tiny_recipe()), "--output-dir", str(run)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and full.hits
    assert "/cache/latents/" in line and ".safetensors: No space left on device" in line and "needs about" in line
    assert _status(run) == "failed"
    assert not list(run.rglob("*.tmp")), "no temporary file is left behind"
    assert not (run / ".lora-run.reserve").exists()
    figures("disk-full", cases=1, faults=1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_disk_full_at_the_final_lora_keeps_the_checkpoints(tiny_recipe, tmp_path, monkeypatch, capsys, figures):
    run = tmp_path / "run"
    full = FullDisk(monkeypatch, lambda p: p.startswith(str(run / ".tiny.safetensors.")))
    code = main([str(tiny_recipe()), "--output-dir", str(run)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and full.hits
    assert f"{run / 'tiny.safetensors'}: No space left on device (writing it needs about" in line, line
    assert (run / "checkpoints" / "step-000004" / "resume" / "state.json").is_file()
    assert _status(run) == "failed" and not (run / "tiny.safetensors").exists()
    assert not list(run.glob(".tiny.safetensors.*")), "the torn temporary file is removed"
    figures("disk-full", cases=1, faults=1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_resume_on_a_still_full_disk(base_run, tmp_path, monkeypatch, capsys, figures):
    recipe, run, _ = _copy(base_run, tmp_path)
    manifest = (run / "manifest.json").read_bytes()
    FullDisk(monkeypatch, lambda p: p.startswith(str(run)))
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    err = capsys.readouterr().err
    assert code == 1
    assert "No space left on device" in _one_error_line(err) and "recipe.toml" in err, err
    assert (run / "manifest.json").read_bytes() == manifest and _status(run) == "completed", \
        "the manifest keeps its earlier final state"
    monkeypatch.undo()
    figures("disk-full", cases=1, faults=1)


@pytest.mark.slow
def test_the_final_lora_is_written_before_the_final_samples(tiny_recipe, tmp_path, monkeypatch, capsys):
    from lora_run_native.train import Trainer

    real = Trainer._samples

    def fail_at_the_end(self, state, number):
        if number == state.total:
            raise RuntimeError("sampling crashed")
        return real(self, state, number)
    monkeypatch.setattr(Trainer, "_samples", fail_at_the_end)
    run = tmp_path / "run"
    recipe = tiny_recipe('[sample]\nprompts = ["a photo of {trigger}"]\nevery_steps = 100\nsteps = 1\n'
                         'width = 64\nheight = 64\n')
    code = main([str(recipe), "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and "sampling crashed" in err
    assert (run / "tiny.safetensors").is_file() and (run / "diffusers" / "tiny.safetensors").is_file()


# ------------------------------------------------------------------- damaged records of the run folder itself
def _manifest_edit(**fields):
    def edit(run: Path) -> None:
        data = json.loads((run / "manifest.json").read_text())
        data.update(fields)
        (run / "manifest.json").write_text(json.dumps(data))
    return edit


def _deep(path: Path) -> None:
    path.write_text("[" * 100_000)


RECORD_DAMAGE = {   # name: (damage, what the error names; None: the resume goes on)
    "manifest dataset a string": (_manifest_edit(dataset="x", resumed_at=5), None),
    "manifest dataset a list": (_manifest_edit(dataset=[1, {"hash": 2}], artifacts=[3]), None),
    "dataset.json entries not tables": (lambda run: (run / "dataset.json").write_text(
        json.dumps({"files": {"subject/img000.png": "x", "subject/img001.png": [1]}})), "dataset changed"),
    "manifest a folder": (lambda run: ((run / "manifest.json").unlink(), (run / "manifest.json").mkdir()),
                          "manifest.json is not a regular file"),
    # a damaged manifest: the resume rewrote it with an empty "written" list, so lora-run forgot what it wrote here
    "manifest not JSON": (lambda run: (run / "manifest.json").write_text('{"lora_run_version": "0.'),
                          "manifest.json: cannot resume: the manifest is not valid JSON"),
    "manifest emptied": (lambda run: (run / "manifest.json").write_bytes(b""), "the manifest is not valid JSON"),
    "manifest not UTF-8": (lambda run: (run / "manifest.json").write_bytes(b'{"a": "\xff"}'), "is not UTF-8 text"),
    "manifest a list": (lambda run: (run / "manifest.json").write_text("[1, 2]"), "is not a JSON object (a list)"),
    "manifest an empty object": (lambda run: (run / "manifest.json").write_text("{}"),
                                 "is not one lora-run wrote (no lora_run_version)"),
    "manifest written not a list": (_manifest_edit(written="checkpoints"), 'has a damaged "written" list'),
    "manifest written holding a number": (_manifest_edit(written=["checkpoints", 7]), 'has a damaged "written" list'),
    "manifest status a number": (_manifest_edit(status=3), 'has a damaged "status"'),
    # the manifest is named first: the other resume checks read it (a checkpoint it lists is lora-run's)
    "manifest not JSON and a checkpoint's state deleted": (
        lambda run: ((run / "manifest.json").write_text("{"),
                     (run / "checkpoints" / "step-000004" / "resume" / "state.json").unlink()),
        "manifest.json: cannot resume: the manifest is not valid JSON"),
    "manifest deleted": (lambda run: (run / "manifest.json").unlink(),
                         "the manifest is missing, while the folder holds what runs write after it (cache, checkpoints"),
    # an engine backend's working folder: its resume writes configs, stages and prunes there (in a link's target)
    "kohya a link to the dataset": (lambda run: (run / "kohya").symlink_to(run.parent / "data", target_is_directory=True),
                                    "kohya is not a folder"),
    "diffusion-pipe a link": (lambda run: (run / "diffusion-pipe").symlink_to(run.parent), "diffusion-pipe is not a folder"),
    "checkpoints a file": (lambda run: (shutil.rmtree(run / "checkpoints"), (run / "checkpoints").write_text("x")),
                           "checkpoints is not a folder"),
    # a file or a link under a checkpoint's name: the resume trained up to that step and then crashed writing it
    # ("NotADirectoryError", exit 1)
    "a checkpoint a file": (lambda run: (shutil.rmtree(run / "checkpoints" / "step-000004"),
                                         (run / "checkpoints" / "step-000004").write_text("x")),
                            "checkpoints/step-000004 is not a folder"),
    "a link where the next checkpoint goes": (lambda run: (run / "checkpoints" / "step-000006").symlink_to(
        run.parent / "data", target_is_directory=True), "checkpoints/step-000006 is a link"),
    "a dangling link where the next checkpoint goes": (
        lambda run: (run / "checkpoints" / "step-000006").symlink_to(run / "nowhere"), "step-000006 is a link"),
    # an older checkpoint's state: listing the kept checkpoints after the next save crashed (JSONDecodeError)
    "an older checkpoint's state not JSON": (
        lambda run: (run / "checkpoints" / "step-000002" / "resume" / "state.json").write_text("{"), None),
    "an older checkpoint's LoRA list not a table": (
        lambda run: (run / "checkpoints" / "step-000002" / "resume" / "state.json").write_text('{"loras": 5}'), None),
    # JSON nested past the decoder's recursion limit (a few bytes a level): "unexpected RecursionError" (exit 1) from
    # the manifest check, the dataset check, the checkpoint scan and the cache index alike
    "manifest nested too deeply": (lambda run: _deep(run / "manifest.json"),
                                   "manifest.json: cannot resume: the manifest cannot be read (the JSON is nested too "
                                   "deeply to read)"),
    "dataset.json nested too deeply": (lambda run: _deep(run / "dataset.json"), None),
    "the newest checkpoint's state nested too deeply": (
        lambda run: _deep(run / "checkpoints" / "step-000004" / "resume" / "state.json"), None),
    "an older checkpoint's state nested too deeply": (
        lambda run: _deep(run / "checkpoints" / "step-000002" / "resume" / "state.json"), None),
    "the cache index nested too deeply": (lambda run: _deep(run / "cache" / "latents" / "index.json"), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_resume_of_a_run_folder_with_damaged_records_is_refused_or_goes_on(base_run, tmp_path, capsys, damage,
                                                                          figures):
    """A manifest or dataset record whose values have the wrong JSON type crashed `--resume` with "unexpected
    AttributeError" (exit 1); a folder where the manifest was, or a file where checkpoints go, let the resume
    train and then fail writing there (exit 1). Now the wrong types are not trusted (a damaged dataset record
    counts as a changed dataset), and misshapen entries are refused before anything runs (exit 2, named). A
    manifest that is damaged as a whole (not JSON, not lora-run's, its `written` list or `status` of the wrong type,
    deleted) was rewritten by the resume with an empty `written` list: it is refused, naming the manifest."""
    recipe, run, _ = _copy(base_run, tmp_path)
    hurt, named = RECORD_DAMAGE[damage]
    hurt(run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    err = capsys.readouterr().err
    assert "unexpected" not in err and "Traceback" not in err, err
    if named is None:
        assert code == 0, err
        assert _status(run) == "completed"
    else:
        assert code == 2 and named in err, err
        assert len(err.strip().splitlines()) == 1 and ("restore it" in err or "move it out" in err), err
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before    # nothing written
    figures("resume integrity", cases=1, faults=1)


def _without_recorded_recipe(run: Path) -> None:
    """The checkpoints as an older version wrote them (their state records no recipe)."""
    for state in run.glob("checkpoints/*/resume/state.json"):
        data = json.loads(state.read_text())
        data.pop("recipe")
        state.write_text(json.dumps(data))


@pytest.mark.slow
@pytest.mark.parametrize("change", ["lora.rank=8", 'lora.targets="attention"', 'optimizer.name="adafactor"',
                                    'scheduler.name="constant"', "train.gradient_accumulation=2"])
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "older-checkpoint"])
def test_a_checkpoint_of_another_recipe_is_refused(base_run, tmp_path, capsys, change, recorded, figures):
    """The recipe check of `--resume` compares with the run folder's recipe.toml; with that file gone (or the
    checkpoints copied from another run) a checkpoint of another rank crashed ("unexpected RuntimeError", exit 1),
    of another optimizer crashed at the first step (KeyError), of other targets ended "the checkpoint's LoRA does
    not match" (exit 1), and of another schedule or accumulation trained on silently. Checkpoints now record their
    recipe and are compared before anything is written; an older checkpoint, recording none, is compared with the
    model and optimizer it is loaded into (exit 2, named)."""
    recipe, run, _ = _copy(base_run, tmp_path)
    (run / "recipe.toml").unlink()
    if not recorded:
        _without_recorded_recipe(run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8", "--set", change])
    err = capsys.readouterr().err
    assert "unexpected" not in err and "Traceback" not in err and "crashed" not in err, err
    if recorded:
        key = change.split("=")[0]
        assert code == 2 and "step-000004/resume/state.json: that checkpoint was trained with another recipe" in err \
            and f"[{key}]" in err, err
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before        # nothing written
    elif change.startswith(("lora.", "optimizer.")):
        assert code == 2 and "step-000004: cannot resume: the checkpoint's" in err, err
    else:   # an older checkpoint holds nothing that tells these apart
        assert code == 0, err
    figures("resume integrity", cases=1, faults=1)


@pytest.mark.slow
def test_a_resume_shorter_than_its_newest_checkpoint_is_refused(base_run, tmp_path, capsys, figures):
    """A killed run whose `[train] steps` (or `epochs`) was lowered below its newest checkpoint on `--resume`
    trained nothing, wrote that checkpoint's LoRA as the final LoRA of the shorter run and ended "completed" ("resumed
    from …step-000004 (step 4 of 3)"). It is refused naming the key: before anything is written where the checkpoint
    records its length (an epoch's batches for `epochs`), else once the checkpoint is loaded (exit 2 either way)."""
    recipe, run, _ = _copy(base_run, tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "running"                    # as a SIGKILL leaves it
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"}
    for sets, key, total in ((["train.steps=3"], "train.steps", 3),
                             (["train.epochs=1"], "train.epochs", 3)):     # 3 images, batch 1: 3 steps an epoch
        argv = [str(recipe), "--resume", "--output-dir", str(run)] + [a for s in sets for a in ("--set", s)]
        if key == "train.epochs":
            argv += ["--unset", "train.steps"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"step-000004: that checkpoint has trained 4 steps, more than the {total} [{key}] gives " \
            "now" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"} == before
    state = run / "checkpoints" / "step-000004" / "resume" / "state.json"      # an older checkpoint records no
    data = json.loads(state.read_text())                                        # epoch length: refused once loaded
    del data["batches_per_epoch"]
    state.write_text(json.dumps(data), encoding="utf-8")
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--unset", "train.steps", "--set", "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "more than the 3 [train.epochs] gives now" in err and "Traceback" not in err, err
    assert (run / "tiny.safetensors").read_bytes() == before[run / "tiny.safetensors"], "the LoRA is kept"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    figures("resume integrity", cases=3, faults=3)


# ------------------------------------------------------------------------------ where the run folder is
@pytest.mark.slow
def test_a_run_folder_resumes_from_another_working_folder(base_run, tmp_path, capsys, monkeypatch, figures):
    """The recipe's `[output] dir` (the default `runs/{name}`) resolves against the working folder; resumed from
    another one with `--output-dir` naming the run folder, the resume was refused as "the recipe changed at
    [output.dir]". The folder resumed is the one named. The run folder's recipe records the folder itself as its
    `[output] dir`, so re-running it finds that folder: it recorded the recipe's `runs/{name}` when `--output-dir`
    named the folder, and `lora-run RUN/recipe.toml --resume` (the "Re-run with" its header prints) looked there."""
    recipe, run, _ = _copy(base_run, tmp_path)
    def recorded() -> list[str]:
        return [line for line in (run / "recipe.toml").read_text("utf-8").splitlines() if line.startswith("dir = ")]
    assert recorded() == [f'dir = "{base_run / "run"}"']       # the base run's own folder (--output-dir named it)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "[output.dir]" not in out.err and "step-000004 (step 4 of 8)" in out.out + out.err
    assert _status(run) == "completed" and not any(elsewhere.iterdir()), "nothing is written where it was run from"
    assert recorded() == [f'dir = "{run}"']                    # the folder it is in now (a copy)
    # the recorded recipe, re-run from anywhere, trains on in its own folder
    code = main([str(run / "recipe.toml"), "--resume", "--set", "train.steps=9"])
    out = capsys.readouterr()
    assert code == 0 and "resumed from" in out.out + out.err, (out.out + out.err)[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["invocations"][-1]["steps"][1] == 9
    assert not any(elsewhere.iterdir())
    # a changed recipe is still refused from there, naming the key
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=10", "--set", "lora.rank=8"])
    assert code == 2 and "[lora.rank]" in capsys.readouterr().err
    figures("resume integrity", cases=2, faults=2)


# ------------------------------------------------------------------ checkpoint folders lora-run did not write
def _tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


FOREIGN_CHECKPOINTS = {   # name: (the folder lora-run did not write, what goes into it)
    "an empty folder at the next step": ("step-000006", {}),
    "a folder of the user's files at a later step": ("step-000010", {"picked.txt": "mine"}),
    "an empty folder older than the intact checkpoints": ("step-000001", {}),
    "a folder holding a state.json that is not a checkpoint's": ("step-000008", {"resume/state.json": '{"step": 8}'}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FOREIGN_CHECKPOINTS))
def test_a_checkpoint_folder_lora_run_did_not_write_is_refused_not_renamed(base_run, tmp_path, capsys, case,
                                                                           figures):
    """An empty folder a user made at `checkpoints/step-000006` was taken for a damaged checkpoint and renamed to
    `step-000006.damaged` by `--resume`. A folder under a checkpoint's name that holds no checkpoint state and that the
    manifest does not record among the checkpoints runs saved is not lora-run's: the resume is refused before
    anything is written (exit 2, naming it), and nothing in it or around it is renamed, deleted or written."""
    recipe, run, _ = _copy(base_run, tmp_path)
    name, files = FOREIGN_CHECKPOINTS[case]
    folder = run / "checkpoints" / name
    folder.mkdir()
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    before, manifest = _tree(run), (run / "manifest.json").read_bytes()
    for _attempt in range(2):     # and it says the same again: nothing was moved
        code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=12"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"cannot resume: checkpoints/{name} is a folder lora-run did not write" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "move it out" in err, err
        assert _tree(run) == before and (run / "manifest.json").read_bytes() == manifest
    assert all((folder / rel).read_text() == text for rel, text in files.items())
    # moved out of the run folder by the user, as the message says, the resume goes on
    folder.rename(tmp_path / name)
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    assert code == 0, capsys.readouterr().err[-2000:]
    figures("resume integrity", cases=2, faults=2)


@pytest.mark.slow
def test_a_damaged_checkpoint_of_a_killed_run_is_still_known_as_lora_runs(tiny_recipe, tmp_path, monkeypatch, capsys,
                                                                         figures):
    """A checkpoint lora-run wrote whose state was damaged since is moved aside as before, also after a kill, when
    the run's final manifest (with its artifacts) was never written: the manifest records the checkpoints after every
    save. The run is stopped in effect after step 5 by putting back the manifest it had then."""
    from lora_run_native.train import Trainer

    real, seen = Trainer._micro_step, {}

    def micro(self, state, batch, step, *a, **kw):
        if step + 1 == 5 and "manifest" not in seen:   # after the checkpoints of steps 2 and 4
            seen["manifest"] = (run / "manifest.json").read_bytes()
        return real(self, state, batch, step, *a, **kw)
    monkeypatch.setattr(Trainer, "_micro_step", micro)
    run, recipe = tmp_path / "run", tiny_recipe()
    assert main([str(recipe), "--output-dir", str(run)]) == 0
    monkeypatch.undo()
    (run / "manifest.json").write_bytes(seen["manifest"])        # what a SIGKILL at step 5 leaves
    assert json.loads(seen["manifest"])["status"] == "running"
    (run / "checkpoints" / "step-000004" / "resume" / "state.json").unlink()
    code = main([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=8"])
    text = "".join(capsys.readouterr())
    assert code == 0, text[-2000:]
    assert "warning: checkpoint step-000004 is damaged" in text and "step-000002 (step 2 of 8)" in text, text[-2000:]
    assert (run / "checkpoints" / "step-000004.damaged").is_dir()
    figures("resume integrity", cases=1, faults=1)


@pytest.mark.slow
def test_a_folder_made_where_the_next_checkpoint_goes_is_never_deleted(tiny_recipe, tmp_path, monkeypatch, capsys):
    """A folder that appears where the next checkpoint goes while a run trains was deleted by the checkpoint's save
    (it took it for an incomplete one of its own; lora-run renames checkpoints into place whole, so it never leaves
    one). The save now stops the run naming it (exit 2), the folder and the earlier checkpoint kept."""
    from lora_run_native.train import Trainer

    real = Trainer._micro_step
    run, recipe = tmp_path / "run", tiny_recipe()
    theirs = run / "checkpoints" / "step-000004"

    def micro(self, state, batch, step, *a, **kw):
        if step + 1 == 3 and not theirs.exists():     # checkpoint 2 may still be being written on its thread
            theirs.mkdir(parents=True)
            (theirs / "notes.txt").write_text("mine")
        return real(self, state, batch, step, *a, **kw)
    monkeypatch.setattr(Trainer, "_micro_step", micro)
    code = main([str(recipe), "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "step-000004: something lora-run did not write is where this checkpoint goes" in err, err
    assert "Traceback" not in err and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    assert (run / "checkpoints" / "step-000002" / "resume" / "state.json").is_file()
    assert not list((run / "checkpoints").glob(".step-*")), "the half-written checkpoint is removed"
