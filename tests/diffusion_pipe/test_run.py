"""Whole runs through a fake diffusion-pipe checkout and a fake `deepspeed` launcher (real subprocesses)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from lora_run.errors import BackendError, OutputError, RecipeError
from lora_run.hookspecs import hookimpl
from lora_run.recipe import load_recipe
from lora_run.run import execute
from lora_run_training import NonFiniteLoss

from .conftest import FLUX_RECIPE, hunyuan_recipe

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


class Recorder:
    def __init__(self):
        self.steps, self.checkpoints, self.finished = [], [], []

    @hookimpl
    def step_finished(self, run, step, metrics):
        self.steps.append((step, dict(metrics)))

    @hookimpl
    def checkpoint_saved(self, run, step, path):
        self.checkpoints.append((step, Path(path).parent.name, Path(path).name, Path(path).is_file()))

    @hookimpl
    def run_finished(self, run, status, error):
        self.finished.append(status)


def run_recipe(path, plugins_with, out, *sets, resume=False, overwrite=False):
    recorder = Recorder()
    lines = []
    ctx = execute(load_recipe(path, sets), plugins_with(recorder), output_dir=str(out), resume=resume,
                  overwrite=overwrite, echo=lines.append)
    return ctx, recorder, lines


def test_flux_run_end_to_end(dp_recipe, plugins_with, tmp_path, fake_env, fake_checkout, subject_dataset):
    fake_env(record=tmp_path / "launch.jsonl")
    before = sorted(p.name for p in subject_dataset.iterdir())
    ctx, rec, lines = run_recipe(dp_recipe(), plugins_with, tmp_path / "run")
    out = tmp_path / "run"
    # the command, its folder and environment
    launch = json.loads((tmp_path / "launch.jsonl").read_text().splitlines()[0])
    assert launch["argv"][1:] == ["--num_gpus=1", "train.py", "--deepspeed", "--config",
                                  str(out / "diffusion-pipe" / "config.toml")]
    assert launch["cwd"] == str(fake_checkout) and launch["env"] == {"PYTHONUNBUFFERED": "1"}
    # hooks and progress
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5, 6]
    assert rec.steps[0][1]["lr"] == pytest.approx(5e-5) and rec.steps[-1][1]["lr"] == pytest.approx(1e-4)
    assert rec.steps[-1][1]["loss"] == pytest.approx(0.3125) and rec.steps[-1][1]["it_per_s"] > 0
    assert rec.checkpoints == [(step, f"step{step}", "subject.safetensors", True) for step in (2, 4, 6)]
    assert rec.finished == ["completed"]
    assert any("step 6/6 (100%)" in line for line in lines)
    # the LoRA in both formats
    kohya = safetensors_torch.load_file(ctx.artifacts["lora_kohya"])
    diffusers = safetensors_torch.load_file(ctx.artifacts["lora_diffusers"])
    assert ctx.artifacts["lora_kohya"] == str(out / "subject.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_single_blocks_1_linear1.alpha"].item() == pytest.approx(4 * 4)  # 4 fused parts, rank 4
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in diffusers
    assert all(v.dtype == torch.bfloat16 for k, v in diffusers.items())
    source = safetensors_torch.load_file(next((out / "diffusion-pipe" / "output").glob("*/step6")) /
                                         "pytorch_lora_weights.safetensors")
    assert set(diffusers) == set(source)
    from lora_run_formats import flux

    back = flux.kohya_to_diffusers(kohya)                  # the kohya file holds the same LoRA
    for key in source:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            delta = back[b].float() @ back[key].float()
            expected = source[b].to(torch.bfloat16).float() @ source[key].to(torch.bfloat16).float()
            torch.testing.assert_close(delta, expected, atol=2e-2, rtol=2e-2)
    # intermediate saves converted too; the run folder and the manifest
    assert [c["name"] for c in ctx.artifacts["checkpoints"]] == ["step2", "step4"]
    assert Path(ctx.artifacts["checkpoints"][0]["lora_kohya"]).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    tool = manifest["external_tools"]["diffusion-pipe"]
    head = subprocess.run(["git", "-C", str(fake_checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tool["commit"] == head.stdout.strip() and tool["dirty"] is False
    assert Path(tool["run_folder"]).parent == out / "diffusion-pipe" / "output"
    assert manifest["status"] == "completed"
    # the recipe's seed is not recorded as the run's: diffusion-pipe does not seed its training
    assert manifest["seed"] is None and tool["seed"].startswith("[train] seed = 42 is not used")
    log = (out / "diffusion-pipe" / "train.log").read_text()
    assert "TRAINING COMPLETE!" in log and "lora-run launches:" in log
    # the stand-ins print the real engine's lines (recorded on a GPU): its progress bars were not taken for steps
    assert "[launch.py:179:main] global_rank_mapping=defaultdict(<class 'list'>, {'localhost': [0]})" in log
    assert "Loading pipeline components...: 100%|██████████| 7/7" in log
    assert "[logging.py:123:log_dist] [Rank 0] step=6, skipped=0, lr=[0.0001], mom=[(0.9, 0.999)]" in log
    assert "steps: 6 loss: 0.3125 iter time (s): 0.012 samples/sec: 83.333" in log
    # staging: captions next to links; the cache went there, never into the dataset folder
    staged = out / "diffusion-pipe" / "data" / "subject"
    images = sorted(p for p in staged.iterdir() if p.suffix == ".png")
    assert len(images) == 4 and all(p.is_symlink() for p in images)
    assert images[0].with_suffix(".txt").read_text() == "ohwx, a photo number 0"
    assert (staged / "cache" / "flux" / "metadata.json").is_file()
    assert sorted(p.name for p in subject_dataset.iterdir()) == before
    # what the engine and lora-run wrote is on the run's record: --overwrite may replace it all, and a file a user adds
    # inside the engine's folder afterwards is named instead
    from tests.reliability.test_kill_resume import not_the_runs

    assert not_the_runs(out) == [], not_the_runs(out)
    (out / "diffusion-pipe" / "mine.txt").write_text("the user's")
    assert not_the_runs(out) == ["diffusion-pipe/mine.txt"]


def test_hunyuan_image_run_converts_comfyui_keys(dp_recipe, plugins_with, tmp_path, fake_env, hunyuan_files):
    fake_env()
    ctx, _, _ = run_recipe(dp_recipe(hunyuan_recipe(hunyuan_files)), plugins_with, tmp_path / "run",
                           'output.formats=["kohya", "diffusers", "comfyui"]')
    kohya = safetensors_torch.load_file(ctx.artifacts["lora_kohya"])
    diffusers = safetensors_torch.load_file(ctx.artifacts["lora_diffusers"])
    comfy = safetensors_torch.load_file(ctx.artifacts["lora_comfyui"])
    # kohya: sd-scripts' names (networks.lora_hunyuan_image) with alphas; comfyui: ComfyUI's own layout
    assert "lora_unet_double_blocks_1_txt_mod_linear.lora_up.weight" in kohya
    assert "lora_unet_double_blocks_0_img_mlp_fc1.lora_up.weight" in kohya
    assert not any("_mod_lin." in k or "mlp_0" in k for k in kohya)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4   # fused, rank kept
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 4
    assert comfy and all(k.startswith("diffusion_model.") and ".alpha" not in k for k in comfy)
    assert "diffusion_model.double_blocks.1.txt_mod.lin.lora_B.weight" in comfy
    assert ctx.artifacts["lora_comfyui"].endswith("subject.comfyui.safetensors")
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_A.weight" in diffusers
    assert "transformer.single_transformer_blocks.1.norm.linear.lora_B.weight" in diffusers
    from safetensors import safe_open

    with safe_open(ctx.artifacts["lora_kohya"], "pt") as fh:
        assert fh.metadata()["modelspec.architecture"] == "hunyuan-image-2.1/lora"


def test_epochs_regularisation_and_keep_last(dp_recipe, plugins_with, tmp_path, fake_env):
    from lora_run_devtools.testing import make_images

    fake_env()
    reg = tmp_path / "reg"
    make_images(reg, count=2, trigger="", captions=False, prefix="reg", seed=5)
    rgba = reg / "reg_alpha.png"
    from PIL import Image

    Image.new("RGBA", (300, 300), (10, 200, 30, 128)).save(rgba)
    body = FLUX_RECIPE.replace("steps = 6\nsave_every_steps = 2", "epochs = 5\nsave_every_epochs = 1\nkeep_last = 2") \
        + '\n[[dataset.regularization]]\npath = "{reg}"\ndefault_caption = "a man"\nrepeats = 2\n'
    path = dp_recipe(body, reg=reg)
    ctx, rec, _ = run_recipe(path, plugins_with, tmp_path / "run")
    out = tmp_path / "run"
    config = (out / "diffusion-pipe" / "config.toml").read_text()
    assert "checkpoint_every_n_epochs = 1" in config and "save_every_n_epochs = 1" in config
    # 4 subject + 3 reg × 2 repeats = 10 examples per epoch at batch 1
    assert [s for s, _ in rec.steps][-1] == 50
    run_folder = Path(ctx.artifacts["diffusion_pipe_run"])
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith("epoch")) == ["epoch4", "epoch5"]
    assert [c["name"] for c in ctx.artifacts["checkpoints"]] == ["epoch4"]
    assert ctx.artifacts["checkpoints"][0]["epoch"] == 4 and ctx.artifacts["checkpoints"][0]["step"] == 40
    staged = out / "diffusion-pipe" / "data" / "reg-0"
    captions = sorted(p.read_text() for p in staged.glob("*.txt"))
    assert captions == ["a man"] * 3
    converted = [p for p in staged.iterdir() if p.name.startswith("reg_alpha_") and p.suffix == ".png"]
    assert len(converted) == 1 and not converted[0].is_symlink()       # alpha composited: a converted copy
    assert Image.open(converted[0]).mode == "RGB"
    dataset = (out / "diffusion-pipe" / "dataset.toml").read_text()
    assert f'path = "{staged}"\nnum_repeats = 2' in dataset


def test_read_only_dataset_and_shared_cache_dir(dp_recipe, plugins_with, tmp_path, fake_env, subject_dataset):
    fake_env()
    cache = tmp_path / "cache"
    before = sorted(p.name for p in subject_dataset.iterdir())
    os.chmod(subject_dataset, 0o555)
    try:
        first, _, _ = run_recipe(dp_recipe(), plugins_with, tmp_path / "a", f"train.cache_dir='{cache}'")
        second, _, _ = run_recipe(dp_recipe(), plugins_with, tmp_path / "b", f"train.cache_dir='{cache}'")
    finally:
        os.chmod(subject_dataset, 0o755)
    staged = [p for p in (cache / "diffusion-pipe").iterdir() if not p.name.startswith(".")]   # .<folder>.lock
    assert len(staged) == 1, "same model and dataset: one staging folder, its cache reused"
    assert (staged[0] / "subject" / "cache" / "flux").is_dir()
    assert Path(second.artifacts["lora_kohya"]).is_file()
    assert sorted(p.name for p in subject_dataset.iterdir()) == before


def test_multi_gpu_launch(dp_recipe, plugins_with, tmp_path, fake_env):
    fake_env(record=tmp_path / "launch.jsonl")
    ctx, rec, _ = run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "backend.diffusion-pipe.num_gpus=2",
                             "backend.diffusion-pipe.master_port=29613", "backend.diffusion-pipe.nccl_p2p_disable=true",
                             "backend.diffusion-pipe.nccl_ib_disable=true", "train.steps=2",
                             "train.save_every_steps=1")
    launch = json.loads((tmp_path / "launch.jsonl").read_text().splitlines()[0])
    assert launch["argv"][1:3] == ["--num_gpus=2", "--master_port=29613"]
    assert launch["argv"][-2:] == ["--master_port", "29613"]
    assert launch["env"]["NCCL_P2P_DISABLE"] == "1" and launch["env"]["NCCL_IB_DISABLE"] == "1"
    # 4 images / (1 × 1 × 2 data-parallel copies) = 2 steps per epoch
    assert [s for s, _ in rec.steps] == [1, 2] and Path(ctx.artifacts["lora_diffusers"]).is_file()


@pytest.mark.parametrize("mode, error, words", [
    ("crash", BackendError, ["exit code 1", "CUDA out of memory", "full log:"]),
    ("nan", NonFiniteLoss, ["loss became nan at step 3", "(the LoRAs step2 saved before it are kept in "]),
    ("quiet_exit", BackendError, ["never printed TRAINING COMPLETE"]),
])
def test_failures_show_the_log_tail(dp_recipe, plugins_with, tmp_path, fake_env, mode, error, words):
    fake_env(mode=mode, at=3)
    with pytest.raises(error) as info:
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run")
    for word in words:
        assert word in str(info.value)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and (tmp_path / "run" / "recipe.toml").is_file()


@pytest.mark.parametrize("mode, words", [
    ("lora_truncated", "truncated or not safetensors"), ("lora_empty", "too short to be a safetensors file"),
    ("lora_nan", "holds NaN or inf values"), ("lora_rank", "rank 8, not the recipe's [lora] rank = 4"),
    ("lora_family", "is not a module of a flux.1-dev LoRA in the diffusers layout"), ("ok", None)])
def test_a_broken_saved_lora_is_never_reported(dp_recipe, plugins_with, tmp_path, fake_env, mode, words):
    """diffusion-pipe's save at step 4 is cut off, empty, trained into NaN, of another rank or another family: it is
    refused by name when it appears (exit 1, manifest `failed`), never converted, reported as a checkpoint or
    collected (a NaN or rank-8 file converted without a word before). Control: `ok` reports both saves."""
    fake_env(mode=mode, at=4)
    run = tmp_path / "run"
    if words is None:
        ctx, rec, _ = run_recipe(dp_recipe(), plugins_with, run)
        assert [c[0] for c in rec.checkpoints] == [2, 4, 6] and Path(ctx.artifacts["lora_kohya"]).is_file()
        return
    with pytest.raises(BackendError) as info:
        run_recipe(dp_recipe(), plugins_with, run)
    assert "diffusion-pipe wrote " in str(info.value) and "step4/pytorch_lora_weights.safetensors, which is not a " \
        "LoRA lora-run can report as the run's: " in str(info.value) and words in str(info.value), str(info.value)
    assert not (run / "checkpoints" / "step4").exists() and not (run / "subject.safetensors").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_an_earlier_save_is_never_collected_as_the_final_lora(dp_recipe, plugins_with, tmp_path, fake_env):
    """A 5-step run saving every 2 steps whose engine prints TRAINING COMPLETE! without its end-of-training save
    (step5/): the newest save, step4/, was collected as the final LoRA (exit 0). Control: the same run with the save
    collects step5/."""
    fake_env(mode="no_final_save")
    with pytest.raises(BackendError, match=r"its end-of-training save step5/ is missing \(the newest save, step4/"):
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "train.steps=5")
    assert not (tmp_path / "run" / "subject.safetensors").exists()
    fake_env(mode="ok")
    ctx, _, _ = run_recipe(dp_recipe(), plugins_with, tmp_path / "ok", "train.steps=5")
    assert ctx.artifacts["steps"] == 5 and Path(ctx.artifacts["lora_kohya"]).is_file()


def test_stall_timeout_stops_a_hung_run(dp_recipe, plugins_with, tmp_path, fake_env):
    fake_env(mode="hang", at=2)
    started = time.monotonic()
    with pytest.raises(BackendError, match="printed nothing for 2 s") as info:
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "backend.diffusion-pipe.stall_timeout=2")
    assert time.monotonic() - started < 60
    assert "steps: 1 loss" in str(info.value)


def test_garbage_output_is_survived(dp_recipe, plugins_with, tmp_path, fake_env):
    fake_env(mode="garbage")
    ctx, rec, _ = run_recipe(dp_recipe(), plugins_with, tmp_path / "run")
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5, 6] and Path(ctx.artifacts["lora_kohya"]).is_file()


def test_missing_checkout_or_launcher_is_bad_input(dp_recipe, run_cli, tmp_path, fake_env, fake_checkout):
    fake_env()
    body = FLUX_RECIPE.replace('path = "{checkout}"\n', "")
    out = run_cli(dp_recipe(body, "nopath.toml"), "--output-dir", tmp_path / "r1")
    assert out.returncode == 2 and "[backend.diffusion-pipe] path is not set" in out.stderr
    assert "LORA_RUN_DIFFUSION_PIPE" in out.stderr and "Traceback" not in out.stderr
    # the environment variable works instead; an empty PATH and no launcher option → clear error
    body = FLUX_RECIPE.replace('path = "{checkout}"\n', "").replace('deepspeed = "{launcher}"\n', "")
    env = {"LORA_RUN_DIFFUSION_PIPE": str(fake_checkout), "PATH": "/nonexistent"}
    out = run_cli(dp_recipe(body, "nolauncher.toml"), "--output-dir", tmp_path / "r2", env=env)
    assert out.returncode == 2 and "[backend.diffusion-pipe] deepspeed" in out.stderr, out.stderr


@pytest.mark.slow
def test_interrupt_then_resume(dp_recipe, tmp_path, fake_env, fake_checkout):
    """Ctrl-C mid-training: diffusion-pipe saves a checkpoint (save_quit), lora-run exits 130; --resume
    continues from that checkpoint through --resume_from_checkpoint <run folder>."""
    fake_env(step_delay=0.3, record=tmp_path / "launch.jsonl")
    path = dp_recipe(FLUX_RECIPE.replace("steps = 6", "steps = 12"))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_run.cli", str(path), "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    log = out / "diffusion-pipe" / "train.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.is_file() and "steps: 2 loss" in log.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "asked diffusion-pipe to save a resumable checkpoint" in stdout
    assert "Manually quitting" in log.read_text()
    run_folder = next((out / "diffusion-pipe" / "output").iterdir())
    stopped_at = int((run_folder / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped_at < 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"

    (run_folder / "save_quit").write_text("")      # one left unread (by lora-run before 2026-12-03): removed
    fake_env(step_delay=0, record=tmp_path / "launch.jsonl")
    resumed = subprocess.run([sys.executable, "-m", "lora_run.cli", str(path), "--output-dir", str(out), "--resume"],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"diffusion-pipe: removed a save_quit signal file left in {run_folder}" in resumed.stdout
    last = json.loads((tmp_path / "launch.jsonl").read_text().splitlines()[-1])
    assert last["argv"][-2:] == ["--resume_from_checkpoint", run_folder.name]
    text = log.read_text()
    assert f"Resuming training from checkpoint. Resuming at epoch: " in text and "steps: 12 loss" in text
    assert f"steps: {stopped_at} loss" in text.split("Resuming training")[0]
    assert (out / "subject.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    names = [c["name"] for c in manifest["artifacts"]["checkpoints"]]
    assert names == ["step8", "step10"], names          # keep_last = 3, the final step12 is the LoRA itself
    assert all(Path(c["lora_kohya"]).is_file() for c in manifest["artifacts"]["checkpoints"])


def interrupted_cli(path: Path, out: Path, ready: Callable[[str], bool], cwd: Path, *args: str) -> tuple[int, str, str]:
    """`lora-run PATH --output-dir OUT ARGS` in a subprocess, sent SIGINT once `ready(its stdout so far)` is true;
    (exit code, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_run.cli", str(path), "--output-dir", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    shown: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lines.extend, args=(stream,), daemon=True)
               for lines, stream in ((shown, proc.stdout), (errors, proc.stderr))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline and not ready("".join(shown)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    for reader in readers:
        reader.join(timeout=10)
    return proc.returncode, "".join(shown), "".join(errors)


def printed(line: str) -> Callable[[str], bool]:
    """`ready` for interrupted_cli: lora-run has printed this line."""
    return lambda stdout: line in stdout.splitlines()


@pytest.mark.slow
def test_a_save_quit_the_engine_never_read_is_removed(dp_recipe, tmp_path, fake_env):
    """Ctrl-C writes diffusion-pipe's `save_quit`; an engine that exits without reading it (here: hung, stopped after
    `interrupt_grace`) must not leave it behind: a later --resume would stop after one step."""
    fake_env(mode="hang", at=2)
    out = tmp_path / "run"
    code, stdout, stderr = interrupted_cli(dp_recipe(), out, lambda stdout: "diffusion-pipe: step 1/" in stdout,
                                           tmp_path, "--set", "backend.diffusion-pipe.interrupt_grace=2")
    assert code == 130, stderr
    assert "asked diffusion-pipe to save a resumable checkpoint and stop" in stdout
    assert "diffusion-pipe did not stop in time; stopping it" in stdout
    run_folder = next((out / "diffusion-pipe" / "output").iterdir())
    assert not (run_folder / "save_quit").exists()
    assert f"diffusion-pipe: removed {run_folder / 'save_quit'}, which lora-run wrote" in (out / "run.log").read_text()


@pytest.mark.slow
def test_resume_from_a_checkpoint_at_the_end_without_its_lora_is_refused(dp_recipe, run_cli, tmp_path, fake_env):
    """A Ctrl-C during the last step, when it is no save step: diffusion-pipe writes the checkpoint global_step6 and
    quits without saving step6/. A --resume has nothing to train (diffusion-pipe would train a 7th step) and no
    final LoRA to collect: exit 2, naming the folder."""
    fake_env(await_quit_at=6)
    out = tmp_path / "run"
    log = out / "diffusion-pipe" / "train.log"
    code, _stdout, stderr = interrupted_cli(dp_recipe(), out, lambda _: log.is_file() and "steps: 5 loss" in
                                            log.read_text("utf-8"), tmp_path, "--set", "train.save_every_steps=4")
    assert code == 130, stderr
    (run_folder,) = (out / "diffusion-pipe" / "output").iterdir()
    assert (run_folder / "latest").read_text() == "global_step6" and not (run_folder / "step6").exists()
    fake_env(record=tmp_path / "launch.jsonl")
    resumed = run_cli(dp_recipe(), "--set", "train.save_every_steps=4", "--resume", "--output-dir", out)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert (f"error: {out}: nothing to resume: diffusion-pipe's latest checkpoint global_step6 in {run_folder} is at "
            "the end of training (step 6 of 6), but that folder holds no final LoRA (step6/) to collect; start again "
            "with --overwrite") in resumed.stderr
    assert not (tmp_path / "launch.jsonl").exists()


def test_the_final_save_is_the_one_at_the_end_of_training(tmp_path):
    from lora_run_diffusion_pipe.collect import SavedLora, checkpoint_step, final_save

    def save(name: str) -> SavedLora:
        kind, number = name.rstrip("0123456789"), int(name.lstrip("epochst"))
        return SavedLora(name, kind, number, tmp_path / name, tmp_path / name / "x.safetensors")

    saves = [save(n) for n in ("step16", "epoch4", "step24", "step25")]
    assert final_save(saves, 24, 24).name == "step25"          # the newest at or past max_steps
    assert final_save(saves[:3], 24, 24).name == "step24"
    assert final_save(saves[:2], 24, 24) is None               # step16 is not the end of a 24-step run
    assert final_save(saves, None, 4).name == "epoch4"         # an epoch run ends with epoch<epochs>
    assert final_save(saves, None, 5) is None
    assert [checkpoint_step(t) for t in ("global_step24", "global_step", "step24", None)] == [24, None, None, None]


def test_resume_without_a_checkpoint_is_refused(dp_recipe, plugins_with, tmp_path, fake_env):
    fake_env(mode="crash", at=2)
    with pytest.raises(BackendError):
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "train.save_every_steps=100")
    fake_env()
    with pytest.raises(OutputError, match="nothing to resume"):
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run", "train.save_every_steps=100", resume=True)


def test_model_files_are_checked_before_launch(dp_recipe, plugins_with, tmp_path, fake_env, flux_folder):
    fake_env(record=tmp_path / "launch.jsonl")
    (flux_folder / "model_index.json").unlink()
    with pytest.raises(RecipeError, match="not a diffusers folder"):  # found by the check, before anything runs
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run")
    assert not (tmp_path / "launch.jsonl").exists()
    with pytest.raises(RecipeError):
        run_recipe(dp_recipe(), plugins_with, tmp_path / "run2", "backend.diffusion-pipe.path='/nonexistent'")


def test_check_reports_a_missing_source_folder_and_model_file(dp_recipe, run_cli, tmp_path, flux_folder):
    out = run_cli("check", dp_recipe(), "--set", f"model.source={tmp_path / 'no-such-flux'}",
                  "--set", f"model.files.transformer={tmp_path / 'flux1-dev.safetensors'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"[model.source] folder not found: {tmp_path / 'no-such-flux'}" in out.stderr
    assert f"[model.files.transformer] {tmp_path / 'flux1-dev.safetensors'} does not exist" in out.stderr
    assert out.stderr.count("[model.source]") == 1


def test_a_source_config_of_a_larger_model_is_named_before_launch(dp_recipe, tmp_path):
    """diffusion-pipe loads FLUX.1's VAE and text encoders from the source folder with diffusers and transformers,
    which build the model a config.json describes before they compare it with the weights: a T5 config of
    100000 blocks cost minutes and gigabytes inside the engine. The check compares the config with the weights'
    headers (lora_run_formats.config_fit), exit 2; the intact folder passes."""
    from lora_run.cli import main
    from lora_run_flux.tiny import build_tiny_flux

    from .conftest import FLUX_RECIPE

    model = build_tiny_flux(tmp_path / "tiny-flux")
    recipe = dp_recipe(FLUX_RECIPE.replace("{flux}", str(model)))
    code, text = _check_output(main, recipe)
    assert code == 0, text
    config = model / "text_encoder_2" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 100000}))
    code, text = _check_output(main, recipe)
    assert code == 2 and (f"[model.source] {config}: num_layers = 100000, but the weights hold 1 block "
                          "(encoder.block.0)") in text, text


