"""Run orchestration: recipe → plugins → validation → dataset lint → run directory → backend → evaluation."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Callable, Protocol

import attrs

from .dataset import Item, LintReport
from .errors import (BackendError, DatasetError, LoraRunError, PluginError, RecipeError, TrainingInterrupted)
from .plugins import Plugins, Registration
from .recipe import LoadedRecipe, Problems, did_you_mean, replace, resume_command, structure_table
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
    """What a backend factory returns. ``check`` is optional; ``plan`` and ``check`` never import torch. A backend
    that trains with several processes offers ``run_processes`` too (see the ``run_processes`` hook)."""

    def plan(self) -> Plan: ...
    def run(self) -> None: ...


class RunFolder(Protocol):
    """What the ``open_run_folder`` hook returns (the built-in: ``lora_run_rundir.RunDir``): ``execute`` calls the
    methods from ``prepare`` to ``release`` in this order, backends use the rest (docs/hooks/open_run_folder.md)."""

    path: Path

    def prepare(self, *, overwrite: bool, resume: bool) -> None: ...
    def start(self, run: RunContext, *, allow_dataset_change: bool) -> None: ...
    def record_plan(self, plan: Plan) -> None: ...
    def error_for(self, exc: BaseException) -> LoraRunError | None: ...
    def finish(self, status: str, error: BaseException | None, artifacts: dict[str, Any],
               echo: Callable[[str], None]) -> None: ...
    def release(self) -> None: ...

    def file(self, *parts: str) -> Path: ...
    def write_text(self, name: str, text: str) -> Path: ...
    def claim(self, *rels: str) -> None: ...
    def writing(self, *folders: str) -> contextlib.AbstractContextManager[None]: ...
    def read_manifest(self) -> dict[str, Any]: ...
    def update_manifest(self, **fields: Any) -> dict[str, Any]: ...
    def log(self, message: str) -> None: ...


@attrs.frozen
class Processes:
    """This process's place in a run of several processes, as the ``run_processes`` hook found it (one process
    without it). Rank 0 is the main process: it alone writes the run folder and calls the plugins' hooks."""

    rank: int = 0
    world: int = 1
    launched: bool = False      # started by a launcher (`torchrun`, `accelerate launch`, `lora-run --gpus`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Any = None) -> Processes:
        """This process's place, read from the `RANK` / `WORLD_SIZE` environment launchers set (one without them)."""
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        except ValueError:
            raise RecipeError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} in the environment are "
                              "not whole numbers (set by a launcher?)") from None
        if world < 1 or not 0 <= rank < world:
            raise RecipeError(f"RANK={rank} / WORLD_SIZE={world} in the environment do not fit together")
        return cls(rank, world, True)


@attrs.define
class RunContext:
    """Everything a backend, loss, evaluator or lifecycle hook needs to know about a run."""

    recipe: Recipe
    plugins: Plugins
    backend: Registration
    options: Any = None
    loaded: LoadedRecipe | None = None
    run_dir: RunFolder | None = None
    resume: bool = False
    items: list[Item] = attrs.field(factory=list)
    lint: LintReport | None = None
    artifacts: dict[str, Any] = attrs.field(factory=dict)   # backends record LoRA files, checkpoints, samples
    debug: bool = False
    echo: Callable[[str], None] = print
    process: Processes = attrs.field(factory=lambda: Processes())
    #: the plugins' hooks (a process other than rank 0 gets ones that do nothing: ``run_processes``)
    hook: Any = attrs.field(default=attrs.Factory(lambda self: self.plugins.hook, takes_self=True))


def structure_options(reg: Registration, raw: dict[str, Any], where: tuple, problems: Problems | None = None) -> Any:
    """Structure a plugin's options table with its attrs class through the strict converter."""
    if reg.options is None:
        if raw and problems is not None:
            problems.add(where, f"{reg.kind} \"{reg.name}\" takes no options, got {', '.join(sorted(raw))}")
        return None
    own = problems if problems is not None else Problems("recipe")
    before = len(own.items)
    value = structure_table(raw, reg.options, own, where)
    if problems is None:
        own.raise_if_any()
    return value if len(own.items) == before else None


def with_defaults(loaded: LoadedRecipe, plugins: Plugins) -> LoadedRecipe:
    """The recipe with the plugin names it leaves unset taken from the registries (the family, the backend
    that trains it, the family's LoRA formats, and what each plugin section's ``with_defaults`` fills in); what
    the registries do not decide stays unset and `validate` reports it."""
    r = loaded.recipe
    family = r.model.family or plugins.default("family")
    backend = r.backend.name or plugins.default("backend", plugins.trainers(family) if family else None)
    formats = r.output.formats
    if formats is None and family in plugins.registry["family"]:
        reg = plugins.registry["family"][family]
        formats = list(reg.default_formats or reg.lora_formats) or None
    recipe = replace(r, model={"family": family}, backend={"name": backend}, output={"formats": formats})
    for name, section in plugins.registry["section"].items():
        if section.with_defaults is not None and hasattr(recipe, name):
            recipe = attrs.evolve(recipe, **{name: section.with_defaults(getattr(recipe, name), plugins)})
    return loaded if recipe == r else attrs.evolve(loaded, recipe=recipe)


