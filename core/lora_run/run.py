"""Run orchestration: recipe → plugins → validation → dataset lint → run directory → backend → evaluation."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import attrs

from . import __version__
from .dataset import Item, LintReport
from .errors import (BackendError, DatasetError, LoraRunError, OutputError, PluginError, RecipeError,
                     TrainingInterrupted)
from .files import FileProblem, read_limited, shown
from .features import capability_problems
from .plugins import Plugins, Registration
from .recipe import (CONVERTER, LoadedRecipe, Problems, check_limits, collect_errors, did_you_mean, dump_recipe,
                     replace, to_dict)
from .rundir import MANIFEST, RECIPE, RunDir, disk_full_error, hardware, is_disk_full, remove_temp_files
from .schema import TIMESTEP_SAMPLINGS, Recipe


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
    """What a backend factory returns. ``check`` is optional; ``plan`` and ``check`` never import torch.

    Optional too: ``run_processes(ctx, output_dir, overwrite) -> RunContext`` for a backend that trains with
    several processes (see :class:`Processes`). ``execute`` hands it a run with ``[train] gpus`` > 1 started
    without a launcher (it starts the processes and waits) and every rank other than 0 of a launched run (it
    trains without writing); rank 0 of a launched run goes through ``execute`` as a one-process run does."""

    def plan(self) -> Plan: ...

    def run(self) -> None: ...


@attrs.frozen
class Processes:
    """This process's place in a run started by a launcher (`torchrun`, `accelerate launch`, `lora-run --gpus`),
    read from the `RANK` / `WORLD_SIZE` environment those launchers set; one process without them. Rank 0 is
    the main process: it alone writes the run folder and calls the plugins' hooks."""

    rank: int = 0
    world: int = 1
    launched: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Any = None) -> Processes:
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


def _quiet(_text: str) -> None:
    pass


class _SilentHooks:
    """What a rank other than 0 sees as `ctx.hook`: every hook call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., list]:
        return lambda **_kw: []


_SILENT_HOOKS = _SilentHooks()


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
    process: Processes = attrs.field(factory=lambda: Processes())

    @property
    def hook(self) -> Any:
        """The plugins' hooks; silent on the processes of a multi-process run other than rank 0."""
        return self.plugins.hook if self.process.main else _SILENT_HOOKS

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


def with_defaults(loaded: LoadedRecipe, plugins: Plugins) -> LoadedRecipe:
    """The recipe with the plugin names it leaves unset taken from the registries (the family, the backend
    that trains it, the embedder, the family's LoRA formats); what the registries do not decide stays unset
    and `validate` reports it."""
    r = loaded.recipe
    family = r.model.family or plugins.default("family")
    backend = r.backend.name or plugins.default("backend", plugins.trainers(family) if family else None)
    embedder = r.eval.embedder or plugins.default("embedder")
    formats = r.output.formats
    if formats is None and family in plugins.registry["family"]:
        reg = plugins.registry["family"][family]
        formats = list(reg.default_formats or reg.lora_formats) or None
    recipe = replace(r, model={"family": family}, backend={"name": backend}, eval={"embedder": embedder},
                     output={"formats": formats})
    return loaded if recipe == r else attrs.evolve(loaded, recipe=recipe)


def _unset(kind: str, plugins: Plugins, among: list[str] | None = None) -> str:
    names = plugins.names(kind) if among is None else among
    return (f"is not set and no single installed {kind} is registered as the default; set it to one of: "
            f"{', '.join(names) or 'none installed'}")


def _known_name(value: str, known: Iterable[str], what: str) -> str | None:
    """None when ``value`` is one of ``known``, else the message (with "did you mean")."""
    known = sorted(set(known))
    if value in known:
        return None
    hint = did_you_mean(value, known, '"')
    return f"unknown {what} \"{value}\"{hint}; installed: {', '.join(known) or 'none'}"


