"""The hook specifications: the registries (family, backend, loss, dataset, evaluator, command, recipe section),
the recipe check, the dataset lint, the run folder, a run's processes and its lifecycle.

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
def register_families(register: Any) -> None:
    """Register model families: ``register(name, *, description, file_slots={slot: doc}, pixel_multiple=16,
    versions=(), adapters={backend: "module:Class"})``.

    ``[model] family`` is looked up here. ``file_slots`` are the ``[model.files]`` keys the family takes,
    ``pixel_multiple`` the grid every bucket side must fall on, ``versions`` the releases ``[model] version``
    may name. ``adapters`` tells backends (by their name) which class teaches them the family; core never
    reads it. Families are collected before backends, so ``register_backends`` can receive them.
    """


@hookspec
def register_backends(register: Any, families: Any) -> None:
    """Register backends: ``register(name, factory, options=OptionsClass, capabilities={family: features})``.

    ``factory(ctx)`` gets the :class:`lora_run.run.RunContext` (``ctx.recipe``, ``ctx.options`` structured
    with ``options``, ``ctx.run_dir`` …) and returns an object with ``plan()``, ``run()`` and optionally
    ``check()`` (see :class:`lora_run.run.Backend`). ``options`` is a frozen attrs class for the
    ``[backend.<name>]`` table; ``capabilities`` maps each model family the backend trains to the recipe
    features it honours (``loss:*``: every registered loss). ``families`` maps each registered family name
    to its :class:`lora_run.plugins.Registration` (``adapters`` included). Further keywords: ``description``, ``reasons``,
    ``family_notes``, ``alias_of``, ``memory_estimate``, ``generate`` (see
    :class:`lora_run.plugins.Registration`).
    """


@hookspec
def register_losses(register: Any) -> None:
    """Register losses: ``register(name, factory, options=OptionsClass)``.

    ``factory(options)`` returns ``loss(prediction, target, **info) -> per-sample tensor``.
    """


@hookspec
def register_datasets(register: Any) -> None:
    """Register dataset types: ``register(name, factory, options=OptionsClass)``.

    ``factory(section, recipe)`` — or ``factory(section, recipe, options)`` when the type registered an
    ``options`` class for its ``[dataset.options]`` table — returns a :class:`lora_run.dataset.DatasetSource`
    whose ``items()`` lists images with captions and whose optional ``check()`` returns (key path, message)
    problems for ``lora-run check``."""


@hookspec
def register_evaluators(register: Any) -> None:
    """Register evaluators and face embedders: ``register(name, factory, options=OptionsClass, kind=...)``.

    ``kind`` is ``"evaluator"`` (``factory(ctx)`` returns an object whose ``evaluate()`` runs after training
    on the run's LoRA files; ``[eval] evaluators`` chooses which) or ``"embedder"`` (turns an image into a
    face embedding).
    """


@hookspec
def register_commands(register: Any) -> None:
    """Add ``lora-run`` subcommands: ``register(name, handler, *, configure=fn, description="", read_only=False)``.

    ``configure(parser)`` adds the command's arguments to its :class:`argparse.ArgumentParser`;
    ``handler(args, plugins)`` runs it and returns the exit code (raise a ``LoraRunError`` for bad input).
    A ``read_only`` command only prints: a closed output pipe just ends it, and it reports broken plugins itself.
    """


@hookspec
def register_sections(register: Any) -> None:
    """Add a recipe table: ``register(name, options=SectionClass, *, description="", check=fn, with_defaults=fn)``.

    ``[name]`` is structured with the frozen attrs class as strictly as core's tables (unknown keys, types, limits)
    and read as ``recipe.<name>``. ``check(recipe, plugins, problems)`` adds the table's own rules with
    ``problems.add(key path, message)``; ``with_defaults(section, plugins)`` fills what it leaves unset from the
    registries.
    """


@hookspec
def check_recipe(recipe: Any, plugins: Any) -> list:
    """Return (key path, message) problems of the whole recipe, after its names were filled and looked up.

    Called by ``validate`` (so by `lora-run check`, `plan` and every run) with the other problems; every
    implementation is called and every problem is reported at once. The built-in ``training`` plugin checks the
    family's facts and refuses the features the backend does not honour for the family.
    """


@hookspec
def lint_dataset(recipe: Any, items: list, report: Any) -> None:
    """Check the dataset before any model loads (`lora-run check` and every run): add findings with
    ``report.add(level, code, message, file)`` and remove refused items from ``report.usable``.

    ``items`` are what the dataset type listed; ``report`` is a :class:`lora_run.dataset.LintReport`. An
    ``"error"`` finding stops the run. The implementation that reads the files also sets ``report.counts``,
    ``report.dataset_hash`` and ``report.files`` (a resumed run compares them).
    """


@hookspec(firstresult=True)
def open_run_folder(loaded: Any, output_dir: Any, overwrite: bool) -> Any:
    """Return the folder a run writes to (a :class:`lora_run.run.RunFolder`); the first plugin that answers is used.

    Called after the recipe validated and before the dataset lint, with the ``--output-dir`` override (None:
    ``[output] dir``); nothing may be created yet. Raise an ``OutputError`` naming the key for a folder no run
    may use. The built-in ``run-folder`` plugin (``lora_run_rundir``) answers last (``trylast``).
    """


@hookspec(firstresult=True)
def run_processes(run: Any, output_dir: Any, overwrite: bool) -> Any:
    """Take this process's part in a run of several processes: return a function that runs it and returns the
    :class:`lora_run.run.RunContext`, or None to run here (one process, or rank 0 of a launched run).

    Called by ``execute`` after the dataset lint, before its table is shown; ``run`` has no run folder yet. An
    implementation first sets what holds for the rest of the run: ``run.process``, ``run.echo`` and ``run.hook``
    (silent on ranks other than 0, which never write) and ``run.recipe``; a later implementation leaves a process
    another one placed (``run.process.launched``) as it is. The function is called once the lint found no errors.
    The first plugin that answers is used; the built-in one answers last (``trylast``).
    """


@hookspec
def check_resume(run_dir: Any, recipe: Any, loaded: Any, report: Any, allow_dataset_change: bool,
                 plugins: Any) -> None:
    """Refuse a ``--resume`` that cannot continue the run in ``run_dir``: raise a ``LoraRunError`` saying what changed.

    Called before the folder is locked or written; ``report`` is the dataset's :class:`lora_run.dataset.LintReport`.
    """


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
