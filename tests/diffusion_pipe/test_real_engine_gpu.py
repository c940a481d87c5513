"""The diffusion-pipe backend against the real diffusion-pipe 8f83dbf's output on one H200 (no engine needed).

fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261202/README.md says what ran (bench/engines_gpu.py, reduced random
FLUX.1 and placeholder HunyuanImage-2.1 files) and what each file is. The replays run the whole backend: the
stand-in train.py prints train.py's part of a recorded train.log (FAKE_DP_MODE=replay) under the stand-in
launcher, so the lines reach lora-run through the same launch, supervisor, parser and watcher as on the GPU.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from lora_run.errors import BackendError, OutputError
from lora_run_training import NonFiniteLoss
from lora_run_diffusion_pipe import collect
from lora_run_diffusion_pipe.backend import HINTS
from lora_run_diffusion_pipe.supervise import LogParser, PhaseEvent, SaveEvent, StepEvent
from lora_run_engines import explain

from .conftest import RECORDED, hunyuan_recipe
from .test_run import run_recipe

NAN_LOG = "flux_fp8_train_nan.log"
FLASH_LOG = "hunyuan_image_flash_attn_train.log"


def lines(name: str) -> list[str]:
    return (RECORDED / name).read_text("utf-8").splitlines()


def test_the_real_step_lines_become_steps_with_loss_lr_and_rate():
    parser = LogParser()
    events = [e for line in lines(NAN_LOG) for e in parser.feed(line)]
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2]
    first, second = steps
    assert first.loss == 1.5028 and first.metrics["lr"] == pytest.approx(7.5e-5)
    assert first.metrics["s_per_it"] == 1.24 and first.metrics["samples_per_s"] == 0.806
    assert math.isnan(second.loss) and second.metrics["lr"] == pytest.approx(1e-4)
    assert not [e for e in events if isinstance(e, SaveEvent)]            # it went NaN before its first save
    assert PhaseEvent("caching latents and text embeddings") in events
    # planted-mistake control: the recording is full of other bars (`20/20`, `7/7`, `8/8`, `4/4`) that a parser
    # taking any `n/N` for a step would report
    bars = [line for line in lines(NAN_LOG) if re.search(r"\|\s*\d+/\d+ \[", line)]
    assert len(bars) >= 20


def test_a_nan_loss_of_the_real_engine_stops_the_run_with_a_clear_message(dp_recipe, plugins_with, tmp_path,
                                                                          fake_env):
    """What happened on the GPU (fp8 and bf16 base alike): step 1 at 1.5028, step 2 NaN. lora-run stops the engine at
    once and says that nothing was saved yet (it used to say "saved LoRAs and checkpoints are kept in …")."""
    fake_env(mode="replay", replay=NAN_LOG)
    started = time.monotonic()
    with pytest.raises(NonFiniteLoss) as info:
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "train.steps=24")
    assert time.monotonic() - started < 60             # the replay would wait 120 s after the NaN line
    message = str(info.value)
    assert message.startswith("the loss became nan at step 2; diffusion-pipe was stopped (it had saved no LoRA and "
                              "no checkpoint before it; log: ")
    # the folder diffusion-pipe made holds only its config copies, as recorded on the GPU
    (run_folder,) = (tmp_path / "run" / "diffusion-pipe" / "output").iterdir()
    assert sorted(p.name for p in run_folder.iterdir()) == ["config.toml", "dataset.toml"]
    recorded = json.loads((RECORDED / "flux_run_layouts.json").read_text("utf-8"))["fp8_main"]
    names = sorted(e["path"].rsplit("/", 1)[1] for e in recorded
                   if re.match(r"diffusion-pipe/output/\d{8}_\d{2}-\d{2}-\d{2}/[^/]+$", e["path"]))
    assert names[:2] == ["config.toml", "dataset.toml"] and len(names) == 3
    assert names[2].startswith("events.out.tfevents.")           # diffusion-pipe's TensorBoard log
    log = (tmp_path / "run" / "diffusion-pipe" / "train.log").read_text("utf-8")
    assert "[lora-run] stopping diffusion-pipe" in log and "steps: 2 loss: nan" in log


def test_the_progress_line_of_the_real_first_step(dp_recipe, plugins_with, tmp_path, fake_env):
    """The step line lora-run printed on the GPU, for the same recorded engine line (the total is this recipe's)."""
    fake_env(mode="replay", replay=NAN_LOG)
    shown: list[str] = []
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    with pytest.raises(NonFiniteLoss):
        execute(load_recipe(dp_recipe(), ["train.steps=24"]), plugins_with(), output_dir=str(tmp_path / "run"),
                echo=shown.append)
    recorded = next(line for line in lines("flux_fp8_console.log") if line.startswith("diffusion-pipe: step 1/"))
    ours = next(line for line in shown if line.startswith("diffusion-pipe: step 1/"))
    assert ours == recorded                    # `step 1/24 (4%)  loss 1.5028  lr 7.50e-05  1.24 s/it  ETA 0m28s`
    assert "diffusion-pipe: caching latents and text embeddings" in shown


def test_the_flash_attn_start_up_failure_gives_the_recorded_message(dp_recipe, plugins_with, tmp_path, fake_env,
                                                                   hunyuan_files):
    fake_env(mode="replay", replay=FLASH_LOG)
    with pytest.raises(BackendError) as info:
        run_recipe(dp_recipe(hunyuan_recipe(hunyuan_files)), plugins_with, tmp_path / "run")
    ours = str(info.value).split("; last output:")[0]
    recorded = next(line for line in lines("hunyuan_image_flash_attn_console.log") if line.startswith("error: "))
    assert "error: " + ours == recorded.split("; last output:")[0]
    assert ours == ("diffusion-pipe failed (exit code 1): ModuleNotFoundError: No module named 'flash_attn' "
                    "(diffusion-pipe's HunyuanImage-2.1 model imports flash-attn (its HunyuanImage-2.1 submodule has no "
                    "other attention path): install flash-attn in diffusion-pipe's environment)")


def test_the_last_exception_of_the_chain_is_the_cause():
    """On the GPU the HunyuanImage-2.1 submodule first fails to import FlashAttention 3 (`flash_attn_interface`: it
    prints "FlashAttention v3 not found, falling back to v2.") and then flash-attn 2; the second is the cause.
    Planted-mistake control: the output cut after the first error names the fallback, and the flash-attn hint must
    not be given for it."""
    tail = lines(FLASH_LOG)
    assert explain(tail, HINTS).startswith(": ModuleNotFoundError: No module named 'flash_attn' (")
    first = next(i for i, line in enumerate(tail) if "No module named 'flash_attn_interface'" in line)
    cut = explain(tail[:first + 1], HINTS)
    assert cut.startswith(": ModuleNotFoundError: No module named 'flash_attn_interface'")
    assert "install flash-attn" not in cut


def test_the_recorded_run_folders_are_found_and_hold_no_checkpoint_to_resume(tmp_path):
    """The recorded layouts: diffusion-pipe names its run folder by time (`20261202_20-35-32`) and, stopped at step
    2, wrote no `latest`/`global_step*` checkpoint, so `--resume` is refused (the recorded resume said so)."""
    layouts = json.loads((RECORDED / "flux_run_layouts.json").read_text("utf-8"))
    for key in ("fp8_main", "fp8_ctrl_c", "bf16_main"):
        run = tmp_path / key
        for entry in layouts[key]:
            path = run / entry["path"]
            if entry["dir"]:
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
        output = run / "diffusion-pipe" / "output"
        (name,) = collect.run_folders(output)
        assert collect.new_run_folder(output, set()) == output / name
        assert collect.resumable_run(output) is None
        # planted-mistake control: with DeepSpeed's checkpoint pointer it is resumable
        (output / name / "global_step8").mkdir()
        (output / name / "latest").write_text("global_step8")
        assert collect.resumable_run(output) == name
    refused = next(line for line in lines("flux_fp8_resume_console.log") if line.startswith("error: "))
    assert "nothing to resume: diffusion-pipe wrote no resumable checkpoint in <run>/diffusion-pipe/output" in refused


def test_resume_after_the_recorded_nan_run_is_refused_with_the_recorded_message(dp_recipe, plugins_with, tmp_path,
                                                                               fake_env):
    fake_env(mode="replay", replay=NAN_LOG)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss):
        run_recipe(dp_recipe(), plugins_with, out, "train.steps=24")
    with pytest.raises(OutputError) as info:
        run_recipe(dp_recipe(), plugins_with, out, "train.steps=24", resume=True)
    recorded = next(line for line in lines("flux_fp8_resume_console.log") if line.startswith("error: "))
    assert "error: " + str(info.value).replace(str(out), "<run>") == recorded