def unset_message(kind: str, plugins: Plugins, among: list[str] | None = None) -> str:
    """The problem of a plugin name the recipe leaves unset and no registration decides."""
    names = plugins.names(kind) if among is None else among
    return (f"is not set and no single installed {kind} is registered as the default; set it to one of: "
            f"{', '.join(names) or 'none installed'}")


def validate(loaded: LoadedRecipe, plugins: Plugins) -> RunContext:
    """Plugin tables, plugin names and capabilities, every problem at once (RecipeError); the run's context if valid."""
    loaded = with_defaults(loaded, plugins)
    recipe = loaded.recipe
    problems = loaded.problems()
    backend: Registration | None = None
    if recipe.model.family is None:
        problems.add(("model", "family"), unset_message("family", plugins))
    if recipe.backend.name is None:
        problems.add(("backend", "name"), unset_message("backend", plugins, plugins.trainers(recipe.model.family or "")))
    else:
        backend = plugins.find("backend", recipe.backend.name, ("backend", "name"), problems)
    if recipe.model.family is not None:
        plugins.find("family", recipe.model.family, ("model", "family"), problems)
    options, tables = None, dict(recipe.backend.options)
    if backend is not None:
        tables.setdefault(backend.name, {})     # the chosen backend's options: its defaults when it has no table
    for name, table in tables.items():
        if name not in plugins.registry["backend"]:
            installed = plugins.names("backend")
            problems.add(("backend", "options", name), f"table for unknown backend \"{name}\""
                         f"{did_you_mean(name, installed, chr(34))}; installed: {', '.join(installed)}")
            continue
        value = structure_options(plugins.registry["backend"][name], table, ("backend", "options", name), problems)
        if backend is not None and name == backend.name:
            options = value
    reg = plugins.find("dataset", recipe.dataset.type, ("dataset", "type"), problems)
    value = structure_options(reg, recipe.dataset.options, ("dataset", "options"), problems) if reg else None
    if reg is not None and (value is not None or reg.options is None):
        checker = getattr(make_dataset(recipe, reg, value), "check", None)
        for path, message in checker() if checker is not None else ():
            problems.add(tuple(path), message)
    for name, section in plugins.registry["section"].items():
        if section.check is not None and hasattr(recipe, name):
            section.check(recipe, plugins, problems)
    for found in plugins.hook.check_recipe(recipe=recipe, plugins=plugins):
        for path, message in found or ():
            problems.add(tuple(path), message)
    # The backend's own check runs even when problems were found above, so that one `check` reports them all.
    if backend is not None and (options is not None or backend.options is None):
        found = len(problems.items)
        try:
            checker = getattr(backend.factory(RunContext(recipe, plugins, backend, options, loaded)), "check", None)
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
    return RunContext(recipe, plugins, backend, options, loaded)


def make_backend(prepared: RunContext, plugins: Plugins, **context: Any) -> Any:
    """The backend of a validated recipe (``validate``'s context); ``context``: further fields (``run_dir`` …)."""
    return prepared.backend.factory(RunContext(prepared.recipe, plugins, prepared.backend, prepared.options,
                                               prepared.loaded, **context))


def make_dataset(recipe: Recipe, reg: Registration, options: Any) -> Any:
    """The dataset source; ``options`` (the structured ``[dataset.options]``) only for types that take them."""
    if reg.options is None:
        return reg.factory(recipe.dataset, recipe)
    return reg.factory(recipe.dataset, recipe, options)


def scan_dataset(recipe: Recipe, plugins: Plugins) -> list[Item]:
    reg = plugins.get("dataset", recipe.dataset.type, "dataset.type")
    options = structure_options(reg, recipe.dataset.options, ("dataset", "options"))   # None: takes no options
    return list(make_dataset(recipe, reg, options).items())


def lint(recipe: Recipe, plugins: Plugins, items: list[Item] | None = None) -> LintReport:
    """``items`` (default: the dataset scanned) checked by each ``lint_dataset`` implementation (all usable if none)."""
    items = scan_dataset(recipe, plugins) if items is None else items
    report = LintReport(usable=list(items))
    plugins.hook.lint_dataset(recipe=recipe, items=items, report=report)
    return report


def open_run_folder(loaded: LoadedRecipe, plugins: Plugins, output_dir: str | None = None,
                    overwrite: bool = False) -> RunFolder:
    """The run folder (nothing created yet) from the ``open_run_folder`` hook; an ``OutputError`` for a folder no run
    may use (`lora-run check` and `plan` ask too)."""
    run_dir = plugins.hook.open_run_folder(loaded=loaded, output_dir=output_dir, overwrite=overwrite)
    if run_dir is None:
        raise PluginError("no installed plugin provides the run folder (the open_run_folder hook); is the "
                          "built-in run-folder plugin disabled?")
    return run_dir


