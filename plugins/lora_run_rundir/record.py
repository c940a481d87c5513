"""The record lora-run leaves in a folder it writes beside a run's own (an evaluation's ``eval-<LoRA>``, written by
`lora-run eval` next to the LoRA it evaluates): :data:`OUTPUT_RECORD` names what wrote the folder and every entry it
writes there. It is written before anything else goes in, so a folder cut short is recorded too; a writer stopped
before its first output (a refusal) takes the record back (:func:`recorded_output`), leaving nothing behind.

The run folder counts such a folder as a run's own (``run --overwrite`` deletes it with the old run) only when its
record is lora-run's and every entry it holds is listed there (or is the temporary file of one of lora-run's atomic
writes): a file merely named like a writer's own output (a ``metrics.json``, a ``report.html``) proves nothing, and a
user's file added later makes the folder theirs. The run-folder plugin reads the record, never the writer's files,
so it stays independent of the plugin that wrote them. When the writer is done (or stops after writing something), the
record also lists every entry inside the folders it wrote (``files``): a user's file added inside one of them (a picked
image in ``images/``) makes the folder theirs too. No torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lora_run.errors import LoraRunError

from .atomic import TEMP_FILE, atomic_write_text, folder_lock, make_folder, parse_json

OUTPUT_RECORD = ".lora-run-output.json"
#: the writer's name in the record of an evaluation folder (``lora_run_eval``'s `lora-run eval`)
EVALUATION = "evaluation"
#: a record larger than this is not lora-run's (its ``files`` list names each image of an evaluation)
RECORD_LIMIT = 16 << 20


def plain_name(name: object) -> bool:
    """A name of one entry in a folder: no path (no separator), not "", "." or "..", no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and "\0" not in name)


def tree(folder: Path, names: Iterable[str]) -> set[str]:
    """Every entry inside the sub-folders ``names`` of ``folder`` (files, folders, links; a link is never followed),
    as paths relative to ``folder`` with ``/`` between parts. A name that is no real folder (a file, a link) holds
    nothing; what cannot be read is left out."""
    out: set[str] = set()
    for name in names:
        top = folder / name
        if os.path.islink(top) or not top.is_dir():
            continue
        for root, dirs, files in os.walk(top):     # links to folders are listed, never walked
            rel = Path(root).relative_to(folder).as_posix()
            out.update(f"{rel}/{n}" for n in (*dirs, *files))
    return out


def unlisted(folder: Path, names: Iterable[str], listed: Any) -> list[str]:
    """The entries inside the sub-folders ``names`` of ``folder`` that ``listed`` (a record's ``files``) does not name,
    the temporary files of lora-run's atomic writes aside, sorted (a folder not listed stands for what it holds);
    none when ``listed`` is no list of names (a record from before the list, or of a writer that was killed:
    nothing to compare with)."""
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        return []
    known = set(listed)
    out = sorted(rel for rel in tree(folder, names) if rel not in known
                 and not (TEMP_FILE.match(rel.rsplit("/", 1)[-1]) and os.path.isfile(folder / rel)
                          and not os.path.islink(folder / rel)))
    found = set(out)
    return [rel for rel in out if rel.rsplit("/", 1)[0] not in found]    # a folder added, not each thing in it


def write_output_record(folder: Path, writer: str, entries: Iterable[str], files: Iterable[str] | None = None) -> None:
    """Record in ``folder`` (made when missing) that lora-run's ``writer`` writes ``entries`` (plain names) there;
    before the first of them is written. ``files``: every entry the writer wrote inside them (see :func:`tree`), once
    it is done."""
    names = sorted(set(entries))
    assert all(plain_name(n) for n in names) and OUTPUT_RECORD not in names, names
    make_folder(folder)
    data: dict[str, Any] = {"lora_run_output": writer, "entries": names}
    if files is not None:
        data["files"] = sorted(files)
    atomic_write_text(folder / OUTPUT_RECORD, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def recorded_output(folder: Path, writer: str, entries: Iterable[str],
                    prepare: Callable[[], None] | None = None) -> Iterator[None]:
    """:func:`write_output_record`, then the writer's work, the folder locked throughout (:func:`folder_lock`: a second
    writer into it is refused); ``prepare`` runs first under the lock (the writer's checks of the folder and its
    clearing of an earlier output, which another writer could otherwise change between check and write). When the
    work raises while the folder holds nothing but the record, the record is removed again, and the folder when this
    made it: a refusal before the first output leaves nothing behind. Otherwise, done or stopped, the record is
    written again with the ``files`` the writer left in its folders."""
    names = sorted(set(entries))
    made = False
    if not os.path.lexists(folder):
        make_folder(folder.parent)
        try:
            os.mkdir(folder)
            made = True
        except FileExistsError:     # another writer made it just now: its lock decides
            pass
        except OSError:
            make_folder(folder)     # names the folder and the reason
    with folder_lock(folder, f"an {writer}" if writer[:1] in "aeiou" else f"a {writer}"):
        try:
            if prepare is not None:
                prepare()
            write_output_record(folder, writer, names)
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                if [e.name for e in folder.iterdir()] == [OUTPUT_RECORD]:
                    os.unlink(folder / OUTPUT_RECORD)
                    if made:
                        folder.rmdir()
                    raise
            _record_files(folder, writer, names)
            raise
        _record_files(folder, writer, names)


def _record_files(folder: Path, writer: str, names: list[str]) -> None:
    with contextlib.suppress(OSError, LoraRunError):     # a full disk: the record without its list, as before
        write_output_record(folder, writer, names, tree(folder, names))


def _read(folder: Path) -> dict[str, Any] | None:
    """``folder``'s record as a JSON object of lora-run's form, or None."""
    path = folder / OUTPUT_RECORD
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_LIMIT:
            return None
        data = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("lora_run_output"), str):
        return None
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(plain_name(n) for n in entries):
        return None
    return data


def read_output_record(folder: Path) -> tuple[str, set[str]] | None:
    """(writer, entries) of ``folder``'s record, or None: no record, or a file under its name that is not lora-run's
    record (a link, not a regular file, too large, not a JSON object of that form)."""
    data = _read(folder)
    return None if data is None else (data["lora_run_output"], set(data["entries"]))


def unrecorded(folder: Path, writer: str) -> list[str] | None:
    """The entries of ``folder`` that ``writer``'s record there does not list (its own record and the temporary files
    of atomic writes aside), sorted, then those inside its folders that its ``files`` do not list (``a/b`` paths);
    None when ``folder`` is not a real folder (a link, a file) or holds no record of ``writer``'s."""
    if os.path.islink(folder) or not folder.is_dir():
        return None
    record = _read(folder)
    if record is None or record["lora_run_output"] != writer:
        return None
    listed = set(record["entries"]) | {OUTPUT_RECORD}
    out = []
    for entry in folder.iterdir():
        if entry.name in listed:
            continue
        if TEMP_FILE.match(entry.name) and entry.is_file() and not entry.is_symlink():
            continue
        out.append(entry.name)
    # inside the writer's own folders: what its record lists when it was done (a user's picks added since)
    return sorted(out) + unlisted(folder, sorted(set(record["entries"])), record.get("files"))
