"""The tiny rows of the GPU acceptance matrix (bench/gpu_acceptance.py) through the real CLI, on CUDA."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_acceptance_rows", REPO / "bench" / "gpu_acceptance.py")
_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rows)
TINY = {row["id"]: row for row in _rows.tiny_rows()}


@pytest.mark.parametrize("row_id", sorted(TINY))
def test_tiny_row(row_id, acceptance, acceptance_assets):
    work, assets = acceptance_assets
    result = acceptance.run_row(TINY[row_id], assets, work)
    assert result["passed"], json.dumps(result, indent=1, default=str)


def test_speed_mode_with_cuda_graphs_samples_every_two_steps_at_512(acceptance, acceptance_assets):
    """The crash this suite was built for: CUDA graphs in training, samples between steps, 512² buckets."""
    work, assets = acceptance_assets
    row = {**TINY["tiny-flux-speed-graphs"], "id": "graphs-512", "resolution": 512, "model": "tiny"}
    recipe = acceptance.recipe_for(row, {**assets, "subject": assets["subject-512"]})
    recipe["dataset"].update(bucket_min=512, bucket_max=512, bucket_step=64)
    recipe["train"].update(steps=8, save_every_steps=100)
    recipe["sample"].update(every_steps=2, width=512, height=512)
    import tomli_w

    path = work / "graphs-512.toml"
    path.write_text(tomli_w.dumps(recipe))
    out = work / "runs" / "graphs-512"
    done = subprocess.run([*acceptance.cli(), str(path), "--output-dir", str(out), "--overwrite", "--set",
                           'train.memory_mode="speed"', "--set", 'train.cuda_graphs="on"'],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "CUDA graphs" in manifest["artifacts"]["gpu_plan"]["plan"]
    assert len(manifest["artifacts"]["samples"]) == 4          # steps 2, 4, 6 and the final one


def test_a_budget_too_small_stops_before_training(acceptance, acceptance_assets):
    work, assets = acceptance_assets
    row = {**TINY["tiny-flux-auto"], "id": "too-small"}
    import tomli_w

    path = work / "too-small.toml"
    path.write_text(tomli_w.dumps(acceptance.recipe_for(row, assets)))
    done = subprocess.run([*acceptance.cli(), str(path), "--output-dir", str(work / "runs" / "too-small"),
                           "--overwrite", "--set", "train.gpu_memory_gib=0.01"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "gpu_memory_gib" in done.stderr and "nothing was trained" in done.stderr
    assert "Traceback" not in done.stderr

