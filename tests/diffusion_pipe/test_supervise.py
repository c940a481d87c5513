"""The output parser and the process supervisor on their own."""
from __future__ import annotations

import math
import sys
import time

import pytest

from lora_run_diffusion_pipe.backend import Progress
from lora_run_diffusion_pipe.supervise import LogParser, PhaseEvent, SaveEvent, StepEvent
from lora_run_engines.supervise import Supervisor


def feed(parser, *lines):
    return [event for line in lines for event in parser.feed(line)]


def test_deepspeed_lines_become_steps_with_lr():
    p = LogParser()
    events = feed(p, "[2026-11-27 10:00:00,000] [INFO] [logging.py:107:log_dist] [Rank 0] step=7, skipped=0, "
                     "lr=[9.5e-05], mom=[(0.9, 0.99)]",
                  "steps: 7 loss: 0.1234 iter time (s): 2.000 samples/sec: 0.500")
    assert events == [StepEvent(7, 0.1234, {"loss": 0.1234, "s_per_it": 2.0, "it_per_s": 0.5,
                                            "samples_per_s": 0.5, "lr": 9.5e-05})]


def test_other_progress_formats_and_markers():
    p = LogParser()
    (step,) = feed(p, "step:    12 /   100 loss: 0.2000 iter time (s): 1.000 samples/sec: 1.000 eta (h): 0.024")
    assert (step.step, step.loss, p.total) == (12, 0.2, 100)
    (step,) = feed(p, "Training:  13%|#3        | 13/100 [00:26<02:54] loss=0.1900, save=7/20st")
    assert (step.step, step.loss) == (13, 0.19)
    assert feed(p, "Training:  13%|#3        | 13/100 [00:27<02:54] loss=0.1900") == []   # a redraw
    assert feed(p, "Saving model to directory step20") == [SaveEvent("step20")]
    assert feed(p, "Started new epoch: 3") == [] and p.epoch == 3
    (step,) = feed(p, "steps: 14 loss: nan iter time (s): 1.0 samples/sec: 1.0")
    assert math.isnan(step.loss) and step.metrics["epoch"] == 3
    assert feed(p, "Map (num_proc=8): 100%|####| 4/4") == [PhaseEvent("caching latents and text embeddings")]
    assert feed(p, "TRAINING COMPLETE!") == [PhaseEvent("training complete")] and p.completed


def test_resume_restarts_the_step_count_and_garbage_is_ignored():
    p = LogParser()
    feed(p, "steps: 5 loss: 0.3 iter time (s): 1 samples/sec: 1")
    assert feed(p, "Resuming training from checkpoint. Resuming at epoch: 2, step: 4") == [
        PhaseEvent("resumed at step 4")]
    (step,) = feed(p, "steps: 4 loss: 0.31 iter time (s): 1 samples/sec: 1")
    assert step.step == 4
    for junk in ["\ufffd\ufffd garbage", "x" * 100000, "steps: loss:", "lr=[", "step=abc, skipped=0, lr=[x]", ""]:
        assert feed(p, junk) == []


def test_progress_prints_first_last_and_throttled():
    lines, now = [], [0.0]
    progress = Progress(lines.append, total=100, every_s=10, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5
        progress.step(step, {"loss": 0.1, "lr": 1e-4, "s_per_it": 0.5})
    assert lines[0].startswith("diffusion-pipe: step 1/100 (1%)") and "ETA 0m49s" in lines[0]
    assert lines[-1].startswith("diffusion-pipe: step 100/100 (100%)") and len(lines) == 6
    progress.phase("caching")
    progress.phase("caching")
    assert lines[-1] == "diffusion-pipe: caching" and lines.count("diffusion-pipe: caching") == 1


def script(tmp_path, body):
    path = tmp_path / "child.py"
    path.write_text(body)
    return [sys.executable, "-u", str(path)]


def test_output_is_split_on_carriage_returns_and_logged(tmp_path):
    seen = []
    argv = script(tmp_path, "import sys\nsys.stdout.write('a\\rb\\r\\nc')\nsys.stdout.buffer.write(b'\\n\\xff\\xfe\\n')\n")
    sup = Supervisor(argv, cwd=tmp_path, env={}, log_path=tmp_path / "log", on_line=seen.append)
    outcome = sup.run()
    assert outcome.returncode == 0 and seen == ["a", "b", "c", "\ufffd\ufffd"]
    log = (tmp_path / "log").read_text("utf-8")      # the log is UTF-8; undecodable bytes are replaced
    assert "a\nb\nc\n\ufffd\ufffd\n" in log and "=== exit code 0" in log


def test_a_failing_callback_stops_the_child(tmp_path):
    argv = script(tmp_path, "import time\nprint('bad', flush=True)\ntime.sleep(60)\n")

    def on_line(line):
        raise RuntimeError(f"saw {line}")

    sup = Supervisor(argv, cwd=tmp_path, env={}, log_path=tmp_path / "log", on_line=on_line, kill_grace=2)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="saw bad"):
        sup.run()
    assert time.monotonic() - started < 20 and sup.proc.poll() is not None


def test_total_timeout(tmp_path):
    argv = script(tmp_path, "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.1)\n")
    sup = Supervisor(argv, cwd=tmp_path, env={}, log_path=tmp_path / "log", on_line=lambda _l: None,
                     timeout_seconds=1.0, kill_grace=2)
    outcome = sup.run()
    assert outcome.timed_out and not outcome.stalled and "tick" in sup.tail


def test_a_step_of_absurd_length_is_no_step():
    """A step of 5000 digits raised ValueError out of the parser (`int()` refuses 4300 digits and more): the run ended
    as a crash. A step number of more than 9 digits is no progress; the steps after it are still reported."""
    parser = LogParser()
    assert parser.feed("steps: " + "9" * 5000 + " loss: 0.1") == []
    assert parser.feed("steps: " + "1" * 13 + " loss: 0.1") == []
    assert [e.step for e in parser.feed("steps: 3 loss: 0.1 iter time (s): 1.0 samples/sec: 1.0")] == [3]
