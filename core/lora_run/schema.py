"""The recipe schema: frozen attrs classes, one section per TOML table.

Every field carries its documentation next to it (``doc``); ``docs/recipe-reference.md`` is generated
from these docs (``python -m lora_run_devtools.docgen``) and a test fails when the page is stale. Range limits
live in the field metadata (``ge``/``gt``/``le``) and are checked with all other problems at once.
"""
from __future__ import annotations

import typing
from typing import Any, Iterable, Literal

import attrs

from .errors import PluginError


def option(default: Any = attrs.NOTHING, doc: str = "", *, factory: Any = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           path: bool | str | tuple[str, ...] = False, features: tuple[Any, ...] = (), choice_features: str = "",
           keys: str = "") -> Any:
    """An attrs field with its documentation, limits, ``path`` and ``keys`` marks (docs/hooks/register_sections.md) and
    the ``features`` (``lora_run_training.Feature``) a recipe uses through it, which a backend may not honour, in the
    metadata; ``choice_features="optimizer"``: one feature per value of a choice field, ``optimizer:<value>``."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path, "features": features,
                "choice_features": choice_features, "keys": keys}
    return attrs.field(default=default if factory is None else attrs.Factory(factory), metadata=metadata)


frozen = attrs.frozen(kw_only=True)


@frozen
class ModelSection:
    """Which base model to train on and where its weights come from."""

    family: str | None = option(None, "Model family: a registered family (`lora-run plugins` lists them; see "
                                "Model families below). Unset: the installed family registered as the default "
                                "(or the only one installed).")


@frozen
class DatasetSection:
    """The subject's images and captions, buckets and regularisation sets."""

    type: str = option("folder", "Dataset plugin (`lora-run plugins` lists them).")
    options: dict[str, Any] = option(factory=dict, doc="`[dataset.options]`: options of the dataset type, "
                                     "checked by the options class that type registered.", keys="dataset")


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
    ``recipe.eval`` for the evaluator plugin's ``[eval]``; a table named like one of core's adds its keys to that
    table, after core's (the ``training`` plugin's keys of ``[model]`` and ``[dataset]``). One class per set of
    tables, so that recipes loaded with the same plugins compare equal."""
    key = tuple(sorted(sections, key=lambda item: item[0]))
    if not key:
        return Recipe
    if key not in _RECIPE_CLASSES:
        tables, types, fields = dict(key), typing.get_type_hints(Recipe), {}
        for f in attrs.fields(Recipe):      # core's fields first and in their order, as the recipe file has them
            default = f.default
            if f.name in tables:
                types[f.name] = with_keys(types[f.name], tables.pop(f.name))
                default = attrs.Factory(types[f.name]) if isinstance(default, attrs.Factory) else default
            fields[f.name] = attrs.field(default=default, metadata=f.metadata)
        for name, cls in tables.items():
            types[name], fields[name] = cls, option(factory=cls, doc=f"`[{name}]`")
        cls = attrs.make_class("Recipe", fields, bases=(Recipe,), frozen=True, kw_only=True, slots=True)
        cls.__module__, cls.__annotations__ = __name__, types
        _RECIPE_CLASSES[key] = attrs.resolve_types(cls)
    return _RECIPE_CLASSES[key]


def with_keys(table: type, keys: type) -> type:
    """Core's ``table`` with the keys of a plugin's attrs class ``keys`` after its own."""
    own = {f.name: attrs.field(default=f.default, metadata=f.metadata) for f in attrs.fields(keys)}
    cls = attrs.make_class(table.__name__, own, bases=(table,), frozen=True, kw_only=True, slots=True)
    cls.__module__, cls.__doc__, cls.__annotations__ = __name__, table.__doc__, typing.get_type_hints(keys)
    return attrs.resolve_types(cls)


def check_table(name: str, keys: type) -> None:
    """Refuse a plugin's table ``[name]`` that would replace a key of core's: a table named like one of core's
    only adds keys to it."""
    core = typing.get_type_hints(Recipe).get(name)
    if core is not None:
        clash = sorted(set(attrs.fields_dict(core)) & set(attrs.fields_dict(keys))) if attrs.has(core) else [name]
        if clash:
            raise PluginError(f"recipe table [{name}] would replace core's key(s) {', '.join(clash)}")
