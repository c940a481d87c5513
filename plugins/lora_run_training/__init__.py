"""Built-in plugin `training`: the recipe tables of training proper and the capability check.

- :mod:`.sections` — `[train]`, `[lora]`, `[text_encoder]`, `[optimizer]`, `[scheduler]` and `[sample]`, and the
  keys of core's `[model]` and `[dataset]` every backend reads (the weights, the images and captions, buckets,
  regularisation sets) (``register_sections``: their attrs classes, defaults and the rules among their keys, the
  loss lookup of `[train]` included); :class:`Feature`, a recipe feature some backend may not honour;
- :mod:`.capabilities` — the recipe features a backend may not honour, and the check that refuses a recipe
  using one the chosen backend does not list for the chosen family (``check_recipe``);
- :mod:`.policy` — the playbook's text-encoder policy (§5) and the failure causes a recipe shows (§9, fp16):
  warnings in the dataset lint's table (``lint_dataset``);
- :mod:`.families` — what the families' registrations say about a recipe: the bucket grid, `[model] version`,
  the `[model.files]` slots, the weights to train on, the σ samplers and LoRA formats they register
  (``check_recipe``);
- :class:`ModelSourceError` (a weights file or folder the `[model]` keys name is wrong; exit 2) and
  :class:`NonFiniteLoss` (the loss became NaN or inf; exit 1), raised by the backends and the families' adapters.

Registered through the `lora_run` entry-point group like any third-party plugin. No torch import.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from lora_run.errors import EXIT_BAD_INPUT, BackendError, LoraRunError
from lora_run.hookspecs import hookimpl


def is_used(value: Any, _recipe: Any) -> bool:
    return bool(value)


class Feature(NamedTuple):
    """A recipe feature some backend may not honour, declared on a field (``option(features=(Feature(...),))``):
    ``used(value, recipe)`` says whether a recipe uses it (default: the field's value is truthy). A backend lists
    the features it honours per family in its ``capabilities``; :mod:`.capabilities` refuses the others, naming
    the field's key."""

    name: str
    doc: str
    used: Callable[[Any, Any], bool] = is_used
    key: tuple[str, ...] = ()     # filled in from the field that carries it (:mod:`.capabilities`)


class ModelSourceError(LoraRunError):
    """A model file or folder named by the recipe (the ``[model]`` keys of :mod:`.sections`) is missing or wrong."""

    exit_code = EXIT_BAD_INPUT


class NonFiniteLoss(BackendError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@hookimpl
def register_sections(register):
    from .sections import SECTIONS

    for name, cls, check, description in SECTIONS:
        register(name, options=cls, check=check, description=description)


@hookimpl
def check_recipe(recipe: Any, plugins: Any) -> list:
    """What the chosen family's registration says about the recipe, the σ sampler and LoRA formats the families
    register, and the features the recipe uses that its backend does not honour for its family."""
    from .capabilities import capability_problems
    from .families import family_problems, name_problems, source_problems

    backends, families = plugins.registry["backend"], plugins.registry["family"]
    family = families.get(recipe.model.family)     # an unknown or unset name is reported by the lookup already
    problems = family_problems(recipe, family, plugins) if family is not None else []
    problems += source_problems(recipe) + name_problems(recipe, plugins)
    if family is not None and recipe.backend.name in backends:
        problems += capability_problems(recipe, recipe.backend.name, backends)
    return problems


@hookimpl(trylast=True)
def lint_dataset(recipe: Any, items: Any, report: Any) -> None:
    """The playbook's text-encoder policy and fp16 (warnings), after the dataset's lint has counted the usable
    images."""
    from .policy import lint_policy

    lint_policy(recipe, report)
