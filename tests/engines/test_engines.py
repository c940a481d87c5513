"""lora_run_engines: the one library kohya and diffusion-pipe use to drive their external engines."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from lora_run_engines import MAX_LINE_BYTES, commented, git_state, split_output, stage_link


def _lines(chunks: list[bytes]) -> list[bytes]:
    feed, out = iter([*chunks, b""]), []
    split_output(lambda: next(feed), out.append)
    return out


def test_output_is_split_on_newlines_and_carriage_returns_across_chunks():
    assert _lines([b"step 1\r", b"step 2\r\nst", b"ep 3\n\n  \nlast"]) == [b"step 1", b"step 2", b"step 3", b"last"]


def test_a_runaway_line_is_flushed_and_a_broken_pipe_keeps_what_was_read():
    out = _lines([b"x" * (MAX_LINE_BYTES + 1), b"tail\n"])
    assert len(out[0]) == MAX_LINE_BYTES + 1 and out[1] == b"tail"
    got = []

    def failing(calls=[b"half a li"]):  # noqa: B006 - one chunk, then the pipe breaks
        if calls:
            return calls.pop()
        raise OSError("closed")
    split_output(failing, got.append)
    assert got == [b"half a li"]


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_state_reports_commit_and_dirtiness(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    assert git_state(tmp_path) == (None, None)
    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_state(tmp_path) == (commit, True)



@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_state_reads_a_file_name_that_is_not_utf8(tmp_path):
    """git prints a Latin-1 file name as raw bytes where `core.quotePath` is off: the state is read, not a
    UnicodeDecodeError."""
    import os

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    git("config", "core.quotePath", "false")
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.py")
    with open(name, "wb") as fh:
        fh.write(b"x = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    with open(name, "wb") as fh:
        fh.write(b"x = 2\n")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and dirty is True

def test_commented_header_and_stage_link(tmp_path):
    assert commented("made by lora-run\nre-run: x", "a = 1\n") == "# made by lora-run\n# re-run: x\n\na = 1\n"
    source = tmp_path / "img.png"
    source.write_bytes(b"png")
    target = tmp_path / "stage" / "img.png"
    target.parent.mkdir()
    stage_link(source, target)
    stage_link(source, target)  # again: nothing changes, no temp file left
    assert target.read_bytes() == b"png" and sorted(p.name for p in target.parent.iterdir()) == ["img.png"]


def test_sync_folder_stages_exactly_what_is_wanted_and_keeps_the_engines_cache(tmp_path):
    from PIL import Image

    from lora_run_engines.stage import Staged, sync_folder

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)
    folder = tmp_path / "staged"
    (folder / "cache" / "flux").mkdir(parents=True)          # the engine's own cache
    (folder / "stale.txt").parent.mkdir(exist_ok=True)
    (folder / "stale.txt").write_text("old caption")
    wanted = {"a.jpg": Staged("link", photo), "a.txt": Staged("text", text="ohwx, a photo"),
              "b.png": Staged("png", cmyk), "c.jpg": Staged("copy", photo)}
    sync_folder(folder, wanted, removable=lambda entry: entry.name != "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "a.txt", "b.png", "c.jpg", "cache"]
    assert (folder / "a.jpg").is_symlink() and (folder / "a.jpg").resolve() == photo.resolve()
    assert not (folder / "c.jpg").is_symlink() and (folder / "c.jpg").read_bytes() == photo.read_bytes()
    with Image.open(folder / "b.png") as png:
        assert png.mode == "RGB"                                 # converted as the dataset lint does
    # a second pass rewrites nothing that is already as wanted (the engine's caches key on the files)
    before = {p.name: p.lstat().st_mtime_ns for p in folder.iterdir()}
    sync_folder(folder, wanted, removable=lambda entry: entry.name != "cache")
    assert {p.name: p.lstat().st_mtime_ns for p in folder.iterdir()} == before
    # a changed caption is rewritten; what `removable` spares stays even when not wanted
    sync_folder(folder, {**wanted, "a.txt": Staged("text", text="ohwx, another")}, removable=lambda entry: False)
    assert (folder / "a.txt").read_text() == "ohwx, another" and (folder / "cache").is_dir()


def test_one_key_scheme_for_every_engine():
    from lora_run_engines.keys import table_problems, value_ok

    assert value_ok("float", 1.0) and value_ok("int|null", None) and value_ok("[int,int]", [512, 768])
    # the traps a plain isinstance check falls into: sd-scripts keeps `1` as an int where a float belongs, and
    # bool is an int subclass (planted-mistake control: isinstance says yes to both)
    assert isinstance(1, (int, float)) and isinstance(True, int)
    assert not value_ok("float", 1) and not value_ok("int", True) and not value_ok("[int,int]", [512])
    problems = table_problems({"resolution": [512, 512], "lerning_rate": 1.0, "batch_size": "4", "subsets": []},
                              {"resolution": "[int,int]|int", "learning_rate": "float", "batch_size": "int"},
                              skip=("subsets",), unknown=lambda key, close: f"{key}? {close}",
                              wrong=lambda key, kind, value: f"{key} wants {kind}")
    assert problems == ["lerning_rate? learning_rate", "batch_size wants int"]
    assert table_problems({"a": object()}, ["a"], unknown=lambda k, c: k) == []   # a key list: any value