def validate(loaded: LoadedRecipe, plugins: Plugins) -> Prepared:
    """Plugin tables, plugin names and capabilities; every problem at once (RecipeError)."""
    loaded = with_defaults(loaded, plugins)
    recipe = loaded.recipe
    problems = loaded.problems()
    backend: Registration | None = None
    families = plugins.registry["family"]
    if recipe.model.family is None:
        problems.add(("model", "family"), _unset("family", plugins))
    if recipe.backend.name is None:
        problems.add(("backend", "name"), _unset("backend", plugins, plugins.trainers(recipe.model.family or "")))
    else:
        try:
            backend = plugins.get("backend", recipe.backend.name, "backend.name")
        except PluginError as exc:
            problems.add(("backend", "name"), _strip_where(str(exc)))
    if recipe.model.family is not None:
        try:
            family_problems(recipe, plugins.get("family", recipe.model.family, "model.family"), plugins, problems)
        except PluginError as exc:
            problems.add(("model", "family"), _strip_where(str(exc)))
    sampling = _known_name(recipe.train.timestep_sampling,
                           [*TIMESTEP_SAMPLINGS, *(s for f in families.values() for s in f.samplers)],
                           "timestep sampling")
    if sampling:
        problems.add(("train", "timestep_sampling"), sampling)
    if recipe.output.formats is None and recipe.model.family in families:
        problems.add(("output", "formats"), f"is not set and family {recipe.model.family} registers no LoRA "
                     "formats; name the formats to write")
    for n, fmt in enumerate(recipe.output.formats or ()):
        message = _known_name(fmt, (f for reg in families.values() for f in reg.lora_formats), "LoRA format")
        if message:
            problems.add(("output", "formats", n), message)
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
    if recipe.eval.enabled and plugins.registry["embedder"] and recipe.eval.embedder is None:
        problems.add(("eval", "embedder"), _unset("embedder", plugins))
    elif recipe.eval.enabled and plugins.registry["embedder"]:
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
            hint = did_you_mean(slot, family.file_slots)
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
    """The dataset's items checked by every ``lint_dataset`` implementation (all usable when none is installed)."""
    items = scan_dataset(recipe, plugins)
    report = LintReport(usable=list(items))
    plugins.hook.lint_dataset(recipe=recipe, items=items, report=report)
    return report


def output_path(recipe: Recipe, override: str | None) -> Path:
    if override:
        return Path(os.path.expanduser(override)).resolve()
    return Path(recipe.output.dir.replace("{name}", recipe.output.name)).resolve()


def _inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    """(key, path) of the run's local inputs: the folders and files a run folder must never contain."""
    r = recipe
    out = [("dataset.path", r.dataset.path)] + [(f"dataset.regularization[{n}].path", reg.path)
                                                for n, reg in enumerate(r.dataset.regularization)]
    if r.model.source and os.path.isabs(r.model.source):
        out.append(("model.source", r.model.source))
    out.extend((f"model.files.{k}", v) for k, v in r.model.files.items() if v)
    found = []
    for key, value in out:
        if not isinstance(value, str) or not value:    # an optional path left unset (a dataset type without one)
            continue
        try:
            found.append((key, Path(value).resolve()))
        except (OSError, ValueError, RuntimeError):
            continue
    return found


