"""Staging a dataset for an engine: one folder per image set, holding exactly the files the engine must read.

Engines read images and ``<stem>.txt`` captions from folders, so each backend decides the file names and
what each file is (a :class:`Staged`); :func:`sync_folder` makes the folder hold exactly that: a link to the
user's image (a copy where asked, or where the file system has no symlinks), a PNG for an image the dataset
lint had to convert (EXIF rotation, CMYK, 16-bit, alpha, …: every backend trains on the same pixels), and
the training caption. A file already as wanted is left alone (a re-run re-uses the engine's caches); an
entry no longer wanted is removed when the backend's ``removable`` says so (the engine's own cache is kept).
Only lora-run's staging folders are ever touched. No torch.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import attrs

from . import stage_link


def safe_stem(stem: str) -> str:
    """An image's stem as part of a staged file name: letters, digits, ``._-`` (others become ``_``), at most 80
    characters, so the name fits the file system (a 255-byte stem plus our prefix does not) and holds no line
    break or quote for the engine to trip over."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "image"


@attrs.frozen
class Staged:
    """What one staged file is: ``link`` / ``copy`` of ``source``, ``png`` (``source`` decoded and converted
    as the dataset lint does), or ``text`` (a caption)."""

    kind: str
    source: Path | None = None
    text: str = ""


def place(target: Path, staged: Staged) -> None:
    """Make ``target`` what ``staged`` says, atomically; nothing is written when it already is."""
    from lora_run_rundir import atomic_path, atomic_write_text

    if staged.kind == "text":
        if target.is_file() and not target.is_symlink() and target.read_text("utf-8") == staged.text:
            return
        atomic_write_text(target, staged.text)
        return
    assert staged.source is not None
    if staged.kind == "link":
        stage_link(staged.source, target)
        return
    if target.is_file() and not target.is_symlink() and \
            target.stat().st_mtime_ns >= staged.source.stat().st_mtime_ns and \
            (staged.kind == "png" or target.stat().st_size == staged.source.stat().st_size):
        return
    if target.is_symlink():
        target.unlink()
    with atomic_path(target) as tmp:
        if staged.kind == "copy":
            shutil.copyfile(staged.source, tmp)
        elif staged.kind == "png":
            from lora_run_folder.images import open_rgb

            open_rgb(staged.source).image.save(tmp, format="PNG")  # type: ignore[attr-defined]
        else:
            raise ValueError(f"unknown staging kind {staged.kind!r}")


def sync_folder(folder: Path, wanted: dict[str, Staged], removable: Callable[[Path], bool]) -> None:
    """``folder`` holds every ``wanted`` file (name → what it is); other entries that are ``removable`` go."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name in wanted or not removable(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name, staged in wanted.items():
        place(folder / name, staged)
