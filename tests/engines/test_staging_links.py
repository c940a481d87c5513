"""Staging removes the staged files no longer wanted, so it works only in folders lora-run made: a run folder's
`kohya/data` (or a shared staged folder, or one of its sets) replaced by a link to the dataset's parent had a
`--resume` delete the user's images and captions through it (kohya: every image and caption; diffusion-pipe: every
entry but `cache`). A link, a non-folder, or a folder without lora-run's marker where a staged folder goes is refused
(exit 2, named), and nothing it reaches is touched, for both engines' removal rules, shared or not."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lora_run.errors import OutputError
from lora_run_diffusion_pipe.stage import _removable as pipe_removable
from lora_run_engines.stage import Staged, publish
from lora_run_kohya.backend import _removable as kohya_removable


def _user_data(folder: Path) -> dict[str, str]:
    """A user's dataset under ``folder/subject`` (the set's name): photos, captions, a notes folder."""
    subject = folder / "subject"
    (subject / "notes").mkdir(parents=True)
    for n in range(2):
        (subject / f"img{n}.png").write_bytes(b"photo %d" % n)
        (subject / f"img{n}.txt").write_text("ohwx, a caption")
    (subject / "notes" / "a.md").write_text("keep")
    return _digest(folder)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


PLACES = ["root a link", "root a user folder", "set a link", "root a file", "root a dangling link"]


@pytest.mark.parametrize("shared", [False, True], ids=["run folder", "shared"])
@pytest.mark.parametrize("removable", [kohya_removable, pipe_removable], ids=["kohya", "diffusion-pipe"])
@pytest.mark.parametrize("place", PLACES)
def test_staging_never_works_through_a_link_or_in_a_folder_it_did_not_make(tmp_path, place, removable, shared):
    user = tmp_path / "project" / "data"
    before = _user_data(user)
    root = tmp_path / "run" / "kohya" / "data"
    root.parent.mkdir(parents=True)
    if place == "root a link":
        root.symlink_to(user, target_is_directory=True)
    elif place == "root a user folder":
        root.mkdir()
        (root / "subject").symlink_to(user / "subject", target_is_directory=True)
    elif place == "set a link":
        publish({"subject": {}}, root, removable, key="k", shared=shared)     # a real staged folder, marked
        (root / "subject").rmdir()
        (root / "subject").symlink_to(user / "subject", target_is_directory=True)
    elif place == "root a file":
        root.write_text("a user's file")
    else:
        root.symlink_to(tmp_path / "nowhere")
    wanted = {"subject": {"img0_0123456789.txt": Staged("text", text="ohwx, staged")}}
    with pytest.raises(OutputError, match="where lora-run stages the dataset") as caught:
        publish(wanted, root, removable, key="k", shared=shared)
    assert caught.value.exit_code == 2 and str(root) in str(caught.value)
    assert _digest(user) == before, "nothing the link reaches was touched"
    if place == "root a file":
        assert root.read_text() == "a user's file"


def test_a_folder_lora_run_staged_is_still_brought_up_to_date(tmp_path):
    """The control: the run folder's own staged folder (marked) is synced in place, the file no longer wanted goes."""
    root = tmp_path / "data"
    publish({"subject": {"old_0123456789.txt": Staged("text", text="a")}}, root, kohya_removable, key="k",
            shared=False)
    publish({"subject": {"new_0123456789.txt": Staged("text", text="b")}}, root, kohya_removable, key="k",
            shared=False)
    assert sorted(p.name for p in (root / "subject").iterdir()) == ["new_0123456789.txt"]
