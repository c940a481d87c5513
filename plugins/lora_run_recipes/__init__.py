"""Built-in plugin `recipes`: the shipped recipes and the `lora-run recipes [NAME]` command.

The shipped recipes are the top-level ``recipes/`` folder of a source checkout; a wheel carries the same files
as the data package ``lora_run.recipes`` (pyproject.toml maps one to the other). ``lora-run recipes`` lists
them with their header line; ``lora-run recipes NAME`` prints one, ready to save and edit. The command is
added through ``register_commands``, like any plugin's.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from lora_run.cli import warn_broken
from lora_run.errors import EXIT_OK, RecipeError
from lora_run.hookspecs import hookimpl


def shipped_folders(name: str) -> list[Path]:
    """Where a top-level folder of the source checkout that the wheel carries as the data package
    ``lora_run.<name>`` is (pyproject.toml maps one to the other): the checkout's folder first (editable installs,
    PYTHONPATH=core), then the wheel's copy; only those that exist."""
    import lora_run

    package = Path(lora_run.__file__).resolve().parent
    folders = [package / name]
    if is_checkout(package):
        folders.insert(0, package.parents[1] / name)
    return [f for f in folders if f.is_dir()]


def is_checkout(package: Path) -> bool:
    """Whether the ``lora_run`` package folder is lora-run's own source checkout's ``core/lora_run``. Not merely
    "a pyproject.toml two levels up": `pip install --target vendor` inside a user's project puts the package at
    ``project/vendor/lora_run``, and that project's own docs/ and recipes/ were listed, and printed, as lora-run's."""
    pyproject = package.parents[1] / "pyproject.toml"
    if package.parent.name != "core" or not pyproject.is_file():
        return False
    try:
        text = pyproject.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return re.search(r'(?m)^name\s*=\s*"lora-run"\s*$', text) is not None


def recipe_roots() -> list[Path]:
    """Shipped recipes: the source checkout's recipes/ and the copy a wheel carries as ``lora_run.recipes``."""
    return shipped_folders("recipes")


def shipped_recipes() -> list[Path]:
    seen: dict[str, Path] = {}
    for root in recipe_roots():
        for path in sorted(root.rglob("*.toml")):
            seen.setdefault(path.relative_to(root).as_posix(), path)
    return [seen[k] for k in sorted(seen)]


def shipped_name(path: Path) -> str:
    """`folder/name` for <root>/folder/name.toml."""
    root = next(r for r in recipe_roots() if path.is_relative_to(r))
    return path.relative_to(root).with_suffix("").as_posix()


def copy_hint(recipe: str | Path) -> str | None:
    """For a recipe path that is no file here but names a shipped recipe as a checkout has it
    (`recipes/flux/identity-fast.toml`, run from outside the checkout or in a wheel install), how every install gets
    that recipe: `lora-run recipes NAME > my.toml`. None for anything else."""
    text = Path(recipe).as_posix()
    if Path(recipe).expanduser().exists() or not text.endswith(".toml"):
        return None
    wanted = text.removesuffix(".toml").rpartition("recipes/")[2]
    if not wanted or wanted not in {shipped_name(p) for p in shipped_recipes()}:
        return None
    return (f"{wanted} is a shipped recipe: copy it with `lora-run recipes {wanted} > my.toml` (any install, any "
            "folder), then use my.toml")


def header_line(path: Path) -> str:
    for line in path.read_text("utf-8").splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text:
            return text
    return ""


def copyable_text(path: Path) -> str:
    """A shipped recipe's text, ready to be saved anywhere: a relative `extends` points at the shipped file."""
    def absolute(match: re.Match[str]) -> str:
        parent = Path(match.group(2))
        if parent.is_absolute():
            return match.group(0)
        return f'{match.group(1)}{json.dumps(str((path.parent / parent).resolve()))}'

    return re.sub(r'^(extends\s*=\s*)"([^"\n]+)"', absolute, path.read_text("utf-8"), flags=re.M)


def cmd_recipes(args: Any, plugins: Any) -> int:
    warn_broken(plugins)         # a read-only command warns of broken plugins itself
    recipes = shipped_recipes()
    if not recipes:
        raise RecipeError("no shipped recipes found: this lora-run installation is missing its recipes "
                          "(reinstall it; a wheel carries them as lora_run/recipes)")
    if args.name is not None:    # `lora-run recipes "$NAME" > my.toml` with NAME unset must not save the listing
        wanted = args.name.removesuffix(".toml").removeprefix("recipes/")
        for path in recipes:
            if shipped_name(path) == wanted:
                sys.stdout.write(copyable_text(path))
                return EXIT_OK
        from lora_run.files import printable
        from lora_run.recipe import did_you_mean

        names = [shipped_name(p) for p in recipes]
        raise RecipeError(f"no shipped recipe \"{printable(args.name)}\"{did_you_mean(wanted, names, chr(34))}; shipped: "
                          f"{', '.join(names)}")
    for path in recipes:
        print(f"{shipped_name(path):<28} {header_line(path)}")
        print(f"{'':<28} {path}")
    print("\nCopy one to start your own: lora-run recipes NAME > my.toml")
    return EXIT_OK


def _arguments(p: Any) -> None:
    p.add_argument("name", nargs="?", help="a shipped recipe by its name in the list: print its text "
                   "(lora-run recipes NAME > my.toml)")


@hookimpl
def register_commands(register):
    # read-only: `lora-run recipes NAME > my.toml` on a full disk fails (exit 1), never leaves a cut copy with exit 0
    register("recipes", cmd_recipes, configure=_arguments, read_only=True,
             description="list shipped recipes, or print one (to copy it)")
