"""The recipe schema: frozen attrs classes, one section per TOML table.

Every field carries its documentation next to it (``doc``); ``docs/recipe-reference.md`` is generated
from these docs (``python -m lora_run_devtools.docgen``) and a test fails when the page is stale. Range limits
live in the field metadata (``ge``/``gt``/``le``) and are checked with all other problems at once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, NamedTuple

import attrs

def is_used(value: Any, _recipe: Any) -> bool:
    return bool(value)


class Feature(NamedTuple):
    """A recipe feature some backend may not honour: ``used(value, recipe)`` says whether a recipe uses it
    (default: the field's value is truthy). A backend lists the features it honours per family in its
    ``capabilities``; the ``training`` plugin (``lora_run_training.capabilities``) refuses the others, naming
    the field's key."""

    name: str
    doc: str
    used: Callable[[Any, Any], bool] = is_used
    key: tuple[str, ...] = ()     # filled in from the field that carries it (lora_run_training.capabilities)


def option(default: Any = attrs.NOTHING, doc: str = "", *, factory: Any = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, path: bool | tuple[str, ...] = False,
           features: tuple[Feature, ...] = (), choice_features: str = "") -> Any:
    """An attrs field with its documentation, limits and features in the metadata. ``path``: the value is a
    path, made absolute against the recipe file's folder (a table: every value, or the keys ``path`` names).
    ``features``: the features a recipe uses through this field; ``choice_features="optimizer"``: one feature
    per value of a choice field, ``optimizer:<value>``."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "path": path, "features": features,
                "choice_features": choice_features}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


frozen = attrs.frozen(kw_only=True)


@frozen
class ModelSection:
    """Which base model to train on and where its weights come from."""

    family: str | None = option(None, "Model family: a registered family (`lora-run plugins` lists them; see "
                                "Model families below). Unset: the installed family registered as the default "
                                "(or the only one installed).")
    source: str | None = option(None, "Hub id (`owner/name`) or a local diffusers folder. "
                                "For single-file checkpoints use `[model.files]` instead (a diffusers folder or "
                                "hub id may still supply the tokenizers and configs).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when `source` is a hub id.")
    version: str | None = option(
        None, "Which release of the family the weights are, for a family that registers several (see Model "
        "families below; what each release changes is in the family's documentation). Unset: the model folder "
        "says. Refused for a family with one release.")
    files: dict[str, str] = option(factory=dict, doc="`[model.files]`: single-file checkpoints (as other tools "
                                   "distribute them), one file per slot; the slots are the family's own "
                                   "(see Model families below), e.g. `transformer`, `vae` and the text encoders.",
                                   path=True)
    base_precision: Literal["bf16", "fp8"] = option(
        "bf16", "Storage precision of the frozen base weights: `bf16`, or `fp8` (float8 storage, bf16 compute).",
        features=(Feature("fp8", "fp8 base weights", lambda precision, _: precision == "fp8"),))
    offline: bool = option(False, "Never contact the hub (also implied by the `HF_HUB_OFFLINE` environment "
                           "variable).")


@frozen
class RegularizationSet:
    """One set of generic images (prior preservation) trained alongside the subject."""

    path: str = option(doc="Folder of regularisation images.", path=True)
    caption_extension: str = option(".txt", "Caption file extension next to each image.")
    default_caption: str = option("a person", "Caption for images that have no caption file "
                                  "(playbook §6: `a person` / `a man`).")
    weight: float = option(1.0, "Loss weight of these samples relative to the subject's.", gt=0.0, le=10.0)
    repeats: int = option(1, "How many times each image appears per epoch.", ge=1, le=10000)


@frozen
class DatasetSection:
    """The subject's images and captions, buckets and regularisation sets."""

    type: str = option("folder", "Dataset plugin (`lora-run plugins` lists them).")
    path: str | None = option(None, "Folder of subject images with a caption file next to each (the `folder` "
                              "type requires it; other types may take their images from `[dataset.options]`).",
                              path=True)
    options: dict[str, Any] = option(factory=dict, doc="`[dataset.options]`: options of the dataset type, "
                                     "checked by the options class that type registered.")
    caption_extension: str = option(".txt", "Caption file extension of the subject images.")
    trigger: str = option("", "Unique trigger token. Must appear in every subject caption and never in a "
                          "regularisation caption (playbook §6).")
    trigger_policy: Literal["require", "prepend", "none"] = option(
        "require", "`require`: a subject caption without the trigger is a lint error; `prepend`: add "
        "`<trigger>, ` where it is missing; `none`: no trigger rules.")
    resolution: int = option(512, "Base training resolution (square side in pixels).", ge=64, le=4096)
    bucket_min: int = option(256, "Smallest bucket side in pixels.", ge=64, le=4096)
    bucket_max: int = option(1024, "Largest bucket side in pixels.", ge=64, le=8192)
    bucket_step: int = option(64, "Bucket side step in pixels (a multiple of the family's grid, see Model "
                              "families below).", ge=8, le=512)
    repeats: int = option(1, "How many times each subject image appears per epoch.", ge=1, le=10000)
    caption_dropout: float = option(0.0, "Probability of training a sample with an empty caption.", ge=0.0,
                                    le=1.0, features=(Feature("caption_dropout", "caption dropout"),))
    min_images: int = option(15, "Lint warns below this many subject images (playbook §6: 15–30 minimum).", ge=1)
    regularization: list[RegularizationSet] = option(
        factory=list, doc="Regularisation sets (`[[dataset.regularization]]`).",
        features=(Feature("regularization", "regularisation (prior) image sets"),
                  Feature("regularization_weight", "a loss weight other than 1 on a regularisation set",
                          lambda sets, _: any(s.weight != 1.0 for s in sets))))


@frozen
class OutputSection:
    """Where the run directory goes and what is written."""

    dir: str = option("runs/{name}", "Run directory; `{name}` is replaced by `name`.", path=True)
    name: str = option("identity-lora", "Base name of the LoRA files: a plain file name (no folder part, no "
                       "`..`, no leading dot or control characters, at most 160 bytes).")
    formats: list[str] | None = option(
        None, "LoRA file formats to write, by the names the families register (see Model families below). "
        "Unset: the family's default formats. A format a family or backend does not write is skipped with a note "
        "in `lora-run plan`. Which file for which tool: `lora-run docs lora-formats`.")
    save_precision: Literal["bf16", "fp16", "fp32"] = option("bf16", "Precision of the saved LoRA tensors.")


@frozen
class BackendSection:
    """Which backend executes the recipe, and the options of each backend."""

    name: str | None = option(None, "Backend plugin (`lora-run plugins` lists them and the families each trains); "
                              "unset: the backend registered as the default among those that train the family. "
                       "`backend = \"NAME\"` at the top level is shorthand for `[backend] name = \"NAME\"`.")
    options: dict[str, dict[str, Any]] = option(factory=dict, doc="`[backend.<name>]` tables, checked by the "
                                                "backend's own options class.")


@frozen
class Recipe:
    """A whole recipe."""

    extends: str | None = option(None, "Another recipe this one builds on (a path relative to this file); "
                                 "keys here override it.")
    description: str = option("", "What the recipe is for, in a sentence; the evaluation report shows it at "
                              "the top (`lora-run recipes` shows the file's first comment line).")
    model: ModelSection = option(factory=ModelSection, doc="`[model]`")
    dataset: DatasetSection = option(doc="`[dataset]`")
    output: OutputSection = option(factory=OutputSection, doc="`[output]`")
    backend: BackendSection = option(factory=BackendSection, doc="`[backend]`")


_RECIPE_CLASSES: dict[tuple[tuple[str, type], ...], type[Recipe]] = {}


def recipe_class(sections: Iterable[tuple[str, type]] = ()) -> type[Recipe]:
    """:class:`Recipe` with the tables plugins register (``register_sections``) as further sections, e.g.
    ``recipe.eval`` for the evaluator plugin's ``[eval]``. One class per set of tables, so that recipes
    loaded with the same plugins compare equal."""
    key = tuple(sorted(sections, key=lambda item: item[0]))
    if not key:
        return Recipe
    if key not in _RECIPE_CLASSES:
        fields = {name: option(factory=cls, doc=f"`[{name}]`") for name, cls in key}
        cls = attrs.make_class("Recipe", fields, bases=(Recipe,), frozen=True, kw_only=True, slots=True)
        cls.__module__, cls.__annotations__ = __name__, {name: section for name, section in key}
        _RECIPE_CLASSES[key] = cls
    return _RECIPE_CLASSES[key]
