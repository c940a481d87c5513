"""diffusion-pipe's console output (its own lines and DeepSpeed's) parsed into events.

The process itself (the DeepSpeed launcher and one train.py per GPU, in one process group) is run by
:class:`lora_run_engines.supervise.Supervisor`, which hands every line to :class:`LogParser` through the
backend. Ctrl-C first asks diffusion-pipe to save a resumable checkpoint and quit (its ``save_quit`` signal
file, the backend's ``request_quit``) and waits ``interrupt_grace`` seconds; after ``TRAINING COMPLETE!`` it only
waits for the engine to exit, and the run completes.
"""
from __future__ import annotations

import math
import re
from typing import Any

import attrs

from lora_run_engines import PARSE_CHARS as MAX_LINE, STEP_NUMBER   # MAX_LINE: at most this much of a line

_N = f"({STEP_NUMBER})"


# ------------------------------------------------------------------------------------------ parsing
@attrs.frozen
class StepEvent:
    step: int
    loss: float
    metrics: dict[str, Any]


@attrs.frozen
class SaveEvent:
    name: str          # epoch<N> / step<N>


@attrs.frozen
class PhaseEvent:
    text: str


_FLOAT = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf|-inf))"
_DS_STEP = re.compile(r"\bsteps:\s*" + _N + r"\s+loss:\s*" + _FLOAT + r"(?P<rest>.*)", re.I)
_DP_STEP = re.compile(r"\bstep:\s*" + _N + r"\s*/\s*" + _N + r"\s+loss:\s*" + _FLOAT + r"(?P<rest>.*)", re.I)
_TQDM_STEP = re.compile(r"^Training:.*?\|\s*" + _N + "/" + _N + r"\b.*?loss=" + _FLOAT, re.I)
_ITER_TIME = re.compile(r"iter time \(s\):\s*" + _FLOAT)
_SAMPLES = re.compile(r"samples/sec:\s*" + _FLOAT)
_LR = re.compile(r"\bstep=(\d+), skipped=(\d+), lr=\[?\s*" + _FLOAT)
_SAVE = re.compile(r"Saving model to directory (\S+)")
_EPOCH = re.compile(r"Started new epoch: " + _N)
_RESUMED = re.compile(r"Resuming training from checkpoint\. Resuming at epoch: " + _N + ", step: " + _N)
_CACHING = re.compile(r"\b(cach(e|ing)|Map\b.*num_proc)", re.I)
COMPLETE = "TRAINING COMPLETE!"


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class LogParser:
    """diffusion-pipe / DeepSpeed console lines → events. Unknown lines are ignored; nothing here raises."""

    def __init__(self) -> None:
        self.lr: float | None = None
        self.epoch: int | None = None
        self.last_step = 0
        self.total: int | None = None
        self.completed = False
        self.resumed_at: int | None = None

    def feed(self, line: str) -> list[Any]:
        line = line[:MAX_LINE]
        events: list[Any] = []
        if COMPLETE in line:
            self.completed = True
            events.append(PhaseEvent("training complete"))
            return events
        match = _LR.search(line)
        if match:
            self.lr = _number(match[3])
            return events
        step = loss = None
        rest = ""
        match = _DS_STEP.search(line)
        if match:
            step, loss, rest = int(match[1]), _number(match[2]), match["rest"]
        else:
            match = _DP_STEP.search(line)
            if match:
                step, loss, rest = int(match[1]), _number(match[3]), match["rest"]
                self.total = int(match[2])
            else:
                match = _TQDM_STEP.search(line)
                if match:
                    step, loss = int(match[1]), _number(match[3])
                    self.total = int(match[2])
        if step is not None and loss is not None:
            if step <= self.last_step and not (self.resumed_at and step > self.resumed_at):
                return events        # a repeated report of a step already seen (tqdm redraws)
            metrics: dict[str, Any] = {"loss": loss}
            iter_time = _ITER_TIME.search(rest)
            if iter_time and _number(iter_time[1]) > 0:
                metrics["s_per_it"] = _number(iter_time[1])
                metrics["it_per_s"] = 1.0 / metrics["s_per_it"]
            samples = _SAMPLES.search(rest)
            if samples:
                metrics["samples_per_s"] = _number(samples[1])
            if self.lr is not None:
                metrics["lr"] = self.lr
            if self.epoch is not None:
                metrics["epoch"] = self.epoch
            self.last_step = step
            events.append(StepEvent(step, loss, metrics))
            return events
        match = _SAVE.search(line)
        if match:
            events.append(SaveEvent(match[1]))
            return events
        match = _EPOCH.search(line)
        if match:
            self.epoch = int(match[1])
            return events
        match = _RESUMED.search(line)
        if match:
            self.epoch, self.resumed_at = int(match[1]), int(match[2]) - 1
            self.last_step = self.resumed_at
            events.append(PhaseEvent(f"resumed at step {match[2]}"))
            return events
        if _CACHING.search(line):
            events.append(PhaseEvent("caching latents and text embeddings"))
        return events
