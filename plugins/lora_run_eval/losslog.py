"""Collects the training loss from the `step_finished` hook into `<run>/eval/loss.jsonl`.

The file is rewritten atomically (every FLUSH_EVERY steps, at each checkpoint and at the end), never
appended in place, so a crash leaves the previous complete file. On resume the earlier history is kept
up to the step the run continues from. Checkpoints seen through `checkpoint_saved` are remembered for the
evaluator too (in case a backend does not list them in `ctx.artifacts`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lora_run_rundir import atomic_write_text

LOSS_FILE = "loss.jsonl"
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
        self.dirty = 0
        self.loaded = False

    def _load(self, first_step: int) -> None:
        self.loaded = True
        for row in read_rows(self.path):
            try:
                if int(row["step"]) < first_step:
                    self.rows.append(row)
            except (ValueError, KeyError, TypeError, OverflowError):
                continue

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
        self.dirty += 1
        if self.dirty >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.dirty and self.path.exists():
            return
        if not self.rows:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.dirty = 0


_LOGS: dict[str, LossLog] = {}


def log_for(run: Any) -> LossLog | None:
    run_dir = getattr(run, "run_dir", None)
    if run_dir is None:
        return None
    key = str(Path(run_dir.path).resolve())
    if key not in _LOGS:
        _LOGS[key] = LossLog(Path(key) / "eval" / LOSS_FILE)
    return _LOGS[key]


def finish(run: Any) -> None:
    log = log_for(run)
    if log is not None:
        log.flush()
        _LOGS.pop(str(Path(run.run_dir.path).resolve()), None)
