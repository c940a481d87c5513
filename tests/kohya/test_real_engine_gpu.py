"""The kohya backend against what the real sd-scripts 48d368f left and printed on one H200 (no engine needed).

fixtures/sd-scripts-48d368f/gpu-h200-20261202/README.md says what ran (bench/engines_gpu.py, reduced random FLUX.1
and HunyuanImage-2.1 files, 24 steps) and what each file is; tests/engines/fixtures/engines-gpu-h200-20261202.json
holds each row's parsed progress, artifacts and messages. sd-scripts' own `train.log` of these runs did not come
back from the machine; its raw output is covered by the CPU recording (test_real_engine_fixtures.py).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest

from lora_run_kohya import KohyaOptions
from lora_run_kohya.backend import SEGMENT, Display, KohyaBackend, Watcher, latest_state, state_step
from lora_run_kohya.supervise import Progress

HERE = Path(__file__).resolve().parent
GPU = HERE / "fixtures" / "sd-scripts-48d368f" / "gpu-h200-20261202"
ROWS = json.loads((HERE.parent / "engines" / "fixtures" / "engines-gpu-h200-20261202.json").read_text("utf-8"))["rows"]
NAME = "subject_fast"


def layout() -> list[dict]:
    return json.loads((GPU / "flux_ctrl_c_resume_layout.json").read_text("utf-8"))["entries"]


def recorded_train_state(step: int, epoch: int, size: int) -> str:
    """A train_state.json in the form the CPU recording shows (sd-scripts writes `current_epoch` first); its length
    must be the size the GPU layout recorded, so the reconstruction is the file sd-scripts wrote."""
    text = json.dumps({"current_epoch": epoch, "current_step": step})
    assert len(text) == size, (text, size)
    return text


class Events:
    def __init__(self) -> None:
        self.checkpoints: list[tuple[int, str]] = []
        self.samples: list[tuple[int, list[str]]] = []
        self.echoed: list[str] = []
        self.hook = SimpleNamespace(
            checkpoint_saved=lambda run, step, path: self.checkpoints.append((step, Path(path).name)),
            samples_written=lambda run, step, paths: self.samples.append((step, sorted(Path(p).name for p in paths))))

    def echo(self, text: str) -> None:
        self.echoed.append(text)


def write(out: Path, entries: list[dict], strip: str = "kohya/output/") -> None:
    for entry in entries:
        path = out / entry["path"][len(strip):]
        if entry["dir"]:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_ctrl_c_then_resume_reproduces_the_recorded_output_folder(tmp_path):
    """The Ctrl-C run stopped after step 13 with its state of step 8; `--resume` moved that segment's files into
    `before-step00000008/`, sd-scripts counted 1…16 again and lora-run reported its files as steps 16 and 24 and its
    samples (`…_000012_…` of the second segment) as step 20. Replayed from the recorded layout: the first segment's
    files are those now in before-step00000008/ and the first pair of step-12 samples (20:23:15, before the resume)."""
    entries = [e for e in layout() if e["path"].startswith("kohya/output/")]
    moved = [e for e in entries if "/before-step00000008/" in e["path"]]
    first_samples = [e for e in entries if "/sample/" in e["path"] and "_2026120220231" in e["path"]]
    out = tmp_path / "output"
    # 1. what the interrupted run left
    write(out, [dict(e, path=e["path"].replace("before-step00000008/", "")) for e in moved] + first_samples)
    state_file = out / f"{NAME}-step00000008-state" / "train_state.json"
    size = next(e["size"] for e in moved if e["path"].endswith("train_state.json"))
    state_file.write_text(recorded_train_state(8, 2, size))
    state = latest_state(out, NAME)
    assert state == out / f"{NAME}-step00000008-state" and state_step(state) == 8
    # 2. the backend's resume step: what it moves, and what it tells sd-scripts
    backend = KohyaBackend.__new__(KohyaBackend)
    backend.recipe = SimpleNamespace(train=SimpleNamespace(steps=24), output=SimpleNamespace(name=NAME),
                                     optimizer=SimpleNamespace(lr=1e-4),       # the recorded run's schedule (bench/
                                     scheduler=SimpleNamespace(name="constant_with_warmup", warmup_steps=2,
                                                               min_lr_ratio=0.0))   # engines_gpu.py): no totals
    backend.options = KohyaOptions()
    backend.ctx = SimpleNamespace(loaded=None)
    resumed_from, extra, offset = backend._resume_segment(SimpleNamespace(output_dir=out), state, 8)
    assert extra == ["--initial_step", "0", "--max_train_steps", "16"] and offset == 8
    assert resumed_from == out / "before-step00000008" / f"{NAME}-step00000008-state"
    now = sorted(str(p.relative_to(out)) for p in (out / "before-step00000008").rglob("*") if p.is_file())
    assert now == sorted(e["path"][len("kohya/output/"):] for e in moved if not e["dir"])
    segment = json.loads((out / SEGMENT).read_text("utf-8"))
    assert segment == {"offset": 8, "resumed_from": str(resumed_from)}
    assert any(e["path"] == f"kohya/output/{SEGMENT}" for e in entries)   # written there on the GPU too
    # 3. the resumed segment, watched as the backend watches it (started before sd-scripts writes)
    events = Events()
    watcher = Watcher(SimpleNamespace(hook=events.hook, echo=events.echo), out, NAME, offset=8)
    second = [e for e in entries if e not in moved and e not in first_samples and not e["path"].endswith(SEGMENT)]
    write(out, second)
    for entry in second:
        if entry["path"].endswith("train_state.json"):
            folder = Path(entry["path"]).parent.name
            step = {f"{NAME}-step00000008-state": 8, f"{NAME}-step00000016-state": 16, f"{NAME}-state": 16}[folder]
            (out / folder / "train_state.json").write_text(recorded_train_state(step, 3, entry["size"]))
    os.utime(out / f"{NAME}-state", (2**31, 2**31))                    # saved last, at the end of training
    watcher.poll(final=True)
    assert events.checkpoints == [(16, f"{NAME}-step00000008.safetensors"), (24, f"{NAME}-step00000016.safetensors")]
    assert events.samples == [(20, [f"{NAME}_000012_00_20261202202406_1.png", f"{NAME}_000012_01_20261202202407_1.png"])]
    # the line lora-run printed on the GPU for the last one
    recorded = ROWS["kohya-flux@202040"]["resume"]["last_lines"]
    assert f"kohya: checkpoint at step 24: {NAME}-step00000016.safetensors" in recorded
    assert events.echoed[-1] == f"kohya: checkpoint at step 24: {NAME}-step00000016.safetensors"
    state = latest_state(out, NAME)
    assert state == out / f"{NAME}-state" and state_step(state) == 24


def test_without_the_segment_offset_the_resumed_files_would_be_misreported(tmp_path):
    """Planted-mistake control for the test above: sd-scripts' own names say step 8 and 16 after the resume."""
    out = tmp_path / "output"
    out.mkdir()
    events = Events()
    watcher = Watcher(SimpleNamespace(hook=events.hook, echo=events.echo), out, NAME)
    for n in (8, 16):
        (out / f"{NAME}-step{n:08d}.safetensors").write_bytes(b"x")
    watcher.poll(final=True)
    assert [s for s, _ in events.checkpoints] == [8, 16]


