"""The `lora-run` command line.

    lora-run RECIPE.toml [--set k=v ...] [--output-dir D] [--resume | --overwrite]   train
    lora-run COMMAND ...                commands plugins add (`register_commands`; `lora-run -h` lists them:
                                        `check`, `plan`, `plugins`, `recipes`, `demo`, `eval`, `score` come
                                        from the built-in plugins)

Exit codes: 0 ok, 1 the run failed, 2 bad input (nothing ran), 130 interrupted (resumable).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, LoraRunError, RecipeError
from .files import printable


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

    for name, reg in sorted(_plugins(quiet=True).registry["command"].items()):
        if name == "run":
            continue  # a plugin cannot replace the built-in command
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


def load_recipe_for(args: argparse.Namespace, plugins: Any) -> Any:
    """The recipe of a command's RECIPE, --set and --unset arguments, with the registries' defaults; warns
    of broken plugins and registration conflicts (after the recipe loaded: a recipe error comes alone)."""
    from .recipe import load_recipe
    from .run import with_defaults

    loaded = with_defaults(load_recipe(args.recipe, args.sets, getattr(args, "unsets", ()), plugins), plugins)
    _warn_broken(plugins)
    for c in plugins.conflicts:
        print(f"warning: {c}", file=sys.stderr)
    return loaded


def cmd_run(args: argparse.Namespace) -> int:
    from .run import execute

    if args.gpus is not None:
        args.sets = [*args.sets, f"train.gpus={args.gpus}"]
    plugins = _plugins(quiet=True)
    loaded = load_recipe_for(args, plugins)
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
        _warn_broken(_LOADED[0])
    return _LOADED[0]


def _warn_broken(plugins: Any) -> None:
    for b in plugins.broken:
        print(f"warning: plugin {b.name} is broken and was skipped: {b.error}", file=sys.stderr)


def _plugin_command(args: argparse.Namespace) -> int:
    """A plugin's command. Read-only ones report broken plugins themselves (through ``load_recipe_for``, or
    as `lora-run plugins` lists them)."""
    reg = _plugins(quiet=True).registry["command"][args.command]
    return reg.factory(args, _plugins(quiet=reg.read_only))


def _tell_launcher(err: LoraRunError) -> None:
    """Under torchrun (also behind `accelerate launch`) a failing process writes its message to the error file
    the launcher names, so the launcher's failure summary shows lora-run's message for that rank."""
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
    commands = _plugins(quiet=True).registry["command"]
    known = {"run", *commands, "-h", "--help", "--version"}
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
    read_only = args.command in commands and commands[args.command].read_only
    if as_program and read_only and hasattr(signal, "SIGPIPE"):
        # `lora-run check … --json | head`: a reader that stops early ends us quietly, as it ends `cat`
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return cmd_run(args) if args.command == "run" else _plugin_command(args)
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
        kind = "out of memory" if isinstance(exc, MemoryError) else f"unexpected {type(exc).__name__}"
        print(f"error: {kind}: {printable(str(exc))[:2000]} (a bug in lora-run or a plugin; --debug shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
