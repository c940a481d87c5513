"""Removing the folders earlier runs of a recipe staged under a shared `[train] cache_dir`
(`lora_run_engines.stage.remove_earlier`, opted into with `remove_old_staging`): only lora-run's own folders of the
same key, staged before the current one, that no run holds (`use`); a wrong removal is far worse than a kept folder,
so each rule is tried on its own."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from lora_run_engines.stage import MARKER, Staged, lock_path, publish, remove_earlier, use


def staged(root: Path, key: str, text: str, at: float) -> Path:
    """A folder staged by lora-run (its marker holding ``key``), its marker dated ``at``."""
    publish({"subject": {f"img_{text}.txt": Staged("text", text=text)}}, root, lambda wanted: lambda entry: True,
            key=key)
    os.utime(root / MARKER, (at, at))
    return root


def test_only_unused_earlier_folders_of_the_same_key_that_lora_run_staged_go(tmp_path):
    kohya = tmp_path / "cache" / "kohya-data"
    now = time.time()
    current = staged(kohya / "dataset-current", "k", "current", now)
    earlier = staged(kohya / "dataset-earlier", "k", "earlier", now - 100)
    held = staged(kohya / "dataset-held", "k", "held", now - 100)
    later = staged(kohya / "dataset-later", "k", "later", now + 100)          # staged after the current one
    other = staged(kohya / "dataset-other", "other key", "other", now - 100)  # another recipe's
    unmarked = staged(kohya / "dataset-unmarked", "k", "unmarked", now - 100)
    (unmarked / MARKER).unlink()                                               # a folder lora-run cannot vouch for
    odd = staged(kohya / "dataset-odd", "k", "odd", now - 100)
    (odd / MARKER).write_text('{"lora_run_staging": 1, "key": "k"}')           # not a marker lora-run writes
    linked_target = staged(tmp_path / "elsewhere" / "dataset-target", "k", "target", now - 100)
    (kohya / "dataset-link").symlink_to(linked_target)
    (kohya / "dataset-file").write_text("a user's file")
    (kohya / "notes").mkdir()
    user = kohya / "dataset-user"
    user.mkdir()
    (user / "photo.png").write_bytes(b"not lora-run's")
    fd = use(held)                                                             # a run trains on it
    try:
        assert remove_earlier(current, "k") == ["dataset-earlier"]
    finally:
        os.close(fd)
    assert not earlier.exists() and not lock_path(earlier).exists()
    assert sorted(p.name for p in kohya.iterdir() if not p.name.startswith(".")) == \
        ["dataset-current", "dataset-file", "dataset-held", "dataset-later", "dataset-link", "dataset-odd",
         "dataset-other", "dataset-unmarked", "dataset-user", "notes"]
    assert (linked_target / MARKER).exists() and (user / "photo.png").exists()
    assert not [p for p in kohya.iterdir() if p.name.endswith(".removing")]
    assert remove_earlier(current, "k") == ["dataset-held"]                   # once the run is done
    assert remove_earlier(current, "other") == []                             # the current folder's own key only


def test_a_folder_held_by_a_running_engine_stays_after_lora_run_is_gone(tmp_path):
    """The engine inherits the hold (the supervisor passes the descriptor on): a lora-run killed under a running
    engine leaves its folder held until the engine ends too."""
    kohya = tmp_path / "kohya-data"
    current = staged(kohya / "dataset-current", "k", "current", time.time())
    earlier = staged(kohya / "dataset-earlier", "k", "earlier", time.time() - 100)
    fd = use(earlier)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    os.close(fd)                                                               # lora-run's own copy is gone
    try:
        assert remove_earlier(current, "k") == [] and earlier.is_dir()
    finally:
        engine.kill()
        engine.wait()
    assert remove_earlier(current, "k") == ["dataset-earlier"]


def test_a_run_waiting_while_its_folder_is_removed_stages_it_again(tmp_path):
    """A run that asks for a folder while it is being removed waits, then holds the lock file that is there after the
    removal (not the removed one), and finds no folder: it stages its own, which no later removal takes from it."""
    import fcntl

    from lora_run_engines.stage import _flock

    kohya = tmp_path / "kohya-data"
    current = staged(kohya / "dataset-current", "k", "current", time.time())
    earlier = staged(kohya / "dataset-earlier", "k", "earlier", time.time() - 100)
    remover = _flock(lock_path(earlier), fcntl.LOCK_EX)
    got: dict[str, int] = {}
    waiting = threading.Thread(target=lambda: got.update(fd=use(earlier)))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive()                                                  # it waits for the remover
    os.rename(earlier, earlier.with_name(".gone"))
    os.unlink(lock_path(earlier))
    another = use(earlier)                  # a run arriving meanwhile takes the new lock file at once
    os.close(remover)
    waiting.join(10)
    try:
        assert os.fstat(got["fd"]).st_ino == os.stat(lock_path(earlier)).st_ino
        assert not earlier.exists()
        staged(earlier, "k", "earlier", time.time() - 100)                     # the waiting run stages it again
        os.close(another)
        assert remove_earlier(current, "k") == [] and earlier.is_dir()
    finally:
        os.close(got["fd"])


def test_a_marker_naming_paths_is_not_lora_runs(tmp_path):
    """The marker names files in their set folder; one naming a path (a tampered or foreign file) is no marker, so
    nothing is read, linked or removed through it."""
    import json

    from lora_run_engines.stage import read_marker

    root = staged(tmp_path / "dataset-x", "k", "x", time.time())
    good = json.loads((root / MARKER).read_text())
    assert read_marker(root) == good
    for bad in ({"subject": {"s": {"file": "../../secret", "kind": "link", "image": "0"}}},
                {"../up": {}}, {"subject": {"a/b": {"file": "a", "kind": "link", "image": "0"}}}):
        (root / MARKER).write_text(json.dumps({**good, "sets": bad}))
        assert read_marker(root) is None, bad