def output_problems(recipe: Recipe, override: str | None = None, overwrite: bool = False,
                    recipe_file: Path | None = None) -> list[str]:
    """Why the run folder cannot be used whatever its state (check, plan and run ask the same): it is a
    file, a folder above the working folder (or, with --overwrite, the working folder itself), or it holds
    the run's dataset or model (`--overwrite` would delete them). Each message names the key (or
    --output-dir)."""
    where = f"--output-dir {shown(override)}" if override else f"{{file}}: [output.dir] (= {shown(recipe.output.dir)})"
    try:
        path = output_path(recipe, override)
    except (OSError, ValueError, RuntimeError) as exc:
        return [f"{where}: not a usable folder path ({exc})"]
    problems = []
    try:
        if path.exists() and not path.is_dir():
            problems.append(f"{where}: {shown(path)} exists and is not a folder")
    except OSError as exc:     # e.g. a name too long for the file system
        return [f"{where}: not a usable folder path ({exc.strerror or exc})"]
    cwd = Path.cwd().resolve()
    if path in cwd.parents:
        problems.append(f"{where}: the run folder {shown(path)} contains the working folder; a run needs a folder "
                        "of its own")
    elif path == cwd and overwrite:
        problems.append(f"{where}: --overwrite would replace the working folder {shown(path)}; run from outside it")
    if recipe_file is not None:
        try:
            own = recipe_file.resolve()
        except (OSError, RuntimeError):
            own = None
        if own is not None and path in own.parents and own != path / RECIPE:   # our own copy may be re-run
            problems.append(f"{where}: the run folder {shown(path)} contains the recipe file {shown(own)}; keep "
                            "recipes outside run folders (--overwrite would delete it)")
    for key, value in _inputs(recipe):
        if value == path or path in value.parents:
            problems.append(f"{where}: the run folder {shown(path)} contains [{key}] ({shown(value)}); a run "
                            "folder must not hold the run's inputs (--overwrite would delete them)")
    return problems


def raise_output_problems(loaded: LoadedRecipe, override: str | None = None, overwrite: bool = False) -> None:
    problems = output_problems(loaded.recipe, override, overwrite, loaded.path)
    if problems:
        err = OutputError("\n".join(p.replace("{file}", loaded.problems().file_for(("output", "dir"))) for p in problems))
        err.problems = str(err).splitlines()   # type: ignore[attr-defined]  (--json lists each)
        raise err


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


#: May change on resume as long as the batch all processes train on together (their product) stays the same.
_PER_PROCESS_BATCH = {("train", "batch_size"), ("train", "gpus")}


def _resume_differences(saved: dict[str, Any], new: dict[str, Any], prefix: tuple = ()) -> list[str]:
    out = []
    if not prefix:
        a, b = saved.get("train", {}), new.get("train", {})
        if a.get("batch_size", 1) * a.get("gpus", 1) != b.get("batch_size", 1) * b.get("gpus", 1):
            out.append("train.batch_size × train.gpus (the global batch: "
                       f"{a.get('batch_size', 1)} × {a.get('gpus', 1)} before, "
                       f"{b.get('batch_size', 1)} × {b.get('gpus', 1)} now)")
    for key in sorted(set(saved) | set(new)):
        here = (*prefix, key)
        if here in _RESUMABLE_CHANGES or here[:1] in _RESUMABLE_CHANGES or here in _PER_PROCESS_BATCH:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_resume_differences(a, b, here))
        elif a != b:
            out.append(".".join(here))
    return out


DATASET_RECORD = "dataset.json"


def dataset_changes(saved: dict[str, Any], now: dict[str, dict[str, str]]) -> list[str]:
    """What changed between the per-file record of a run's dataset and the dataset now."""
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old is None:
            out.append(f"added image {shown(key)}")
        elif new is None:
            out.append(f"removed image {shown(key)}")
        else:
            if old.get("image") != new.get("image"):
                out.append(f"image {shown(key)} changed")
            if old.get("caption") != new.get("caption"):
                out.append(f"caption of {shown(key)} changed")
    return out


def _check_dataset_unchanged(run_dir: RunDir, report: LintReport, shown_recipe: str) -> None:
    record = run_dir.file(DATASET_RECORD)
    changes: list[str] = []
    if record.is_file():
        try:
            saved = json.loads(read_limited(record, "json")).get("files", {})
        except (OSError, ValueError, AttributeError, FileProblem):
            saved = None
        if isinstance(saved, dict):
            changes = dataset_changes(saved, report.files)
    if not changes:
        old_hash = run_dir.read_manifest().get("dataset", {}).get("hash")
        if old_hash and old_hash != report.dataset_hash and not record.is_file():
            changes = ["the dataset hash differs (this run folder has no per-file record to name the files)"]
    if changes:
        shown_changes = "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more" if len(changes) > 12 else "")
        raise OutputError(f"{shown_recipe}: cannot resume {shown(run_dir.path)}: the dataset changed since the run "
                          f"started ({len(changes)} change(s): {shown_changes}); restore it, start a new run, or pass "
                          "--allow-dataset-change to continue training on the changed dataset")


