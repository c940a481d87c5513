"""The hook specifications: the registries (family, backend, loss, dataset, evaluator, command, recipe section),
the recipe check, the dataset lint, the run folder, a run's processes and its lifecycle. Arguments are append-only
(pluggy lets an implementation take any subset). Each hook's contract (when it is called, its arguments, what it
returns, the built-in implementation, an example) is its page in ``docs/hooks/``, headed by its signature.
"""
from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "lora_run"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_families(register: Any) -> None:
    """Register model families (``[model] family``): ``register(name, *, file_slots={slot: doc}, pixel_multiple=16,
    versions=(), adapters={backend: "module:Class"}, ...)``; collected before the backends."""


@hookspec
def register_backends(register: Any, families: Any) -> None:
    """Register backends (``[backend] name``): ``register(name, factory, options=OptionsClass, capabilities={family:
    features}, ...)``; ``factory(ctx)`` gets the :class:`lora_run.run.RunContext` and returns a
    :class:`lora_run.run.Backend`. ``families``: the registered families by name."""


@hookspec
def register_losses(register: Any) -> None:
    """Register losses (``[train] loss``): ``register(name, factory, options=OptionsClass)``; ``factory(options)``
    returns ``loss(prediction, target, **info) -> per-sample tensor``."""


@hookspec
def register_datasets(register: Any) -> None:
    """Register dataset types (``[dataset] type``): ``register(name, factory, options=OptionsClass)``; the factory
    returns a :class:`lora_run.dataset.DatasetSource`."""


@hookspec
def register_evaluators(register: Any) -> None:
    """Register evaluators, face embedders: ``register(name, factory, options=Class, kind="evaluator"|"embedder")``."""


@hookspec
def register_commands(register: Any) -> None:
    """Add ``lora-run`` subcommands: ``register(name, handler, *, configure=fn, description="", read_only=False)``;
    ``handler(args, plugins)`` returns the exit code."""


@hookspec
def register_sections(register: Any) -> None:
    """Add a recipe table ``[name]``, read as ``recipe.<name>``: ``register(name, options=SectionClass, *,
    description="", check=fn, with_defaults=fn)``."""


@hookspec
def check_recipe(recipe: Any, plugins: Any) -> list:
    """Return (key path, message) problems of the whole recipe; every implementation is called by ``validate``."""


@hookspec
def lint_dataset(recipe: Any, items: list, report: Any) -> None:
    """Check the dataset's items before any model loads: add findings to ``report`` (a
    :class:`lora_run.dataset.LintReport`) and remove refused items from ``report.usable``."""


@hookspec(firstresult=True)
def open_run_folder(loaded: Any, output_dir: Any, overwrite: bool) -> Any:
    """Return the folder a run writes to (a :class:`lora_run.run.RunFolder`), creating nothing; first answer wins."""


@hookspec(firstresult=True)
def run_processes(run: Any, output_dir: Any, overwrite: bool) -> Any:
    """Take this process's part in a run of several processes: set ``run.process`` (and ``echo``, ``hook``,
    ``recipe``), return a function that runs it, or None to run here; the first answer is used."""


@hookspec
def check_resume(run_dir: Any, recipe: Any, loaded: Any, report: Any, allow_dataset_change: bool,
                 plugins: Any) -> None:
    """Refuse a ``--resume`` that cannot continue the run in ``run_dir``: raise a ``LoraRunError`` saying what changed."""


@hookspec
def run_started(run: Any) -> None:
    """Called once the run directory, resolved recipe and manifest exist, before the backend starts."""


@hookspec
def step_finished(run: Any, step: int, metrics: dict) -> None:
    """Called after every optimizer step with ``metrics`` (``loss``, ``lr``, ``it_per_s`` …)."""


@hookspec
def checkpoint_saved(run: Any, step: int, path: Any) -> None:
    """Called after a checkpoint (LoRA files and, for backends that can resume, their resumable state) is on disk."""


@hookspec
def samples_written(run: Any, step: int, paths: list) -> None:
    """Called after sample images for ``step`` were written; ``paths`` lists the image files."""


@hookspec
def evaluate_run(run: Any) -> None:
    """Called after the backend's ``run()`` returned, before the run is marked completed; an exception fails the run."""


@hookspec
def run_finished(run: Any, status: str, error: Any) -> None:
    """Called at the end: ``status`` is ``"completed"``, ``"interrupted"`` or ``"failed"`` (``error`` set)."""