def execute(loaded: LoadedRecipe, plugins: Plugins, *, output_dir: str | None = None, resume: bool = False,
            overwrite: bool = False, debug: bool = False, echo: Callable[[str], None] = print,
            allow_dataset_change: bool = False) -> RunContext:
    """The whole run. Raises a LoraRunError subclass on failure (exit codes in errors.py). The run folder
    (the ``open_run_folder`` hook) keeps what was written and records how the run ended."""
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other")
    prepared = validate(loaded, plugins)
    recipe = prepared.recipe
    run_dir = open_run_folder(prepared.loaded, plugins, output_dir, overwrite)
    report = lint(recipe, plugins)
    ctx = RunContext(recipe, plugins, prepared.backend, prepared.options, loaded, None, resume, report.usable, report,
                     debug=debug, echo=echo)
    elsewhere = plugins.hook.run_processes(run=ctx, output_dir=output_dir, overwrite=overwrite)
    launcher = Processes.from_env()
    if elsewhere is None and not ctx.process.launched and launcher.world > 1:
        raise PluginError(f"WORLD_SIZE={launcher.world} in the environment: this process was started by a "
                          "multi-process launcher, but no installed backend takes part in multi-process runs (no "
                          "plugin answers the run_processes hook); every process would write the same run folder")
    ctx.echo(report.table())
    if report.errors:
        raise DatasetError(f"{loaded.shown}: [dataset] has {len(report.errors)} error(s); fix them before "
                           "training (nothing was loaded or written)")
    if elsewhere is not None:
        return elsewhere()
    recipe, echo = ctx.recipe, ctx.echo     # the launcher's process count is this run's `[train] gpus`
    if resume:
        plugins.hook.check_resume(run_dir=run_dir, recipe=recipe, loaded=loaded, report=report,
                                  allow_dataset_change=allow_dataset_change, plugins=plugins)
    run_dir.prepare(overwrite=overwrite, resume=resume)
    status, error, began = "failed", None, False
    signals = Signals()
    try:
        ctx.run_dir = run_dir
        run_dir.start(ctx, allow_dataset_change=allow_dataset_change)
        backend = prepared.backend.factory(ctx)
        run_dir.record_plan(backend.plan())
        signals.term()
        began = True
        ctx.hook.run_started(run=ctx)
        backend.run()
        ctx.hook.evaluate_run(run=ctx)
        status = "completed"
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        status = "interrupted"
        error = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(
            f"interrupted; resume with: {resume_command(loaded, run_dir.path)}")
        raise error from None
    except LoraRunError as exc:
        error = exc
        raise
    except Exception as exc:  # noqa: BLE001 - an unexpected crash (MemoryError too) still ends with a manifest entry
        if signals.caused(exc):   # Ctrl-C in an import ("partially initialized module 'torch'"): not a crash
            status, error = "interrupted", TrainingInterrupted(
                f"interrupted; resume with: {resume_command(loaded, run_dir.path)}")
            raise error from None
        error = run_dir.error_for(exc) or exc     # a full disk met outside the atomic writers: one line
        if error is not exc:
            raise error from exc
        raise crash_error(exc, recipe.backend.name, run_dir.path) from exc
    finally:
        signals.restore()
        run_dir.finish(status, error, ctx.artifacts, echo)
        if began:
            try:
                ctx.hook.run_finished(run=ctx, status=status, error=error)
            except Exception as exc:  # noqa: BLE001 - a broken observer must not hide the run's outcome
                echo(f"warning: a run_finished hook failed: {exc}")
        run_dir.release()
    return ctx


def crash_error(exc: BaseException, backend: str, run_path: Any, where: str = "") -> BackendError:
    """A backend's unexpected exception as the run's error (exit 1), alike on every rank (``where``: " on rank 1")."""
    what = "ran out of memory" if isinstance(exc, MemoryError) else "crashed"
    return BackendError(f"backend \"{backend}\" {what}{where}: {type(exc).__name__}: {exc} (run folder kept: "
                        f"{run_path}; --debug shows the traceback)")


class Signals:
    """Ctrl-C (where Python's own handler is installed) and, from ``term()`` on, SIGTERM and SIGHUP raise
    KeyboardInterrupt and are recorded: a library may swallow the interrupt or re-raise it as another error
    (``caused``)."""

    def __init__(self) -> None:
        self.arrived, self.previous = False, {}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._install(signal.SIGINT)

    def _install(self, signum: int) -> None:
        with contextlib.suppress(ValueError):   # not the main thread
            self.previous[signum] = signal.signal(signum, self._interrupt)

    def _interrupt(self, _signum: int, _frame: Any) -> None:
        self.arrived = True
        raise KeyboardInterrupt

    def term(self) -> None:
        """SIGTERM, and SIGHUP (a closed terminal or SSH session) unless ignored (`nohup`), end the run as Ctrl-C does
        (a resumable state is saved)."""
        self._install(signal.SIGTERM)
        if getattr(signal, "SIGHUP", None) and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            self._install(signal.SIGHUP)

    def caused(self, exc: BaseException | None) -> bool:
        while exc is not None and not isinstance(exc, KeyboardInterrupt):   # raised from / while handling it
            exc = exc.__cause__ or exc.__context__
        return self.arrived or exc is not None

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