def _valuable(folder: Path) -> bool:
    """Did a run write something worth keeping (a LoRA or checkpoint file anywhere but the cache)?"""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "cache" and not os.path.islink(os.path.join(root, d))]
        if any(n.endswith(".safetensors") and not n.startswith(".") for n in names):
            return True
    return False


def execute(loaded: LoadedRecipe, plugins: Plugins, *, output_dir: str | None = None, resume: bool = False,
            overwrite: bool = False, debug: bool = False, echo: Callable[[str], None] = print,
            allow_dataset_change: bool = False) -> RunContext:
    """The whole run. Raises a LoraRunError subclass on failure (exit codes in errors.py).

    A fresh run that stops before it wrote anything of value with exit code 2 (bad input found by a
    backend's pre-flight: a missing model folder or checkout, an unreachable hub), or that could not even
    write its manifest, removes what it wrote, so the corrected command just works."""
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other")
    prepared = validate(loaded, plugins)
    recipe = prepared.recipe
    raise_output_problems(loaded, output_dir, overwrite)
    report = lint(recipe, plugins)
    process = Processes.from_env()
    if not process.main:
        echo = _quiet
    echo(report.table())
    if report.errors:
        raise DatasetError(f"{loaded.shown}: [dataset] has {len(report.errors)} error(s); fix them before "
                           "training (nothing was loaded or written)")
    several = None      # a backend that trains with several processes starts and runs them: `run_processes`
    if process.launched or recipe.train.gpus > 1:
        several = getattr(make_backend(prepared, plugins), "run_processes", None)
    if process.launched:
        if process.world > 1 and several is None:
            raise RecipeError(f"{loaded.shown}: backend \"{recipe.backend.name}\" starts its own processes; run "
                              f"`lora-run {loaded.shown} --gpus {process.world}` once instead of under a launcher "
                              f"({process.world} processes here) — see docs/multi-gpu.md")
        recipe = _with_world_size(recipe, process, loaded.shown, echo)
        prepared = attrs.evolve(prepared, recipe=recipe)
    if several is not None and not (process.launched and process.main):   # rank 0 of a launched run goes on here
        return several(RunContext(recipe, plugins, prepared.backend, prepared.options, loaded, None, resume,
                                  report.usable, report, debug=debug, echo=echo, process=process),
                       output_dir=output_dir, overwrite=overwrite)
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
        if not allow_dataset_change:
            _check_dataset_unchanged(run_dir, report, loaded.shown)
    run_dir.prepare(overwrite=overwrite, resume=resume)
    started = time.time()
    ctx: RunContext | None = None
    status, error, began = "failed", None, False
    manifest_written = False
    previous_term = None
    try:
        if resume:
            cache = Path(recipe.train.cache_dir).resolve() if recipe.train.cache_dir else None
            if cache is None or run_dir.path in cache.parents:   # a shared cache may have live writers
                for tmp in remove_temp_files(run_dir.path):
                    run_dir.log(f"removed the temporary file of an interrupted write: {tmp.name}")
        run_dir.reserve()
        run_dir.write_text(RECIPE, dump_recipe(recipe, header=f"Resolved from {loaded.shown} by lora-run "
                                               f"{__version__}.\nRe-run with: lora-run {run_dir.path / RECIPE}"))
        manifest = manifest_base(prepared, plugins, report)
        manifest.update(status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if resume:
            manifest["resumed_at"] = [*run_dir.read_manifest().get("resumed_at", []), manifest["started_at"]]
            manifest.pop("started_at")
            if allow_dataset_change:
                manifest["dataset_change_allowed_at"] = [*run_dir.read_manifest().get("dataset_change_allowed_at", []),
                                                         manifest["resumed_at"][-1]]
        run_dir.update_manifest(**manifest)
        manifest_written = True
        run_dir.write_text(DATASET_RECORD, json.dumps({"hash": report.dataset_hash, "files": report.files},
                                                      indent=1, sort_keys=True) + "\n")
        run_dir.log(f"lora-run {__version__}: {loaded.shown} with backend {recipe.backend.name}")
        if process.launched:
            run_dir.update_manifest(processes={"world_size": process.world})
        ctx = RunContext(recipe, plugins, prepared.backend, prepared.options, loaded, run_dir, resume,
                         report.usable, report, debug=debug, echo=echo, process=process)
        backend = prepared.backend.factory(ctx)
        plan = backend.plan()
        for rel, content in plan.files.items():
            run_dir.write_text(rel, content)
        run_dir.update_manifest(plan={"steps": plan.steps, "commands": plan.commands,
                                      "memory_estimate_gib": plan.memory_estimate_gib, "memory_mode": plan.memory_mode})
        previous_term = install_sigterm()
        began = True
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
    except MemoryError as exc:
        error = exc
        raise BackendError(f"backend \"{recipe.backend.name}\" ran out of memory (MemoryError; run folder kept: "
                           f"{run_dir.path})") from exc
    except Exception as exc:  # noqa: BLE001 - an unexpected crash still ends with a manifest entry
        error = exc
        if is_disk_full(exc):      # a write outside our atomic writers (a tracker, a library) met a full disk
            error = disk_full_error(Path(getattr(exc, "filename", None) or run_dir.path), None)
            raise error from exc
        raise BackendError(f"backend \"{recipe.backend.name}\" crashed: {type(exc).__name__}: {exc} "
                           f"(run folder kept: {run_dir.path}; --debug shows the traceback)") from exc
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        run_dir.unreserve()
        code = getattr(error, "exit_code", None)
        undo = (not resume and status == "failed" and (code == 2 or not manifest_written)
                and not _valuable(run_dir.path))
        if undo and run_dir.remove_created():
            echo(f"note: nothing was kept in {run_dir.path}: the run stopped before training (fix the problem and "
                 "run the same command again)")
        else:
            _finish_manifest(run_dir, status, started, ctx, error, echo)
        if ctx is not None and began:
            try:
                ctx.hook.run_finished(run=ctx, status=status, error=error)
            except Exception as exc:  # noqa: BLE001 - a broken observer must not hide the run's outcome
                echo(f"warning: a run_finished hook failed: {exc}")
        run_dir.release()
    return ctx


def _with_world_size(recipe: Recipe, process: Processes, shown: str, echo: Callable[[str], None]) -> Recipe:
    """Under a launcher the number of processes is the launcher's: it becomes `[train.gpus]` of this run."""
    from .recipe import replace

    if recipe.train.gpus not in (1, process.world) and process.main:
        echo(f"note: {shown}: [train.gpus] = {recipe.train.gpus} is replaced by the launcher's {process.world} "
             "process(es)")
    return replace(recipe, train={"gpus": process.world}) if recipe.train.gpus != process.world else recipe


def _finish_manifest(run_dir: RunDir, status: str, started: float, ctx: RunContext | None, error: Any,
                     echo: Callable[[str], None]) -> None:
    """The manifest's final state (the reserve was released just before, so a full disk still has room)."""
    try:
        run_dir.update_manifest(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                duration_s=round(time.time() - started, 2),
                                artifacts=ctx.artifacts if ctx is not None else {},
                                error=(str(error) or type(error).__name__) if error else None)
    except (OSError, LoraRunError) as exc:
        echo(f"warning: could not record the final status \"{status}\" in {run_dir.file(MANIFEST)}: {exc}")
    run_dir.log(f"run {status}")


def run_evaluators(ctx: RunContext) -> None:
    """The evaluators `[eval] evaluators` names (unset: every installed one), in that order."""
    chosen = ctx.recipe.eval.evaluators
    names = chosen if chosen is not None else ctx.plugins.names("evaluator")
    for name in names:
        ctx.plugins.get("evaluator", name, "eval.evaluators").factory(ctx).evaluate()


def install_sigterm() -> Any:
    """SIGTERM ends the run as Ctrl-C does (a resumable state is saved); returns the previous handler."""
    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        return signal.getsignal(signal.SIGTERM)
