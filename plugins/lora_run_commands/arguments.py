"""The command line's conventions for every command that reads a recipe or names a path: the built-in commands use
them, and so may a plugin's (`docs/hooks/register_commands.md`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


#: The longest name of one file or folder (one part of a path), in bytes, and the longest path, that Linux's file
#: systems take (NAME_MAX, PATH_MAX): a longer one can be neither read nor made.
NAME_MAX = 255
PATH_MAX = 4096


def path_argument(value: str) -> str:
    """The type of every path argument: a blank one ("$UNSET") is refused, never the working folder (`Path("")`), and
    `-`: no file is read from standard input or written to standard output (a run records its recipe file). So is a
    path no file system takes (a name over :data:`NAME_MAX` bytes, a path over :data:`PATH_MAX`), which made Python's
    own checks (``Path.exists``, ``is_dir``) raise "File name too long" where the commands ask whether it exists."""
    if value == "-":
        raise argparse.ArgumentTypeError("reading standard input or writing standard output is not supported; "
                                         "name a file (a recipe: save it to a file first)")
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file or folder (an unset variable gives one)")
    longest = max((len(os.fsencode(part)) for part in value.split(os.sep)), default=0)
    if longest > NAME_MAX:
        raise argparse.ArgumentTypeError(f"a name in the path is {longest} bytes long, over the {NAME_MAX} bytes a file "
                                         "or folder name may have")
    if len(os.fsencode(os.path.abspath(value))) >= PATH_MAX:
        raise argparse.ArgumentTypeError(f"the path is over the {PATH_MAX} bytes a path may have")
    return value


_EXTENDS = ("[extends] cannot be {} on the command line: the recipe's files are merged before --set and --unset "
            "apply, so it would change nothing; {} the recipe file")


def set_argument(value: str) -> str:
    """The type of --set: `extends` is refused (it would be ignored), and so is what the recipe's own reader of a --set
    refuses (`lora_run.recipe.parse_set`: no `=`, an empty key, a value holding a second TOML key)."""
    from lora_run.errors import RecipeError
    from lora_run.recipe import parse_set

    if value.partition("=")[0].strip() == "extends":
        raise argparse.ArgumentTypeError(_EXTENDS.format("set", "write it in"))
    try:
        parse_set(value)
    except RecipeError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--set ")) from None
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
    from lora_run.errors import RecipeError
    from lora_run.recipe import load_recipe
    from lora_run.run import with_defaults
    from lora_run_recipes import copy_hint

    try:
        loaded = with_defaults(load_recipe(args.recipe, args.sets, getattr(args, "unsets", ()), plugins), plugins)
    except RecipeError as exc:
        hint = copy_hint(args.recipe)        # `lora-run recipes/flux/identity-fast.toml` outside a checkout
        if hint is None:
            raise
        raise RecipeError(f"{exc}; {hint}") from None
    warn_broken(plugins)
    for c in plugins.conflicts:
        print(f"warning: {c}", file=sys.stderr)
    return loaded