@pytest.mark.parametrize("row, name", [("kohya-flux@202040", "subject_fast"),
                                       ("kohya-hunyuan@202552", "subject_hunyuan_image")])
def test_the_recorded_checkpoints_and_samples_of_a_whole_run_are_reported(tmp_path, row, name):
    """The files sd-scripts left in the main runs (keep_last = 2 pruned step 8; samples every 12 steps, two prompts)."""
    arts = ROWS[row]["artifacts"]
    out = tmp_path / "output"
    (out / "sample").mkdir(parents=True)
    events = Events()
    watcher = Watcher(SimpleNamespace(hook=events.hook, echo=events.echo), out, name)
    for path in [c["path"] for c in arts["checkpoints"]] + arts["samples"]:
        target = out / Path(path).relative_to("<run>/kohya/output")
        target.write_bytes(b"x")
    watcher.poll(final=True)
    assert events.checkpoints == [(c["step"], Path(c["path"]).name) for c in arts["checkpoints"]]
    assert [(s, len(p)) for s, p in events.samples] == [(12, 2), (24, 2)]
    assert Path(arts["kohya_state"]).name == f"{name}-state"


@pytest.mark.parametrize("row", ["kohya-flux@202040", "kohya-hunyuan@202552"])
def test_the_recorded_progress_lines_are_what_the_display_prints(row):
    """lora-run's progress lines of the GPU runs, from the values the parser got out of sd-scripts' bar."""
    import re

    printed = [line for key in ("main", "ctrl_c", "resume") for line in ROWS[row][key]["last_lines"]
               if line.startswith("step ")]
    assert printed
    for line in printed:
        m = re.fullmatch(r"step (\d+)/(\d+)  loss ([\d.]+)  ([\d.]+) it/s  elapsed ([\d:]+)  left ([\d:]+)", line)
        assert m, line
        shown: list[str] = []
        display = Display(shown.append)
        display.tty = False
        display.show(Progress(int(m[1]), int(m[2]), float(m[4]), m[5], m[6], {"avr_loss": float(m[3])}))
        assert shown == [line]


