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
