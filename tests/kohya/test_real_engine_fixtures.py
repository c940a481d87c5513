"""The kohya backend against output recorded from the real sd-scripts (no engine needed).

The files in fixtures/sd-scripts-48d368f/ were written by kohya-ss/sd-scripts at commit
48d368fa557731ad0488c07304dfeba8c07910eb, run by `lora-run` on CPU with reduced random FLUX.1 files (see that
folder's README.md for the recipe and commands). Local paths are replaced by <run>, <models>, <sd-scripts>.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from lora_run_engines import explain
from lora_run_kohya.backend import Watcher, latest_state, state_step
from lora_run_engines.supervise import Supervisor
from lora_run_kohya.supervise import Progress, parse_progress, training_progress

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sd-scripts-48d368f"


def replay(name: str, tmp_path: Path) -> tuple[list[Progress], int, Supervisor]:
    """Feed a recorded sd-scripts log through the Supervisor as a child's output."""
    reported: list[Progress] = []
    source = FIXTURES / name
    sup = Supervisor([sys.executable, "-c", f"import sys; sys.stdout.write(open({str(source)!r}, encoding='utf-8').read())"],
                     log_path=tmp_path / "train.log", progress=training_progress, on_progress=reported.append)
    return reported, sup.run().returncode, sup


def test_the_real_progress_bar_reaches_every_step_with_its_loss(tmp_path):
    reported, code, sup = replay("flux_train.log", tmp_path)
    assert code == 0
    assert [p.step for p in reported] == [1, 2, 3, 4, 5, 6]
    assert {p.total for p in reported} == {6}
    # tqdm shows avr_loss with 3 significant digits; this is what sd-scripts prints
    assert [p.loss for p in reported] == [2.6, 2.56, 2.52, 2.56, 2.55, 2.52]
    assert all(p.it_per_s and 0.04 < p.it_per_s < 0.07 for p in reported)   # `22.67s/it` is a rate of 1/22.67
    # the full output is kept in the log, the bar lines included
    assert (tmp_path / "train.log").read_text("utf-8").count("steps:") >= 6


def test_a_step_is_reported_with_the_loss_sd_scripts_prints_after_it():
    """Planted-mistake control: sd-scripts draws `2/6 … avr_loss=2.6` (the previous average) before it sets the
    postfix of step 2, so reporting the first line of a step would give the wrong loss."""
    lines = (FIXTURES / "flux_train.log").read_text("utf-8").splitlines()
    step2 = [p for p in (parse_progress(line) for line in lines) if p is not None and p.step == 2]
    assert [p.values["avr_loss"] for p in step2] == [2.6, 2.56]


def test_the_real_output_layout_is_watched_and_resumable(tmp_path):
    layout = json.loads((FIXTURES / "flux_output_layout.json").read_text("utf-8"))
    out = tmp_path / "output"
    for n, entry in enumerate(layout["entries"]):
        p = out / entry["path"]
        if entry["dir"]:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            state = layout["train_state"].get(p.parent.name) if p.name == "train_state.json" else None
            p.write_text(json.dumps(state) if state is not None else "x")
        os.utime(p, ns=(10**18 + n * 10**9, 10**18 + n * 10**9))
    events: list[tuple[str, int, object]] = []
    hook = SimpleNamespace(checkpoint_saved=lambda run, step, path: events.append(("ckpt", step, path.name)),
                           samples_written=lambda run, step, paths: events.append(("samples", step, len(paths))))
    ctx = SimpleNamespace(hook=hook, echo=lambda *_: None)
    out_ctx = tmp_path / "empty"
    watcher = Watcher(ctx, out_ctx, "cpuproof")     # started before sd-scripts wrote anything
    watcher.output_dir = out
    watcher.poll(final=True)
    assert [e for e in events if e[0] == "ckpt"] == [("ckpt", 4, "cpuproof-step00000004.safetensors"),
                                                     ("ckpt", 6, "cpuproof-step00000006.safetensors")]
    assert [e for e in events if e[0] == "samples"] == [("samples", 3, 1), ("samples", 6, 1)]
    state = latest_state(out, "cpuproof")
    assert state is not None and state.name == "cpuproof-state"     # the one saved at the end of training
    assert state_step(state) == 6
    assert state_step(out / "cpuproof-step00000004-state") == 4


