"""Issue #17's CPU reproduction of the step-2 NaN (bench/engine_dpipe_nan_cpu.py) answers for the GPU run's configs,
and the docs quote its recorded results (bench/results/engine-dpipe-nan-cpu-20261203.json) as they are.

The probe itself needs diffusion-pipe's source and DeepSpeed, so it does not run here; these tests keep what it
claims tied to the recording: the configs it trains on are the ones the GPU run used, and every row the docs give
is computed again from the results file.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import RECORDED

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "engine-dpipe-nan-cpu-20261203.json"
PAGE = ROOT / "docs" / "backend-diffusion-pipe.md"


def probe():
    """bench/engine_dpipe_nan_cpu.py, imported by path (its top level imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("engine_dpipe_nan_cpu", ROOT / "bench" / "engine_dpipe_nan_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base", ["fp8", "bf16"])
def test_the_probe_trains_on_the_configs_the_gpu_run_used(base, tmp_path):
    """The probe regenerates the configs from the GPU run's recorded command line with today's config writer; they
    must be byte for byte the recorded ones (the bf16 run: without transformer_dtype), or it answers for another
    config."""
    from lora_run_devtools.testing import make_images

    module = probe()
    make_images(tmp_path / "data", count=8, size=(512, 512))
    flux = tmp_path / "flux-diffusers-reduced"
    flux.mkdir()
    (flux / "model_index.json").write_text("{}")
    main, dataset = module.generated_config(tmp_path / "run", flux, tmp_path / "data", base)

    def placeholders(text: str) -> str:
        return text.replace(str(tmp_path / "run"), "<run>").replace(str(tmp_path), "<models>")

    recorded = (RECORDED / "flux_config.toml").read_text("utf-8")
    if base == "bf16":
        assert 'transformer_dtype = "float8"\n' in recorded
        recorded = recorded.replace('transformer_dtype = "float8"\n', "")
    assert placeholders(main) == recorded
    assert placeholders(dataset) == (RECORDED / "flux_dataset.toml").read_text("utf-8")
    recipe, sets, unsets = module.recorded_command(base, tmp_path / "data", flux)
    assert recipe.name == "identity-fast.toml" and unsets == ["sample.every_steps"]
    assert ("model.base_precision=bf16" in sets) == (base == "bf16") and "optimizer.name=adamw" in sets


def doc_rows() -> dict[str, list[str]]:
    """The CPU table's rows, keyed by their probe options."""
    section = PAGE.read_text("utf-8").split("### The step-2 NaN on the CPU (issue #17)")[1].split("\n### ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "`" in line]
    return {cells[1].strip("`"): cells for cells in rows}


def summary(run: dict) -> tuple[str, str, str, str]:
    steps = run["steps"]
    losses = f"{steps[0]['loss']:.4f} / {steps[1]['loss']:.4f} / {steps[-1]['loss']:.4f}"
    norms = [s["grad_norm"] for s in steps if "grad_norm" in s]
    norm = f"{min(norms):.3f}–{max(norms):.3f}" if norms else "—"
    return str(len(steps)), losses, norm, f"{steps[-1]['max_abs_lora_B']:.2g}"


def test_every_recorded_probe_run_is_in_the_docs_with_its_figures():
    runs = json.loads(RESULTS.read_text("utf-8"))["runs"]
    rows = doc_rows()
    assert sorted(rows) == sorted(run["options"] for run in runs)
    for run in runs:
        cells = rows[run["options"]]
        count, losses, norm, lora_b = summary(run)
        assert cells[2] == count and cells[3] == losses and cells[4].startswith(norm) and cells[5] == lora_b, cells
        finite = run["verdict"]["finite"] and all(s["weights_finite"] and s.get("grad_finite", True)
                                                  for s in run["steps"])
        assert cells[6].rstrip(" |") == ("yes" if finite else "**no**")


def test_the_recorded_runs_cover_what_differs_between_the_gpu_runs():
    """fp8 and bf16 base, the recipe's 24 steps, both buckets first, bf16 and fp32 LoRA weights, the recipe's lr."""
    runs = {run["options"]: run for run in json.loads(RESULTS.read_text("utf-8"))["runs"]}
    verdicts = [run["verdict"] for run in runs.values()]
    assert {v["base"] for v in verdicts} == {"fp8", "bf16"}
    assert {v["adapter_dtype"] for v in verdicts} == {"torch.float32", "torch.bfloat16"}
    assert {v["precision"] for v in verdicts} == {"autocast", "fp32"}
    assert any(v["lr"] == 1e-4 and v["warmup_steps"] == 2 and v["gradient_clipping"] == 1.0 for v in verdicts)
    assert min(len(run["steps"]) for run in runs.values()) >= 24
    assert {tuple(run["steps"][0]["latent_hw"]) for run in runs.values()} == {(64, 64), (56, 72)}
    assert all(v["optimizer"] == "AdamW" and v["optimizer_defaults"]["eps"] == 1e-8 for v in verdicts)
    # the learning rate DeepSpeed logged on the GPU after steps 1 and 2, from the same schedule
    first = runs["--base fp8"]["steps"]
    assert first[0]["lr_after"] == pytest.approx(7.5e-5) and first[1]["lr_after"] == pytest.approx(1e-4)
