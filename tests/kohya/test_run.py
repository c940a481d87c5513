"""Running sd-scripts for real: a fake checkout (temporary git repo, stand-in trainer) launched through the real
`accelerate launch` on CPU, supervised, resumed, interrupted and collected. Each launch costs a few seconds
(accelerate imports torch), so those tests are marked slow; CI runs them."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_run.errors import BackendError, RecipeError
from lora_run.recipe import load_recipe
from lora_run.run import execute
from lora_run_training import NonFiniteLoss

from .conftest import HookRecorder, make_checkout, read_manifest

pytest.importorskip("accelerate")
pytest.importorskip("torch")


def run_in_process(path: Path, plugins_with, *, resume=False, sets=()):
    recorder = HookRecorder()
    plugins = plugins_with(recorder)
    echoed: list[str] = []
    try:
        ctx = execute(load_recipe(path, sets), plugins, resume=resume, echo=echoed.append)
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return None, recorder, echoed, exc
    return ctx, recorder, echoed, None


@pytest.mark.slow
def test_end_to_end(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    from lora_run_formats import load_lora
    from lora_run_formats.flux import kohya_to_diffusers

    record = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_KOHYA_RECORD", str(record))
    path = kohya_recipe(sd_scripts=fake_checkout)
    ctx, hooks, echoed, error = run_in_process(path, plugins_with)
    assert error is None, error
    run = tmp_path / "runs" / "ohwx"
    arts = ctx.artifacts
    # the LoRA under our names, both formats
    assert arts["lora_kohya"] == str(run / "ohwx.safetensors")
    assert arts["lora_diffusers"] == str(run / "ohwx.diffusers.safetensors")
    kohya, meta = load_lora(run / "ohwx.safetensors")
    assert meta["ss_network_module"] == "networks.lora_flux"              # sd-scripts' own metadata kept
    assert meta["lora_run.backend"] == "kohya" and meta["lora_run.trigger"] == "ohwx"
    assert len(meta["lora_run.sd_scripts_commit"]) == 40
    diffusers, _ = load_lora(run / "ohwx.diffusers.safetensors")
    expected = kohya_to_diffusers(kohya)
    assert set(diffusers) == set(expected) and all(k.startswith("transformer.") for k in diffusers)
    assert not any("norm1.linear" in k for k in diffusers)                   # attention+mlp: no modulation
    # hooks: every step once, with sd-scripts' running loss; checkpoints and samples as they appear
    assert [s for s, _ in hooks.steps] == [1, 2, 3, 4, 5, 6]
    assert all(0 < m["loss"] < 1 and m["total_steps"] == 6 for _, m in hooks.steps)
    assert [s for s, _ in hooks.checkpoints] == [2, 4]
    assert [s for s, _ in hooks.samples] == [3, 6] and all(len(p) == 1 for _, p in hooks.samples)
    assert [c["step"] for c in arts["checkpoints"]] == [2, 4]
    assert arts["kohya_state"].endswith("ohwx-state")
    # manifest: the checkout's commit and clean state, the argv
    manifest = read_manifest(run)
    tool = manifest["external_tools"]["sd-scripts"]
    head = subprocess.run(["git", "-C", str(fake_checkout), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert tool["commit"] == head and tool["dirty"] is False and tool["path"] == str(fake_checkout)
    assert tool["argv"][:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # the versions of sd-scripts' own Python (here the test's), and the final LoRA's digest
    from importlib import metadata
    assert {k: tool["packages"].get(k) for k in ("torch", "accelerate", "safetensors")} == {
        k: metadata.version(k) for k in ("torch", "accelerate", "safetensors")}
    assert tool["packages"]["python"] == platform.python_version()
    final = Path(arts["lora_kohya"])
    assert manifest["lora_files"][str(final.relative_to(run))]["sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert manifest["status"] == "completed"
    # the plan's notes, as `lora-run plan` shows them, in the manifest and in run.log
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import make_backend, validate

    notes = make_backend(validate(load_recipe(path), load_plugins()), load_plugins()).plan().notes
    assert notes and manifest["plan"]["notes"] == notes
    assert [line.split(" ", 1)[1] for line in (run / "run.log").read_text().splitlines()
            if " plan note: " in line] == [f"plan note: {note}" for note in notes]
    # what sd-scripts parsed from our files (TOML flattened into argparse's namespace)
    args = json.loads(record.read_text())
    assert args["guidance_scale"] == 1.0 and args["timestep_sampling"] == "sigmoid"
    assert args["network_train_unet_only"] is True and args["max_train_steps"] == 6
    assert args["network_args"] == ["img_mod_dim=0", "txt_mod_dim=0", "single_mod_dim=0"]
    assert args["config_file"] == str(run / "kohya" / "config.toml")
    # the staged dataset: links to the images, one-line captions in .txt
    staged = sorted((run / "kohya" / "data" / "subject").iterdir())
    images = [p for p in staged if p.suffix == ".png"]
    assert len(images) == 4 and all(p.is_symlink() for p in images)
    caption, = (run / "kohya" / "data" / "subject").glob("img000_*.txt")     # <stem>_<hash>
    assert caption.read_text() == "ohwx, a photo number 0\n"
    log = (run / "kohya" / "train.log").read_text()
    assert "running training" in log and "steps: 100%" in log
    assert any("step 6/6" in line for line in echoed)
    # the stand-in prints sd-scripts' recorded lines (fixtures/sd-scripts-48d368f) with this run's values
    assert "  total optimization steps / 学習ステップ数: 6" in log
    assert "INFO     epoch is incremented. current_epoch: 1, epoch: 2" in log
    assert f"save train state to {run}/kohya/output/ohwx-step00000004-state/train_state.json at epoch 1 step 4" in log
    assert "INFO     saving last state." in log and "INFO     model saved." in log
    assert all(re.fullmatch(r"ohwx_00000[36]_00_\d{14}_\d+\.png", Path(p).name) for _, ps in hooks.samples for p in ps)
    # what sd-scripts and lora-run wrote is on the run's record: --overwrite may replace it all, and a file a user adds
    # inside sd-scripts' folder afterwards is named instead
    from tests.reliability.test_kill_resume import not_the_runs

    assert not_the_runs(run) == [], not_the_runs(run)
    (run / "kohya" / "output" / "mine.txt").write_text("the user's")
    assert not_the_runs(run) == ["kohya/output/mine.txt"]


@pytest.mark.slow
def test_dirty_checkout_is_recorded(kohya_recipe, fake_checkout, plugins_with, tmp_path):
    with open(fake_checkout / "train_network.py", "a") as fh:
        fh.write("# local change\n")
    ctx, _, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert error is None, error
    assert read_manifest(tmp_path / "runs" / "ohwx")["external_tools"]["sd-scripts"]["dirty"] is True


@pytest.mark.slow
def test_staging_converts_and_captions(kohya_recipe, fake_checkout, plugins_with, tmp_path, subject_dataset):
    from PIL import Image

    Image.new("RGBA", (320, 288), (200, 10, 10, 128)).save(subject_dataset / "alpha.png")
    (subject_dataset / "alpha.txt").write_text("ohwx, with\ntwo lines")
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(reg / "r0.jpg")
    extra = f'[[dataset.regularization]]\npath = "{reg}"\ndefault_caption = "a man"\nweight = 0.7\n'
    ctx, _, _, error = run_in_process(kohya_recipe(extra, sd_scripts=fake_checkout), plugins_with)
    assert error is None, error
    data = tmp_path / "runs" / "ohwx" / "kohya" / "data"
    converted = [p for p in (data / "subject").iterdir() if "alpha" in p.name and p.suffix == ".png"]
    assert len(converted) == 1 and not converted[0].is_symlink()
    assert Image.open(converted[0]).mode == "RGB"
    assert converted[0].with_suffix(".txt").read_text() == "ohwx, with two lines\n"
    staged = sorted(p.name for p in (data / "reg0").iterdir() if p.suffix != ".npz")    # sd-scripts' caches beside
    assert [re.sub(r"_[0-9a-f]{10}\.", ".", n) for n in staged] == ["r0.jpg", "r0.txt"]
    assert (data / "reg0" / staged[1]).read_text() == "a man\n"


@pytest.mark.slow
def test_crash_shows_the_last_lines(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_MODE", "crash")
    _, hooks, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert isinstance(error, BackendError)
    text = str(error)
    assert "sd-scripts exited with code 1: RuntimeError: CUDA out of memory" in text and "out of GPU memory" in text
    assert "RuntimeError: CUDA out of memory" in text and "train.log" in text
    assert "run folder kept" in text
    assert read_manifest(tmp_path / "runs" / "ohwx")["status"] == "failed"


@pytest.mark.slow
def test_a_broken_final_lora_is_never_collected(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    """sd-scripts' file is copied as it is (formats = ["kohya"]: no conversion reads its tensors). One cut off while it
    was written, empty, trained into NaN, of another rank or of another family is refused by name (exit 1, manifest
    `failed`), nothing at the top of the run folder. Control: the same run with a whole LoRA is collected."""
    cases = {"lora_truncated": "truncated: its tensors need", "lora_empty": "too short to be a safetensors file",
             "lora_nan": "holds NaN or inf values", "lora_rank": "rank 8, not the recipe's [lora] rank = 4",
             "lora_family": "is not a module of a flux.1-dev LoRA in the kohya layout", "": None}
    for mode, words in cases.items():
        monkeypatch.setenv("FAKE_KOHYA_MODE", mode)
        run = tmp_path / f"out-{mode or 'ok'}"
        _, _, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with,
                                        sets=[f'output.dir="{run}"', 'output.formats=["kohya"]'])
        if words is None:
            assert error is None and (run / "ohwx.safetensors").is_file(), error
            continue
        assert isinstance(error, BackendError), (mode, error)
        assert f"sd-scripts wrote {run / 'kohya' / 'output' / 'ohwx.safetensors'}, which is not a LoRA" in str(error)
        assert words in str(error), (mode, str(error))
        assert not (run / "ohwx.safetensors").exists() and read_manifest(run)["status"] == "failed"


def test_a_checkpoint_cut_off_while_written_is_not_reported(tmp_path):
    """sd-scripts writes its checkpoints in place: a stop while it writes one leaves half a file under the checkpoint's
    name, which the watcher's last look (after the stop) reported as a checkpoint. It is named in a warning instead.
    Planted-mistake control: the watcher without the check reports it."""
    from types import SimpleNamespace

    from lora_run_engines.output import lora_problem
    from lora_run_kohya.backend import Watcher

    from tests.engines.test_output import write

    out = tmp_path / "output"
    whole = write(tmp_path / "whole.safetensors", "lora_unet_single_blocks_0_linear1", "lora_down.weight",
                  "lora_up.weight")

    def watched(check):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        reported, echoed = [], []
        hook = SimpleNamespace(checkpoint_saved=lambda run, step, path: reported.append(step),
                               samples_written=lambda **_: None)
        watcher = Watcher(SimpleNamespace(hook=hook, echo=echoed.append), out, "ohwx", check=check)
        shutil.copy(whole, out / "ohwx-step00000002.safetensors")
        (out / "ohwx-step00000004.safetensors").write_bytes(whole.read_bytes()[:200])    # then stopped
        watcher.poll()
        watcher.poll(final=True)
        return reported, echoed

    reported, echoed = watched(lambda path: lora_problem(path, family="flux.1-dev", layout="kohya", rank=4))
    assert reported == [2]
    assert [line for line in echoed if line.startswith("warning")] == [
        f"warning: kohya: {out / 'ohwx-step00000004.safetensors'} is not reported as a checkpoint: its header claims "
        f"{int.from_bytes(whole.read_bytes()[:8], 'little')} bytes but the file has 200: truncated or not safetensors"]
    assert watched(None)[0] == [2, 4]


@pytest.mark.slow
def test_an_earlier_segments_final_lora_is_never_collected_again(kohya_recipe, fake_checkout, plugins_with, tmp_path,
                                                                 monkeypatch):
    """A finished 6-step run extended to 8 steps with --resume, whose sd-scripts exits 0 without writing its final
    LoRA: the step-6 file of the first segment, still under the final name, was collected as the 8-step LoRA (exit 0,
    `ss_steps` 6). Control: the same resume with sd-scripts writing it collects the new file."""
    path = kohya_recipe(sd_scripts=fake_checkout)
    _, _, _, error = run_in_process(path, plugins_with)
    assert error is None, error
    run = tmp_path / "runs" / "ohwx"
    monkeypatch.setenv("FAKE_KOHYA_MODE", "no_lora")
    _, _, _, error = run_in_process(path, plugins_with, resume=True, sets=["train.steps=8"])
    assert isinstance(error, BackendError) and "wrote no new " in str(error), error
    assert read_manifest(run)["status"] == "failed"
    for entry in ("ohwx-state", "lora-run-segment.json"):       # the failed segment's state is moved aside next time
        assert (run / "kohya" / "output" / entry).exists()
    monkeypatch.delenv("FAKE_KOHYA_MODE")
    _, _, _, error = run_in_process(path, plugins_with, resume=True, sets=["train.steps=10"])
    assert error is None, error
    from lora_run_formats import read_metadata

    assert read_metadata(run / "ohwx.safetensors")["ss_steps"] == "2"      # the last segment's own count


@pytest.mark.slow
def test_garbage_output_does_not_break_anything(kohya_recipe, fake_checkout, plugins_with, monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_MODE", "garbage")
    ctx, hooks, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert error is None, error
    assert [s for s, _ in hooks.steps] == [1, 2, 3, 4, 5, 6]


def test_fast_steps_are_timed_by_lora_runs_own_clock(kohya_recipe, fake_checkout, plugins_with, monkeypatch):
    """sd-scripts' bar leaves out steps shorter than its 0.1 s redraw (it calls unpause() after each step: recorded
    on the GPU, where its elapsed time stood still for 21 HunyuanImage-2.1 steps); `step_seconds`, lora-run's own
    clock averaged since the first reported step, sees 0.03 s steps."""
    monkeypatch.setenv("FAKE_KOHYA_STEP_SECONDS", "0.03")
    _, hooks, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout, replace={"every_steps = 3": "every_steps = 100"}),
                                        plugins_with)
    assert error is None, error
    assert "step_seconds" not in hooks.steps[0][1]           # no earlier report to measure from
    timed = {step: m["step_seconds"] for step, m in hooks.steps if 3 <= step <= 5}
    # each is the mean since the first report, drawn when the bar drew it: 0.024 s was seen on a loaded 2-core machine
    assert len(timed) == 3 and all(0.015 < t < 0.5 for t in timed.values()), timed
    # planted-mistake control: the bar's own clock (steps ÷ its rate) did not count these steps, ours did
    bar = {step: m.get("it_per_s") for step, m in hooks.steps if 3 <= step <= 5}
    ours = 4 * timed[5] - 2 * timed[3]                       # lora-run's seconds from step 3 to step 5
    if bar[3] and bar[5]:
        assert 5 / bar[5] - 3 / bar[3] < ours / 2, (bar, timed)


@pytest.mark.slow
def test_each_step_is_timed_when_sd_scripts_draws_it(kohya_recipe, fake_checkout, plugins_with, monkeypatch):
    """The supervisor reports a step once the next one is drawn (or at the end, after sd-scripts saved and exited),
    but the step's time is when the bar first drew it. Timed at the report, the real sd-scripts on CPU (2026-12-05:
    16.4 s steps, then about 2 s of saving) showed its last step at 0.43 it/s; here 0.2 s steps and 2 s of saving gave
    the last step about 0.6 s."""
    monkeypatch.setenv("FAKE_KOHYA_STEP_SECONDS", "0.2")
    monkeypatch.setenv("FAKE_KOHYA_END_SECONDS", "2")
    _, hooks, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout, replace={"every_steps = 3": "every_steps = 100"}),
                                        plugins_with)
    assert error is None, error
    timed = {step: m["step_seconds"] for step, m in hooks.steps if "step_seconds" in m}
    assert sorted(timed) == [2, 3, 4, 5, 6]
    assert all(0.15 < t < 0.4 for t in timed.values()), timed


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(kohya_recipe, fake_checkout, plugins_with, monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_MODE", "nan")
    monkeypatch.setenv("FAKE_KOHYA_STEP_SECONDS", "0.3")
    _, hooks, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert isinstance(error, NonFiniteLoss), error
    assert "non-finite loss (nan) at step 3" in str(error) and "step00000002" in str(error)
    assert [s for s, _ in hooks.steps] == [1, 2]


@pytest.mark.slow
def test_stall_is_stopped(kohya_recipe, fake_checkout, plugins_with, monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_MODE", "hang")
    path = kohya_recipe(sd_scripts=fake_checkout)
    path.write_text(path.read_text().replace("stall_minutes = 2.0", "stall_minutes = 0.05"))
    started = time.monotonic()
    _, _, _, error = run_in_process(path, plugins_with)
    assert isinstance(error, BackendError) and "printed nothing for 0.05 minutes" in str(error)
    assert time.monotonic() - started < 60


def crashed_then_resumed(path, plugins_with, monkeypatch):
    """The stand-in sd-scripts crashes at step 5 (a BackendError), then `--resume` finishes the run: (ctx, hooks)."""
    monkeypatch.setenv("FAKE_KOHYA_MODE", "crash")
    monkeypatch.setenv("FAKE_KOHYA_AT", "5")
    _, _, _, error = run_in_process(path, plugins_with)
    assert isinstance(error, BackendError)
    monkeypatch.delenv("FAKE_KOHYA_MODE")
    ctx, hooks, _, error = run_in_process(path, plugins_with, resume=True)
    assert error is None, error
    return ctx, hooks


@pytest.mark.slow
def test_resume_continues_from_the_newest_state(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    path = kohya_recipe(sd_scripts=fake_checkout)
    ctx, hooks = crashed_then_resumed(path, plugins_with, monkeypatch)
    run = tmp_path / "runs" / "ohwx"
    tool = read_manifest(run)["external_tools"]["sd-scripts"]
    # the earlier segment's files are kept aside (sd-scripts would name its new checkpoints from step 1 again)
    kept = run / "kohya" / "output" / "before-step00000004"
    assert tool["resumed_from"] == str(kept / "ohwx-step00000004-state")
    assert tool["argv"][-6:] == ["--resume", tool["resumed_from"], "--initial_step", "0", "--max_train_steps", "2"]
    assert (kept / "ohwx-step00000004.safetensors").is_file()
    assert [s for s, _ in hooks.steps] == [5, 6]   # sd-scripts counts 1, 2 again; lora-run adds the saved step
    assert "resume training from local state" in (run / "kohya" / "train.log").read_text()
    assert Path(ctx.artifacts["lora_kohya"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True])
def test_a_run_stopped_after_sd_scripts_finished_resumes_by_collecting_its_lora(stale, kohya_recipe, fake_checkout,
                                                                                 plugins_with, tmp_path, monkeypatch):
    """Ctrl-C while lora-run collected sd-scripts' final LoRA (sd-scripts had saved its last state and the LoRA): the
    resume line it printed failed, exit 2, "the sd-scripts state … is at step 6, so a run of 6 steps has nothing left to
    do". The resume collects that LoRA without launching sd-scripts. Control (``stale``): a final LoRA older than the
    last state is an earlier segment's, never collected; the refusal stands."""
    from lora_run.errors import TrainingInterrupted
    from lora_run_kohya.backend import KohyaBackend

    path = kohya_recipe(sd_scripts=fake_checkout)
    collect = KohyaBackend._collect

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(KohyaBackend, "_collect", interrupted)
    _, _, _, error = run_in_process(path, plugins_with)
    assert isinstance(error, TrainingInterrupted), error
    monkeypatch.setattr(KohyaBackend, "_collect", collect)
    run = tmp_path / "runs" / "ohwx"
    final = run / "kohya" / "output" / "ohwx.safetensors"
    if stale:
        os.utime(final, ns=(1, 1))
    log = (run / "kohya" / "train.log").read_text()
    ctx, _, echoed, error = run_in_process(path, plugins_with, resume=True)
    assert (run / "kohya" / "train.log").read_text() == log          # sd-scripts was not launched again
    if stale:
        assert isinstance(error, RecipeError) and "nothing left to do" in str(error), error
        assert not (run / "ohwx.safetensors").exists()
        return
    assert error is None, error
    assert any("nothing left to train" in line for line in echoed), echoed
    assert Path(ctx.artifacts["lora_kohya"]).read_bytes()[8:] and read_manifest(run)["status"] == "completed"


