"""The model-free LoRA size the engines' disk-space check uses, against a real sd-scripts LoRA."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_run_engines.disk import lora_parameters

#: the tensors of a real sd-scripts FLUX.1 LoRA (rank 16, every linear of the blocks), names and shapes (from the
#: project's sd-scripts reference data, tools-data/sd-scripts)
REAL = Path(__file__).resolve().parent / "fixtures" / "flux_lora_keys_rank16.json"


def _recipe(targets: str, rank: int) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(family="flux.1-dev"), lora=SimpleNamespace(targets=targets, rank=rank))


def _close_above(estimate: int, real: int) -> bool:
    """Not below the real file, and at most a quarter above it (sd-scripts fuses q, k, v: its file is smaller)."""
    return real <= estimate <= 1.25 * real


@pytest.mark.parametrize("mistake", [None, "preset", "rank"])
def test_the_lora_size_estimate_covers_a_real_sd_scripts_lora(mistake):
    """The estimate for all-linear rank 16 is within a quarter above the real file's elements; a planted mistake
    (the attention+mlp preset counted for all-linear, half the rank) falls below it and is caught."""
    shapes = json.loads(REAL.read_text())
    real = sum(math.prod(s) for s in shapes.values())
    targets, rank = {None: ("all-linear", 16), "preset": ("attention+mlp", 16), "rank": ("all-linear", 8)}[mistake]
    estimate = lora_parameters(_recipe("all-linear", 16), targets)
    if mistake == "rank":
        estimate = lora_parameters(_recipe("all-linear", rank))
    assert _close_above(estimate, real) is (mistake is None), (estimate, real)
