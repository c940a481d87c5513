"""Recipe features a backend may or may not honour, and the capability check (``check_recipe``).

The features are declared on the fields of core's tables and of the tables plugins register
(``option(features=...)``, ``option(choice_features=...)``); this module lists them with their keys. A backend registers ``capabilities={family: {feature, ...}}``. A
recipe that uses a feature the chosen backend does not list for the chosen family is refused, naming the key
and the backends that can. We never silently ignore a setting (some external trainers do).
"""
from __future__ import annotations

import functools
import typing
from typing import Any, Iterator

import attrs

from lora_run import schema
from lora_run.schema import Recipe

from . import Feature
from .sections import SECTIONS


def _declared(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Feature]:
    """The features the fields of ``cls`` (and its sections) declare, each with its field's key."""
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        key = (*prefix, f.name)
        if attrs.has(hints[f.name]):
            yield from _declared(hints[f.name], key)
            continue
        yield from (feature._replace(key=key) for feature in f.metadata.get("features", ()))
        name = f.metadata.get("choice_features")
        for value in typing.get_args(hints[f.name]) if name else ():
            yield Feature(f"{name}:{value}", f"`{'.'.join(key)} = \"{value}\"`",
                          lambda v, _r, value=value: v == value, key)


@functools.lru_cache(maxsize=None)
def features_of(recipe_class: type) -> tuple[Feature, ...]:
    """Every feature a recipe class declares (core's tables and the tables plugins register)."""
    return tuple(_declared(recipe_class))


#: The features of core's tables and this plugin's (the tables of other plugins: ``features_of(plugins.recipe_class)``).
FEATURES: list[Feature] = list(features_of(schema.recipe_class((name, cls) for name, cls, *_ in SECTIONS)))
# losses and σ samplers are plugin names, not a fixed choice: `loss:<name>`, `timestep_sampling:<name>`


def _value(recipe: Recipe, key: tuple[str, ...]) -> Any:
    for part in key:
        recipe = getattr(recipe, part)
    return recipe


def used_features(recipe: Recipe) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(feature name, recipe key) for every feature the recipe uses."""
    for feature in features_of(type(recipe)):
        if feature.used(_value(recipe, feature.key), recipe):
            yield feature.name, feature.key
    yield f"loss:{recipe.train.loss}", ("train", "loss")
    yield f"timestep_sampling:{recipe.train.timestep_sampling}", ("train", "timestep_sampling")


ANY_LOSS = "loss:*"


def honours(capabilities: frozenset[str] | set[str], name: str) -> bool:
    """Whether a capability set covers a feature; ``loss:*`` covers every registered loss (a kind, not a list)."""
    return name in capabilities or (name.startswith("loss:") and ANY_LOSS in capabilities)


def doc_of(name: str, recipe_class: type = Recipe) -> str:
    for feature in (*features_of(recipe_class), *FEATURES):
        if feature.name == name:
            return feature.doc
    if name.startswith("loss:"):
        return f"the `{name[5:]}` loss"
    if name.startswith("timestep_sampling:"):
        return f"`train.timestep_sampling = \"{name[18:]}\"`"
    return name


def capability_problems(recipe: Recipe, backend: str, registry: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Problems for features the backend does not honour for the recipe's family. The backends that can are
    listed once each: a registration with ``alias_of`` (another name for a listed backend) is left out."""
    family = recipe.model.family
    reg = registry[backend]
    out: list[tuple[tuple, str]] = []
    registry = {n: r for n, r in registry.items() if r.alias_of not in registry}
    if family not in reg.capabilities:
        able = sorted(n for n, r in registry.items() if family in r.capabilities)
        why = reg.family_notes.get(family, "")
        out.append((("model", "family"), f"backend \"{backend}\" does not train {family}"
                    + (f" ({why})" if why else "") + f"; backends that do: {', '.join(able) or 'none installed'}"))
        return out
    honoured = reg.capabilities[family]
    reasons = reg.reasons.get(family) if isinstance(reg.reasons.get(family), dict) else reg.reasons
    for name, key in used_features(recipe):
        if honours(honoured, name):
            continue
        able = sorted(n for n, r in registry.items() if honours(r.capabilities.get(family, frozenset()), name))
        why = reasons.get(name, "")
        out.append((key, f"backend \"{backend}\" cannot honour {doc_of(name, type(recipe))} for {family}"
                    + (f" ({why})" if why else "")
                    + f"; backends that can: {', '.join(able) if able else 'none installed'}"))
    return out
