"""`lora-run RECIPE` ends with one line of where the run's time went (the parts its backend measured, the rest)."""
from __future__ import annotations

import json
import re

import pytest


def test_the_split_names_each_measured_part_once_and_the_rest():
    """The steps are shown without their compilation (a part of its own): planted timing of a run of 100 s whose
    steps took 50 s, 20 of them compiling; the rest is what no part measured."""
    from lora_run_commands.run import time_split

    timing = {"cache_s": 5.0, "load_s": 10.0, "compile_s": 20.0, "train_s": 50.0, "steps": 300, "step_s": 0.1,
              "samples_s": 4.0, "checkpoints_s": 1.0, "finish_s": 2.0, "evaluate_s": 6.0, "loop_s": 60.0}
    line = time_split(timing, 100.0)
    assert line == ("time: 100 s: caching 5.0 s, load 10 s, compilation 20 s, steps 30 s (300 at 0.100 s), samples "
                    "4.0 s, checkpoints 1.0 s, final LoRA and samples 2.0 s, evaluation 6.0 s, the rest 22 s")
    assert time_split({"steps": 3}, 1.0) is None and time_split(None, 1.0) is None       # nothing measured: no line
    assert time_split({"evaluate_s": 3.0}, 9.0) is None       # an engine's run: no part of its own measured
    assert time_split({"load_s": 1.0, "evaluate_s": 3.0}, 2.0) == ("time: 2.0 s: load 1.0 s, evaluation 3.0 s, "
                                                                   "the rest 0.0 s")


@pytest.mark.slow
def test_a_run_prints_its_split_as_its_manifest_records_it(flux_recipe, tmp_path, capsys):
    from lora_run.cli import main

    out = tmp_path / "run"
    assert main([str(flux_recipe()), "--output-dir", str(out), "--set", "train.save_every_steps=2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time: ")]
    assert len(lines) == 1, lines
    timing = json.loads((out / "manifest.json").read_text())["artifacts"]["timing"]
    part = r"([a-z][a-zA-Z ]*?) ([\d.]+) s(?: \(\d+ at [\d.]+ s\))?"      # "label 12 s", steps with their count
    shown = {label: float(value) for label, value in re.findall(part, lines[0].split(": ", 1)[1])}

    def near(value):          # as printed: one decimal under 10 s, whole seconds above
        return pytest.approx(value, abs=0.051 if value < 10 else 0.51)
    assert shown["caching"] == near(timing["cache_s"]) and shown["load"] == near(timing["load_s"])
    assert shown["steps"] == near(timing["train_s"] - timing.get("compile_s", 0))
    assert shown["checkpoints"] == near(timing["checkpoints_s"]), lines[0]
    assert f"({timing['steps']} at {timing['step_s']:.3f} s)" in lines[0]
    total = float(re.match(r"time: ([\d.]+) s", lines[0])[1])
    assert sum(v for k, v in shown.items() if k != "the rest") <= total + 0.5 * len(shown)     # parts within the whole
