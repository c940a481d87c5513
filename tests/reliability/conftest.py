"""Fixtures for the reliability suite: the tiny FLUX model, a small dataset, a recipe writer and a figures
recorder (each test adds the cases it tried and the faults it survived; the totals are printed at the end
and written to ``$LORA_RUN_RELIABILITY_FIGURES`` when set, for docs/reliability.md)."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

RECIPE = """
[model]
family = "flux.1-dev"
source = "{model}"
offline = true

[dataset]
path = "{dataset}"
trigger = "ohwx"
resolution = 64
bucket_min = 64
bucket_max = 96
bucket_step = 16
min_images = 1
caption_dropout = 0.3

[lora]
rank = 4
alpha = 4.0
targets = "all-linear"
dropout = 0.1

[optimizer]
name = "adamw"
lr = 1e-3

[scheduler]
name = "cosine"
warmup_steps = 2

[train]
steps = 6
batch_size = 1
mixed_precision = "no"
gradient_checkpointing = false
save_every_steps = 2
keep_last = 2
noise_offset = 0.05
seed = 7

[eval]
enabled = false

[output]
name = "tiny"
save_precision = "fp32"

[backend]
name = "native"

[backend.native]
text_max_length = 16
progress_bar = false
tensorboard = false
"""

FIGURES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


def run_cli(argv, capsys, never: str):
    """``lora-run ARGV`` in this process: (exit code, everything it printed), which must hold neither a traceback
    nor ``never``."""
    from lora_run.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text and never not in text, text[-2000:]
    return code, text


@pytest.fixture
def figures():
    """``figures(area, cases=0, faults=0, lost=0)`` adds to the suite's totals."""
    def add(area: str, cases: int = 0, faults: int = 0, lost: int = 0) -> None:
        FIGURES[area]["cases"] += cases
        FIGURES[area]["faults_survived"] += faults
        FIGURES[area]["data_lost"] += lost
    return add


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    lines = [f"{area}: {v['cases']} cases, {v['faults_survived']} faults survived, data lost {v['data_lost']}"
             for area, v in sorted(FIGURES.items())]
    terminalreporter.write_sep("-", "reliability figures")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get("LORA_RUN_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps({k: dict(v) for k, v in FIGURES.items()}, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lora_run_flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "tiny-flux")


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "subject"
    make_images(folder, count=3, size=(96, 80))
    return folder


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model, small_dataset):
    """``tiny_recipe(extra="", data=None, name="recipe.toml") -> Path`` for the tiny FLUX model."""
    def write(extra: str = "", data: Path | None = None, name: str = "recipe.toml") -> Path:
        body = RECIPE.replace("{model}", str(tiny_model)).replace("{dataset}", str(data or small_dataset))
        path = tmp_path / name
        path.write_text(body + "\n" + extra, encoding="utf-8")
        return path
    return write


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
