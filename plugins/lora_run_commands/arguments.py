"""The command line's conventions for every command that reads a recipe or names a path: the built-in commands use
them, and so may a plugin's (`docs/hooks/register_commands.md`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def path_argument(value: str) -> str:
    """The type of every path argument: a blank one ("$UNSET") is refused, never the working folder (`Path("")`), and
    `-`: no file is read from standard input or written to standard output (a run records its recipe file)."""
    if value == "-":
        raise argparse.ArgumentTypeError("reading standard input or writing standard output is not supported; "
                                         "name a file (a recipe: save it to a file first)")
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file or folder (an unset variable gives one)")
    return value


_EXTENDS = ("[extends] cannot be {} on the command line: the recipe's files are merged before --set and --unset "
            "apply, so it would change nothing; {} the recipe file")


def set_argument(value: str) -> str:
    """The type of --set: one value for one key. `extends` is refused (it would be ignored), and so is a value holding
    a second TOML key (`train.steps=5⏎train.seed=3` kept 5 and dropped the rest unseen)."""
    from lora_run.files import printable
    from lora_run.recipe import tomllib

    key, _, text = value.partition("=")
    if key.strip() == "extends":
        raise argparse.ArgumentTypeError(_EXTENDS.format("set", "write it in"))
    try:
        others = set(tomllib.loads(f"v = {text}")) - {"v"}
    except (tomllib.TOMLDecodeError, RecursionError):   # not TOML: the value is that text
        others = set()
    if others:
        raise argparse.ArgumentTypeError(f"{printable(value)}: the value holds more than one TOML value (a line break "
                                         "and another key?); give one --set per key")
    return value


def unset_argument(value: str) -> str:
    """The type of --unset: `extends` is refused (it would be ignored)."""
    if value.strip() == "extends":
        raise argparse.ArgumentTypeError(_EXTENDS.format("removed", "remove it from"))
    return value


def recipe_arguments(p: argparse.ArgumentParser) -> None:
    """RECIPE, --set and --unset: for plugin commands that read a recipe as the built-in ones do."""
    p.add_argument("recipe", metavar="RECIPE", type=path_argument, help="recipe TOML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", type=set_argument,
                   help="override a recipe key (TOML value), e.g. --set train.steps=100; repeatable")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY", type=unset_argument,
                   help="remove a key so its default applies (before the --set values), e.g. --unset "
                   "sample.every_steps; repeatable")


def load_recipe_for(args: argparse.Namespace, plugins: Any) -> Any:
    """The recipe of a command's RECIPE, --set and --unset arguments, with the registries' defaults; warns
    of broken plugins and registration conflicts (after the recipe loaded: a recipe error comes alone)."""
    from lora_run.cli import warn_broken
    from lora_run.recipe import load_recipe
    from lora_run.run import with_defaults

    loaded = with_defaults(load_recipe(args.recipe, args.sets, getattr(args, "unsets", ()), plugins), plugins)
    warn_broken(plugins)
    for c in plugins.conflicts:
        print(f"warning: {c}", file=sys.stderr)
    return loaded
