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
