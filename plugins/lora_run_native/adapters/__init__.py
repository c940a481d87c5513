"""Model adapters of the native backend, one per family, found through the family registry.

A model family is a plugin (``register_families``); its registration names the class that teaches the native
backend the family: ``adapters={"native": "module:Class"}`` (a :class:`~lora_run_native.adapters.base.
ModelAdapter` subclass; importing its module must not import torch). The ``native`` backend registers the
adapter's ``features`` as its capabilities for that family, so installing a family plugin adds the family.
"""
from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .base import ModelAdapter

BACKEND = "native"


def resolve(spec: Any) -> type[ModelAdapter]:
    """A ``"module:Class"`` string or a callable returning the class."""
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    return spec() if not isinstance(spec, type) else spec


def adapter_classes(families: dict[str, Any]) -> dict[str, type[ModelAdapter]]:
    """family -> adapter class, for every registered family that declares a native adapter."""
    return {name: resolve(reg.adapters[BACKEND]) for name, reg in families.items() if BACKEND in reg.adapters}


@functools.lru_cache(maxsize=None)
def _registered() -> dict[str, Any]:
    from lora_run.plugins import load_plugins

    return {name: reg.adapters[BACKEND] for name, reg in load_plugins().registry["family"].items()
            if BACKEND in reg.adapters}


def registered_adapters() -> dict[str, type[ModelAdapter]]:
    """family -> adapter class of every installed family plugin that declares a native adapter."""
    return {family: resolve(spec) for family, spec in _registered().items()}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family`` from the installed family plugins (KeyError when none exists)."""
    return resolve(_registered()[family])
