"""Shared helpers of the parity tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from lora_run.recipe import parse_recipe_text


def minimal_recipe(family: str, source: str | Path, *, train: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
                   native: dict[str, Any] | None = None):
    """The smallest recipe a family's adapter is built from: the family, its source (also the dataset path,
    which these tests never read), one step, and the given `[train]`, `[model]`, `[dataset]` and
    `[backend.native]` entries."""
    raw: dict[str, Any] = {"model": {"family": family, "source": str(source), **(model or {})},
                           "dataset": {"path": str(source), "trigger": "ohwx", **(dataset or {})},
                           "train": {"steps": 1, **(train or {})}}
    if native:
        raw["backend"] = {"native": native}
    return parse_recipe_text(tomli_w.dumps(raw))
