"""Run orchestration: recipe → plugins → validation → dataset lint → run directory → backend → evaluation."""
from __future__ import annotations

import difflib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import attrs

from . import __version__
from .dataset import Item
from .errors import (BackendError, DatasetError, LoraRunError, PluginError, RecipeError, TrainingInterrupted)
from .features import capability_problems
from .lint import LintReport, lint_dataset
from .plugins import Plugins, Registration
from .recipe import CONVERTER, LoadedRecipe, Problems, check_limits, collect_errors, dump_recipe, to_dict
from .rundir import RECIPE, RunDir, hardware
from .schema import Recipe


@attrs.frozen
class Plan:
    """What a backend will do: shown by `lora-run plan`, written into the run directory."""

    backend: str
    family: str
    steps: int
    files: dict[str, str] = attrs.field(factory=dict)        # run-dir relative path -> content
    commands: list[list[str]] = attrs.field(factory=list)      # argv lists, launched without a shell
    memory_estimate_gib: float | None = None
    memory_mode: str | None = None
    memory_source: str | None = None                           # whose estimate it is, when not the backend's
    outputs: list[str] = attrs.field(factory=list)             # files the run will produce
    notes: list[str] = attrs.field(factory=list)
    details: dict[str, Any] = attrs.field(factory=dict)


class Backend(Protocol):
    """What a backend factory returns. ``check`` is optional; ``plan`` and ``check`` never import torch."""

    def plan(self) -> Plan: ...

    def run(self) -> None: ...


@attrs.define
class RunContext:
    """Everything a backend, loss, evaluator or lifecycle hook needs to know about a run."""

    recipe: Recipe
    plugins: Plugins
    backend: Registration
    options: Any = None
    loaded: LoadedRecipe | None = None
    run_dir: RunDir | None = None
    resume: bool = False
    items: list[Item] = attrs.field(factory=list)
    lint: LintReport | None = None
    artifacts: dict[str, Any] = attrs.field(factory=dict)   # backends record LoRA files, checkpoints, samples
    debug: bool = False
    echo: Callable[[str], None] = print

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    def option_for(self, kind: str, name: str, raw: dict[str, Any], where: tuple) -> Any:
        return structure_options(self.plugins.get(kind, name, ".".join(where)), raw, where)


def structure_options(reg: Registration, raw: dict[str, Any], where: tuple, problems: Problems | None = None) -> Any:
    """Structure a plugin's options table with its attrs class through the strict converter."""
    if reg.options is None:
        if raw and problems is not None:
            problems.add(where, f"{reg.kind} \"{reg.name}\" takes no options, got {', '.join(sorted(raw))}")
        return None
    own = problems if problems is not None else Problems("recipe")
    before = len(own.items)
    check_limits(raw, reg.options, where, own)
    try:
        value = CONVERTER.structure(raw, reg.options)
    except Exception as exc:  # noqa: BLE001
        for path, message in collect_errors(exc):
            own.add((*where, *path), message)
        value = None
    if problems is None:
        own.raise_if_any()
    return value if len(own.items) == before else None


@attrs.frozen
class Prepared:
    recipe: Recipe
    loaded: LoadedRecipe
    backend: Registration
    options: Any


