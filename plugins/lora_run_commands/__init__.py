"""Built-in plugin: `run` (:mod:`.run`, also `lora-run RECIPE`) and the read-only commands `check`, `plan`,
`plugins` and `docs` (:mod:`.docs`).

Core's command line only dispatches; these commands are added through ``register_commands`` with exactly the
call a third-party plugin makes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

import attrs

from .arguments import load_recipe_for, path_argument, recipe_arguments
from lora_run.errors import EXIT_BAD_INPUT, EXIT_OK, LoraRunError
from lora_run.hookspecs import hookimpl

from .docs import cmd_docs, docs_arguments
from .run import cmd_run, run_arguments


def cmd_check(args: argparse.Namespace, plugins: Any) -> int:
    from lora_run.run import lint, open_run_folder, validate

    loaded = load_recipe_for(args, plugins)
    recipe_error: LoraRunError | None = None
    prepared = None
    try:
        prepared = validate(loaded, plugins)
    except LoraRunError as exc:  # still lint the dataset: one `check` reports every problem
        recipe_error = exc
    try:
        open_run_folder(loaded, plugins)
    except LoraRunError as exc:  # the output folder's problems join the recipe's
        if recipe_error is None:
            recipe_error = exc
        else:
            merged = [*getattr(recipe_error, "problems", [str(recipe_error)]),
                      *getattr(exc, "problems", [str(exc)])]
            recipe_error.problems = merged   # type: ignore[attr-defined]
    try:
        report = lint(loaded.recipe, plugins)
    except LoraRunError:
        if recipe_error is None:
            raise
        report = None  # e.g. an unknown [dataset] type, already among the recipe's problems
    problems = getattr(recipe_error, "problems", [str(recipe_error)]) if recipe_error else []
    ok = recipe_error is None and report is not None and not report.errors
    code = EXIT_OK if ok else (recipe_error.exit_code if recipe_error else EXIT_BAD_INPUT)
    recipe = prepared.recipe if prepared else loaded.recipe
    if args.json:
        print(json.dumps({"ok": ok, "exit_code": code, "recipe": loaded.shown, "backend": recipe.backend.name,
                          "family": recipe.model.family, "problems": problems,
                          "lint": lint_json(report) if report else None}, indent=2))
        return code
    if recipe_error is None:
        print(f"{loaded.shown}: recipe OK (backend {recipe.backend.name}, {recipe.model.family})")
    if report is not None:
        print(report.table())
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if report is not None and report.errors:
        print(f"error: {loaded.shown}: [dataset] has {len(report.errors)} error(s)", file=sys.stderr)
    if ok:
        print("check passed" + (f" with {len(report.warnings)} warning(s)" if report.warnings else ""))
    elif recipe_error is not None:
        print(f"check failed: {len(problems)} recipe problem(s)"
              + (f", {len(report.errors)} dataset error(s)" if report is not None and report.errors else ""),
              file=sys.stderr)
    return code


def lint_json(report: Any) -> dict[str, Any]:
    """The dataset lint as `lora-run check --json` shows it: the counts, the dataset's hash and every finding."""
    return dict(counts=report.counts, dataset_hash=report.dataset_hash,
                findings=[attrs.asdict(f) for f in report.findings])


def cmd_plan(args: argparse.Namespace, plugins: Any) -> int:
    from lora_run.recipe import dump_recipe, to_dict
    from lora_run.run import make_backend, open_run_folder, validate

    loaded = load_recipe_for(args, plugins)
    prepared = validate(loaded, plugins)
    run_dir = open_run_folder(prepared.loaded, plugins, args.output_dir)
    plan = make_backend(prepared, plugins, run_dir=run_dir).plan()
    if args.json:
        print(json.dumps({"ok": True, "recipe": to_dict(prepared.recipe), "output_dir": str(run_dir.path),
                          "plan": attrs.asdict(plan)}, indent=2, default=str))
        return EXIT_OK
    print(f"# resolved recipe ({loaded.shown})")
    print(dump_recipe(prepared.recipe))
    print(f"# plan: backend {plan.backend}, {plan.family}, {plan.steps} steps, output {run_dir.path}")
    if plan.memory_estimate_gib is not None:
        print(f"# memory estimate: {plan.memory_estimate_gib:.1f} GiB peak"
              + (f" ({plan.memory_mode} mode)" if plan.memory_mode else "")
              + (f" — {plan.memory_source}" if plan.memory_source else ""))
    for argv in plan.commands:
        print("# command: " + " ".join(shlex.quote(a) for a in argv))
    for rel, content in plan.files.items():
        print(f"# file: {run_dir.path / rel}\n{content.rstrip()}\n")
    for label, lines in (("output", plan.outputs), ("note", plan.notes)):
        for line in lines:
            print(f"# {label}: {line}")
    return EXIT_OK


