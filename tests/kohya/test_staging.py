"""The dataset view staged for sd-scripts under a shared `[train] cache_dir`: one folder per staged content, recipe and
model, written aside and renamed into place whole, so recipes (and runs at the same time) never stage over each other's
captions, and sd-scripts' caches beside the images (`*.npz`, which it checks against neither the image nor the
caption) are never reused for an edited image or caption. The same staging as diffusion-pipe's
(`lora_run_engines.stage`; tests/diffusion_pipe/test_staging.py)."""
from __future__ import annotations

import os
import re
import shutil
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
def test_an_edited_caption_stages_a_new_folder_and_leaves_the_old_one_as_it_was(shared, subject_dataset, tmp_path,
                                                                                 monkeypatch):
    """The same recipe after a caption was edited: a new folder, where the edited caption is encoded afresh
    (sd-scripts would have reused the text-encoder cache of the old caption beside an image of the same name) and
    every other cache of the earlier folder is linked in (the stand-in, writing caches where none is as sd-scripts
    does, encodes that one caption alone); the folder an earlier run staged, with sd-scripts' caches, is left exactly
    as it was (a run still training on it reads what it staged)."""
    log = tmp_path / "encoded.txt"
    monkeypatch.setenv("FAKE_KOHYA_ENCODED", str(log))
    a = shared("a")
    before = snapshot(staged_subject(a))
    assert any(name.endswith("_flux_te.npz") for name in before) and any(n.endswith("_0320x0288_flux.npz") for n in before)
    assert len(log.read_text().split()) == 8
    log.unlink()
    (subject_dataset / "img000.txt").write_text("ohwx, an edited caption", "utf-8")
    b = shared("b")
    assert staged_subject(b) != staged_subject(a)
    assert "ohwx, an edited caption\n" in captions(staged_subject(b))
    assert "ohwx, an edited caption" in encoded(staged_subject(b))
    assert [re.sub(r"_[0-9a-f]{10}_", "_", Path(p).name) for p in log.read_text().split()] == ["img000_flux_te.npz"]
    assert stale(staged_subject(b)) == []
    assert snapshot(staged_subject(a)) == before
    assert "ohwx, a photo number 0\n" in captions(staged_subject(a))


@pytest.mark.slow
def test_the_stand_ins_caches_are_named_as_the_real_sd_scripts_named_them(kohya_recipe, fake_checkout, plugins_with,
                                                                          subject_dataset, tmp_path):
    """The staged folder the real sd-scripts 48d368f left on CPU (2026-12-05, four 192×160 images, latents and
    text-encoder outputs cached to disk, names `<stem>_<hash>`; docs/backend-kohya.md) and the stand-in's on the same
    images, name for name: the latents cache carries the image file's own size (`_0192x0160_flux.npz`), not the
    recipe's resolution, after the staged stem."""
    for old in subject_dataset.iterdir():
        old.unlink()
    make_images(subject_dataset, count=4, size=(192, 160))
    out = tmp_path / "r"
    run(kohya_recipe(sd_scripts=fake_checkout), plugins_with, out, "dataset.resolution=128", "dataset.bucket_min=64",
        "dataset.bucket_max=256")     # the real run's [dataset] (192×160 is below the default bucket_min)

    def hashless(names: list[str]) -> list[str]:     # the hash covers the PNG bytes, which another Pillow may vary
        return sorted(re.sub(r"^(img\d{3})_[0-9a-f]{10}", r"\1_<hash>", name) for name in names)
    recorded = (RECORDED / "cpu-staging-names-20261205" / "staged_subject.txt").read_text("utf-8").split()
    assert hashless([p.name for p in staged_subject(out).iterdir()]) == hashless(recorded)


@pytest.mark.slow
def test_the_same_recipe_again_reuses_its_folder_and_writes_nothing(shared):
    """A rerun (or a second run at the same time) finds the folder of its content: every link, caption and sd-scripts
    cache stays as it was, not even rewritten with the same bytes."""
    a = shared("a")
    before = snapshot(staged_subject(a))
    b = shared("b")
    assert staged_subject(b) == staged_subject(a)
    assert sorted(p.name for p in (shared.cache / "kohya-data").iterdir()) == \
        [f".{staged_subject(a).parent.name}.lock", staged_subject(a).parent.name]        # the folder and its lock
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
    allowed dataset change): an edited caption is staged under a new name, and sd-scripts' caches of the old name go
    (its latents, of the same image bytes, under the new name), while those of the images still staged stay."""
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
    assert [re.sub(r"_[0-9a-f]{10}", "", p.name) for p in sorted(folder.glob("img000_*"))] == \
        ["img000.png", "img000.txt", "img000_0320x0288_flux.npz"]
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
    """What is staged (captions, images), the [dataset] table, the model files and precisions sd-scripts caches with
    and its own options (`extra_args`: `apply_t5_attn_mask` changes the text-encoder outputs) each name another
    folder; the run's own settings do not."""
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
    for sets in (["model.base_precision='fp8'"], ["train.mixed_precision='fp16'"], [f"model.files.vae='{vae}'"],
                 ["backend.kohya.extra_args.apply_t5_attn_mask=true"]):
        assert folder(*sets) != first, sets