def validate(loaded: LoadedRecipe, plugins: Plugins) -> Prepared:
    """Plugin tables, plugin names and capabilities; every problem at once (RecipeError)."""
    recipe = loaded.recipe
    problems = loaded.problems()
    backend: Registration | None = None
    try:
        backend = plugins.get("backend", recipe.backend.name, "backend.name")
    except PluginError as exc:
        problems.add(("backend", "name"), _strip_where(str(exc)))
    try:
        family_problems(recipe, plugins.get("family", recipe.model.family, "model.family"), plugins, problems)
    except PluginError as exc:
        problems.add(("model", "family"), _strip_where(str(exc)))
    options = None
    for name, table in recipe.backend.options.items():
        if name not in plugins.registry["backend"]:
            problems.add(("backend", "options", name), f"table for unknown backend \"{name}\"; installed: "
                         f"{', '.join(plugins.names('backend'))}")
            continue
        value = structure_options(plugins.registry["backend"][name], table, ("backend", "options", name), problems)
        if backend is not None and name == backend.name:
            options = value
    if backend is not None and backend.name not in recipe.backend.options and backend.options is not None:
        options = structure_options(backend, {}, ("backend", "options", backend.name), problems)
    for kind, name, where, raw, raw_at in (
            ("loss", recipe.train.loss, ("train", "loss"), recipe.train.loss_options, ("train", "loss_options")),
            ("dataset", recipe.dataset.type, ("dataset", "type"), recipe.dataset.options, ("dataset", "options"))):
        try:
            reg = plugins.get(kind, name, ".".join(where))
        except PluginError as exc:
            problems.add(where, _strip_where(str(exc)))
            continue
        value = structure_options(reg, raw, raw_at, problems)
        if kind == "dataset" and (value is not None or reg.options is None):
            checker = getattr(make_dataset(recipe, reg, value), "check", None)
            for path, message in checker() if checker is not None else ():
                problems.add(tuple(path), message)
    for n, name in enumerate(recipe.eval.evaluators or ()):
        try:
            plugins.get("evaluator", name, "eval.evaluators")
        except PluginError as exc:
            problems.add(("eval", "evaluators", n), _strip_where(str(exc)))
    if recipe.eval.enabled and plugins.registry["embedder"]:
        try:
            reg = plugins.get("embedder", recipe.eval.embedder, "eval.embedder")
            structure_options(reg, recipe.eval.embedder_options, ("eval", "embedder_options"), problems)
        except PluginError as exc:
            problems.add(("eval", "embedder"), _strip_where(str(exc)))
    if backend is not None and recipe.model.family in plugins.registry["family"]:
        for path, message in capability_problems(recipe, backend.name, plugins.registry["backend"]):
            problems.add(path, message)
    # The backend's own check runs even when problems were found above, so that one `check` reports them all.
    if backend is not None and (options is not None or backend.options is None):
        found = len(problems.items)
        try:
            checker = getattr(make_backend(Prepared(recipe, loaded, backend, options), plugins), "check", None)
            for path, message in checker() if checker is not None else ():
                problems.add(tuple(path), message)
        except LoraRunError as exc:  # reported with the others (alone, it keeps its own type and exit code)
            if not found:
                raise
            problems.items.extend(getattr(exc, "problems", [str(exc)]))
        except Exception:  # a check confused by a problem already reported; without one it is a real bug
            if not found:
                raise
    problems.raise_if_any()
    assert backend is not None
    return Prepared(recipe, loaded, backend, options)


