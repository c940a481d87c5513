"""sd-scripts' progress bar and the shared process supervisor driving it, with real subprocesses (never a shell)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from lora_run_engines.supervise import Supervisor
from lora_run_kohya.supervise import parse_progress, training_progress


@pytest.mark.parametrize("line, step, total, rate, values", [
    ("steps:  10%|█         | 150/1500 [01:23<12:34,  1.79it/s, avr_loss=0.123]", 150, 1500, 1.79,
     {"avr_loss": 0.123}),
    ("steps:  10%|█         | 150/1500 [08:37<1:17:33,  3.45s/it, avr_loss=0.0912]", 150, 1500, 1 / 3.45,
     {"avr_loss": 0.0912}),
    ("steps: 100%|██████████| 6/6 [00:00<00:00, 35.27it/s, avr_loss=nan]", 6, 6, 35.27, {"avr_loss": float("nan")}),
    ("steps:  33%|███▎      | 2/6 [00:01<00:02,  1.50it/s, avr_loss=0.4, lr=1e-4, loss/current=0.3]", 2, 6, 1.5,
     {"avr_loss": 0.4, "lr": 1e-4, "loss/current": 0.3}),
    ("\x1b[Asteps:  50%|█████     | 3/6 [00:00<00:00, 27.10it/s, avr_loss=0.49] 12:00 INFO generating samples",
     3, 6, 27.10, {"avr_loss": 0.49}),
])
def test_parse_progress(line, step, total, rate, values):
    p = parse_progress(line)
    assert p is not None and (p.step, p.total) == (step, total)
    assert p.it_per_s == pytest.approx(rate)
    assert p.values.keys() == values.keys()
    for k, v in values.items():
        assert p.values[k] == pytest.approx(v, nan_ok=True)


def test_loss_prefers_the_current_loss():
    assert parse_progress("steps: 1%|| 1/9 [00:01<00:09, 1.0it/s, avr_loss=0.5, loss/current=0.3]").loss == 0.3
    assert parse_progress("steps: 1%|| 1/9 [00:01<00:09, 1.0it/s, avr_loss=0.5]").loss == 0.5
    assert parse_progress("steps: 1%|| 1/9 [00:01<00:09, 1.0it/s]").loss is None


@pytest.mark.parametrize("line", [
    "100%|██████████| 4/4 [00:01<00:00, 3.2it/s]",                       # latent caching: no "steps" bar
    "caching latents: 100%|██████████| 4/4 [00:01<00:00, 3.2it/s]",
    "epoch 1/10", "", "steps: garbage 99%|| nonsense", "\ufffd\ufffd binary",
])
def test_other_lines_are_not_progress(line):
    assert parse_progress(line) is None


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


TQDM_LIKE = r"""
import sys, time
for i in range(1, 5):
    sys.stderr.write(f"\rsteps:  {i*25}%|##| {i}/4 [00:0{i}<00:00,  2.00it/s, avr_loss=0.{i}]")
    sys.stderr.flush()
    sys.stderr.write(f"\rsteps:  {i*25}%|##| {i}/4 [00:0{i}<00:00,  2.00it/s, avr_loss=0.{i}5]")
    sys.stderr.flush()
    print(f"\nINFO line {i}", flush=True)
    time.sleep(0.02)
sys.stdout.buffer.write(b"\xff\xfe invalid utf-8 \x00\n")
"""


def test_supervisor_streams_carriage_return_progress_and_reports_each_step_once(tmp_path):
    seen, lines = [], []
    sup = Supervisor(child(TQDM_LIKE), log_path=tmp_path / "train.log", progress=training_progress,
                     on_progress=seen.append, on_line=lines.append)
    assert sup.run().returncode == 0
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert [p.values["avr_loss"] for p in seen] == [0.15, 0.25, 0.35, 0.45]   # the step's last postfix
    assert "INFO line 3" in lines
    log = (tmp_path / "train.log").read_text("utf-8")
    assert log.count("4/4") == 1 and "invalid utf-8" in log
    assert "invalid utf-8" in list(sup.tail)[-1] and log.index("4/4") < log.rindex("invalid utf-8")


FLOOD = r"""
import sys
sys.stdout.buffer.write(b"\x1b[2J\x1b[31mred\r" + b"y" * (10 << 20) + b"\x1b[0m\n")
sys.stdout.flush()
sys.stderr.write("\rsteps:  50%|##| 2/4 [00:01<00:01,  2.00it/s, avr_loss=0.5]\n" + "9" * 5000 + "\n")
sys.stderr.write("steps:  50%|##| " + "9" * 5000 + "/4 [00:01<00:01,  2.00it/s, avr_loss=0.5]\n")
sys.stderr.write("\rsteps:  75%|##| 3/4 [00:01<00:01,  2.00it/s, avr_loss=0.4]\n")
"""


def test_a_flood_without_line_breaks_is_logged_whole_and_parsed_in_bounded_time(tmp_path):
    """10 MB without a line break (an engine printing without newlines, ANSI escapes and carriage returns in it), then
    a bar whose step has 5000 digits: the log keeps every byte, the steps around it are reported, in seconds. Before,
    the bar pattern took time quadratic in a line's length (26 s for 64 000 letters: hours for each 1 MiB piece), even
    after Ctrl-C, and the 5000-digit step raised ValueError out of the parser (the run "crashed"). The control times
    the old pattern on 16 000 letters: well over the new one's time on 10 MB."""
    import re

    lines: list[str] = []
    seen = []
    sup = Supervisor(child(FLOOD), log_path=tmp_path / "train.log", progress=training_progress,
                     on_progress=seen.append, on_line=lines.append)
    started = time.monotonic()
    assert sup.run().returncode == 0
    took = time.monotonic() - started
    assert took < 20, took
    assert [p.step for p in seen] == [2, 3]
    assert (tmp_path / "train.log").read_text("utf-8").count("y") >= 10 << 20
    assert max(len(line) for line in lines) <= 16384              # what a parser is handed
    # planted-mistake control: the old pattern's first part on 16 000 letters takes far longer than the parser now
    # takes on 1 MiB
    old = re.compile(r"(?P<desc>[\w ./-]*?):\s*(?P<pct>\d+)%\|")
    started = time.monotonic()
    training_progress("y" * (1 << 20))
    new = time.monotonic() - started
    started = time.monotonic()
    old.search("y" * 16000)
    assert time.monotonic() - started > 5 * new