def test_cli_run_exit_codes(dp_recipe, run_cli, tmp_path, fake_env):
    fake_env()
    ok = run_cli(dp_recipe(), "--output-dir", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert "lora_kohya: " + str(tmp_path / "ok" / "subject.safetensors") in ok.stdout
    fake_env(mode="crash", at=2)
    bad = run_cli(dp_recipe(), "--output-dir", tmp_path / "bad")
    assert bad.returncode == 1 and "CUDA out of memory" in bad.stderr and "Traceback (most recent" in bad.stderr
    assert "error: diffusion-pipe failed (exit code 1)" in bad.stderr


def test_plan_gives_our_memory_estimate(dp_recipe, run_cli):
    out = run_cli("plan", dp_recipe(), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["memory_estimate_gib"] > 0
    assert plan["memory_source"].startswith("lora-run's native memory model for the equivalent settings")
    swapped = json.loads(run_cli("plan", dp_recipe(), "--set", "backend.diffusion-pipe.blocks_to_swap=10",
                                 "--json").stdout)["plan"]
    assert swapped["memory_estimate_gib"] < plan["memory_estimate_gib"]


def test_hunyuan_image_without_flash_attn_is_refused_before_launch(dp_recipe, tmp_path, monkeypatch, hunyuan_files,
                                                                    flash_attn_site):
    """diffusion-pipe's HunyuanImage-2.1 imports flash-attn a minute into its start-up (GPU run of 2026-12-02):
    `lora-run check` asks the launcher's Python first and names the key, exit 2. Control: with flash_attn
    importable there (the autouse fixture's folder), the same check has no such problem."""
    from lora_run.cli import main

    recipe = dp_recipe(hunyuan_recipe(hunyuan_files))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))
    with_missing = _check_output(main, recipe)
    assert with_missing[0] == 2
    line = next(ln for ln in with_missing[1].splitlines() if "flash_attn" in ln)
    assert "[backend.diffusion-pipe.deepspeed] diffusion-pipe's Python (" in line
    assert "cannot import flash_attn: its HunyuanImage-2.1 model imports flash_attn_varlen_func" in line
    assert "install flash-attn 2 (the `flash-attn` package: pip install flash-attn --no-build-isolation)" in line
    monkeypatch.setenv("PYTHONPATH", str(flash_attn_site))
    code, text = _check_output(main, recipe)
    assert code == 0 and "flash_attn" not in text


