"""Running diffusion-pipe as a child process: stream and log its output, parse it, stop it cleanly.

The child runs in its own process group (the DeepSpeed launcher and one train.py per GPU), never through a
shell. Ctrl-C / SIGTERM arrive here as KeyboardInterrupt: the first one asks diffusion-pipe to save a
resumable checkpoint and quit (its ``save_quit`` signal file) and waits ``interrupt_grace`` seconds; a second
one, or the end of the grace period, stops the group (SIGINT, then SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from lora_run_engines import split_output

MAX_LINE = 16384          # parse at most this much of one line (the log keeps everything)
TAIL_LINES = 40


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
_DS_STEP = re.compile(r"\bsteps:\s*(\d+)\s+loss:\s*" + _FLOAT + r"(?P<rest>.*)", re.I)
_DP_STEP = re.compile(r"\bstep:\s*(\d+)\s*/\s*(\d+)\s+loss:\s*" + _FLOAT + r"(?P<rest>.*)", re.I)
_TQDM_STEP = re.compile(r"^Training:.*?\|\s*(\d+)/(\d+)\b.*?loss=" + _FLOAT, re.I)
_ITER_TIME = re.compile(r"iter time \(s\):\s*" + _FLOAT)
_SAMPLES = re.compile(r"samples/sec:\s*" + _FLOAT)
_LR = re.compile(r"\bstep=(\d+), skipped=(\d+), lr=\[?\s*" + _FLOAT)
_SAVE = re.compile(r"Saving model to directory (\S+)")
_EPOCH = re.compile(r"Started new epoch: (\d+)")
_RESUMED = re.compile(r"Resuming training from checkpoint\. Resuming at epoch: (\d+), step: (\d+)")
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


# ------------------------------------------------------------------------------------------ the process
@attrs.define
class Outcome:
    returncode: int | None
    interrupted: bool = False        # Ctrl-C / SIGTERM reached us
    graceful: bool = False           # ... and diffusion-pipe was asked to checkpoint and quit
    stalled: bool = False
    timed_out: bool = False
    duration_s: float = 0.0


class Supervisor:
    """Run `argv` in its own process group, tee its output to `log_path`, call `on_line` for every line."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path,
                 on_line: Callable[[str], None], tick: Callable[[], None] | None = None,
                 request_quit: Callable[[], bool] | None = None, stall_timeout: float = 0.0,
                 timeout: float | None = None, interrupt_grace: float = 600.0, kill_grace: float = 10.0,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic):
        self.argv, self.cwd, self.env, self.log_path = argv, cwd, env, log_path
        self.on_line, self.tick, self.request_quit = on_line, tick, request_quit
        self.stall_timeout, self.timeout = stall_timeout, timeout
        self.interrupt_grace, self.kill_grace = interrupt_grace, kill_grace
        self.echo, self.clock = echo, clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: list[str] = []
        self.deferred_error: BaseException | None = None

    # -- signals to the whole group -----------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, first: int = signal.SIGTERM) -> None:
        """Stop the group: `first`, then SIGTERM, then SIGKILL, `kill_grace` seconds apart."""
        for sig in dict.fromkeys((first, signal.SIGTERM, signal.SIGKILL)):
            if self.proc is None or (self.proc.poll() is not None and not self._group_alive()):
                return
            self._signal(sig)
            deadline = self.clock() + (self.kill_grace if sig != signal.SIGKILL else 5.0)
            while self.clock() < deadline:
                if self.proc.poll() is not None and not self._group_alive():
                    return
                time.sleep(0.05)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = self.clock()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: queue.Queue[bytes | None] = queue.Queue()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} lora-run launches: {' '.join(self.argv)}\n"
                      .encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, cwd=str(self.cwd), env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            reader = threading.Thread(target=_read_lines, args=(self.proc.stdout, lines), daemon=True)
            reader.start()
            outcome = Outcome(None)
            last_output = last_check = self.clock()
            quit_deadline: float | None = None
            eof = False
            exited_at: float | None = None
            try:
                while True:
                    try:
                        try:
                            raw = lines.get(timeout=0.2)
                        except queue.Empty:
                            raw = b""
                        if raw is None:
                            eof = True
                        elif raw:
                            last_output = self.clock()
                            log.write(raw + b"\n")
                            log.flush()
                            text = raw.decode("utf-8", errors="replace")
                            self.tail = [*self.tail[-(TAIL_LINES - 1):], text[:500]]
                            self.on_line(text)
                        now = self.clock()
                        if raw and now - last_check < 0.2:
                            continue                   # a chatty child: check the clocks 5 times a second
                        last_check = now
                        if self.tick is not None:
                            self.tick()
                        if self.proc.poll() is not None:
                            exited_at = exited_at or now
                            if eof or now - exited_at > 5.0:   # grandchildren may hold the pipe open
                                break
                            continue
                        if quit_deadline is not None and now > quit_deadline:
                            self.echo("diffusion-pipe did not stop in time; stopping it")
                            self.stop(signal.SIGINT)
                            break
                        if self.timeout is not None and now - started > self.timeout:
                            outcome.timed_out = True
                            self.stop(signal.SIGINT)
                            break
                        if self.stall_timeout and now - last_output > self.stall_timeout:
                            outcome.stalled = True
                            self.stop(signal.SIGINT)
                            break
                    except KeyboardInterrupt:
                        if outcome.interrupted:
                            self.echo("second interrupt: stopping diffusion-pipe now")
                            self.stop(signal.SIGINT)
                            break
                        outcome.interrupted = True
                        if self.request_quit is not None and self.request_quit():
                            outcome.graceful = True
                            quit_deadline = self.clock() + self.interrupt_grace
                            self.echo("interrupt: asked diffusion-pipe to save a resumable checkpoint and stop "
                                      f"(waiting up to {self.interrupt_grace:.0f} s; Ctrl-C again to stop now)")
                        else:
                            self.echo("interrupt: stopping diffusion-pipe")
                            self.stop(signal.SIGINT)
                            break
            except BaseException:
                self.stop(signal.SIGINT)
                raise
            finally:
                if self.proc.poll() is None:
                    self.stop(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                    pass
                _drain(lines, log, self)
            outcome.returncode = self.proc.returncode
            outcome.duration_s = self.clock() - started
            log.write(f"=== exit code {outcome.returncode}\n".encode())
        if self.deferred_error is not None:
            raise self.deferred_error
        return outcome


def _read_lines(stream: Any, out: queue.Queue) -> None:
    """Split the child's bytes on \\n and \\r (progress bars redraw with \\r); None marks the end."""
    read = stream.read1 if hasattr(stream, "read1") else stream.read
    try:
        split_output(lambda: read(65536), out.put)
    finally:
        out.put(None)


def _drain(lines: queue.Queue, log: Any, sup: Supervisor) -> None:
    while True:
        try:
            raw = lines.get_nowait()
        except queue.Empty:
            return
        if raw:
            log.write(raw + b"\n")
            text = raw.decode("utf-8", errors="replace")
            sup.tail = [*sup.tail[-(TAIL_LINES - 1):], text[:500]]
            try:
                sup.on_line(text)
            except Exception as exc:  # noqa: BLE001 - raised once the child is gone (e.g. a NaN loss)
                sup.deferred_error = sup.deferred_error or exc
