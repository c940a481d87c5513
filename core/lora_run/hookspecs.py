"""The hook specifications: four registries (backend, loss, dataset, evaluator) and the run's lifecycle.

Arguments are append-only: an implementation may take any subset of them (pluggy matches by name).
Each hook has a page in ``docs/hooks/`` whose heading is its signature (a test checks this).
"""
from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "lora_run"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Any) -> None:
    """Register backends: ``register(name, factory, options=OptionsClass, capabilities={family: features})``.

    ``factory(recipe, options, context)`` returns an object with ``plan()`` and ``run()`` (see
    :class:`lora_run.plugins.Backend`). ``options`` is a frozen attrs class for the ``[backend.<name>]``
    table; ``capabilities`` maps each model family the backend trains to the recipe features it honours.
    """


@hookspec
def register_losses(register: Any) -> None:
    """Register losses: ``register(name, factory, options=OptionsClass)``.

    ``factory(options)`` returns ``loss(prediction, target, **info) -> per-sample tensor``.
    """


@hookspec
def register_datasets(register: Any) -> None:
    """Register dataset types: ``register(name, factory)``; ``factory(section, recipe)`` returns a
    :class:`lora_run.dataset.DatasetSource` whose ``items()`` lists images with captions."""


@hookspec
def register_evaluators(register: Any) -> None:
    """Register evaluators and face embedders: ``register(name, factory, options=OptionsClass, kind=...)``.

    ``kind`` is ``"evaluator"`` (runs after training on the run's LoRA files) or ``"embedder"`` (turns an
    image into a face embedding; used by the identity evaluator and ``lora-run score``).
    """


@hookspec
def run_started(run: Any) -> None:
    """Called once the run directory, resolved recipe and manifest exist, before the backend starts."""


@hookspec
def step_finished(run: Any, step: int, metrics: dict) -> None:
    """Called after every optimizer step with ``metrics`` (``loss``, ``lr``, ``it_per_s`` …)."""


@hookspec
def checkpoint_saved(run: Any, step: int, path: Any) -> None:
    """Called after a checkpoint (LoRA files and, for native backends, the resumable state) is on disk."""


@hookspec
def samples_written(run: Any, step: int, paths: list) -> None:
    """Called after sample images for ``step`` were written; ``paths`` lists the image files."""


@hookspec
def run_finished(run: Any, status: str, error: Any) -> None:
    """Called at the end: ``status`` is ``"completed"``, ``"interrupted"`` or ``"failed"`` (``error`` set)."""
