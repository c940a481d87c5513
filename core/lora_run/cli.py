"""The `lora-run` command line.

    lora-run RECIPE.toml [--set k=v ...] [--output-dir D] [--resume | --overwrite]   train
    lora-run check RECIPE [--json]      recipe + dataset lint, fast, never imports torch
    lora-run plan RECIPE [--json]       resolved recipe + the backend's plan
    lora-run plugins [--json]           installed plugins, hooks, registrations
    lora-run COMMAND ...                commands plugins add (`register_commands`; `lora-run -h` lists them:
                                        `recipes`, `demo`, `eval`, `score` come from the built-in plugins)

Exit codes: 0 ok, 1 the run failed, 2 bad input (nothing ran), 130 interrupted (resumable).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import attrs

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_OK, LoraRunError, RecipeError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}
#: Commands that only print: a closed output pipe just ends them (default SIGPIPE behaviour).
READ_ONLY = {"check", "plan", "plugins"}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return wrap


def recipe_arguments(p: argparse.ArgumentParser) -> None:
    """RECIPE, --set and --unset: for plugin commands that read a recipe as the built-in ones do."""
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (TOML value), e.g. --set train.steps=100; repeatable")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="remove a key so its default applies, e.g. --unset sample.every_steps; repeatable; "
                   "applied before the --set values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-run", description="Declarative identity-LoRA trainer for "
                                     "the model families its plugins register (lora-run plugins).",
                                     epilog="Run a recipe: lora-run RECIPE.toml [options] (see `lora-run run -h`).")
    parser.add_argument("--version", action="version", version=f"lora-run {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train a recipe (the default command)")
    recipe_arguments(p)
    p.add_argument("--output-dir", help="run folder (default: [output.dir] of the recipe)")
    p.add_argument("--gpus", type=int, metavar="N", help="data-parallel processes on this machine, one per GPU, "
                   "started through torchrun (overrides [train.gpus]; under torchrun / accelerate launch the "
                   "launcher decides)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    group.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty output folder "
                       "(only a folder lora-run created)")
    p.add_argument("--allow-dataset-change", action="store_true", help="with --resume: continue although images or "
                   "captions changed since the run started (refused otherwise)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("check", help="validate a recipe and lint its dataset (fast, no torch)")
    recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("plan", help="show the resolved recipe and what the backend will do")
    recipe_arguments(p)
    p.add_argument("--output-dir", help="run folder the plan is made for")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for name, reg in sorted(_plugins(quiet=True).registry["command"].items()):
        if name in COMMANDS or name == "run":
            continue  # a plugin cannot replace a built-in command
        p = sub.add_parser(name, help=reg.description or f"added by plugin {reg.plugin}")
        if reg.configure is not None:
            reg.configure(p)
        if not any(action.dest == "debug" for action in p._actions):
            p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _fail(err: LoraRunError, as_json: bool = False) -> int:
    if as_json:
        problems = getattr(err, "problems", [str(err)])
        print(json.dumps({"ok": False, "exit_code": err.exit_code, "error": type(err).__name__,
                          "problems": problems}, indent=2))
    else:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
    return err.exit_code


def _load(args: argparse.Namespace) -> Any:
    from .plugins import load_plugins
    from .recipe import load_recipe
    from .run import with_defaults

    loaded = load_recipe(args.recipe, args.sets, getattr(args, "unsets", ()))
    plugins = load_plugins()
    loaded = with_defaults(loaded, plugins)
    for b in plugins.broken:
        print(f"warning: plugin {b.name} is broken and was skipped: {b.error}", file=sys.stderr)
    for c in plugins.conflicts:
        print(f"warning: {c}", file=sys.stderr)
    return loaded, plugins


@command("check")
def cmd_check(args: argparse.Namespace) -> int:
    from .run import lint, raise_output_problems, validate

    loaded, plugins = _load(args)
    recipe_error: LoraRunError | None = None
    prepared = None
    try:
        prepared = validate(loaded, plugins)
    except LoraRunError as exc:  # still lint the dataset: one `check` reports every problem
        recipe_error = exc
    try:
        raise_output_problems(loaded)
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
                          "lint": report.to_json() if report else None}, indent=2))
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


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    from .recipe import dump_recipe, to_dict
    from .run import RunDir, make_backend, output_path, raise_output_problems, validate

    loaded, plugins = _load(args)
    prepared = validate(loaded, plugins)
    raise_output_problems(loaded, args.output_dir)
    run_dir = RunDir(output_path(prepared.recipe, args.output_dir))
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
        print("# command: " + " ".join(_quote(a) for a in argv))
    for rel, content in plan.files.items():
        print(f"# file: {run_dir.path / rel}\n{content.rstrip()}\n")
    for out in plan.outputs:
        print(f"# output: {out}")
    for note in plan.notes:
        print(f"# note: {note}")
    return EXIT_OK


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@command("plugins")
def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import load_plugins

    plugins = load_plugins()
    listing = plugins.describe()
    if args.json:
        print(json.dumps({"plugins": listing, "broken": [attrs.asdict(b) for b in plugins.broken],
                          "conflicts": plugins.conflicts}, indent=2))
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
    return EXIT_OK


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    from .run import execute

    if args.gpus is not None:
        args.sets = [*args.sets, f"train.gpus={args.gpus}"]
    loaded, plugins = _load(args)
    if args.allow_dataset_change and not args.resume:
        raise RecipeError("--allow-dataset-change only applies with --resume")
    ctx = execute(loaded, plugins, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite,
                  debug=args.debug, allow_dataset_change=args.allow_dataset_change)
    if not ctx.process.main:          # one of several processes: rank 0 reports
        return EXIT_OK
    print(f"done: {ctx.run_dir.path if ctx.run_dir else ''}")
    for key, value in ctx.artifacts.items():
        if isinstance(value, (str, Path)):
            print(f"  {key}: {value}")
    return EXIT_OK


_LOADED: list[Any] = []


def _plugins(quiet: bool = False) -> Any:
    """The plugins, loaded once per command line (the parser needs their commands)."""
    from .plugins import load_plugins

    if not _LOADED:
        _LOADED.append(load_plugins())
    if not quiet:
        for b in _LOADED[0].broken:
            print(f"warning: plugin {b.name} is broken and was skipped: {b.error}", file=sys.stderr)
    return _LOADED[0]


def _plugin_command(args: argparse.Namespace) -> int:
    plugins = _plugins()
    return plugins.registry["command"][args.command].factory(args, plugins)


def _tell_launcher(err: LoraRunError) -> None:
    """Under torchrun (also behind `accelerate launch`) a failing process writes its message to the error file
    the launcher names, so the launcher's failure summary shows lora-run's message for that rank."""
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or err.exit_code == 130:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": f"{type(err).__name__} (exit {err.exit_code}): {err}",
                       "timestamp": int(time.time())}, fh)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the `lora-run` program, not a call from Python (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    _LOADED.clear()  # a fresh plugin list for every command line (tests call main() repeatedly)
    parser = build_parser()
    known = set(COMMANDS) | set(_plugins(quiet=True).registry["command"]) | {"-h", "--help", "--version"}
    first = next((a for a in argv if a != "--debug"), None)
    if first is not None and first not in known and not first.startswith("-"):
        argv.insert(argv.index(first), "run")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are bad input
        return EXIT_BAD_INPUT if exc.code not in (0, None) else EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    debug = getattr(args, "debug", False)
    as_json = getattr(args, "json", False)
    if as_program and args.command in READ_ONLY and hasattr(signal, "SIGPIPE"):
        # `lora-run check … --json | head`: a reader that stops early ends us quietly, as it ends `cat`
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return COMMANDS.get(args.command, _plugin_command)(args)
    except BrokenPipeError:  # other commands: the reader went away; say nothing more on that pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except LoraRunError as err:
        _tell_launcher(err)
        if debug:
            raise
        return _fail(err, as_json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - no traceback reaches the user without --debug
        if debug:
            raise
        from .errors import EXIT_FAILED
        from .files import printable

        kind = "out of memory" if isinstance(exc, MemoryError) else f"unexpected {type(exc).__name__}"
        print(f"error: {kind}: {printable(str(exc))[:2000]} (a bug in lora-run or a plugin; --debug shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
