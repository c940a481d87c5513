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