# ------------------------------------------------------------------------------- caches carried into a new folder
def stage_at(kohya_recipe, root: Path, *, key: str = "k", shared: bool = True) -> Path:
    """Lint the dataset as it is now and stage it at ``root`` (a folder under a shared `[train] cache_dir` unless
    ``shared`` is false) with the cache key ``key``; returns the subject folder."""
    recipe, report = _linted(kohya_recipe())
    stage_dataset(wanted_sets(report.usable, recipe, report), Paths(root.parent, "<sd-scripts>", "python", root),
                  key=key, shared=shared)
    return root / "subject"


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.glob("*.npz")}


def test_an_edited_caption_re_encodes_only_that_captions_text_encoder_outputs(kohya_recipe, tmp_path,
                                                                              subject_dataset):
    """Any edit under `[train] cache_dir` stages a new folder, which started empty: sd-scripts encoded every image
    again (seen on the real engine, 2026-12-05). The caches of the folder staged before with the same key that are
    valid in the new one are linked in: every latent (the images are unchanged) and every text-encoder output but the
    edited caption's, which is all sd-scripts encodes. The old folder is left as it was."""
    kohya = tmp_path / "cache" / "kohya-data"
    old = stage_at(kohya_recipe, kohya / "dataset-a")
    assert len(encode(old)) == 8
    before = snapshot(old)
    (subject_dataset / "img002.txt").write_text("ohwx, an edited caption", "utf-8")
    new = stage_at(kohya_recipe, kohya / "dataset-b")
    assert [re.sub(r"_[0-9a-f]{10}_", "_", n) for n in encode(new)] == ["img002_flux_te.npz"]
    assert stale(new) == [] and snapshot(old) == before
    assert sorted(inodes(new).values()) != sorted(inodes(old).values())
    assert len(set(inodes(new).values()) & set(inodes(old).values())) == 7      # hard links, no copies


def test_added_removed_and_changed_images_encode_only_what_changed(kohya_recipe, tmp_path, subject_dataset):
    """An image removed, one added and one whose pixels changed (its caption not): sd-scripts encodes the latents of
    the new and the changed image and the text-encoder outputs of the new one; the changed image's caption is the
    same text, so its text-encoder outputs serve, its old latents never do."""
    from PIL import Image

    kohya = tmp_path / "cache" / "kohya-data"
    assert len(encode(stage_at(kohya_recipe, kohya / "dataset-a"))) == 8
    for path in subject_dataset.glob("img001.*"):
        path.unlink()
    make_images(subject_dataset, count=1, seed=7, prefix="new")
    (subject_dataset / "new000.txt").write_text("ohwx, a new photo", "utf-8")
    Image.new("RGB", (320, 288), (9, 9, 9)).save(subject_dataset / "img003.png")
    new = stage_at(kohya_recipe, kohya / "dataset-b")
    assert sorted(re.sub(r"_[0-9a-f]{10}_", "_", n) for n in encode(new)) == \
        ["img003_0320x0288_flux.npz", "new000_0320x0288_flux.npz", "new000_flux_te.npz"]
    assert stale(new) == []


def test_a_planted_wrong_carry_is_caught(kohya_recipe, tmp_path, subject_dataset, monkeypatch):
    """The check the tests above rely on (`stale`: each cache made from the image and caption staged under its name)
    catches a carry that reuses a changed image's latents: here one matching images by their file's stem."""
    from PIL import Image
    import lora_run_kohya.backend as backend

    def by_stem(into, sets, sources):
        for source, _ in sources:
            for cache in (source / "subject").glob("*.npz"):
                stem = cache.name.split("_", 1)[0]
                ours = next(p for p in (into / "subject").glob(f"{stem}_*.png"))
                target = ours.with_name(f"{ours.stem}_{cache.name.split('_', 2)[2]}")
                if not target.exists():
                    os.link(cache, target)

    kohya = tmp_path / "cache" / "kohya-data"
    encode(stage_at(kohya_recipe, kohya / "dataset-a"))
    Image.new("RGB", (320, 288), (9, 9, 9)).save(subject_dataset / "img003.png")
    monkeypatch.setattr(backend, "carry_caches", by_stem)
    new = stage_at(kohya_recipe, kohya / "dataset-b")
    encode(new)
    assert [re.sub(r"_[0-9a-f]{10}_", "_", n) for n in stale(new)] == ["img003_0320x0288_flux.npz"]


