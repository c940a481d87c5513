"""A hostile-input sweep of dataset folders through `lora-run check` and a short CPU run: what the sweep found
(each fixed at its root) and the odd inputs that were already safe, pinned. The corpus of broken image files
lives in ``test_faults.py`` and the non-regular files in ``test_bounded_reads.py``."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from .conftest import run_cli


def _run(argv, capsys):
    return run_cli(argv, capsys, never="unexpected")


def _copy(small_dataset: Path, tmp_path: Path, name: str = "data") -> Path:
    folder = tmp_path / name
    shutil.copytree(small_dataset, folder)
    return folder


# ------------------------------------------------------------------ file names that are not UTF-8
def test_a_file_name_that_is_not_utf8_trains(tiny_recipe, small_dataset, tmp_path, capsys):
    """Before: the run crashed writing the first latent cache entry (safetensors cannot encode the name's lone
    surrogates in the entry's metadata): "crashed: UnicodeEncodeError", exit 1."""
    data = _copy(small_dataset, tmp_path)
    raw = os.fsencode(data)
    shutil.copy(data / "img000.png", os.fsdecode(raw + b"/odd\xff\xfe.png"))
    Path(os.fsdecode(raw + b"/odd\xff\xfe.txt")).write_text("ohwx, an odd name")
    (data / "img000.png").unlink()
    (data / "img000.txt").unlink()
    run = tmp_path / "run"
    code, text = _run([str(tiny_recipe(data=data)), "--output-dir", str(run), "--set", "train.steps=1"], capsys)
    assert code == 0, text[-2000:]
    assert (run / "tiny.safetensors").is_file()


# ------------------------------------------------------------------ a dataset that changes during the run
def _change_after_lint(monkeypatch, change):
    import lora_run.run as run_module

    real = run_module.lint

    def lint_then_change(recipe, plugins):
        report = real(recipe, plugins)
        change()
        return report
    monkeypatch.setattr(run_module, "lint", lint_then_change)


@pytest.mark.parametrize("how", ["replaced", "deleted", "fifo"])
def test_an_image_that_changes_after_the_lint_is_named_and_not_trained_on(tiny_recipe, small_dataset, tmp_path,
                                                                          capsys, monkeypatch, how):
    """Before: an image replaced after the lint (an editor saving over it, a sync tool) was trained on unchecked
    while the manifest recorded the linted bytes (exit 0); a deleted one ended "unexpected"/crashed (exit 1)."""
    data = _copy(small_dataset, tmp_path)
    target = data / "img001.png"

    def change():
        if how == "replaced":
            shutil.copy(data / "img002.png", target)
        elif how == "deleted":
            target.unlink()
        else:
            target.unlink()
            os.mkfifo(target)
    _change_after_lint(monkeypatch, change)
    run = tmp_path / "run"
    code, text = _run([str(tiny_recipe(data=data)), "--output-dir", str(run)], capsys)
    assert code == 2, text[-2000:]
    line = next(ln for ln in text.splitlines() if "img001.png" in ln)
    assert "the dataset changed after its lint" in line, text[-2000:]
    assert not (run / "tiny.safetensors").exists()
    assert not any((run / "cache").rglob("*.safetensors")), "nothing is encoded from a changed dataset"


def test_a_fifo_swapped_in_after_the_file_check_is_refused_not_waited_on(small_dataset, tmp_path, monkeypatch):
    """The image is opened without blocking and checked again on the open file: a FIFO put in place between the
    check and the open is refused (a blocking open would wait for a writer forever)."""
    from lora_run_folder import images

    data = _copy(small_dataset, tmp_path)
    target = data / "img000.png"
    real = images.check_input_file

    def check_then_swap(path, kind, limit):
        st = real(path, kind, limit)
        target.unlink()
        os.mkfifo(target)
        return st
    monkeypatch.setattr(images, "check_input_file", check_then_swap)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(_raises(images.open_rgb, target)), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():          # release the blocked open, then fail
        with open(target, "wb"):
            pass
        worker.join(5)
        pytest.fail("open_rgb waited on a FIFO")
    assert isinstance(outcome[0], images.ImageProblem) and "not a regular file" in str(outcome[0])


def _raises(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


# ------------------------------------------------------------------ never writing into the dataset folder
@pytest.mark.parametrize("where", ["cache-is-the-dataset", "cache-inside", "cache-in-a-reg-set", "run-inside"])
def test_a_cache_or_run_folder_in_a_dataset_folder_is_refused(tiny_recipe, small_dataset, tmp_path, capsys, where):
    """Before: `train.cache_dir` set to the dataset folder (or a folder in it, or in a regularisation set) and a run
    folder inside the dataset folder passed `check`, and the run wrote its `latents/`, `text/` and run files there."""
    data = _copy(small_dataset, tmp_path)
    reg = _copy(small_dataset, tmp_path, "reg")
    for caption in reg.glob("*.txt"):
        caption.write_text("a photo")
    recipe = str(tiny_recipe(data=data, extra=f'[[dataset.regularization]]\npath = "{reg}"\n'))
    before = sorted(p.name for p in data.iterdir()) + sorted(p.name for p in reg.iterdir())
    if where.startswith("run"):
        args, key = ["--set", f'output.dir="{data / "runs" / "x"}"'], "[output.dir]"
    else:
        folder = {"cache-is-the-dataset": data, "cache-inside": data / "cache", "cache-in-a-reg-set": reg / "c"}[where]
        args, key = ["--set", f'train.cache_dir="{folder}"'], "[train.cache_dir]"
    for command in (["check"], ["plan"], []):
        code, text = _run([*command, recipe, *args], capsys)
        assert code == 2, text[-2000:]
        line = next(ln for ln in text.splitlines() if "lies in the dataset folder" in ln)
        assert key in line and ("[dataset.regularization[0].path]" if "reg" in where else "[dataset.path]") in line
    assert sorted(p.name for p in data.iterdir()) + sorted(p.name for p in reg.iterdir()) == before


# ------------------------------------------------------------------ regularisation sets on the subject folder
@pytest.mark.parametrize("how", ["the-subject-folder", "a-link-to-it", "one-folder-twice"])
def test_a_regularisation_set_reading_the_subject_folder_or_another_set_is_refused(tiny_recipe, small_dataset,
                                                                                  tmp_path, capsys, how):
    """Before: with captions lacking the trigger (`trigger_policy = "prepend"`) a regularisation set pointing at the
    subject folder passed `check` (three "identical to itself" warnings) and trained each subject photo as "not the
    subject" too; a folder given as two sets did the same twice."""
    data = _copy(small_dataset, tmp_path)
    for caption in data.glob("*.txt"):
        caption.write_text("a photo")
    reg = _copy(small_dataset, tmp_path, "reg")
    (tmp_path / "link").symlink_to(data)
    first, second = {"the-subject-folder": (data, None), "a-link-to-it": (tmp_path / "link", None),
                     "one-folder-twice": (reg, reg)}[how]
    sets = "".join(f'[[dataset.regularization]]\npath = "{p}"\n' for p in (first, second) if p)
    recipe = str(tiny_recipe(data=data, extra=sets))
    for command in (["check"], ["plan"], []):
        code, text = _run([*command, recipe, "--set", 'dataset.trigger_policy="prepend"']
                          + ([] if command else ["--output-dir", str(tmp_path / "run")]), capsys)
        assert code == 2, text[-2000:]
        key = "[dataset.regularization[1].path] is the folder of [dataset.regularization[0].path]" if second else \
            "[dataset.regularization[0].path] is the subject folder [dataset.path]"
        assert key in text, text[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets", [['dataset.regularization=[{path="\\u0000"}]'], ['dataset.path="\\u0000"'],
                                  ['dataset.path="a\\u0000b"', 'dataset.regularization=[{path="a\\u0000b"}]']])
def test_a_dataset_folder_with_a_nul_byte_is_bad_input_not_a_crash(tiny_recipe, small_dataset, tmp_path, capsys, sets):
    """The same-folder rule resolved every folder's links and crashed on a NUL byte ("embedded null byte", found by
    the recipe fuzzer); such a path is left to the folder checks, which name it (exit 2)."""
    recipe = str(tiny_recipe(data=_copy(small_dataset, tmp_path)))
    code, text = _run(["check", recipe, *(a for s in sets for a in ("--set", s))], capsys)
    assert code == 2 and "dataset" in text and "Traceback" not in text, text[-2000:]


# ------------------------------------------------------------------ oddities the lint names (warnings)
def _lint(tiny_recipe, data, capsys) -> tuple[int, dict]:
    import json

    code, text = _run(["check", "--json", str(tiny_recipe(data=data))], capsys)
    report = json.loads(text[text.index("{"):])
    return code, {(f["code"], Path(f["file"]).name): f for f in report["lint"]["findings"]}


def test_unread_formats_shared_captions_and_odd_caption_text_are_warnings(tiny_recipe, small_dataset, tmp_path,
                                                                          capsys):
    """Before: a GIF, TIFF or HEIC photo in the folder was left out unseen; `a.png` and `a.jpg` beside one `a.txt`
    were both trained with it; a caption with a NUL, an escape code or a second line passed silently; a UTF-16
    caption was only "not UTF-8"."""
    from PIL import Image

    data = _copy(small_dataset, tmp_path)
    for name in ("anim.gif", "scan.TIFF", "phone.heic"):
        (data / name).write_bytes(b"not read")
    Image.open(data / "img000.png").save(data / "img000.jpg")
    (data / "img001.txt").write_bytes(b"ohwx, a photo\x00 with a NUL")
    (data / "img002.txt").write_text("ohwx, a photo\nand a second line")
    shutil.copy(data / "img001.png", data / "wide.png")
    (data / "wide.txt").write_bytes("ohwx, wide".encode("utf-16"))
    code, found = _lint(tiny_recipe, data, capsys)
    assert code == 2
    for name in ("anim.gif", "scan.TIFF", "phone.heic"):
        assert found[("unread-format", name)]["level"] == "warning"
    assert "img000.jpg" in found[("shared-caption", "img000.png")]["message"]     # sorted: the .jpg is first
    assert "\\x00" in found[("odd-caption", "img001.txt")]["message"]
    assert "2 lines" in found[("odd-caption", "img002.txt")]["message"]
    assert "UTF-16" in found[("bad-caption", "wide.txt")]["message"]


def test_odd_but_usable_folders_pass(tiny_recipe, small_dataset, tmp_path, capsys):
    """Pinned, already safe: hidden files and macOS/Windows litter are not entries; an upper-case extension is an
    image with its caption; a doubled extension wants `a.png.txt`; a link to an image outside the folder is used;
    LA and transparent-palette PNGs and an animated WebP are converted and noted."""
    from PIL import Image

    data = _copy(small_dataset, tmp_path)
    outside = _copy(small_dataset, tmp_path, "outside")
    (data / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (data / "._img000.png").write_bytes(b"\0\5\26\7")            # an AppleDouble file named like an image
    (data / "__MACOSX").mkdir()
    (data / "__MACOSX" / "._img000.png").write_bytes(b"\0\5\26\7")
    shutil.copy(outside / "img000.png", data / "UPPER.PNG")
    (data / "UPPER.txt").write_text("ohwx, upper")
    (data / "linked.png").symlink_to(outside / "img001.png")
    (data / "linked.txt").write_text("ohwx, linked")
    src = Image.open(outside / "img002.png")
    src.convert("LA").save(data / "la.png")
    src.convert("P").save(data / "pt.png", transparency=0)
    src.save(data / "anim.webp", save_all=True, append_images=[src.rotate(90)])
    for name in ("la", "pt", "anim"):
        (data / f"{name}.txt").write_text(f"ohwx, {name}")
    shutil.copy(outside / "img002.png", data / "double.png.jpg")
    (data / "double.png.txt").write_text("ohwx, double")
    code, found = _lint(tiny_recipe, data, capsys)
    errors = {k: v for k, v in found.items() if v["level"] == "error"}
    assert code == 0 and not errors, errors
    assert {"la.png", "pt.png", "anim.webp"} <= {name for code, name in found if code == "converted"}
    assert not any(name.startswith(".") or name == "Thumbs.db" for _, name in found)


@pytest.mark.parametrize("which", ["subject", "regularisation"])
def test_an_unreadable_dataset_folder_is_named_as_unreadable(tiny_recipe, small_dataset, tmp_path, capsys,
                                                             monkeypatch, which):
    """Before: a folder that cannot be listed (chmod 000; simulated, as root reads anything) was "no images found"
    (subject) or silently empty (a regularisation set)."""
    data = _copy(small_dataset, tmp_path)
    reg = _copy(small_dataset, tmp_path, "reg")
    for caption in reg.glob("*.txt"):
        caption.write_text("a photo")
    locked = data if which == "subject" else reg
    real = os.listdir

    def listdir(path="."):
        if os.path.realpath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "listdir", listdir)
    code, text = _run(["check", str(tiny_recipe(data=data, extra=f'[[dataset.regularization]]\npath = "{reg}"\n'))],
                      capsys)
    key = "dataset.path" if which == "subject" else "dataset.regularization[0].path"
    assert code == 2 and f"{key}: folder cannot be read (Permission denied): {locked}" in text, text[-2000:]
