"""Run an external engine as a child process: stream and log its output, parse it, stop it cleanly.

One :class:`Supervisor` serves every engine backend. The child runs without a shell, in its own process group
(an engine's launcher and its workers), with SIGINT at its default (lora-run started with ``&`` or nohup has
SIGINT ignored, and the child would inherit that). Its output is split on ``\\n`` and ``\\r`` (progress bars
redraw with ``\\r``), written to the log as UTF-8 (undecodable bytes replaced) and handed to the backend (the first
``PARSE_CHARS`` characters of a line: a 1 MiB line of an engine printing without line breaks kept lora-run's progress
parser busy for hours):

- ``on_line(text)`` for every line that is not a progress redraw;
- ``progress(text)`` (optional) parses a progress-bar line into an object with a ``step``; redraws of one step
  are collapsed, and ``on_progress`` gets each step once, with the last values drawn for it (an engine may
  draw a step before it sets that step's loss), when the next step starts, at the end or on Ctrl-C;
- ``poll()`` at most five times a second (watch the output folder), ``request_quit()`` on the first Ctrl-C
  (ask the engine to save and stop; return False when it cannot, or a line to show instead of "asked … to save a
  resumable checkpoint and stop" when the engine is waited for without being asked, e.g. it is already ending).

Ctrl-C and SIGTERM arrive as KeyboardInterrupt (the core turns SIGTERM into one). The first asks the engine to
quit through ``request_quit`` and waits ``quit_grace`` seconds for it; without that, or on a second Ctrl-C,
the group gets SIGINT, then SIGTERM, then SIGKILL. :meth:`Supervisor.run` returns an :class:`Outcome`: exit
code, interrupted, stalled (no output for ``stall_seconds``), timed out (``timeout_seconds``). An exception
raised by a callback stops the child and is re-raised (one raised after the child exited, once it is gone).
No torch, no engine import.
"""
from __future__ import annotations

import collections
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs

from . import PARSE_CHARS, split_output

#: characters of one line kept in the tail shown on failure (the log keeps everything)
TAIL_CHARS = 2000
TICK = 0.2


@attrs.define
class Outcome:
    returncode: int | None
    interrupted: bool = False        # Ctrl-C / SIGTERM reached us
    graceful: bool = False           # ... and the engine was waited for (request_quit answered)
    stalled: bool = False
    timed_out: bool = False
    duration_s: float = 0.0


