"""Model adapters of the native backend, one per family.

To add a family: write ``adapters/<family>.py`` with a :class:`~lora_run_native.adapters.base.ModelAdapter`
subclass (no torch import at module level) and add one line to ``ADAPTERS``. The ``native`` backend then
registers capabilities for that family (the adapter's ``features``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .base import ModelAdapter

#: family -> "module:Class" (imported lazily; importing an adapter module never imports torch).
ADAPTERS: dict[str, str] = {
    "flux.1-dev": "lora_run_native.adapters.flux:FluxAdapter",
    "hunyuan-image-2.1": "lora_run_native.adapters.hunyuan_image:HunyuanImageAdapter",
    "hunyuan-dit-1.2": "lora_run_native.adapters.hunyuan_dit:HunyuanDiTAdapter",
}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class of ``family`` (KeyError when no adapter exists)."""
    module, _, name = ADAPTERS[family].partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_classes() -> dict[str, type[ModelAdapter]]:
    return {family: adapter_class(family) for family in ADAPTERS}
