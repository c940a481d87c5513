"""The recipe writer: a loaded recipe back as TOML (the run folder's resolved `recipe.toml`, which `--resume` reads
again, and `lora-run plan`), the inverse of core's loader (``lora_run.recipe.load_recipe``)."""
from __future__ import annotations

from typing import Any

import tomli_w

from lora_run.recipe import CONVERTER
from lora_run.schema import Recipe


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain TOML-able data (None values left out, backend tables unpacked)."""
    data = _drop_none(CONVERTER.unstructure(recipe))
    data.pop("extends", None)
    backend = data.pop("backend")
    data["backend"] = {"name": backend["name"], **backend.get("options", {})}
    return data


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """The resolved recipe as TOML (tomli-w); loading it gives an equal Recipe."""
    body = tomli_w.dumps(to_dict(recipe))
    if header:
        body = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + body
    return body