class Supervisor:
    """Runs one child process and streams its output; see the module docstring."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, name: str = "the engine", cwd: Path | None = None,
                 env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
                 progress: Callable[[str], Any] | None = None, on_progress: Callable[[Any], None] | None = None,
                 poll: Callable[[], None] | None = None, request_quit: Callable[[], bool | str] | None = None,
                 stall_seconds: float | None = None, timeout_seconds: float | None = None,
                 grace_seconds: float = 30.0, quit_grace: float = 600.0, kill_grace: float = 10.0,
                 keep_lines: int = 40, echo: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, pass_fds: Sequence[int] = ()):
        self.argv = [str(a) for a in argv]
        self.log_path, self.name, self.cwd, self.env = log_path, name, cwd, env
        self.on_line, self.progress, self.on_progress = on_line, progress, on_progress
        self.poll, self.request_quit = poll, request_quit
        self.stall_seconds, self.timeout_seconds = stall_seconds, timeout_seconds
        self.grace_seconds, self.quit_grace, self.kill_grace = grace_seconds, quit_grace, kill_grace
        self.echo, self.clock = echo, clock
        self.pass_fds = tuple(pass_fds)     # descriptors the child keeps open (a staged folder's lock)
        self.tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.last_progress: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pending: list[Any] | None = None      # [progress, line, already logged]
        self._reported = 0                          # the last step handed to on_progress
        self._log: Any = None

    # ------------------------------------------------------------------------------------------ the child
    def start(self) -> None:
        """Open the log, then launch the child (OSError when it cannot be started) and the thread that reads its
        output. The log is opened first, so a log that cannot be appended to (``open_append``: a link, a FIFO under
        its name; OutputError) stops the run before the engine starts; a log with other names (a resumed run folder
        copied with ``cp -al``) gets its own copy, so the copy's log never grows."""
        from lora_run_rundir import open_append

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open_append(self.log_path, errors="replace")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=None if self.cwd is None else str(self.cwd), env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_default_sigint, pass_fds=self.pass_fds)
        except BaseException:
            self._log.close()
            raise
        threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            split_output(lambda: os.read(fd, 65536),
                         lambda raw: self._lines.put(raw.decode("utf-8", "replace").rstrip()))
        finally:
            self._lines.put(None)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)  # type: ignore[union-attr]
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _gone(self) -> bool:
        return self.proc is None or (self.proc.poll() is not None and not self._group_alive())

    def stop(self, *, interrupt: bool, grace: float | None = None) -> None:
        """Stop the whole process group: SIGINT (when ``interrupt``; then ``grace`` seconds, by default
        ``grace_seconds``), then SIGTERM (``kill_grace`` seconds), then SIGKILL. A Ctrl-C while waiting moves on
        to the next signal at once."""
        steps = ([(signal.SIGINT, self.grace_seconds if grace is None else grace)] if interrupt else []) + \
            [(signal.SIGTERM, self.kill_grace), (signal.SIGKILL, 5.0)]
        for sig, wait_s in steps:
            if self._gone():
                return
            try:
                os.killpg(self.proc.pid, sig)  # type: ignore[union-attr]
            except (ProcessLookupError, PermissionError):
                pass
            deadline = self.clock() + wait_s
            try:
                while self.clock() < deadline:
                    if self._gone():
                        return
                    time.sleep(0.05)
            except KeyboardInterrupt:   # a second Ctrl-C escalates at once
                continue

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> Outcome:
        """Stream until the child exits (starting it first if needed); see the module docstring."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        started = last_output = last_check = self.clock()
        outcome = Outcome(None)
        quit_deadline: float | None = None
        exited_at: float | None = None
        eof = False
        with self._log:
            shown = shlex.join(self.argv).replace("\n", "\\n")
            self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} lora-run launches: {shown}\n")
            self._log.flush()
            try:
                while True:
                    try:
                        try:
                            line = self._lines.get(timeout=TICK)
                        except queue.Empty:
                            line = ""
                        if line is None:
                            eof = True
                        elif line:
                            last_output = self.clock()
                            self._handle(line)
                        now = self.clock()
                        if line and now - last_check < TICK:
                            continue                # a chatty child: look at the clocks five times a second
                        last_check = now
                        if self.poll is not None:
                            self.poll()
                        if self.proc.poll() is not None:
                            exited_at = exited_at or now
                            if eof or now - exited_at > 5.0:    # a grandchild may hold the pipe open
                                break
                            continue
                        if quit_deadline is not None and now > quit_deadline:
                            self._say(f"{self.name} did not stop in time; stopping it")
                            self._stop_logged(outcome, "did not quit in time", grace=self.kill_grace)
                            break
                        if self.timeout_seconds and now - started > self.timeout_seconds:
                            outcome.timed_out = True
                            self._stop_logged(outcome, "TimedOut", grace=self.kill_grace)
                            break
                        if self.stall_seconds and now - last_output > self.stall_seconds:
                            outcome.stalled = True
                            self._stop_logged(outcome, "Stalled", grace=self.kill_grace)
                            break
                    except KeyboardInterrupt:
                        self._flush()       # the bar already showed the last step the engine finished
                        if outcome.interrupted:
                            self._say(f"second interrupt: stopping {self.name} now")
                            self._stop_logged(outcome, "KeyboardInterrupt", grace=self.kill_grace)
                            break
                        outcome.interrupted = True
                        answer = self.request_quit() if self.request_quit is not None else False
                        if answer:
                            outcome.graceful = True
                            quit_deadline = self.clock() + self.quit_grace
                            what = answer if isinstance(answer, str) else \
                                f"asked {self.name} to save a resumable checkpoint and stop"
                            self._say(f"interrupt: {what} (waiting up to {self.quit_grace:.0f} s; Ctrl-C again to "
                                      "stop now)")
                        else:
                            self._say(f"interrupt: stopping {self.name}")
                            self._stop_logged(outcome, "KeyboardInterrupt")
                            break
            except BaseException as exc:
                self._stop_logged(outcome, type(exc).__name__, grace=self.kill_grace)
                raise
            finally:
                if not self._gone():
                    self.stop(interrupt=False)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                    pass
                deferred = self._drain()
                outcome.returncode = self.proc.returncode
                outcome.duration_s = self.clock() - started
                self._log.write(f"=== exit code {outcome.returncode}\n")
        if deferred is not None:
            raise deferred
        return outcome

    def _say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)

    def _stop_logged(self, outcome: Outcome, why: str, grace: float | None = None) -> None:
        if self._gone():
            return
        self._write(f"[lora-run] stopping {self.name} (process group {self.proc.pid}): {why}")  # type: ignore[union-attr]
        self.stop(interrupt=True, grace=grace)

    def _drain(self) -> BaseException | None:
        """Handle what the child printed before it exited; an error raised by a callback now is returned."""
        error: BaseException | None = None
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line:
                try:
                    self._handle(line)
                except Exception as exc:  # noqa: BLE001 - raised once the child is gone (e.g. a NaN loss)
                    error = error or exc
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001 - likewise
            error = error or exc
        return error

    # ------------------------------------------------------------------------------------------ lines
    def _handle(self, line: str) -> None:
        text = line[:PARSE_CHARS]           # what the backend parses; the log keeps the whole line
        parsed = self.progress(text) if self.progress is not None else None
        if parsed is not None:
            if self._pending is not None and self._pending[0].step != parsed.step:
                self._flush()
            self._pending = [parsed, line, False]
            return
        self._write_pending()
        self._write(line)
        if self.on_line is not None:
            self.on_line(text)

    def _write(self, line: str) -> None:
        self._log.write(line + "\n")
        self._log.flush()
        self.tail.append(line[:TAIL_CHARS])

    def _write_pending(self) -> None:
        """Log the current step's line before an unrelated line, so that the log keeps the output's order."""
        if self._pending is not None and not self._pending[2]:
            self._write(self._pending[1])
            self._pending[2] = True

    def _flush(self) -> None:
        if self._pending is None:
            return
        parsed, line, written = self._pending
        self._pending = None
        if not written:
            self._write(line)
        if parsed.step > self._reported:
            self._reported = parsed.step
            self.last_progress = parsed
            if self.on_progress is not None:
                self.on_progress(parsed)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