@pytest.mark.slow
def test_hunyuan_image_runs_with_its_script(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    record = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_KOHYA_RECORD", str(record))
    path = kohya_recipe(family="hunyuan-image-2.1", sd_scripts=fake_checkout)
    ctx, hooks, _, error = run_in_process(path, plugins_with)
    assert error is None, error
    args = json.loads(record.read_text())
    assert args["network_module"] == "networks.lora_hunyuan_image" and args["text_encoder"].endswith("qwen_2.5_vl_7b"
                                                                                                   ".safetensors")
    assert read_manifest(tmp_path / "runs" / "ohwx")["external_tools"]["sd-scripts"]["script"] == \
        "hunyuan_image_train_network.py"
    assert "lora_diffusers" not in ctx.artifacts and Path(ctx.artifacts["lora_kohya"]).is_file()


@pytest.mark.slow
def test_hunyuan_image_comfyui_file_from_sd_scripts_file(kohya_recipe, fake_checkout, plugins_with, tmp_path):
    import torch

    from lora_run_formats import load_lora
    from lora_run_formats.hunyuan_image import kohya_to_diffusers

    path = kohya_recipe(family="hunyuan-image-2.1", sd_scripts=fake_checkout)
    text = path.read_text()
    formats = next(line for line in text.splitlines() if line.startswith("formats ="))
    path.write_text(text.replace(formats, 'formats = ["kohya", "comfyui"]'))
    ctx, _, _, error = run_in_process(path, plugins_with)
    assert error is None, error
    assert ctx.artifacts["lora_comfyui"].endswith("ohwx.comfyui.safetensors")
    comfy, _ = load_lora(ctx.artifacts["lora_comfyui"])
    kohya, _ = load_lora(ctx.artifacts["lora_kohya"])
    assert comfy and all(k.startswith("diffusion_model.") and not k.endswith(".alpha") for k in comfy)
    from lora_run_formats.hunyuan_image import comfy_to_diffusers

    ours, theirs = comfy_to_diffusers(comfy), kohya_to_diffusers(kohya)
    assert set(ours) == set(theirs)
    for key in ours:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            torch.testing.assert_close((ours[b].float() @ ours[key].float()), (theirs[b].float() @ theirs[key].float()),
                                       atol=1e-3, rtol=1e-2)


@pytest.mark.slow
def test_hunyuan_attention_mlp_has_no_modulation_modules(kohya_recipe, fake_checkout, plugins_with, tmp_path):
    from lora_run_formats import load_lora

    path = kohya_recipe(family="hunyuan-image-2.1", sd_scripts=fake_checkout)
    path.write_text(path.read_text().replace('targets = "all-linear"', 'targets = "attention+mlp"'))
    ctx, _, _, error = run_in_process(path, plugins_with)
    assert error is None, error
    tensors, _ = load_lora(ctx.artifacts["lora_kohya"])
    assert tensors and not any("mod_lin" in k or "modulation" in k for k in tensors)


@pytest.mark.slow
def test_lora_with_modules_the_recipe_excludes_is_not_collected(kohya_recipe, fake_checkout, plugins_with, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_IGNORE_NETWORK_ARGS", "1")
    _, _, _, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert isinstance(error, BackendError)
    assert "holds LoRA modules the recipe did not ask for (lora_unet_double_blocks_0_img_mod_lin" in str(error)
    assert not (tmp_path / "runs" / "ohwx" / "ohwx.safetensors").exists()


# -------------------------------------------------------------------------------- CLI: exit codes, messages
def test_missing_checkout_is_a_clear_error_before_anything_starts(kohya_recipe, run_cli, tmp_path):
    path = kohya_recipe()
    done = run_cli(path, env={"LORA_RUN_SD_SCRIPTS": ""})
    assert done.returncode == 2, done.stderr
    assert "[backend.kohya.sd_scripts] no sd-scripts checkout configured" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "ohwx" / "kohya" / "output").exists()


def test_too_old_checkout_names_the_missing_options(kohya_recipe, run_cli, tmp_path):
    old = make_checkout(tmp_path / "old-sd-scripts", drop=("guidance_scale", "model_prediction_type"))
    done = run_cli(kohya_recipe(sd_scripts=old))
    assert done.returncode == 2, done.stderr
    assert "too old" in done.stderr and "--guidance_scale" in done.stderr and "--model_prediction_type" in done.stderr
    assert "git pull" in done.stderr


def test_checkout_without_the_flux_trainer(kohya_recipe, run_cli, tmp_path):
    old = make_checkout(tmp_path / "sd1-only", scripts=("train_network_sd.py",))
    done = run_cli("check", kohya_recipe(sd_scripts=old))
    assert done.returncode == 2
    assert "missing flux_train_network.py" in done.stderr and "v0.10" in done.stderr


def test_interpreter_without_accelerate(kohya_recipe, run_cli, fake_checkout, tmp_path):
    fake_python = tmp_path / "python-without-accelerate"
    fake_python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'accelerate'\" >&2\nexit 1\n")
    fake_python.chmod(0o755)
    # `extra` lands at the end of the [backend.kohya] table
    done = run_cli(kohya_recipe(sd_scripts=fake_checkout, extra=f'python = "{fake_python}"\n'))
    assert done.returncode == 2, done.stderr
    assert "[backend.kohya.python]" in done.stderr and "cannot import accelerate" in done.stderr