def family_problems(recipe: Recipe, family: Registration, plugins: Plugins, problems: Problems) -> None:
    """What the family's registration says about the recipe: bucket grid, release, `[model.files]` slots."""
    d, name = recipe.dataset, family.name
    for key in ("resolution", "bucket_min", "bucket_max", "bucket_step"):
        if getattr(d, key) % family.pixel_multiple:
            problems.add(("dataset", key), f"must be a multiple of {family.pixel_multiple} for {name}, got "
                         f"{getattr(d, key)}")
    version = recipe.model.version
    if version is not None and version not in family.versions:
        several = [n for n, r in plugins.registry["family"].items() if r.versions]
        problems.add(("model", "version"), f"{name} has no release {version!r} to choose (" + (
            f"it has {', '.join(repr(v) for v in family.versions)})" if family.versions
            else "remove the key; only " + (", ".join(several) or "no installed family") + " has several)"))
    for slot, value in recipe.model.files.items():
        if value is not None and slot not in family.file_slots:
            close = difflib.get_close_matches(slot, list(family.file_slots), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(("model", "files", slot), f"is not a file {name} takes{hint}; its [model.files] slots: "
                         f"{', '.join(family.file_slots)}" if family.file_slots else f"single files are not read "
                         f"for {name}; give [model.source] (a hub id or a diffusers folder)")


def _strip_where(message: str) -> str:
    head, sep, tail = message.partition(" at [")
    return head + (tail.split("]", 1)[1] if sep else "")


def make_backend(prepared: Prepared, plugins: Plugins, **context: Any) -> Any:
    ctx = context.pop("ctx", None) or RunContext(prepared.recipe, plugins, prepared.backend, prepared.options,
                                                  prepared.loaded, **context)
    return prepared.backend.factory(ctx)


def borrowed_memory_estimate(recipe: Recipe, plugins: Plugins, swapped_blocks: int = 0) -> tuple[float, str] | None:
    """For a backend without its own memory model: (GiB, label) from the first backend that offers one
    (its registered `memory_estimate`), for the equivalent settings, labelled as that backend's estimate."""
    for reg in plugins.registry["backend"].values():
        estimate = reg.memory_estimate
        if callable(estimate) and recipe.model.family in reg.capabilities:
            found = estimate(recipe, swapped_blocks)
            if found is not None:
                gib, assumed = found
                return round(gib, 1), f"lora-run's {reg.name} memory model for the equivalent settings: {assumed}"
    return None


def make_dataset(recipe: Recipe, reg: Registration, options: Any) -> Any:
    """The dataset source; ``options`` (the structured ``[dataset.options]``) only for types that take them."""
    if reg.options is None:
        return reg.factory(recipe.dataset, recipe)
    return reg.factory(recipe.dataset, recipe, options)


def scan_dataset(recipe: Recipe, plugins: Plugins) -> list[Item]:
    reg = plugins.get("dataset", recipe.dataset.type, "dataset.type")
    options = structure_options(reg, recipe.dataset.options, ("dataset", "options")) if reg.options else None
    return list(make_dataset(recipe, reg, options).items())


def lint(recipe: Recipe, plugins: Plugins) -> LintReport:
    return lint_dataset(recipe, scan_dataset(recipe, plugins))


def output_path(recipe: Recipe, override: str | None) -> Path:
    if override:
        return Path(os.path.expanduser(override)).resolve()
    return Path(recipe.output.dir.replace("{name}", recipe.output.name)).resolve()


def manifest_base(prepared: Prepared, plugins: Plugins, report: LintReport) -> dict[str, Any]:
    r = prepared.recipe
    return {
        "lora_run_version": __version__,
        "recipe": str(prepared.loaded.path.resolve()),
        "command": sys.argv,
        "backend": r.backend.name,
        "family": r.model.family,
        "model_source": r.model.source or dict(r.model.files),
        "plugins": [{k: p[k] for k in ("name", "distribution", "version")} for p in plugins.describe()],
        "dataset": {"path": r.dataset.path, "hash": report.dataset_hash, **report.counts},
        "seed": r.train.seed,
        "lora": {"rank": r.lora.rank, "alpha": r.lora.alpha, "targets": r.lora.targets},
        "lr": r.optimizer.lr,
        "steps": r.train.steps,
        "epochs": r.train.epochs,
        "hardware": hardware(),
        "external_tools": {},
    }


_RESUMABLE_CHANGES = {("train", "steps"), ("train", "epochs"), ("train", "save_every_steps"),
                      ("train", "save_every_epochs"), ("train", "keep_last"), ("sample",), ("eval",)}


def _resume_differences(saved: dict[str, Any], new: dict[str, Any], prefix: tuple = ()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(new)):
        here = (*prefix, key)
        if here in _RESUMABLE_CHANGES or here[:1] in _RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_resume_differences(a, b, here))
        elif a != b:
            out.append(".".join(here))
    return out