def test_the_display_shows_lora_runs_own_step_rate():
    """HunyuanImage-2.1 on the H200 stepped in about 0.03 s while sd-scripts' bar, which skips steps shorter
    than its redraw, still said 1.22 it/s: the line shows lora-run's own clock when it has one."""
    shown: list[str] = []
    display = Display(shown.append)
    display.tty = False
    bar = Progress(5, 24, 1.22, "00:01", "00:10", {"avr_loss": 2.5})
    display.show(bar, step_seconds=0.03)
    display.show(attrs.evolve(bar, step=24), step_seconds=None)
    assert shown == ["step 5/24  loss 2.5000  33.33 it/s  elapsed 00:01  left 00:10",
                     "step 24/24  loss 2.5000  1.22 it/s  elapsed 00:01  left 00:10"]


@pytest.mark.parametrize("row, last", [("kohya-flux@202040", (13, 8)), ("kohya-hunyuan@202552", (17, 16))])
def test_the_recorded_ctrl_c_stops_and_names_the_last_saved_state(row, last):
    """SIGINT to lora-run on the GPU: sd-scripts' process group stopped within 5 s, exit 130, the message names the
    last finished step, the newest state (sd-scripts saves none on Ctrl-C) and the resume command; the resume
    then started right after that state and ended at the recipe's 24 steps."""
    ctrl_c, resume = ROWS[row]["ctrl_c"], ROWS[row]["resume"]
    assert ctrl_c["rc"] == 130 and ctrl_c["stopped_after_sigint_s"] <= 5
    step, saved = last
    assert ctrl_c["steps"][-1][0] == step
    message = ctrl_c["last_lines"][-1]
    assert message.startswith(f"error: interrupted: sd-scripts was stopped after step {step}; its last saved state is "
                              f"<run>/kohya/output/")
    assert f"-step{saved:08d}-state (step {saved}); resume with: lora-run " in message
    assert message.endswith("--resume --output-dir <run>")
    assert resume["rc"] == 0 and resume["steps"][0][0] == saved + 1 and resume["steps"][-1][0] == 24


def test_the_recorded_ctrl_c_console_is_what_the_row_parsed():
    console = (GPU / "flux_ctrl_c_console.log").read_text("utf-8").splitlines()
    steps = [int(line.split()[1].split("/")[0]) for line in console if line.startswith("step ")]
    assert steps == list(range(1, 14)) == [s for s, _, _ in ROWS["kohya-flux@202040"]["ctrl_c"]["steps"]]
    assert "epoch 2/3" in console and "kohya: checkpoint at step 8: subject_fast-step00000008.safetensors" in console


def test_a_truncated_model_file_gets_the_recorded_message(kohya_recipe, run_cli, tmp_path):
    """The GPU row cut `ae.safetensors` to 4 KiB (its header says 25304 bytes): refused before launch, exit 2."""
    recorded = next(line for line in (GPU / "flux_truncated_vae_console.log").read_text("utf-8").splitlines()
                    if line.startswith("error: "))
    broken = tmp_path / "broken-vae-kohya-flux.safetensors"
    broken.write_bytes(struct.pack("<Q", 25304) + b"{" + b" " * (4096 - 9))
    out = run_cli("check", kohya_recipe(), "--set", f"model.files.vae={broken}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    expected = recorded.split("[model.files.vae] ", 1)[1].replace("<models>/broken-vae-kohya-flux.safetensors",
                                                                   str(broken))
    assert "[model.files.vae] " + expected in out.stderr


@pytest.mark.parametrize("row, family, most", [("kohya-flux@202040", "flux.1-dev", 35),
                                               ("kohya-hunyuan@202552", "hunyuan-image-2.1", 37)])
def test_a_bad_option_gets_the_recorded_message(kohya_recipe, run_cli, row, family, most):
    recorded = ROWS[row]["error_bad_option"]
    assert recorded["rc"] == 2
    message = recorded["last_lines"][-1].split("(--set): ", 1)[1]
    assert message == f"[backend.kohya.blocks_to_swap] sd-scripts swaps at most {most} blocks for {family}; got 99"
    out = run_cli("check", kohya_recipe(family=family), "--set", "backend.kohya.blocks_to_swap=99")
    assert out.returncode == 2 and message in out.stderr


def test_the_fixture_readme_names_the_commit_gpu_and_command():
    readme = (GPU / "README.md").read_text("utf-8")
    for fact in ("48d368fa557731ad0488c07304dfeba8c07910eb", "H200", "2026-12-02", "bench/engines_gpu.py", "random"):
        assert fact in readme
    for path in GPU.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} is not described in the README"
        assert "/tmp/" not in path.read_text("utf-8") and "/work/" not in path.read_text("utf-8"), path.name
