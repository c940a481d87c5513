"""Built-in plugin `training`: the recipe tables of training proper and the capability check.

- :mod:`.sections` — `[lora]`, `[text_encoder]`, `[optimizer]`, `[scheduler]` and `[sample]`
  (``register_sections``: their attrs classes, defaults and the rules among their keys);
- :mod:`.capabilities` — the recipe features a backend may not honour, and the check that refuses a recipe
  using one the chosen backend does not list for the chosen family (``check_recipe``).

Registered through the `lora_run` entry-point group like any third-party plugin. No torch import.
"""
from __future__ import annotations

from typing import Any

from lora_run.hookspecs import hookimpl


@hookimpl
def register_sections(register):
    from .sections import SECTIONS

    for name, cls, check, description in SECTIONS:
        register(name, options=cls, check=check, description=description)


@hookimpl
def check_recipe(recipe: Any, plugins: Any) -> list:
    """The features the recipe uses that its backend does not honour for its family."""
    from .capabilities import capability_problems

    backends = plugins.registry["backend"]
    if recipe.backend.name not in backends or recipe.model.family not in plugins.registry["family"]:
        return []       # an unknown or unset name is reported by the lookup already
    return capability_problems(recipe, recipe.backend.name, backends)
