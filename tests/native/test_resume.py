"""A run killed (SIGKILL) right after a checkpoint and resumed ends bitwise equal to an uninterrupted run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from .conftest import env_for_subprocess, lora_tensors

KILLER = '''
import os, signal, sys
from lora_run.hookspecs import hookimpl
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import execute

class KillAfterCheckpoint:
    @hookimpl
    def checkpoint_saved(self, step, path):
        if step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

execute(load_recipe(sys.argv[1], sys.argv[3:]), load_plugins(extra=[KillAfterCheckpoint()]), output_dir=sys.argv[2])
'''

SETS = ["train.steps=6", "train.save_every_steps=2", "train.keep_last=5", "train.gradient_accumulation=2",
        "lora.dropout=0.2", "dataset.caption_dropout=0.3", "train.noise_offset=0.1", "optimizer.name=\"adafactor\"",
        "optimizer.lr=1e-2", "scheduler.name=\"cosine\"", "scheduler.warmup_steps=2", "text_encoder.train=true",
        "text_encoder.train_fraction=0.5"]


@pytest.mark.slow
def test_killed_after_checkpoint_and_resumed_is_bitwise_equal(flux_recipe, run_recipe, tmp_path):
    recipe = flux_recipe()
    whole = run_recipe(recipe, SETS, output=tmp_path / "whole")

    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, str(script), str(recipe), str(cut), *SETS], capture_output=True,
                            text=True, env={**env_for_subprocess(), "KILL_AT": "4"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (cut / "checkpoints" / "step-000004" / "resume" / "state.json").is_file()
    assert not (cut / "tiny.safetensors").exists(), "the killed run never got to its final LoRA"
    assert json.loads((cut / "manifest.json").read_text())["status"] == "running"

    args = [sys.executable, "-m", "lora_run.cli", str(recipe), "--resume", "--output-dir", str(cut)]
    for s in SETS:
        args += ["--set", s]
    resumed = subprocess.run(args, capture_output=True, text=True, env=env_for_subprocess(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in (resumed.stdout + resumed.stderr)

    for fmt in ("lora_kohya", "lora_diffusers"):
        a = lora_tensors(whole.artifacts[fmt])
        b = lora_tensors(cut / whole.artifacts[fmt].split("/whole/", 1)[1])
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and bool((a[key] == b[key]).all()), f"{fmt}: {key} differs"
    assert any(k.startswith("lora_te1_") for k in lora_tensors(whole.artifacts["lora_kohya"]))
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest.get("resumed_at")


def test_resume_without_checkpoint_starts_over_and_refuses_a_changed_recipe(flux_recipe, run_recipe, tmp_path):
    from lora_run.errors import RecipeError

    recipe = flux_recipe()
    first = run_recipe(recipe, ["train.steps=2"])
    again = run_recipe(recipe, ["train.steps=3"], resume=True)      # steps may change on resume
    assert again.artifacts["steps"] == 3 and first.artifacts["steps"] == 2
    with pytest.raises(RecipeError, match=r"\[lora.rank\]"):
        run_recipe(recipe, ["train.steps=3", "lora.rank=8"], resume=True)


# ----------------------------------------------------------------- stopped, resumed: the same steps, bit for bit
def _buckets_dataset(folder):
    """6 images in 3 aspect buckets at resolution 80 (80x80, 64x96, 96x64), near-duplicates the lint only warns of."""
    from lora_run_devtools.testing import make_images

    make_images(folder, count=2, size=(96, 80), seed=1)
    make_images(folder, count=2, size=(64, 112), seed=2, prefix="tall")
    make_images(folder, count=2, size=(112, 64), seed=3, prefix="wide")
    return folder


#: an epochs-based run of 6 optimizer steps: 2 epochs of 6 batches (3 buckets), 2 micro-batches a step, so step 3
#: ends epoch 0 and a checkpoint at step 2 lies mid-epoch; caption dropout, LoRA dropout, noise offset, warm-up+cosine
BUCKETED = ["dataset.resolution=80", "dataset.caption_dropout=0.3", "train.gradient_accumulation=2",
            "lora.dropout=0.1", "train.noise_offset=0.05", 'scheduler.name="cosine"', "scheduler.warmup_steps=2",
            "train.save_every_steps=2", "train.keep_last=5"]


def _steps(run):
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (run / "eval" / "loss.jsonl").read_text().splitlines())]


def _same_loras(a, b) -> bool:
    for rel in ("tiny.safetensors", "diffusers/tiny.safetensors"):
        x, y = lora_tensors(a / rel), lora_tensors(b / rel)
        if x.keys() != y.keys() or any(x[k].dtype != y[k].dtype or not bool((x[k] == y[k]).all()) for k in x):
            return False
    return True


def _stop_at(monkeypatch, number):
    """SIGTERM (as `kill PID` sends) during optimizer step ``number``: the run saves that step and exits 130."""
    import os

    from lora_run_native.train import Trainer

    real = Trainer._micro_step

    def micro(self, state, batch, step, micro_index, *a, **kw):
        if step + 1 == number and micro_index == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, state, batch, step, micro_index, *a, **kw)
    monkeypatch.setattr(Trainer, "_micro_step", micro)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["adamw-mid-epoch", "adafactor-epoch-boundary"])
def test_stopped_and_resumed_from_the_cli_repeats_every_step(flux_recipe, tmp_path, monkeypatch, capsys, case):
    """Stopped after a checkpoint and resumed through the command line, a run reports the same loss and learning
    rate at every step as the uninterrupted run and ends with the same LoRA tensors, bit for bit (CPU): accumulation,
    an epochs-based length with the checkpoint mid-epoch (step 2) or at an epoch's end (step 3), three aspect buckets,
    caption and LoRA dropout, noise offset, warm-up and cosine, AdamW and Adafactor (with a text-encoder LoRA frozen
    half-way), the caches reused. The manifest and run.log say what happened. With AdamW, resumes with one planted
    mistake each (the optimizer state, the schedule or the generators not restored, the data order or the noise
    counted from the resume) must be told apart by the same comparison."""
    import shutil

    import torch

    from lora_run.cli import main

    recipe = flux_recipe(data=_buckets_dataset(tmp_path / "buckets"), length="epochs = 2")
    sets = [*BUCKETED, *(["optimizer.name=\"adafactor\"", "optimizer.lr=1e-2", "text_encoder.train=true",
                          "text_encoder.train_fraction=0.5"] if case.startswith("adafactor") else [])]
    argv = [str(recipe)] + [a for s in sets for a in ("--set", s)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--output-dir", str(whole)]) == 0, capsys.readouterr().err[-2000:]
    reference = _steps(whole)
    assert [s for s, _, _ in reference] == [1, 2, 3, 4, 5, 6]
    stop = 2 if case.startswith("adamw") else 3
    with monkeypatch.context() as m:
        _stop_at(m, stop)
        assert main([*argv, "--output-dir", str(cut)]) == 130
    assert (cut / "checkpoints" / f"step-{stop:06d}" / "resume" / "state.json").is_file()
    assert not (cut / "tiny.safetensors").exists()
    stopped = tmp_path / "stopped"
    shutil.copytree(cut, stopped, symlinks=True)
    capsys.readouterr()
    assert main([*argv, "--resume", "--output-dir", str(cut)]) == 0
    text = capsys.readouterr()
    assert f"step-{stop:06d} (step {stop} of 6)" in text.out + text.err
    assert "cache: latents 6 hit(s), 0 built" in text.out + text.err and "text 3 hit(s), 0 built" in text.out + text.err
    assert _steps(cut) == reference, "the resumed run's steps differ from the uninterrupted run's"
    assert _same_loras(whole, cut)

    manifest, first = json.loads((cut / "manifest.json").read_text()), json.loads((whole / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["invocations"]) == 2 and len(manifest["resumed_at"]) == 1
    assert manifest["artifacts"]["steps"] == 6 and manifest["lora_files"]["tiny.safetensors"]["tensors_sha256"] == \
        first["lora_files"]["tiny.safetensors"]["tensors_sha256"]
    assert manifest["artifacts"]["loss_first"] == first["artifacts"]["loss_first"] == reference[0][1]
    assert manifest["artifacts"]["loss_last"] == reference[-1][1]
    assert manifest["invocations"][0]["steps"] == [0, stop] and manifest["invocations"][1]["steps"] == [stop, 6]
    assert manifest["invocations"][0]["status"] == "interrupted" and manifest["invocations"][1]["status"] == "completed"
    log = (cut / "run.log").read_text()
    assert f"resumed from step-{stop:06d}" in log and log.count("run interrupted") == 1 and log.endswith("run completed\n")
    if not case.startswith("adamw"):
        return

    from lora_run_native import checkpoint as ckpt
    from lora_run_native import distributed, train

    def restart_counting(m):         # the data order and the noise counted from the resume, not from step 0
        starts = {}
        real_restore, real_batch, real_seed = train.Trainer.restore, train.Trainer._batch, train.step_seed
        m.setattr(train.Trainer, "restore", lambda self, *a: starts.setdefault("at", real_restore(self, *a)))
        return starts, real_batch, real_seed

    def data_order(m):
        starts, real_batch, _ = restart_counting(m)
        accum = 2
        m.setattr(train.Trainer, "_batch", lambda self, state, index: real_batch(self, state, index - starts["at"] * accum))

    def noise(m):
        starts, _, real_seed = restart_counting(m)
        m.setattr(train, "step_seed", lambda seed, *parts: real_seed(
            seed, *((parts[0], parts[1] - starts["at"], *parts[2:]) if parts[:1] == ("noise",) else parts)))

    def generators(m):               # neither reseeded each step nor restored: LoRA dropout draws other masks
        m.setattr(train, "reseed", lambda seed: None)
        m.setattr(ckpt, "restore_rng", lambda *a: None)

    planted = {
        "optimizer state": lambda m: m.setattr(distributed.Parallel, "load_optimizer_state", lambda *a: None),
        "schedule": lambda m: m.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", lambda *a: None),
        "generators": generators,
        "data order": data_order,
        "noise": noise,
    }
    for name, plant in planted.items():
        run = tmp_path / f"planted-{name.replace(' ', '-')}"
        shutil.copytree(stopped, run, symlinks=True)
        with monkeypatch.context() as m:
            plant(m)
            assert main([*argv, "--resume", "--output-dir", str(run)]) == 0, name
        assert _steps(run)[:stop] == reference[:stop]
        assert _steps(run) != reference and not _same_loras(whole, run), f"a resume with the {name} wrong went unseen"