def test_only_whole_caches_of_the_same_key_and_the_same_staged_bytes_are_carried(kohya_recipe, tmp_path,
                                                                                 subject_dataset):
    """No cache comes from a folder of another key (other model files, precisions, `[dataset]` table or extra_args),
    from a folder without lora-run's marker, from a cache sd-scripts has not finished writing, or for a converted
    image whose PNG differs (an earlier lora-run's conversion)."""
    from PIL import Image

    from lora_run_engines.stage import MARKER

    Image.new("RGBA", (320, 288), (200, 10, 10, 128)).save(subject_dataset / "alpha.png")     # staged as a PNG
    (subject_dataset / "alpha.txt").write_text("ohwx, alpha", "utf-8")
    kohya = tmp_path / "cache" / "kohya-data"
    old = stage_at(kohya_recipe, kohya / "dataset-a")
    assert len(encode(old)) == 10
    assert encode(stage_at(kohya_recipe, kohya / "dataset-same")) == []          # the control: everything carried
    assert len(encode(stage_at(kohya_recipe, kohya / "dataset-b", key="other"))) == 10
    (subject_dataset / "img000.txt").write_text("ohwx, edited", "utf-8")        # a new content from here on
    for folder in (kohya / "dataset-same", kohya / "dataset-b"):
        shutil.rmtree(folder)
    marker = (old.parent / MARKER).read_bytes()
    (old.parent / MARKER).unlink()
    assert len(encode(stage_at(kohya_recipe, kohya / "dataset-c"))) == 10       # no marker: not lora-run's
    shutil.rmtree(kohya / "dataset-c")
    (old.parent / MARKER).write_bytes(marker)
    te = next(old.glob("img001_*_flux_te.npz"))
    te.write_bytes(te.read_bytes()[:-30])                                     # still being written
    png = next(p for p in old.glob("alpha_*.png"))
    png.write_bytes(png.read_bytes() + b"\0")                                 # another conversion
    new = stage_at(kohya_recipe, kohya / "dataset-d")
    assert sorted(re.sub(r"_[0-9a-f]{10}_", "_", n) for n in encode(new)) == \
        ["alpha_0320x0288_flux.npz", "img000_flux_te.npz", "img001_flux_te.npz"]
    assert stale(new) == []


def test_a_resume_in_the_run_folder_keeps_the_latents_of_an_image_whose_caption_was_edited(kohya_recipe, tmp_path,
                                                                                          subject_dataset):
    """The run folder's own `kohya/data` (no `[train] cache_dir`), brought up to date in place: the edited caption's
    image gets its new name with its latents (the same image bytes), and only its text-encoder outputs are encoded."""
    folder = stage_at(kohya_recipe, tmp_path / "kohya" / "data", shared=False)
    encode(folder)
    (subject_dataset / "img000.txt").write_text("ohwx, an edited caption", "utf-8")
    stage_at(kohya_recipe, tmp_path / "kohya" / "data", shared=False)
    assert [re.sub(r"_[0-9a-f]{10}_", "_", n) for n in encode(folder)] == ["img000_flux_te.npz"]
    assert stale(folder) == [] and len(list(folder.glob("*.npz"))) == 8


# ------------------------------------------------------------------------------- earlier folders removed, by opt-in
@pytest.mark.slow
def test_remove_old_staging_removes_the_earlier_folders_no_run_uses(shared, subject_dataset, monkeypatch):
    """Without `remove_old_staging` every folder stays; with it the run removes the folders earlier runs of this
    recipe staged, unless a run still holds one (`lora_run_engines.stage.use`). sd-scripts is launched holding the
    run's own folder (the descriptor passed on), and the caches carried from a removed folder stay (hard links)."""
    import lora_run_kohya.backend as backend
    from lora_run_engines.stage import lock_path, use

    a = staged_subject(shared("a")).parent
    (subject_dataset / "img000.txt").write_text("ohwx, edited", "utf-8")
    b = staged_subject(shared("b")).parent
    assert a.is_dir() and b.is_dir()
    (subject_dataset / "img000.txt").write_text("ohwx, edited twice", "utf-8")
    passed: list[str] = []
    real = backend.Supervisor

    def supervisor(*args, **kwargs):
        passed.extend(os.readlink(f"/proc/self/fd/{fd}") for fd in kwargs.get("pass_fds", ()))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "Supervisor", supervisor)
    held = use(b)                                   # a run still training on b
    try:
        c = staged_subject(shared("c", "backend.kohya.remove_old_staging=true")).parent
    finally:
        os.close(held)
    assert not a.exists() and b.is_dir() and c.is_dir()
    assert passed == [str(lock_path(c))]
    assert stale(c / "subject") == [] and len(list((c / "subject").glob("*.npz"))) == 8
    assert sorted(p.name for p in c.parent.iterdir() if not p.name.startswith(".")) == sorted([b.name, c.name])
