"""Launch sd-scripts without a shell, stream its output to a log, parse its progress bar, stop it cleanly.

sd-scripts reports training progress through tqdm (on stderr, updated with carriage returns)::

    steps:  10%|█         | 150/1500 [01:23<12:34,  1.79it/s, avr_loss=0.123]

:func:`parse_progress` turns such a line into a :class:`Progress`; :class:`Supervisor` runs the child in its
own process group, splits its output on ``\\r`` and ``\\n``, writes every line (progress lines only when
the step changes) to the log, and calls back for each new step. Ctrl-C / SIGTERM (which the core turns
into ``KeyboardInterrupt``) are forwarded to the whole group: SIGINT first, then SIGTERM, then SIGKILL.
No torch here.
"""
from __future__ import annotations

import collections
import math
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import attrs

from lora_run_engines import split_output

_BAR = re.compile(
    r"(?P<desc>[\w ./-]*?):\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<step>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+),\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>it/s|s/it)?"
    r"(?:,\s*(?P<post>[^\]]*))?\]")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf|-inf)$", re.I)


@attrs.frozen
class Progress:
    """One parsed progress-bar update of sd-scripts' training loop."""

    step: int
    total: int
    it_per_s: float | None
    elapsed: str
    remaining: str
    values: dict[str, float]        # the bar's postfix: avr_loss, and whatever else sd-scripts shows

    @property
    def loss(self) -> float | None:
        for key in ("loss", "current_loss", "loss/current", "avr_loss", "loss/average"):
            if key in self.values:
                return self.values[key]
        return None


def parse_progress(line: str, desc: str = "steps") -> Progress | None:
    """The training bar's state from one output line, or None (other bars, e.g. latent caching, are skipped)."""
    match = None
    for m in _BAR.finditer(line):
        if m["desc"].strip().endswith(desc):
            match = m
    if match is None:
        return None
    rate: float | None = None
    if match["rate"] not in (None, "?"):
        value = float(match["rate"])
        if match["unit"] == "s/it":
            rate = 1.0 / value if value > 0 else None
        else:
            rate = value
    values: dict[str, float] = {}
    for part in (match["post"] or "").split(","):
        key, sep, raw = part.partition("=")
        raw = raw.strip()
        if sep and _NUMBER.match(raw):
            values[key.strip()] = float(raw)
    return Progress(int(match["step"]), int(match["total"]), rate, match["elapsed"], match["remaining"], values)


class Stalled(Exception):
    """No output for longer than the stall limit."""


class TimedOut(Exception):
    """The whole run took longer than the time limit."""


class Supervisor:
    """Runs one child process and streams its output; see the module docstring."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
                 on_progress: Callable[[Progress], None] | None = None, stall_seconds: float | None = None,
                 timeout_seconds: float | None = None, poll: Callable[[], None] | None = None,
                 grace_seconds: float = 30.0, keep_lines: int = 40):
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.on_line = on_line
        self.on_progress = on_progress
        self.stall_seconds = stall_seconds
        self.timeout_seconds = timeout_seconds
        self.poll = poll
        self.grace_seconds = grace_seconds
        self.tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.last_progress: Progress | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pending: tuple[Progress, str, bool] | None = None   # (progress, line, already logged)
        self._reported = 0          # the last step handed to on_progress (step 0 is the bar's initial state)

    # -------------------------------------------------------------------------------------------- running
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # start_new_session: Ctrl-C in the terminal reaches lora-run only, which forwards it to the whole group.
        # SIGINT is reset to its default in the child: lora-run started with `&` or nohup has SIGINT ignored, and
        # the child would inherit that and sit out the grace period (seen with the real sd-scripts).
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)
        threading.Thread(target=self._read, name="sd-scripts-output", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            split_output(lambda: os.read(fd, 65536), lambda line: self._lines.put(line.decode("utf-8", "replace").rstrip()))
        finally:
            self._lines.put(None)

    def wait(self) -> int:
        """Stream until the child exits; returns its exit code. Raises Stalled, TimedOut or KeyboardInterrupt
        (after stopping the child's whole process group)."""
        assert self.proc is not None
        started = last_output = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            try:
                finished = False
                while not finished:
                    try:
                        line = self._lines.get(timeout=0.5)
                    except queue.Empty:
                        line = ""
                    now = time.monotonic()
                    if line is None:
                        finished = True
                        self._flush(log)
                    elif not line and self.proc.poll() is not None and now - last_output > 5.0:
                        finished = True  # the child is gone; a grandchild still holds the pipe open
                        self._flush(log)
                    elif line:
                        last_output = now
                        self._handle(line, log)
                    if self.poll is not None:
                        self.poll()
                    if not finished and self.stall_seconds and now - last_output > self.stall_seconds:
                        raise Stalled()
                    if not finished and self.timeout_seconds and now - started > self.timeout_seconds:
                        raise TimedOut()
                return self.proc.wait()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    try:  # the bar already showed the step sd-scripts finished last: report it
                        self._flush(log)
                    except Exception:  # noqa: BLE001 - stopping the child comes first
                        pass
                log.write(f"[lora-run] stopping sd-scripts (process group {self.proc.pid}): "
                          f"{type(exc).__name__}\n")
                log.flush()
                self.stop(interrupt=isinstance(exc, KeyboardInterrupt))
                raise

    def _handle(self, line: str, log) -> None:  # noqa: ANN001 - a text file
        progress = parse_progress(line)
        if progress is not None and progress.it_per_s is None and not progress.values:
            progress = None     # the bar's first draw (`0/N [00:00<?, ?it/s]`, or `k/N` after a resume)
        if progress is not None:
            # sd-scripts calls bar.update(1) and only later set_postfix(avr_loss=...): the last line printed for a
            # step carries that step's values, so a step is reported when the next one starts (or at the end).
            if self._pending is not None and self._pending[0].step != progress.step:
                self._flush(log)
            self._pending = (progress, line, False)
            return
        self._write_pending(log)
        self._write(line, log)
        if self.on_line is not None:
            self.on_line(line)

    def _write(self, line: str, log) -> None:  # noqa: ANN001 - a text file
        log.write(line + "\n")
        log.flush()
        self.tail.append(line)

    def _write_pending(self, log) -> None:  # noqa: ANN001 - a text file
        """Log the current step's line before an unrelated line, so the log keeps the output's order."""
        if self._pending is not None and not self._pending[2]:
            self._write(self._pending[1], log)
            self._pending = (self._pending[0], self._pending[1], True)

    def _flush(self, log) -> None:  # noqa: ANN001 - a text file
        if self._pending is None:
            return
        progress, line, written = self._pending
        self._pending = None
        if not written:
            self._write(line, log)
        if progress.step > self._reported:
            self._reported = progress.step
            self.last_progress = progress
            if self.on_progress is not None:
                self.on_progress(progress)

    def stop(self, *, interrupt: bool) -> None:
        """Stop the whole process group: SIGINT (when ``interrupt``), then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        steps = ([(signal.SIGINT, self.grace_seconds)] if interrupt else []) + [(signal.SIGTERM, 10.0),
                                                                                 (signal.SIGKILL, 5.0)]
        for sig, wait_s in steps:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C escalates at once
                continue
        try:  # nothing of the group may outlive us
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)
