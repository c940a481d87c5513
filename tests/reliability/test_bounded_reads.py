"""Every file lora-run reads on a user's behalf is a regular file within a documented size limit, checked
before it is read: devices, FIFOs, sparse giants and deep nesting end in an error naming the file or key
(exit 2), never in a MemoryError, a hang or a traceback."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lora_run_eval.evaluator import LORA_LIMIT
from lora_run_folder import CAPTION_LIMIT

from .conftest import run_cli

BIG = 4 << 30   # sparse: no disk space used


def _sparse(path: Path, size: int = BIG) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def _run(argv, capsys):
    return run_cli(argv, capsys, never="MemoryError")


def test_captions_and_images_that_are_not_small_regular_files(tiny_recipe, small_dataset, tmp_path, capsys,
                                                               figures):
    data = tmp_path / "hostile"
    shutil.copytree(small_dataset, data)
    (data / "img000.txt").unlink()
    (data / "img000.txt").symlink_to("/dev/zero")                 # endless caption
    (data / "img001.txt").unlink()
    os.mkfifo(data / "img001.txt")                                # a read would block forever
    _sparse(data / "huge.png")                                    # 4 GiB "image"
    (data / "huge.txt").write_text("ohwx, big")
    shutil.copy(data / "img002.png", data / "long.png")
    _sparse(data / "long.txt", CAPTION_LIMIT + 1)            # a caption over its limit
    (data / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (data / "folder.png").mkdir()                                  # not a file: not an image either
    (data / "device.png").symlink_to("/dev/zero")                  # named like an image: reported, not skipped
    os.mkfifo(data / "pipe.png")
    code, text = _run(["check", str(tiny_recipe(data=data))], capsys)
    assert code == 2
    expected = {"img000.txt": "is a character device, not a regular file",
                "img001.txt": "is a FIFO (named pipe), not a regular file",
                "huge.png": "is 4.0 GiB, over the 256.0 MiB limit for image files",
                "long.txt": "over the 64.0 KiB limit for caption files",
                "dangling.png": "not found (a dangling link)",
                "device.png": "is a character device, not a regular file",
                "pipe.png": "is a FIFO (named pipe), not a regular file"}
    for name, message in expected.items():
        line = next((ln for ln in text.splitlines() if name in ln), "")
        assert message in line, (name, text[-3000:])
    assert "folder.png" not in text                                # a sub-folder is not a dataset entry
    figures("bounded reads", cases=len(expected), faults=len(expected))


def test_recipes_and_extends_that_are_too_big_or_not_files(tiny_recipe, tmp_path, capsys, figures):
    recipe = tiny_recipe()
    giant = _sparse(tmp_path / "giant.toml")
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{giant.name}"\n' + recipe.read_text(), encoding="utf-8")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    bad_extends = {"dev": "/dev/zero", "fifo": str(fifo), "folder": str(tmp_path)}
    cases = [(["check", str(giant)], "the recipe file is 4.0 GiB, over the 1.0 MiB limit for recipe files"),
             (["check", str(child)], "[extends] file is 4.0 GiB, over the 1.0 MiB limit"),
             (["plan", str(child)], "[extends] file is 4.0 GiB"),
             ([str(child), "--output-dir", str(tmp_path / "run")], "[extends] file is 4.0 GiB"),
             (["check", "/dev/zero"], "the recipe file is a character device"),
             (["check", str(fifo)], "the recipe file is a FIFO"),
             (["check", str(tmp_path)], "the recipe file is a folder"),
             (["check", str(deep)], "not valid TOML: nested too deeply")]
    for name, target in bad_extends.items():
        path = tmp_path / f"extends-{name}.toml"
        path.write_text(f'extends = "{target}"\n' + recipe.read_text(), encoding="utf-8")
        cases.append((["check", str(path)], "[extends] file is a"))
    for argv, message in cases:
        code, text = _run(argv, capsys)
        assert code == 2 and message in text, (argv, text[-1500:])
    assert not (tmp_path / "run").exists()
    figures("bounded reads", cases=len(cases), faults=len(cases))


def test_lora_and_onnx_files_for_eval_and_score(tiny_recipe, tmp_path, capsys, figures):
    from lora_run.errors import PluginError
    from lora_run_eval.faces import _session

    recipe = tiny_recipe()
    giant = _sparse(tmp_path / "giant.safetensors", LORA_LIMIT + 1)
    cases = [("/dev/zero", "is a character device"), (str(giant), "over the 8.0 GiB limit for lora files"),
             (str(tmp_path), "is a folder"), (str(tmp_path / "missing.safetensors"), "no such file")]
    for lora, message in cases:
        code, text = _run(["eval", str(recipe), "--lora", lora], capsys)
        assert code == 2 and f"--lora {lora}: " in text and message in text, text[-1500:]
    for model, message in (("/dev/zero", "is a character device"), (str(_sparse(tmp_path / "m.onnx")),
                                                                    "over the 2.0 GiB limit for onnx files")):
        with pytest.raises(PluginError, match=message):
            _session(model, [])
    figures("bounded reads", cases=len(cases) + 2, faults=len(cases) + 2)


def test_eval_overwrite_never_clears_someone_elses_folder(tiny_recipe, tmp_path, capsys):
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"stand-in")
    mine = tmp_path / "pictures"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"precious")
    code, text = _run(["eval", str(tiny_recipe()), "--lora", str(lora), "--output-dir", str(mine), "--overwrite"],
                      capsys)
    assert code == 2 and "replaces only an earlier evaluation" in text, text[-1500:]
    assert (mine / "images" / "holiday.jpg").read_bytes() == b"precious"