def test_nonzero_exit_code_and_tail(tmp_path):
    sup = Supervisor(child("import sys\nfor i in range(50): print('line', i)\nsys.exit(3)"),
                     log_path=tmp_path / "t.log", keep_lines=10)
    assert sup.run().returncode == 3
    assert list(sup.tail) == [f"line {i}" for i in range(40, 50)]


def test_stall_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            f"print('started', flush=True)\ntime.sleep(60)\n")
    sup = Supervisor(child(code), log_path=tmp_path / "t.log", stall_seconds=1.5)
    started = time.monotonic()
    outcome = sup.run()
    assert outcome.stalled and not outcome.timed_out and not outcome.interrupted
    assert time.monotonic() - started < 20
    assert sup.proc.poll() is not None
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild survived the stop")


def test_total_timeout(tmp_path):
    sup = Supervisor(child("import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.1)"),
                     log_path=tmp_path / "t.log", timeout_seconds=1.0)
    outcome = sup.run()
    assert outcome.timed_out and not outcome.stalled
    assert sup.proc.poll() is not None


def test_ctrl_c_is_forwarded_as_sigint_first(tmp_path):
    code = ("import signal, sys, time\n"
            "def on_int(*_):\n    print('got SIGINT, saving', flush=True); sys.exit(130)\n"
            "signal.signal(signal.SIGINT, on_int)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    sup = Supervisor(child(code), log_path=tmp_path / "t.log", on_line=lambda line: None)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    outcome = sup.run()
    timer.cancel()
    assert outcome.interrupted and not outcome.graceful and outcome.returncode == 130
    log = (tmp_path / "t.log").read_text("utf-8")
    assert "got SIGINT, saving" in log      # what the child printed after the signal is logged too
    assert log.index("stopping the engine (process group") < log.rindex("got SIGINT, saving")


def test_child_ignoring_sigint_is_escalated(tmp_path):
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\n"
            "time.sleep(60)\n")
    sup = Supervisor(child(code), log_path=tmp_path / "t.log", grace_seconds=0.5)
    sup.start()
    time.sleep(0.5)
    started = time.monotonic()
    sup.stop(interrupt=True)
    assert sup.proc.poll() is not None and time.monotonic() - started < 15
    assert sup.proc.returncode == -signal.SIGTERM


def test_no_shell_is_involved(tmp_path):
    marker = tmp_path / "injected"
    argv = child("import sys; print(sys.argv[1:])") + [f"; touch {marker}", "$(touch x)", "'quoted'"]
    sup = Supervisor(argv, log_path=tmp_path / "t.log")
    assert sup.run().returncode == 0
    assert not marker.exists()
    assert "$(touch x)" in (tmp_path / "t.log").read_text()


def test_the_forwarded_sigint_reaches_the_child_even_when_lora_run_ignores_it(tmp_path):
    """lora-run started with `&` or nohup has SIGINT ignored; the engine must not inherit that, or a forwarded
    Ctrl-C would only take effect after the grace period (met with the real sd-scripts)."""
    import signal as _signal
    import sys as _sys
    import time as _time

    from lora_run_engines.supervise import Supervisor as _Supervisor

    previous = _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    try:
        sup = _Supervisor([_sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                          log_path=tmp_path / "log", grace_seconds=20.0)
        sup.start()
    finally:
        _signal.signal(_signal.SIGINT, previous)
    deadline = _time.monotonic() + 20
    while _time.monotonic() < deadline and "up" not in sup._lines.queue:
        _time.sleep(0.05)
    started = _time.monotonic()
    sup.stop(interrupt=True)
    assert sup.proc.returncode is not None
    assert _time.monotonic() - started < 5.0   # SIGINT worked; not SIGTERM after the 20 s grace
