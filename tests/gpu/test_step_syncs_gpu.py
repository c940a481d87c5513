"""On CUDA: a steady training step waits for the GPU once, where it reads the previous step's loss, and nowhere
else. Every other host sync (a pageable host-to-device copy, ``.item()``, ``float(tensor)``) stops the host from
queueing work ahead, and the GPU then idles through the host's gaps (docs/performance.md, "The steps after a sample
round": the fast recipe's step was host-bound by a fifth to a third). PyTorch's sync debug mode reports each such
call with the line that made it. The control: σ copied to the GPU the plain way (pageable, as before) must show up
as a second sync per step, at that line."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lora_run.hookspecs import hookimpl  # noqa: E402
from tests.native.conftest import BASE_RECIPE  # noqa: E402


class SyncWatch:
    """Sync debug mode on from step ``first`` to step ``last`` (steady steps: compiled, graphs recorded)."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last

    @hookimpl
    def step_finished(self, step):
        if step == self.first:
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.last:
            torch.cuda.set_sync_debug_mode("default")


def _syncs(tmp_path: Path, mode: str, monkeypatch, planted: bool = False) -> list[str]:
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_devtools.testing import make_images
    from lora_run_flux.tiny import build_tiny_flux

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_flux(tmp_path / "tiny-flux")
    make_images(tmp_path / "subject", count=3, size=(64, 64))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BASE_RECIPE.replace("{model}", str(model)).replace("{dataset}", str(tmp_path / "subject"))
                      .replace("{length}", "steps = 14"), encoding="utf-8")
    sets = [f'train.memory_mode="{mode}"', 'train.mixed_precision="bf16"', "dataset.bucket_max=64"]
    if planted:      # the control: a pageable copy to the GPU, as σ was copied before
        from lora_run_native import timesteps

        monkeypatch.setattr(timesteps, "to_device", lambda tensor, device: tensor.to(device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            execute(load_recipe(recipe, sets), load_plugins(extra=[SyncWatch(4, 12)]), output_dir=str(tmp_path / "run"),
                    echo=lambda *_: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_a_steady_step_syncs_once_at_the_previous_loss(tmp_path, monkeypatch, mode):
    from lora_run_native import train

    syncs = _syncs(tmp_path, mode, monkeypatch)
    source = Path(train.__file__).read_text("utf-8").splitlines()
    lines = {s for s in syncs if s.startswith("train.py:")}
    assert syncs and all(s.startswith("train.py:") for s in syncs), f"syncs outside the loss read: {syncs}"
    assert all("float(loss_sum)" in source[int(s.split(":")[1]) - 1] for s in lines), syncs
    assert 7 <= len(syncs) <= 9, f"{len(syncs)} syncs in 8 steps: {syncs}"


def test_control_a_planted_pageable_copy_is_seen(tmp_path, monkeypatch):
    syncs = _syncs(tmp_path, "speed", monkeypatch, planted=True)
    planted = [s for s in syncs if s.startswith("timesteps.py:")]
    assert len(planted) >= 7, syncs
