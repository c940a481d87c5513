"""On CUDA: a steady training step waits for the GPU once, where it reads the previous step's loss, and nowhere
else. Every other host sync (a pageable host-to-device copy, ``.item()``, ``float(tensor)``) stops the host from
queueing work ahead, and the GPU then idles through the host's gaps (docs/performance.md, "The steps after a sample
round": the fast recipe's step was host-bound by a fifth to a third). PyTorch's sync debug mode reports each such
call with the line that made it. The control: σ copied to the GPU the plain way (pageable, as before) must show up
as a second sync per step, at that line. A sync inside torch's CUDA-graph trees records a graph (once per shape,
on the steps after compilation) and is not a steady step's, nor is one the watch makes switching the debug mode
back; any other sync fails with its call stack."""
from __future__ import annotations

import traceback
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


def _syncs(tmp_path: Path, mode: str, monkeypatch, planted: bool = False) -> list[tuple[str, list]]:
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
    caught: list[tuple[str, list[traceback.FrameSummary]]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stack = [f for f in traceback.extract_stack() if Path(f.filename).name != "warnings.py"][:-1]
            caught.append((f"{Path(filename).name}:{lineno}", stack))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        try:
            execute(load_recipe(recipe, sets), load_plugins(extra=[SyncWatch(4, 12)]), output_dir=str(tmp_path / "run"),
                    echo=lambda *_: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return caught


def _shown(sync: tuple[str, list[traceback.FrameSummary]]) -> str:
    """A sync with the innermost frames of its call stack."""
    where, stack = sync
    return where + " via " + " < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                                        for f in reversed(stack[-6:]))


def _watcher(stack: list[traceback.FrameSummary]) -> bool:
    """A sync reported inside ``SyncWatch.step_finished``: the watch switching the debug mode back (seen on the
    H100 on 2026-12-05, from ``torch/cuda/__init__.py``), not the step's."""
    return any(f.filename == __file__ and f.name == "step_finished" for f in stack)


def _recording(stack: list[traceback.FrameSummary]) -> bool:
    """A sync inside torch's CUDA-graph trees: a graph being recorded (once per shape), not a steady step's."""
    return any(Path(f.filename).name == "cudagraph_trees.py" for f in stack)


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_a_steady_step_syncs_once_at_the_previous_loss(tmp_path, monkeypatch, mode):
    from lora_run_native import train

    syncs = _syncs(tmp_path, mode, monkeypatch)
    source = Path(train.__file__).read_text("utf-8").splitlines()
    reads = [w for w, _ in syncs if w.startswith("train.py:") and "float(loss_sum)" in source[int(w.split(":")[1]) - 1]]
    recorded = [s for s in syncs if _recording(s[1])]
    others = [s for s in syncs if s[0] not in reads and s not in recorded and not _watcher(s[1])]
    assert not others, "syncs outside the loss read: " + "; ".join(map(_shown, others))
    assert 7 <= len(reads) <= 9, f"{len(reads)} loss reads in 8 steps: {[_shown(s) for s in syncs]}"
    assert len(recorded) <= 2, f"graph recordings in steady steps: {[_shown(s) for s in recorded]}"


def test_control_a_planted_pageable_copy_is_seen(tmp_path, monkeypatch):
    syncs = _syncs(tmp_path, "speed", monkeypatch, planted=True)
    planted = [w for w, _ in syncs if w.startswith(f"{Path(__file__).name}:")]     # the planted copy's line
    assert len(planted) >= 7, [_shown(s) for s in syncs]
