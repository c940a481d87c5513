"""The staged sets under a shared `[train] cache_dir`: one folder per staged content, recipe and model, written aside
and renamed into place whole, so recipes (and runs at the same time) never stage over each other's captions."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from lora_run.recipe import load_recipe
from lora_run.run import execute
import lora_run_engines.stage as stage_module      # where the publishing (os.rename) is
from lora_run_diffusion_pipe.stage import content_digest, stage, wanted_sets

pytest.importorskip("torch")        # the runs convert the fake engine's LoRA


def run(recipe: Path, plugins_with, out: Path, *sets: str):
    return execute(load_recipe(recipe, sets), plugins_with(), output_dir=str(out), echo=lambda _line: None)


def staged_subject(out: Path) -> Path:
    """The subject folder the run's generated dataset.toml hands diffusion-pipe."""
    dataset = tomllib.loads((out / "diffusion-pipe" / "dataset.toml").read_text("utf-8"))
    return Path(dataset["directory"][0]["path"])


def captions(folder: Path) -> list[str]:
    return sorted(p.read_text("utf-8") for p in folder.glob("*.txt"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (links not followed): (inode, mtime_ns): a rewrite, even an atomic one, changes it."""
    return {str(p.relative_to(folder)): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def shared(dp_recipe, plugins_with, tmp_path, fake_env):
    """run(name, *sets) -> the run folder of the FLUX recipe with a shared cache folder and the `prepend` policy."""
    fake_env()
    cache = tmp_path / "cache"

    def go(name: str, *sets: str) -> Path:
        out = tmp_path / name
        run(dp_recipe(), plugins_with, out, f"train.cache_dir='{cache}'", "dataset.trigger_policy='prepend'", *sets)
        return out
    go.cache = cache
    return go


def test_recipes_differing_only_in_the_trigger_stage_apart(shared):
    """Keyed by the model and dataset paths alone, both recipes staged into one folder: the second's captions (and its
    removal of the first's files) replaced the first's under a run that may still be reading them."""
    a = shared("a", "dataset.trigger='ohwx'")
    b = shared("b", "dataset.trigger='sks'")
    assert staged_subject(a) != staged_subject(b)
    assert {p.parent.parent for p in (staged_subject(a), staged_subject(b))} == {shared.cache / "diffusion-pipe"}
    assert captions(staged_subject(a)) == [f"ohwx, a photo number {i}" for i in range(4)]
    assert captions(staged_subject(b)) == [f"sks, ohwx, a photo number {i}" for i in range(4)]


def test_recipes_differing_only_in_caption_text_stage_apart(shared, subject_dataset):
    """The same images read with other caption files (`caption_extension`), and the same recipe after a caption was
    edited: each gets its own folder, and the folder an earlier run staged is left exactly as it was."""
    for path in sorted(subject_dataset.glob("*.txt")):
        path.with_suffix(".caption").write_text(path.read_text("utf-8").replace("photo", "portrait"), "utf-8")
    a = shared("a")
    before = snapshot(staged_subject(a))
    b = shared("b", "dataset.caption_extension='.caption'")
    assert staged_subject(a) != staged_subject(b)
    assert captions(staged_subject(a)) == [f"ohwx, a photo number {i}" for i in range(4)]
    assert captions(staged_subject(b)) == [f"ohwx, a portrait number {i}" for i in range(4)]
    (subject_dataset / "img000.txt").write_text("ohwx, an edited caption", "utf-8")
    c = shared("c")
    assert staged_subject(c) not in (staged_subject(a), staged_subject(b))
    assert "ohwx, an edited caption" in captions(staged_subject(c))
    after = snapshot(staged_subject(a))
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == \
        {k: v for k, v in before.items() if not k.startswith("cache")}


def test_the_same_recipe_again_reuses_its_folder_and_writes_nothing(shared):
    a = shared("a")
    before = snapshot(staged_subject(a))
    b = shared("b")
    assert staged_subject(b) == staged_subject(a)
    assert [p.name for p in (shared.cache / "diffusion-pipe").iterdir() if not p.name.endswith(".lock")] == \
        [staged_subject(a).parent.name]
    assert {k: v for k, v in snapshot(staged_subject(a)).items() if not k.startswith("cache")} == \
        {k: v for k, v in before.items() if not k.startswith("cache")}


def test_plan_names_the_folder_the_run_stages(dp_recipe, plugins_with, tmp_path, fake_env):
    """`lora-run plan` (no lint before it) lints to name the folder: its dataset.toml is the run's."""
    from lora_run.run import make_backend, open_run_folder, validate

    fake_env()
    sets = (f"train.cache_dir='{tmp_path / 'cache'}'",)
    prepared = validate(load_recipe(dp_recipe(), sets), plugins_with())
    plugins = plugins_with()
    plan = make_backend(prepared, plugins, run_dir=open_run_folder(prepared.loaded, plugins,
                                                                     str(tmp_path / "r"))).plan()
    run(dp_recipe(), plugins_with, tmp_path / "r", *sets)
    assert plan.files["diffusion-pipe/dataset.toml"] == \
        (tmp_path / "r" / "diffusion-pipe" / "dataset.toml").read_text("utf-8")


def _items(recipe_path: Path):
    from lora_run.plugins import load_plugins
    from lora_run.run import lint

    recipe = load_recipe(recipe_path).recipe
    report = lint(recipe, load_plugins())
    return recipe, report


def test_a_run_that_publishes_second_uses_the_first_ones_folder(dp_recipe, tmp_path, monkeypatch):
    """Two runs staging one content at the same time: each writes aside; the one renaming second finds the folder
    there, checks it (rewriting nothing) and removes its own copy."""
    recipe, report = _items(dp_recipe())
    sets = wanted_sets(recipe, report.usable, ["subject"], lint=report)
    root = tmp_path / "cache" / "dataset-x"
    real_rename = os.rename
    seen: dict[str, dict] = {}

    def rename(src, dst):
        if not seen:        # the other run gets there first
            monkeypatch.setattr(stage_module.os, "rename", real_rename)
            stage(sets, Path(dst))
            seen["theirs"] = snapshot(Path(dst))
            monkeypatch.setattr(stage_module.os, "rename", rename)
        return real_rename(src, dst)

    monkeypatch.setattr(stage_module.os, "rename", rename)
    assert stage(sets, root) == {"subject": 4}
    assert snapshot(root) == seen["theirs"]
    assert [p.name for p in root.parent.iterdir()] == ["dataset-x"]       # no hidden staging folder left behind


def test_the_content_digest_covers_what_is_staged(dp_recipe, tmp_path):
    recipe, report = _items(dp_recipe())
    base = wanted_sets(recipe, report.usable, ["subject"], lint=report)
    assert content_digest(base) == content_digest(wanted_sets(recipe, report.usable, ["subject"], lint=report))
    copied = wanted_sets(recipe, report.usable, ["subject"], lint=report, copy=True)
    assert content_digest(copied) != content_digest(base)
    other = load_recipe(dp_recipe(), ["dataset.trigger_policy='prepend'", "dataset.trigger='sks'"]).recipe
    assert content_digest(wanted_sets(other, report.usable, ["subject"], lint=report)) != content_digest(base)
    # without the lint's digests, the images are read here: the same names
    assert wanted_sets(recipe, report.usable, ["subject"]) == base


def test_removing_a_middle_image_renames_nothing_else(dp_recipe, tmp_path, subject_dataset):
    """The run folder's own sets (no `[train] cache_dir`) are brought up to date in place on a resume after an allowed
    dataset change. Named by their place in the set, every image after a removed one was renamed; named by content,
    each other file keeps its name and is left untouched, and so does diffusion-pipe's `cache/` (diffusion-pipe
    itself decides what of it to keep: its fingerprint covers the set's whole file list)."""
    recipe, report = _items(dp_recipe())
    root = tmp_path / "diffusion-pipe" / "data"
    stage(wanted_sets(recipe, report.usable, ["subject"], lint=report), root)
    (root / "subject" / "cache").mkdir()
    (root / "subject" / "cache" / "kept").write_text("diffusion-pipe's")
    before = snapshot(root / "subject")
    for path in subject_dataset.glob("img001.*"):
        path.unlink()
    recipe, report = _items(dp_recipe())
    assert stage(wanted_sets(recipe, report.usable, ["subject"], lint=report), root) == {"subject": 3}
    assert snapshot(root / "subject") == {k: v for k, v in before.items() if not k.startswith("img001_")}


def test_remove_old_staging_removes_the_earlier_folders_no_run_uses(shared, subject_dataset):
    """Without `remove_old_staging` every folder stays; with it the run removes the folders earlier runs of this
    recipe staged (lora-run's marker, the same key), unless a run still holds one."""
    from lora_run_engines.stage import use

    a = staged_subject(shared("a")).parent
    (subject_dataset / "img000.txt").write_text("ohwx, edited", "utf-8")
    b = staged_subject(shared("b")).parent
    assert a.is_dir() and b.is_dir()
    other = staged_subject(shared("other", "dataset.trigger='sks'")).parent      # another recipe's folder
    (subject_dataset / "img000.txt").write_text("ohwx, edited twice", "utf-8")
    held = use(b)
    try:
        c = staged_subject(shared("c", "backend.diffusion-pipe.remove_old_staging=true")).parent
    finally:
        os.close(held)
    assert not a.exists() and b.is_dir() and c.is_dir() and other.is_dir()