def describe_plugins(plugins: Any) -> list[dict[str, Any]]:
    """Each loaded plugin, by name: its module, distribution and version (the run folder's manifest records them) and
    the hooks it implements (:func:`plugin_listing` adds what it registered)."""
    from importlib import metadata

    try:    # one scan of the installed distributions' files for every plugin (about 0.1 s each)
        distributions = metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - broken metadata must not break listing
        distributions = {}
    out = []
    for name, plugin in sorted(plugins.pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        module = getattr(plugin, "__name__", type(plugin).__name__)
        dist = (distributions.get(module.split(".")[0]) or [""])[0]
        version = ""
        if dist:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = ""
        hooks = sorted(impl.name for impl in plugins.pm.get_hookcallers(plugin) or [])
        out.append(dict(name=name, module=module, distribution=dist, version=version, hooks=hooks))
    return out


#: The name of each registry as `lora-run plugins` lists it.
PLURAL = {"family": "families", "backend": "backends", "loss": "losses", "dataset": "datasets", "evaluator": "evaluators",
          "embedder": "embedders", "command": "commands", "section": "sections"}


def plugin_listing(plugins: Any) -> list[dict[str, Any]]:
    """Each plugin (:func:`describe_plugins`) with what it registered, by kind, and the backends that train its families."""
    listing = []
    for entry in describe_plugins(plugins):
        registered = {kind: sorted(r.name for r in table.values() if r.plugin == entry["name"])
                      for kind, table in plugins.registry.items()}
        entry.update({PLURAL[kind]: names for kind, names in registered.items() if names})
        if registered["family"]:
            entry["trained_by"] = {family: plugins.trainers(family) for family in registered["family"]}
        listing.append(entry)
    return listing


def cmd_plugins(args: argparse.Namespace, plugins: Any) -> int:
    listing = plugin_listing(plugins)
    if args.json:
        print(json.dumps({"plugins": listing, "broken": [attrs.asdict(b) for b in plugins.broken],
                          "conflicts": plugins.conflicts, "warnings": plugins.notes}, indent=2))
        return EXIT_OK
    for p in listing:
        print(f"{p['name']} {p['version'] or ''} ({p['module']})".replace("  ", " "))
        print(f"  hooks: {', '.join(p['hooks'])}")
        for kind in ("families", "backends", "losses", "datasets", "evaluators", "embedders", "commands"):
            if p.get(kind):
                print(f"  {kind}: {', '.join(p[kind])}")
        for family, backends in p.get("trained_by", {}).items():
            print(f"  {family} is trained by: {', '.join(backends) or 'no installed backend'}")
    for b in plugins.broken:
        print(f"BROKEN {b.name}: {b.error}")
    for c in plugins.conflicts:
        print(f"CONFLICT {c}")
    for note in plugins.notes:
        print(f"WARNING {note}")
    return EXIT_OK


def _check_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p)
    p.add_argument("--output-dir", type=path_argument, help="run folder the plan is made for")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _plugins_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


@hookimpl
def register_commands(register: Any) -> None:
    register("run", cmd_run, configure=run_arguments, description="train a recipe (the default command)")
    register("check", cmd_check, configure=_check_arguments, read_only=True,
             description="validate a recipe and lint its dataset (fast, no torch)")
    register("plan", cmd_plan, configure=_plan_arguments, read_only=True,
             description="show the resolved recipe and what the backend will do")
    register("plugins", cmd_plugins, configure=_plugins_arguments, read_only=True,
             description="list installed plugins and what they register")
    register("docs", cmd_docs, configure=docs_arguments, read_only=True,
             description="list the documentation pages, or print one (offline, from any install)")