def test_the_engines_python_is_read_from_the_launchers_first_line(tmp_path):
    from lora_run_diffusion_pipe.backend import engine_python

    cases = {"#!/opt/dp/bin/python3.12\nimport x\n": "/opt/dp/bin/python3.12",
             f"#!/usr/bin/env -S {Path(sys.executable).name}\n": shutil.which(Path(sys.executable).name),
             "#!/bin/sh\nexec python -m deepspeed.launcher.runner \"$@\"\n": None,   # a wrapper: not checked
             "import deepspeed\n": None}
    for i, (text, expected) in enumerate(cases.items()):
        (tmp_path / f"l{i}").write_text(text)
        assert engine_python(tmp_path / f"l{i}") == expected, text
    assert engine_python(tmp_path / "missing") is None


def test_the_import_check_imports_the_module_as_diffusion_pipe_will(tmp_path, flash_attn_site, flash_attn_4_site):
    from lora_run_diffusion_pipe.backend import REQUIRED_IMPORTS, import_problem

    (wanted,) = REQUIRED_IMPORTS["hunyuan-image-2.1"]
    broken = tmp_path / "broken"
    (broken / "flash_attn").mkdir(parents=True)
    (broken / "flash_attn" / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol')\n")

    def problem(*sites: Path, python: str = sys.executable) -> str | None:
        return import_problem(python, wanted, {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, sites))})

    assert problem(flash_attn_site) is None
    assert problem(tmp_path) == "cannot import flash_attn"
    assert problem(broken) == "importing flash_attn fails there (ImportError: flash_attn_2_cuda.so: undefined symbol)"
    assert problem(flash_attn_4_site).startswith("cannot import flash_attn_varlen_func, "
                                                 "flash_attn_varlen_qkvpacked_func from flash_attn (a namespace "
                                                 "package, without __init__.py: ")
    assert problem(flash_attn_site, python=str(tmp_path / "no-python")) is None     # left to the launch


def _check_output(main, recipe):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["check", str(recipe)])
    return code, out.getvalue()
