"""The disk-space check before diffusion-pipe is launched: a run that cannot fit is refused (exit 2, nothing
launched, the new run folder removed), one that fits runs, and the estimate covers the files of the real GPU run
(fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261203/flux_run_layouts.json)."""
from __future__ import annotations

import json
import shutil

import attrs
import pytest

from lora_run.recipe import load_recipe
from lora_run_diffusion_pipe import translate
from lora_run_diffusion_pipe.options import DiffusionPipeOptions
from tests.reliability.conftest import run_cli
from tests.reliability.test_disk_space import _Usage

from .conftest import FLUX_RECIPE, RECORDED_RUN


def test_a_run_that_cannot_fit_is_refused_before_launch(dp_recipe, fake_env, tmp_path, capsys, monkeypatch):
    fake_env(record=tmp_path / "launch.jsonl")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(100 * 2**20))
    run = tmp_path / "run"
    code, out = run_cli([str(dp_recipe()), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 2, out
    line = [ln for ln in out.splitlines() if "[output.dir]" in ln]
    assert line and "diffusion-pipe run" in line[0] and "nothing was trained" in line[0], out
    assert "100.0 MiB free" in line[0] and "3 save(s)" in line[0] and "DeepSpeed checkpoint(s)" in line[0]
    assert not (tmp_path / "launch.jsonl").exists(), "diffusion-pipe was launched"
    assert "the run stopped before training" in out and not run.exists(), "a new run folder is not left behind"


def test_a_run_that_fits_is_not_refused(dp_recipe, fake_env, tmp_path, capsys, monkeypatch):
    fake_env()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(64 * 2**30))
    run = tmp_path / "run"
    code, out = run_cli([str(dp_recipe()), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 0 and "[output.dir]" not in out, out
    assert (run / "subject.safetensors").is_file()


@pytest.mark.parametrize("mistake", [None, "no optimizer state"])
def test_the_estimate_covers_the_real_gpu_run(dp_recipe, tmp_path, monkeypatch, mistake):
    """The recorded run (24 steps, save_every_steps 8, keep_last 2, AdamW, both formats) saved step8, step16 and
    step24 and kept the newest 2; its LoRA files and its DeepSpeed checkpoint each fit in their part of the
    estimate (LoRA parameters from its own diffusers file), the checkpoint within a quarter. A planted mistake
    (the optimizer state left out) is caught."""
    import lora_run_engines.disk as disk
    from lora_run_native import memory

    files = {e["path"]: e["size"] for e in json.loads((RECORDED_RUN / "flux_run_layouts.json").read_text())["main"]
             if not e["dir"]}
    output = "diffusion-pipe/output/20261203_18-51-49/"
    saves = sorted({p[len(output):].split("/")[0] for p in files if p.startswith(output + "step")})
    checkpoint = sum(n for p, n in files.items() if p.startswith(output + "global_step"))
    loras = sum(n for p, n in files.items() if p.endswith(".safetensors"))
    parameters = files[output + "step24/pytorch_lora_weights.safetensors"] // 2        # bf16, header included
    if mistake == "no optimizer state":
        monkeypatch.setitem(memory.OPTIMIZER_BYTES, "adamw", 0)
    body = FLUX_RECIPE.replace("steps = 6\nsave_every_steps = 2", "steps = 24\nsave_every_steps = 8\nkeep_last = 2")
    recipe = load_recipe(dp_recipe(body)).recipe
    recipe = attrs.evolve(recipe, output=attrs.evolve(recipe.output, formats=["kohya", "diffusers"]))   # as recorded
    layout = translate.Layout.of(tmp_path / "run", recipe)
    config = translate.build_config(recipe, DiffusionPipeOptions(), layout, examples=8)
    writes = translate.disk_writes(recipe, config, parameters, 3)
    kept = min(writes.saves, recipe.train.keep_last)
    assert (writes.saves, saves) == (3, [f"step{n}" for n in (16, 24)][-kept:])
    ours = max(min(writes.saves, 3) * writes.save, kept * writes.save + writes.final)
    state = disk.state_bytes(parameters, "adamw")
    fits = loras <= ours and checkpoint <= state <= 1.25 * checkpoint
    assert fits is (mistake is None), (loras, ours, checkpoint, state)
