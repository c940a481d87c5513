"""docs/backend-diffusion-pipe.md stays in step with the code."""
from __future__ import annotations

from pathlib import Path

import attrs

from lora_run.features import FEATURES
from lora_run_diffusion_pipe import REASONS
from lora_run_diffusion_pipe.options import DiffusionPipeOptions

PAGE = Path(__file__).resolve().parents[2] / "docs" / "backend-diffusion-pipe.md"


def test_every_option_is_documented():
    text = PAGE.read_text("utf-8")
    table = text.split("## Options: `[backend.diffusion-pipe]`")[1].split("\n## ")[0]
    for field in attrs.fields(DiffusionPipeOptions):
        assert f"`{field.name}`" in table, f"option {field.name} missing from the options table"


def test_every_refused_feature_names_its_key_in_the_page():
    text = PAGE.read_text("utf-8")
    refused = text.split("## What is refused, and why")[1].split("\n## ")[0]
    keys = {f.name: ".".join(f.key) for f in FEATURES}
    keys.update({"loss:pseudo-huber": "train.loss"})
    for feature in REASONS:
        assert f"`{keys[feature]}" in refused, f"{feature} ({keys[feature]}) is not in the refusal table"