def test_a_diffusers_layout_transformer_is_refused_with_the_recorded_message(dp_recipe, run_cli, tmp_path):
    folder = tmp_path / "flux-diffusers-reduced" / "transformer"
    folder.mkdir(parents=True)
    header = json.dumps({"transformer_blocks.0.attn.to_q.weight":
                         {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    file = folder / "diffusion_pytorch_model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    out = run_cli("check", dp_recipe(), "--set", f"model.files.transformer={file}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    recorded = next(line for line in lines("flux_diffusers_transformer_console.log") if line.startswith("error: "))
    recorded_part = recorded.split("[model.files.transformer] ", 1)[1].replace(
        "<models>/flux-diffusers-reduced", str(tmp_path / "flux-diffusers-reduced"))
    assert "[model.files.transformer] " + recorded_part in out.stderr


def test_the_fixture_readme_names_the_commit_gpu_and_command():
    readme = (RECORDED / "README.md").read_text("utf-8")
    for fact in ("8f83dbf25d03219df705570ec03e62be04bc402f", "H200", "2026-12-02", "bench/engines_gpu.py",
                 "random"):
        assert fact in readme
    for name in sorted(p.name for p in RECORDED.iterdir() if p.name != "README.md"):
        assert f"`{name}`" in readme, f"{name} is not described in the README"
    # local paths are replaced everywhere
    for path in RECORDED.iterdir():
        assert not re.search(r"/(tmp|work|opt|root|home)/", path.read_text("utf-8")), path.name


def test_a_non_finite_stop_names_only_the_saves_made_before_the_bad_step(tmp_path):
    """diffusion-pipe can finish a save while it is being stopped; that save was trained on the bad loss."""
    from types import SimpleNamespace

    from lora_run_diffusion_pipe.backend import _Watcher

    output = tmp_path / "output"
    folder = output / "20261202_20-35-32"
    for name in ("step2", "step4"):
        (folder / name).mkdir(parents=True)
        (folder / name / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    watcher = _Watcher.__new__(_Watcher)
    watcher.backend = SimpleNamespace(family="flux.1-dev")
    watcher.layout = SimpleNamespace(output=output)
    watcher.run_folder, watcher.before, watcher.step_of, watcher.earlier = None, set(), {"step2": 2}, set()
    assert watcher.kept(3) == (f"the LoRAs step2 saved before it are kept in {folder}; step4 was saved after it "
                               "(trained on the bad loss)")
    (folder / "global_step4").mkdir()
    (folder / "latest").write_text("global_step4")
    assert "resumable checkpoint" not in watcher.kept(3)          # DeepSpeed's step-4 state is after the bad step
    assert watcher.kept(5).startswith("the LoRAs step2, step4 and the resumable checkpoint global_step4 saved before")
    assert watcher.kept(2) == ("it had saved no LoRA and no checkpoint before it; step2, step4 were saved after it "
                               "(trained on the bad loss)")
