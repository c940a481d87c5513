"""The dataset view staged for sd-scripts under a shared `[train] cache_dir`: one folder per staged content, recipe and
model, written aside and renamed into place whole, so recipes (and runs at the same time) never stage over each other's
captions, and sd-scripts' caches beside the images (`*.npz`, which it checks against neither the image nor the
caption) are never reused for an edited image or caption. The same staging as diffusion-pipe's
(`lora_run_engines.stage`; tests/diffusion_pipe/test_staging.py)."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from lora_run.recipe import load_recipe
from lora_run.run import execute
from lora_run_devtools.testing import make_images
import lora_run_engines.stage as stage_module
from lora_run_engines.stage import content_digest
from lora_run_kohya.backend import stage_dataset, wanted_sets
from lora_run_kohya.translate import Paths

from .conftest import RECORDED


def run(recipe: Path, plugins_with, out: Path, *sets: str) -> None:
    execute(load_recipe(recipe, sets), plugins_with(), output_dir=str(out), echo=lambda _line: None)


def staged_subject(out: Path) -> Path:
    """The subject folder the run's generated dataset.toml hands sd-scripts."""
    dataset = tomllib.loads((out / "kohya" / "dataset.toml").read_text("utf-8"))
    return Path(dataset["datasets"][0]["subsets"][0]["image_dir"])


def captions(folder: Path) -> list[str]:
    return sorted(p.read_text("utf-8") for p in folder.glob("*.txt"))