def execute(loaded: LoadedRecipe, plugins: Plugins, *, output_dir: str | None = None, resume: bool = False,
            overwrite: bool = False, debug: bool = False, echo: Callable[[str], None] = print) -> RunContext:
    """The whole run. Raises a LoraRunError subclass on failure (exit codes in errors.py)."""
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other")
    prepared = validate(loaded, plugins)
    recipe = prepared.recipe
    report = lint(recipe, plugins)
    echo(report.table())
    if report.errors:
        raise DatasetError(f"{loaded.shown}: [dataset] has {len(report.errors)} error(s); fix them before "
                           "training (nothing was loaded or written)")
    run_dir = RunDir(output_path(recipe, output_dir))
    if resume:
        saved = run_dir.file(RECIPE)
        if saved.is_file():
            from .recipe import load_recipe

            previous = load_recipe(saved).recipe
            diffs = _resume_differences(to_dict(previous), to_dict(recipe))
            if diffs:
                raise RecipeError(f"{loaded.shown}: cannot resume {run_dir.path}: the recipe changed at "
                                  f"{', '.join('[' + d + ']' for d in diffs)}; only steps/epochs, save policy, "
                                  "[sample] and [eval] may change on resume")
    run_dir.prepare(overwrite=overwrite, resume=resume)
    run_dir.write_text(RECIPE, dump_recipe(recipe, header=f"Resolved from {loaded.shown} by lora-run "
                                           f"{__version__}.\nRe-run with: lora-run {run_dir.path / RECIPE}"))
    started = time.time()
    manifest = manifest_base(prepared, plugins, report)
    manifest.update(status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if resume:
        manifest["resumed_at"] = [*run_dir.read_manifest().get("resumed_at", []), manifest["started_at"]]
        manifest.pop("started_at")
    run_dir.update_manifest(**manifest)
    run_dir.log(f"lora-run {__version__}: {loaded.shown} with backend {recipe.backend.name}")
    ctx = RunContext(recipe, plugins, prepared.backend, prepared.options, loaded, run_dir, resume,
                     report.usable, report, debug=debug, echo=echo)
    backend = prepared.backend.factory(ctx)
    plan = backend.plan()
    for rel, content in plan.files.items():
        run_dir.write_text(rel, content)
    run_dir.update_manifest(plan={"steps": plan.steps, "commands": plan.commands,
                                  "memory_estimate_gib": plan.memory_estimate_gib, "memory_mode": plan.memory_mode})
    status, error = "failed", None
    previous_term = _install_sigterm()
    try:
        ctx.hook.run_started(run=ctx)
        backend.run()
        if recipe.eval.enabled:
            evaluated = time.perf_counter()
            run_evaluators(ctx)
            ctx.artifacts.setdefault("timing", {})["evaluate_s"] = round(time.perf_counter() - evaluated, 2)
        status = "completed"
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        status = "interrupted"
        error = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(
            f"interrupted; resume with: lora-run {loaded.shown} --resume --output-dir {run_dir.path}")
        raise error from None
    except LoraRunError as exc:
        error = exc
        raise
    except Exception as exc:  # noqa: BLE001 - an unexpected crash still ends with a manifest entry
        error = exc
        raise BackendError(f"backend \"{recipe.backend.name}\" crashed: {type(exc).__name__}: {exc} "
                           f"(run folder kept: {run_dir.path}; --debug shows the traceback)") from exc
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        run_dir.update_manifest(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                duration_s=round(time.time() - started, 2), artifacts=ctx.artifacts,
                                error=str(error) if error else None)
        run_dir.log(f"run {status}")
        try:
            ctx.hook.run_finished(run=ctx, status=status, error=error)
        except Exception as exc:  # noqa: BLE001 - a broken observer must not hide the run's outcome
            echo(f"warning: a run_finished hook failed: {exc}")
    return ctx


def run_evaluators(ctx: RunContext) -> None:
    """The evaluators `[eval] evaluators` names (unset: every installed one), in that order."""
    chosen = ctx.recipe.eval.evaluators
    names = chosen if chosen is not None else ctx.plugins.names("evaluator")
    for name in names:
        ctx.plugins.get("evaluator", name, "eval.evaluators").factory(ctx).evaluate()


def _install_sigterm() -> Any:
    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        return signal.getsignal(signal.SIGTERM)