def test_files_of_an_earlier_segment_are_not_reported_again(tmp_path):
    out = tmp_path / "output"
    (out / "sample").mkdir(parents=True)
    (out / "cpuproof-step00000004.safetensors").write_text("x")
    (out / "sample" / "cpuproof_000003_00_20261202043725_1.png").write_text("x")
    events = []
    hook = SimpleNamespace(checkpoint_saved=lambda **k: events.append(k), samples_written=lambda **k: events.append(k))
    watcher = Watcher(SimpleNamespace(hook=hook, echo=lambda *_: None), out, "cpuproof", offset=4)
    watcher.poll(final=True)
    assert events == []
    # after a resume sd-scripts counts from 0 again: its `step00000002` file is the run's step 6
    (out / "cpuproof-step00000002.safetensors").write_text("y")
    watcher.poll(final=True)
    assert [e["step"] for e in events] == [6]


def test_a_state_saved_after_a_resume_counts_the_earlier_steps(tmp_path):
    """sd-scripts writes `current_step` counted from the resumed segment's start (recorded: 2 after resuming at 4)."""
    out = tmp_path / "output"
    state = out / "cpuproof-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": 2}))
    assert state_step(state) == 2
    (out / "lora-run-segment.json").write_text(json.dumps({"offset": 4}))
    assert state_step(state) == 6


def test_the_real_interrupted_run_reports_the_last_step_it_finished(tmp_path):
    reported, _, _ = replay("flux_ctrl_c.log", tmp_path)
    assert [p.step for p in reported] == [1, 2, 3, 4]
    assert reported[-1].loss == 2.56


def test_the_real_resumed_run_counts_from_zero_again(tmp_path):
    """What makes lora-run pass `--initial_step 0 --max_train_steps <left>` and add the saved step itself."""
    reported, _, _ = replay("flux_resume.log", tmp_path)
    assert [(p.step, p.total) for p in reported] == [(1, 2), (2, 2)]
    text = (FIXTURES / "flux_resume.log").read_text("utf-8")
    assert "resume training from local state: <run>/kohya/output/before-step00000004/cpuproof-step00000004-state" in text
    assert "steps from the state is ignored because initial_step is specified" in text


def test_the_engine_error_for_a_truncated_file_is_found_in_its_output():
    tail = (FIXTURES / "flux_error_truncated_file.log").read_text("utf-8").splitlines()[-40:]
    assert explain(tail) == ": safetensors_rust.SafetensorError: Error while deserializing header: InvalidHeaderLength"


def test_truncated_model_files_are_refused_before_launch(tmp_path):
    """sd-scripts reports a truncated file only as `InvalidHeaderLength` without its name, after loading the others;
    lora-run checks each [model.files] header first (and must accept a complete file)."""
    import struct

    from lora_run_kohya.translate import safetensors_problem

    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    good = tmp_path / "good.safetensors"
    good.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert safetensors_problem(good) is None
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-4])                     # tensor data cut off
    assert "truncated" in safetensors_problem(short)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:20])                       # header cut off (the recorded case)
    assert "header claims" in safetensors_problem(cut)
    text = tmp_path / "text.safetensors"
    text.write_bytes(b"not a model file at all")
    assert safetensors_problem(text) is not None


def test_the_real_hunyuan_image_run_reports_every_step_with_its_loss(tmp_path):
    """sd-scripts' HunyuanImage-2.1 trainer (hunyuan_image_train_network.py) on reduced random files from
    bench/engine_models.py: the same progress bar as FLUX, parsed the same way (the losses are what lora-run
    printed during that run)."""
    reported, code, _ = replay("hunyuan_train.log", tmp_path)
    assert code == 0
    assert [p.step for p in reported] == [1, 2, 3, 4] and {p.total for p in reported} == {4}
    assert [p.loss for p in reported] == [79.9, 104.0, 88.4, 74.4]
    text = (FIXTURES / "hunyuan_train.log").read_text("utf-8")
    assert "subject_hunyuan_image-step00000002.safetensors" in text   # the checkpoint name the watcher expects