def encoded(folder: Path) -> list[str]:
    """The captions of the stand-in's text-encoder caches (`<stem>_flux_te.npz`): what sd-scripts trains with."""
    return sorted(str(np.load(p)["caption"]) for p in folder.glob("*_flux_te.npz"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (links not followed): (inode, mtime_ns); a rewrite, even an atomic one, changes
    it."""
    return {str(p.relative_to(folder)): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def shared(kohya_recipe, fake_checkout, plugins_with, tmp_path):
    """run(name, *sets) -> the run folder of the FLUX recipe with a shared cache folder and the `prepend` policy."""
    cache = tmp_path / "cache"
    recipe = kohya_recipe(sd_scripts=fake_checkout)

    def go(name: str, *sets: str) -> Path:
        out = tmp_path / name
        run(recipe, plugins_with, out, f"train.cache_dir='{cache}'", "dataset.trigger_policy='prepend'", *sets)
        return out
    go.cache = cache
    return go


@pytest.mark.slow
def test_recipes_differing_only_in_the_trigger_stage_apart(shared):
    """Keyed by the [dataset] table, the family and source, two recipes on one folder whose staged captions differ
    (here through the trigger) could share a folder: each run then rewrote the other's captions and removed its files
    under sd-scripts reading them, and sd-scripts' text-encoder caches of the first captions served the second."""
    a, b = (staged_subject(shared(name, f"dataset.trigger='{trigger}'")) for name, trigger in (("a", "ohwx"),
                                                                                               ("b", "sks")))
    assert a != b and a.parent.parent == b.parent.parent == shared.cache / "kohya-data"
    assert captions(a) == [f"ohwx, a photo number {i}\n" for i in range(4)]
    assert captions(b) == [f"sks, ohwx, a photo number {i}\n" for i in range(4)]
    assert encoded(b) == [f"sks, ohwx, a photo number {i}" for i in range(4)]


@pytest.mark.slow
def test_an_edited_caption_stages_a_new_folder_and_leaves_the_old_one_as_it_was(shared, subject_dataset):
    """The same recipe after a caption was edited: a new folder, cached afresh (sd-scripts would have reused the
    text-encoder cache of the old caption beside an image of the same name), and the folder an earlier run staged,
    with sd-scripts' caches, is left exactly as it was (a run still training on it reads what it staged)."""
    a = shared("a")
    before = snapshot(staged_subject(a))
    assert any(name.endswith("_flux_te.npz") for name in before) and any(n.endswith("_0320x0288_flux.npz") for n in before)
    (subject_dataset / "img000.txt").write_text("ohwx, an edited caption", "utf-8")
    b = shared("b")
    assert staged_subject(b) != staged_subject(a)
    assert "ohwx, an edited caption\n" in captions(staged_subject(b))
    assert "ohwx, an edited caption" in encoded(staged_subject(b))
    assert snapshot(staged_subject(a)) == before
    assert "ohwx, a photo number 0\n" in captions(staged_subject(a))


@pytest.mark.slow
def test_the_stand_ins_caches_are_named_as_the_real_sd_scripts_named_them(kohya_recipe, fake_checkout, plugins_with,
                                                                          subject_dataset, tmp_path):
    """The staged folder the real sd-scripts 48d368f left on CPU (2026-12-05, four 192×160 images, latents and
    text-encoder outputs cached to disk; docs/backend-kohya.md) and the stand-in's on the same images, name for name:
    the latents cache carries the image file's own size (`_0192x0160_flux.npz`), not the recipe's resolution."""
    for old in subject_dataset.iterdir():
        old.unlink()
    make_images(subject_dataset, count=4, size=(192, 160))
    out = tmp_path / "r"
    run(kohya_recipe(sd_scripts=fake_checkout), plugins_with, out, "dataset.resolution=128", "dataset.bucket_min=64",
        "dataset.bucket_max=256")     # the real run's [dataset] (192×160 is below the default bucket_min)

    def hashless(names: list[str]) -> list[str]:    # the recording's NNNNN_<hash>_<stem> and our <stem>_<hash>
        return sorted(re.sub(r"^(?:\d{5}_[0-9a-f]{10}_(img\d{3})|(img\d{3})_[0-9a-f]{10})", r"\1\2_<hash>", name)
                      for name in names)
    recorded = (RECORDED / "cpu-staging-20261205" / "staged_subject.txt").read_text("utf-8").split()
    assert hashless([p.name for p in staged_subject(out).iterdir()]) == hashless(recorded)


@pytest.mark.slow
def test_the_same_recipe_again_reuses_its_folder_and_writes_nothing(shared):
    """A rerun (or a second run at the same time) finds the folder of its content: every link, caption and sd-scripts
    cache stays as it was, not even rewritten with the same bytes."""
    a = shared("a")
    before = snapshot(staged_subject(a))
    b = shared("b")
    assert staged_subject(b) == staged_subject(a)
    assert [p.name for p in (shared.cache / "kohya-data").iterdir()] == [staged_subject(a).parent.name]
    assert snapshot(staged_subject(a)) == before


def test_plan_names_the_folder_the_run_stages(kohya_recipe, fake_checkout, plugins_with, tmp_path):
    """`lora-run plan` (no lint before it) lints to name the folder: its dataset.toml is the run's; `check` (no lint
    either) validates a name of the same form without linting."""
    from lora_run.run import make_backend, open_run_folder, validate

    sets = (f"train.cache_dir='{tmp_path / 'cache'}'",)
    recipe = kohya_recipe(sd_scripts=fake_checkout)
    prepared = validate(load_recipe(recipe, sets), plugins_with())
    plugins = plugins_with()
    plan = make_backend(prepared, plugins, run_dir=open_run_folder(prepared.loaded, plugins,
                                                                     str(tmp_path / "r"))).plan()
    run(recipe, plugins_with, tmp_path / "r", *sets)
    assert plan.files["kohya/dataset.toml"] == (tmp_path / "r" / "kohya" / "dataset.toml").read_text("utf-8")


def _linted(recipe_path: Path, *sets: str):
    from lora_run.plugins import load_plugins
    from lora_run.run import lint

    recipe = load_recipe(recipe_path, sets).recipe
    return recipe, lint(recipe, load_plugins())


def test_a_run_that_publishes_second_uses_the_first_ones_folder(kohya_recipe, tmp_path, monkeypatch):
    """Two runs staging one content at the same time: each writes aside; the one renaming second finds the folder
    there, checks it (rewriting nothing, keeping the caches sd-scripts wrote there already) and removes its own."""
    recipe, report = _linted(kohya_recipe())
    sets = wanted_sets(report.usable, recipe, report)
    paths = Paths(tmp_path, "<sd-scripts>", "python", tmp_path / "cache" / "kohya-data" / "dataset-x")
    real_rename = os.rename
    seen: dict[str, dict] = {}

    def rename(src, dst):
        if not seen:        # the other run gets there first, and its sd-scripts has cached a latent already
            monkeypatch.setattr(stage_module.os, "rename", real_rename)
            stage_dataset(sets, paths)
            image = next(p for p in (Path(dst) / "subject").iterdir() if p.suffix == ".png")
            image.with_name(f"{image.stem}_0512x0512_flux.npz").write_bytes(b"latents")
            seen["theirs"] = snapshot(Path(dst))
            monkeypatch.setattr(stage_module.os, "rename", rename)
        return real_rename(src, dst)

    monkeypatch.setattr(stage_module.os, "rename", rename)
    assert stage_dataset(sets, paths) == {"subject": 4}
    assert snapshot(paths.data_dir) == seen["theirs"]
    assert [p.name for p in paths.data_dir.parent.iterdir()] == ["dataset-x"]    # no hidden staging folder left


def encode(folder: Path) -> list[str]:
    """What sd-scripts does before training, for the images of one staged set folder: the caches it finds missing are
    written (named as it names them: `<stem>_<W>x<H>_flux.npz`, `<stem>_flux_te.npz`), the latents holding the SHA-256
    of the image bytes they were made from, the text-encoder outputs the caption; returns the names written."""
    import hashlib

    from PIL import Image

    written = []
    for image in sorted(p for p in folder.iterdir() if p.suffix == ".png"):
        with Image.open(image) as opened:
            width, height = opened.size
        latents = image.with_name(f"{image.stem}_{width:04d}x{height:04d}_flux.npz")
        if not latents.exists():
            np.savez(latents, image=np.array(hashlib.sha256(image.read_bytes()).hexdigest()))
            written.append(latents.name)
        te = image.with_name(f"{image.stem}_flux_te.npz")
        if not te.exists():
            np.savez(te, caption=np.array(image.with_suffix(".txt").read_text("utf-8").splitlines()[0]))
            written.append(te.name)
    return written


def stale(folder: Path) -> list[str]:
    """The caches in a staged set folder made from another image or caption than the one staged under their name:
    what sd-scripts would train with, wrongly, since it checks neither."""
    import hashlib

    out = []
    for cache in sorted(folder.glob("*.npz")):
        stem, form = re.fullmatch(r"(.+)_(\d{4}x\d{4}_flux|flux_te)\.npz", cache.name).groups()
        image, caption = folder / f"{stem}.png", folder / f"{stem}.txt"
        if form == "flux_te":
            if not caption.exists() or str(np.load(cache)["caption"]) != caption.read_text("utf-8").splitlines()[0]:
                out.append(cache.name)
        elif not image.exists() or str(np.load(cache)["image"]) != hashlib.sha256(image.read_bytes()).hexdigest():
            out.append(cache.name)
    return out


def test_a_rerun_in_the_run_folder_drops_the_caches_of_what_is_no_longer_staged(kohya_recipe, tmp_path,
                                                                                   subject_dataset):
    """Without `[train] cache_dir` the run folder's own `kohya/data` is brought up to date in place (a resume after an
    allowed dataset change): an edited caption is staged under a new name, and sd-scripts' caches of the old name go,
    while those of the images still staged stay."""
    recipe, report = _linted(kohya_recipe())
    paths = Paths(tmp_path, "<sd-scripts>", "python", tmp_path / "kohya" / "data")
    stage_dataset(wanted_sets(report.usable, recipe, report), paths)
    folder = paths.data_dir / "subject"
    encode(folder)
    old = {p.name for p in folder.glob("img000_*")}
    kept = {k: v for k, v in snapshot(folder).items() if not k.startswith("img000_")}
    (subject_dataset / "img000.txt").write_text("ohwx, an edited caption", "utf-8")
    recipe, report = _linted(kohya_recipe())
    stage_dataset(wanted_sets(report.usable, recipe, report), paths)
    assert not old & {p.name for p in folder.iterdir()}
    assert [p.suffix for p in sorted(folder.glob("img000_*"))] == [".png", ".txt"]
    assert {k: v for k, v in snapshot(folder).items() if not k.startswith("img000_")} == kept
    assert all(name.startswith("img000_") for name in encode(folder)) and stale(folder) == []


def test_removing_a_middle_image_renames_nothing_else(kohya_recipe, tmp_path, subject_dataset):
    """Named by their place in the set (`NNNNN_<hash>_<stem>`), the images after a removed one were renamed, their
    caches removed as stale and sd-scripts encoded them again (seen on the real engine, 2026-12-05). Named by content,
    every other image keeps its name, link, caption and caches, untouched; sd-scripts has nothing to encode."""
    recipe, report = _linted(kohya_recipe())
    paths = Paths(tmp_path, "<sd-scripts>", "python", tmp_path / "kohya" / "data")
    stage_dataset(wanted_sets(report.usable, recipe, report), paths)
    folder = paths.data_dir / "subject"
    assert len(encode(folder)) == 8
    before = snapshot(folder)
    for path in subject_dataset.glob("img001.*"):
        path.unlink()
    recipe, report = _linted(kohya_recipe())
    stage_dataset(wanted_sets(report.usable, recipe, report), paths)
    after = snapshot(folder)
    assert after == {k: v for k, v in before.items() if not k.startswith("img001_")}
    assert len(after) == 3 * 4 and encode(folder) == [] and stale(folder) == []


def test_names_are_unique_where_stems_meet(tmp_path):
    """Without the index, two images of the same bytes and caption whose stems meet (`a.png` and `a.PNG`, or `a b.png`
    and `a_b.png` made safe) would share one caption file and one cache; each gets a name of its own, which stays when
    the other goes."""
    from lora_run.dataset import Item
    from lora_run_engines.stage import staged_files

    names = ["a.png", "a.PNG", "a b.png", "a_b.png", "c.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"the same bytes")
    items = [Item(tmp_path / name, "cap", None, "subject") for name in names]

    def stems(chosen):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stage_module, "_image_facts", lambda item, lint, converted: ("same", False))
            wanted = staged_files(chosen, lambda item: "the same caption")
        return {str(item.image.name): n.rsplit(".", 1)[0] for item, n in zip(chosen, [k for k in wanted
                                                                                     if not k.endswith(".txt")])}

    every = stems(items)
    assert len({s.casefold() for s in every.values()}) == len(items)
    fewer = stems([i for i in items if i.image.name != "a b.png"])
    assert fewer["c.png"] == every["c.png"] and fewer["a.png"] == every["a.png"]
    assert stems([i for i in items if i.image.name == "a_b.png"])["a_b.png"] != every["a_b.png"]  # alone: unhashed


def test_the_folder_name_covers_the_staged_content_and_the_model(kohya_recipe, plugins_with, tmp_path):
    """What is staged (captions, images), the [dataset] table and the model files and precisions sd-scripts caches
    with each name another folder; the run's own settings do not."""
    from lora_run.run import make_backend, validate

    recipe, report = _linted(kohya_recipe())
    base = wanted_sets(report.usable, recipe, report)
    assert content_digest(base) == content_digest(wanted_sets(report.usable, recipe, None))   # images read here
    other, _ = _linted(kohya_recipe(), "dataset.trigger_policy='prepend'", "dataset.trigger='sks'")
    assert content_digest(wanted_sets(report.usable, other, report)) != content_digest(base)

    def folder(*sets: str) -> Path:
        prepared = validate(load_recipe(kohya_recipe(), (f"train.cache_dir='{tmp_path / 'c'}'", *sets)), plugins_with())
        return make_backend(prepared, plugins_with()).paths().data_dir

    first = folder()
    assert folder("output.name='other'", "train.steps=9") == first
    vae = tmp_path / "models" / "other-ae.safetensors"
    vae.write_bytes((tmp_path / "models" / "ae.safetensors").read_bytes())
    for sets in (["model.base_precision='fp8'"], ["train.mixed_precision='fp16'"], [f"model.files.vae='{vae}'"]):
        assert folder(*sets) != first, sets
