"""The record lora-run leaves in a folder it writes beside a run's own (an evaluation's ``eval-<LoRA>``, written by
`lora-run eval` next to the LoRA it evaluates): :data:`OUTPUT_RECORD` names what wrote the folder and every entry it
writes there. It is written before anything else goes in, so a folder cut short is recorded too; a writer stopped
before its first output (a refusal) takes the record back (:func:`recorded_output`), leaving nothing behind.

The run folder counts such a folder as a run's own (``run --overwrite`` deletes it with the old run) only when its
record is lora-run's and every entry it holds is listed there (or is the temporary file of one of lora-run's atomic
writes): a file merely named like a writer's own output (a ``metrics.json``, a ``report.html``) proves nothing, and a
user's file added later makes the folder theirs. The run-folder plugin reads the record, never the writer's files,
so it stays independent of the plugin that wrote them. No torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import TEMP_FILE, atomic_write_text

OUTPUT_RECORD = ".lora-run-output.json"
#: the writer's name in the record of an evaluation folder (``lora_run_eval``'s `lora-run eval`)
EVALUATION = "evaluation"
#: a record larger than this is not lora-run's
RECORD_LIMIT = 65536


def _plain(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def write_output_record(folder: Path, writer: str, entries: Iterable[str]) -> None:
    """Record in ``folder`` (made when missing) that lora-run's ``writer`` writes ``entries`` (plain names) there;
    before the first of them is written."""
    names = sorted(set(entries))
    assert all(_plain(n) for n in names) and OUTPUT_RECORD not in names, names
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / OUTPUT_RECORD, json.dumps({"lora_run_output": writer, "entries": names}, indent=1) + "\n")


@contextlib.contextmanager
def recorded_output(folder: Path, writer: str, entries: Iterable[str]) -> Iterator[None]:
    """:func:`write_output_record`, then the writer's work; when that raises while the folder holds nothing but the
    record, the record is removed again, and the folder when this made it: a refusal before the first output leaves
    nothing behind."""
    made = not os.path.lexists(folder)
    write_output_record(folder, writer, entries)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if [e.name for e in folder.iterdir()] == [OUTPUT_RECORD]:
                os.unlink(folder / OUTPUT_RECORD)
                if made:
                    folder.rmdir()
        raise


def read_output_record(folder: Path) -> tuple[str, set[str]] | None:
    """(writer, entries) of ``folder``'s record, or None: no record, or a file under its name that is not lora-run's
    record (a link, not a regular file, too large, not a JSON object of that form)."""
    path = folder / OUTPUT_RECORD
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_LIMIT:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("lora_run_output"), str):
        return None
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(_plain(n) for n in entries):
        return None
    return data["lora_run_output"], set(entries)


def unrecorded(folder: Path, writer: str) -> list[str] | None:
    """The entries of ``folder`` that ``writer``'s record there does not list (its own record and the temporary files
    of atomic writes aside), sorted; None when ``folder`` is not a real folder (a link, a file) or holds no record of
    ``writer``'s."""
    if os.path.islink(folder) or not folder.is_dir():
        return None
    record = read_output_record(folder)
    if record is None or record[0] != writer:
        return None
    listed = record[1] | {OUTPUT_RECORD}
    out = []
    for entry in folder.iterdir():
        if entry.name in listed:
            continue
        if TEMP_FILE.match(entry.name) and entry.is_file() and not entry.is_symlink():
            continue
        out.append(entry.name)
    return sorted(out)