def test_plan_cli_shows_files_and_command(kohya_recipe, run_cli, fake_checkout):
    done = run_cli("plan", kohya_recipe(sd_scripts=fake_checkout))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"# command: {sys.executable} -m accelerate.commands.launch" in out
    assert f"{fake_checkout}/flux_train_network.py --config_file" in out
    assert "kohya/config.toml\n# sd-scripts flux_train_network.py --config_file" in out
    assert 'network_module = "networks.lora_flux"' in out and "[[datasets]]" in out


@pytest.mark.slow
def test_ctrl_c_stops_sd_scripts_and_exits_130(kohya_recipe, fake_checkout, tmp_path):
    path = kohya_recipe(sd_scripts=fake_checkout)
    env = {**os.environ, "FAKE_KOHYA_STEP_SECONDS": "0.5", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_run.cli", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "ohwx" / "kohya" / "train.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.is_file() and "steps:" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "interrupted: sd-scripts was stopped after step" in err and "--resume" in err
    assert read_manifest(tmp_path / "runs" / "ohwx")["status"] == "interrupted"
    time.sleep(0.5)
    survivors = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if str(fake_checkout) in cmdline:
                survivors.append(cmdline)
    assert survivors == []


@pytest.mark.slow
def test_an_unreachable_hub_runs_sd_scripts_offline(kohya_recipe, fake_checkout, plugins_with, tmp_path, monkeypatch):
    """sd-scripts fetches tokenizers from the hub: without a reachable hub it runs with HF_HUB_OFFLINE=1 (the
    cache at once) instead of spending minutes in retries, and says so."""
    import socket

    from lora_run_native.adapters import base

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")       # nobody listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(base, "_HUB_PROBES", {})
    record = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_KOHYA_RECORD", str(record))
    ctx, _, echoed, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with)
    assert error is None, error
    assert json.loads(record.read_text())["env_HF_HUB_OFFLINE"] == "1"
    assert any("the Hugging Face hub cannot be reached" in line for line in echoed)
    # a reachable hub (here: any HTTP answer) leaves sd-scripts' environment alone
    monkeypatch.setattr(base, "_HUB_PROBES", {f"http://127.0.0.1:{port}": None})
    _, _, echoed, error = run_in_process(kohya_recipe(sd_scripts=fake_checkout), plugins_with,
                                         sets=[f"output.dir=\"{tmp_path / 'second'}\""])
    assert error is None, error
    assert json.loads(record.read_text())["env_HF_HUB_OFFLINE"] is None


@pytest.mark.slow
def test_a_resumed_cosine_run_names_its_schedule_totals(kohya_recipe, fake_checkout, plugins_with, tmp_path,
                                                        monkeypatch):
    """The resume of a decaying schedule passes the run's totals (see test_translate's replay of the schedule):
    sd-scripts (here its stand-in, with sd-scripts' option list) accepts the command line and finishes the run."""
    path = kohya_recipe(sd_scripts=fake_checkout, extra='[scheduler]\nname = "cosine"\nwarmup_steps = 2\n')
    ctx, hooks = crashed_then_resumed(path, plugins_with, monkeypatch)
    argv = read_manifest(tmp_path / "runs" / "ohwx")["external_tools"]["sd-scripts"]["argv"]
    assert argv[-9:] == ["--max_train_steps", "2", "--lr_scheduler_type",
                         "transformers.optimization.get_cosine_schedule_with_warmup", "--lr_scheduler_args",
                         "num_warmup_steps=2", "num_training_steps=6", "--lr_warmup_steps", "0"]
    assert [s for s, _ in hooks.steps] == [5, 6]
