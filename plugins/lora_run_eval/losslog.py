"""Collects the training loss from the `step_finished` hook into `<run>/eval/loss.jsonl`.

Each step's row is appended as it is reported, in one write, so a run killed at any moment (SIGKILL, a power cut
of the process) leaves every step it reported on disk, also those between its last checkpoint and the kill. When
a run starts or resumes, the file is first rewritten atomically with the earlier history up to the step the run
continues from (a resumed run trains the steps after its checkpoint again, and reports them again). An append never
reaches another name of the file: one with other names (a run folder copied with ``cp -al``) gets its own copy
first (``lora_run_rundir.open_append``). A row whose
append failed (a full disk) would leave a torn line that spoils the next one: after a failed append the rows are
kept in memory only and the whole file is rewritten atomically at the next checkpoint or the end (``flush``).
Checkpoints seen through `checkpoint_saved` are remembered for the evaluator too (in case a backend does not list
them in `ctx.artifacts`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from lora_run.errors import OutputError
from lora_run_rundir import atomic_write_text, open_append

LOSS_FILE = "loss.jsonl"
#: after a failed append, rewrite the whole file every this many steps
FLUSH_EVERY = 50


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a loss log, one a line; lines that are not one are skipped. The log is read as every file
    on a user's behalf is (``eval --lora`` reads the one of the LoRA's run folder): a regular file within
    ``lora_run_rundir.JSON_LIMIT``, never a FIFO (a read would wait forever) or ``/dev/zero``; a log that cannot be
    read is left out with a warning naming it, and bytes that are not UTF-8 or nesting too deep for Python spoil
    only their line."""
    import sys

    from lora_run.files import FileProblem, read_limited, shown
    from lora_run_rundir import JSON_LIMIT

    try:
        data = read_limited(path, "json", JSON_LIMIT)
    except FileProblem as exc:
        if os.path.lexists(path):
            print(f"warning: {shown(path)}: {exc}; its loss history is left out", file=sys.stderr)
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class LossLog:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.dirty = 0          # rows not on disk (an append failed): the next flush rewrites the file
        self.loaded = False

    def _load(self, first_step: int) -> None:
        """The history before ``first_step`` (the step this run continues from), rewritten atomically: the rows of
        the steps a resumed run trains again, reported by the run that was stopped, go."""
        self.loaded = True
        kept = []
        for row in read_rows(self.path):
            try:
                if int(row["step"]) < first_step:
                    kept.append(row)
            except (ValueError, KeyError, TypeError, OverflowError):
                continue
        self.rows = kept + self.rows
        if self.rows or os.path.lexists(self.path):
            self._rewrite()
        else:
            with contextlib.suppress(OSError):      # else the first append fails and the rows wait for a flush
                self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.loaded:
            self._load(step)
        loss = metrics.get("loss")
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            return
        row = {"step": int(step), "loss": loss if math.isfinite(loss) else None}
        for key in ("lr", "it_per_s"):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                row[key] = value
        self.rows.append(row)
        if self.dirty:          # an earlier append failed: appending now would join this row to a torn line
            self.dirty += 1
            if self.dirty >= FLUSH_EVERY:
                self.flush()
            return
        try:
            with open_append(self.path) as fh:      # never through a hard link (a copied run folder's log)
                fh.write(json.dumps(row) + "\n")
        except (OSError, OutputError):
            self.dirty = 1

    def flush(self) -> None:
        """Rewrite the file atomically where rows are not on disk (an append failed)."""
        if self.dirty and self.rows:
            self._rewrite()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.dirty = 0


_LOGS: dict[str, LossLog] = {}


def log_for(run: Any) -> LossLog | None:
    run_dir = getattr(run, "run_dir", None)
    if run_dir is None:
        return None
    key = str(Path(run_dir.path).resolve())
    if key not in _LOGS:
        run_dir.claim(f"eval/{LOSS_FILE}")      # the run's, in its manifest before the first row is written
        _LOGS[key] = LossLog(Path(key) / "eval" / LOSS_FILE)
    return _LOGS[key]


def finish(run: Any) -> None:
    log = log_for(run)
    if log is not None:
        log.flush()
        _LOGS.pop(str(Path(run.run_dir.path).resolve()), None)
