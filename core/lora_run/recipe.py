"""Recipes: TOML in, frozen attrs classes out, through one strict cattrs converter.

Loading collects *every* problem before failing, each one naming its file and key path:
``recipe.toml: [train.steps] expected int, got float 3.9``. cattrs' lenient coercions (``3.9 → 3``,
``"false" → True``, ``42 → "42"``) are replaced by strict hooks.
"""
from __future__ import annotations

import difflib
import functools
import math
import operator
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple

import attrs
import cattrs
import cattrs.cols
import cattrs.gen
import tomli_w
from cattrs.errors import BaseValidationError, ForbiddenExtraKeysError, IterableValidationNote

from . import files
from .errors import RecipeError
from .schema import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

KeyPath = tuple[Any, ...]
Tables = tuple[tuple[KeyPath, Any], ...]   # (table, options class): `[backend.<name>]`s, tables marked ``keys``
MAX_EXTENDS_DEPTH = 8
#: How deeply a recipe may nest tables and arrays (`[a.a.a…]` nests without a parser's limit; readers recurse)
MAX_NESTING = 64


class RecipeValueError(ValueError):
    """Raised by the strict hooks; the message is shown to the user as is."""


def describe(value: Any) -> str:
    """`float 3.9`, `str 'false'`: the type and a short form of a value, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# --------------------------------------------------------------------------------------------- converter
def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, typing.List)


def _is_dict(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, typing.Dict)


def _strict(tp: type, accepted: tuple[type, ...], expected: str) -> Any:
    """A structure hook that takes values of exactly the ``accepted`` types (``bool`` is no ``int``, ``1.0`` is
    no ``int``, a number is no string) as ``tp``; anything else is a problem naming what was ``expected``."""
    def structure_scalar(value: Any, _: Any) -> Any:
        if type(value) in accepted:
            return tp(value)
        raise RecipeValueError(f"expected {expected}, got {describe(value)}")
    return structure_scalar


def make_converter() -> cattrs.Converter:
    """The one converter: forbids unknown keys, reports every problem, never coerces."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def literal(value: Any, tp: Any) -> Any:
        choices = typing.get_args(tp)
        if type(value) is str and value in choices:
            return value
        shown = ", ".join(f'"{c}"' for c in choices)
        hint = did_you_mean(value, [str(c) for c in choices], '"') if isinstance(value, str) else ""
        raise RecipeValueError(f"must be one of {shown}; got {describe(value)}{hint}")

    def guarded(accepted: type, what: str, make_hook: Any) -> Any:
        """A hook factory: cattrs' own hook (every failing item reported), for values of the ``accepted`` type only
        (cattrs would take a string as a list of characters)."""
        def factory(tp: Any) -> Any:
            inner = make_hook(tp, conv)

            def structure_container(value: Any, _: Any) -> Any:
                if not isinstance(value, accepted):
                    raise RecipeValueError(f"expected a {what}, got {describe(value)}")
                return inner(value, tp)
            return structure_container
        return factory

    for tp, accepted, expected in ((int, (int,), "int"), (float, (int, float), "float"),
                                   (bool, (bool,), "true or false"), (str, (str,), "string")):
        conv.register_structure_hook(tp, _strict(tp, accepted, expected))
    conv.register_structure_hook_func(lambda tp: typing.get_origin(tp) is Literal, literal)
    conv.register_structure_hook_factory(_is_list, guarded(list, "list", cattrs.cols.list_structure_factory))
    conv.register_structure_hook_factory(_is_dict, guarded(dict, "table", cattrs.cols.mapping_structure_factory))
    conv.register_structure_hook_factory(attrs.has, guarded(dict, "table", functools.partial(
        cattrs.gen.make_dict_structure_fn, _cattrs_forbid_extra_keys=True)))
    return conv


CONVERTER = make_converter()


# ------------------------------------------------------------------------------------------- problems
def as_written(path: KeyPath) -> KeyPath:
    """A key path as the recipe spells it: ``[backend.NAME]`` is ``backend.options[NAME]`` inside."""
    return ("backend", *path[2:]) if path[:2] == ("backend", "options") else path


def format_key(path: KeyPath) -> str:
    """("dataset", "regularization", 0, "path") -> "dataset.regularization[0].path"."""
    path, text = as_written(path), ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (str(part) if str(part).isprintable() else repr(part))  # no raw \n
    return text or "(top level)"


def did_you_mean(word: str, options: Iterable[str], quote: str = "'") -> str:
    """`` (did you mean 'learning_rate'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


class Problem(NamedTuple):
    """One problem: the key it is shown at, the message, and the key whose file (or --set) it is charged to when
    that is not ``path`` (an unknown key is shown at its table and charged to whoever wrote the key)."""

    path: KeyPath
    message: str
    written: KeyPath | None = None


def collect_errors(exc: BaseException, path: KeyPath = ()) -> list[Problem]:
    """Flatten a cattrs error tree into problems (their paths under ``path``)."""
    out: list[Problem] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        names = list(attrs.fields_dict(exc.cl))
        for key in sorted(exc.extra_fields):
            message = f"unknown key {key!r}{did_you_mean(key, names)}; allowed: {', '.join(names)}"
            out.append(Problem(path, message, (*path, key)))
    elif isinstance(exc, BaseValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            segment = note.index if isinstance(note, IterableValidationNote) else note.name
            out.extend(collect_errors(sub, (*path, segment)))
        for sub in without:
            out.extend(collect_errors(sub, path))
    elif isinstance(exc, KeyError):
        out.append(Problem(path, "is required"))
    elif isinstance(exc, RecipeValueError):
        out.append(Problem(path, str(exc)))
    else:
        out.append(Problem(path, f"invalid value ({type(exc).__name__}: {exc})"))
    return out


@attrs.define
class Problems:
    """Problems found while loading; every one names a file and a key."""

    default_file: str
    origins: dict[KeyPath, str] = attrs.field(factory=dict)
    items: list[str] = attrs.field(factory=list)

    def file_for(self, path: KeyPath) -> str:
        path = as_written(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                origin = self.origins[path[:n]]
                return f"{self.default_file} (--set)" if origin == "--set" else origin
            if n > 1 and path[:n - 1] in self.origins and not any(isinstance(p, int) for p in path[:n]):
                break   # a key no file wrote (missing, or a default): it belongs in the recipe that was run
        return self.default_file

    def add(self, path: KeyPath, message: str, written: KeyPath | None = None) -> None:
        """A problem shown at ``path``, named by the file (or --set) that wrote ``written`` (default: ``path``)."""
        message = files.printable(message)    # a value with a newline never splits a problem over two lines
        where = f"[{format_key(path)}] " if path else "top level: "
        line = f"{self.file_for(path if written is None else written)}: {where}{message}"
        if line not in self.items:
            self.items.append(line)

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError(self.items)


# -------------------------------------------------------------------------------------------- reading
def display_path(path: Path) -> str:
    try:
        return str(files.resolved(path).relative_to(files.resolved(Path.cwd())))
    except ValueError:
        return str(path)


def read_toml(path: Path, shown: str | None = None) -> dict[str, Any]:
    shown = files.shown(shown or display_path(path))
    try:
        data = files.read_limited(path, "recipe", files.RECIPE_LIMIT)
    except files.FileProblem as exc:
        what = "recipe file not found" if str(exc).startswith("not found") else f"the recipe file {exc}"
        raise RecipeError(f"{shown}: {what}") from None
    try:
        # utf-8-sig: a byte-order mark, which Windows editors write, is dropped; anything else is the same UTF-8
        parsed = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise RecipeError(f"{shown}: the recipe is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{shown}: not valid TOML: {files.printable(str(exc))}") from None
    except RecursionError:
        raise RecipeError(f"{shown}: not valid TOML: nested too deeply") from None
    if (deepest := too_deep(parsed)) is not None:
        raise RecipeError(f"{shown}: [{format_key(deepest)}] nests more than {MAX_NESTING} levels deep; no key does")
    return parsed


def too_deep(value: Any, limit: int = MAX_NESTING) -> KeyPath | None:
    """The key path (cut at ``limit`` levels) where ``value`` nests tables or arrays deeper, or None (iteratively)."""
    stack: list[tuple[Any, KeyPath]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        children = list(node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ())
        if children and len(path) >= limit:
            return path
        stack.extend((v, (*path, k)) for k, v in children)
    return None


@functools.lru_cache(maxsize=None)
def _schema_keys(recipe_class: type, tables: Tables = ()) -> dict[KeyPath, Any]:
    """Each key of the schema (``*`` stands for a list index) with its (field, type): the recipe's, and those of the
    option ``tables``' classes in their tables."""
    found: dict[KeyPath, Any] = {}

    def walk(cls: type, prefix: KeyPath) -> None:
        hints = typing.get_type_hints(cls)
        for f in attrs.fields(cls):
            tp, key = hints[f.name], (*prefix, f.name)
            found[key] = (f, tp)
            inner = [a for a in typing.get_args(tp) if attrs.has(a)]
            if attrs.has(tp) or inner:
                walk(tp if attrs.has(tp) else inner[0], (*key, "*") if _is_list(tp) else key)
    walk(recipe_class, ())
    for prefix, options in tables:
        if attrs.has(options):
            walk(options, prefix)
    return found


def resolve_paths(raw: dict[str, Any], base: Path, recipe_class: type, tables: Tables = ()) -> None:
    """Make the path-valued keys of one file absolute against that file's folder (in place)."""

    def visit(node: Any, keys: KeyPath, which: Any) -> None:
        child = node.get(keys[0]) if isinstance(node, dict) else None
        if len(keys) > 1:                     # deeper: into a table, or into each item of a list (``*``)
            star = keys[1] == "*"
            for item in (child if isinstance(child, list) else []) if star else [child]:
                visit(item, keys[2:] if star else keys[1:], which)
        elif isinstance(child, str) and child and (which != "local" or _names_local(child, base)):
            node[keys[0]] = _absolute(child, base)
        elif isinstance(child, dict) and which != "local":  # a table of paths: every value, or the keys ``path`` names
            child.update({key: _absolute(value, base) for key, value in child.items()
                          if isinstance(value, str) and value and (which is True or key in which)})

    for keys, (field, _) in _schema_keys(recipe_class, tables).items():
        if field.metadata.get("path"):
            visit(raw, keys, field.metadata["path"])


def _names_local(value: str, base: Path) -> bool:
    """A ``path="local"`` value is a path (not a hub id) when it says so or names what exists."""
    return value.startswith((".", "/", "~")) or os.path.exists(base / value)   # False for over-long or NUL names


def _absolute(value: str, base: Path) -> str:
    if "\x00" in value:  # not a usable path: left as written, the checks of that key report it
        return value
    if "{" in value and "}" in value and not value.startswith(("/", "~", ".")):
        # templated output dirs (runs/{name}) stay relative to the recipe's folder too
        return str((base / value))
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else files.resolved(base / p))


def _merge(base: dict[str, Any], over: dict[str, Any], origins: dict[KeyPath, str], shown: str,
           prefix: KeyPath = ()) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, shown, (*prefix, key))
        else:
            out[key] = value
            _record(origins, (*prefix, key), value, shown)
    return out


def _record(origins: dict[KeyPath, str], path: KeyPath, value: Any, shown: str) -> None:
    origins[path] = shown
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, (*path, k), v, shown)


def load_raw(path: Path, origins: dict[KeyPath, str], recipe_class: type = Recipe, chain: tuple[Path, ...] = (),
             tables: Tables = ()) -> dict[str, Any]:
    """Read a recipe and everything it `extends`, merged (later files win), paths made absolute."""
    path = Path(os.path.expanduser(str(path)))
    real = files.resolved(path)
    shown = display_path(path)
    if real in chain:
        loop = " -> ".join(display_path(p) for p in (*chain, real))
        raise RecipeError(f"{shown}: [extends] forms a loop: {loop}")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"{shown}: [extends] nests deeper than {MAX_EXTENDS_DEPTH} files")
    raw = read_toml(path, shown)
    resolve_paths(raw, real.parent, recipe_class, tables)
    parent = raw.pop("extends", None)
    if parent is None:
        return _merge({}, raw, origins, shown)      # every key is this file's
    if not isinstance(parent, str) or not parent:
        raise RecipeError(f"{shown}: [extends] expected a path string, got {describe(parent)}")
    parent_path = real.parent / os.path.expanduser(parent)     # an absolute path replaces the folder
    try:
        files.check_input_file(parent_path, "recipe", files.RECIPE_LIMIT)
    except files.FileProblem as exc:
        what = "file not found" if str(exc).startswith("not found") else f"file {exc}"
        raise RecipeError(f"{shown}: [extends] {what}: {files.shown(parent)}") from None
    try:
        parent_raw = load_raw(parent_path, origins, recipe_class, (*chain, real), tables)
    except RecipeError as exc:   # a parent that cannot be read or parsed: named through this file's key
        raise RecipeError([line if "[extends]" in line else f"{shown}: [extends] {line}"
                           for line in exc.problems]) from None
    return _merge(parent_raw, raw, origins, shown)


def parse_set(assignment: str) -> tuple[KeyPath, Any]:
    """`train.steps=100` -> (("train", "steps"), 100): a TOML value (bare words: strings) for one key, not two."""
    key, equals, text = assignment.partition("=")
    path, shown = tuple(key.strip().split(".")), f"--set {files.printable(assignment)}"
    if not (equals and all(path)):
        raise RecipeError(f"{shown}: expected KEY=VALUE, e.g. --set train.steps=100")
    try:
        parsed = tomllib.loads(f"v = {text}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return path, text
    if set(parsed) != {"v"}:
        raise RecipeError(f"{shown}: the value holds more than one TOML value (a line break and another key?)")
    if len(path) > MAX_NESTING or too_deep(parsed["v"], MAX_NESTING - len(path)) is not None:
        raise RecipeError(f"{shown}: the key and its value nest more than {MAX_NESTING} levels deep; no key does")
    return path, parsed["v"]


def unknown_key(path: KeyPath, recipe_class: type = Recipe, tables: Tables = (), present: Any = None) -> str | None:
    """Why ``path`` (as a recipe writes it) is no key a recipe may hold, naming the closest and those beside it; None
    for a key of the schema or of the option ``tables``, or any key inside a table the schema leaves free (a table
    not marked ``keys``: the plugin that reads it decides), unless ``present`` (what that table holds) has a key so
    close to it that it is surely a misspelling of that key."""
    known = {as_written(k): v for k, v in _schema_keys(recipe_class, tables).items() if k != ("backend", "options")}
    known.update(dict.fromkeys(prefix for prefix, _ in tables))
    for n in range(1, len(path) + 1):
        if path[:n] not in known:
            names = sorted({k[-1] for k in known if len(k) == n and k[:-1] == path[:n - 1]} - {"*"})
            where = f"[{format_key(path[:n - 1])}]" if n > 1 else "a recipe"
            return f"is not a recipe key{did_you_mean(str(path[n - 1]), names)}" + (
                f"; {where} holds: {', '.join(names)}" if names else "")
        if known[path[:n]] and _is_dict(known[path[:n]][1]) and not known[path[:n]][0].metadata.get("keys"):
            close = did_you_mean(str(path[-1]), map(str, present)) if n == len(path) - 1 and present else ""
            return f"is not set{close}: nothing to remove" if close else None
    return None


def apply_unsets(raw: dict[str, Any], keys: Iterable[str], origins: dict[KeyPath, str],
                 recipe_class: type = Recipe, tables: Tables = ()) -> dict[str, Any]:
    """`--unset sample.every_steps`: remove the key (a value or a whole table) so its default applies."""
    for key in keys:
        key = key.strip()
        path = tuple(key.split("."))
        if not all(path) or "=" in key:
            raise RecipeError(f"--unset {files.printable(key)}: expected a dotted key such as sample.every_steps")
        node: Any = raw
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None    # `backend = "name"` holds no keys
        if not isinstance(node, dict) or path[-1] not in node:  # not set: nothing to do, if it is a key at all
            if (problem := unknown_key(path, recipe_class, tables, node if isinstance(node, dict) else None)):
                raise RecipeError(f"--unset {files.printable(key)}: [{files.printable(key)}] {problem}")
            continue
        del node[path[-1]]
        for known in [k for k in origins if k[:len(path)] == path]:
            origins.pop(known)
    return raw


def apply_sets(raw: dict[str, Any], sets: Iterable[str], origins: dict[KeyPath, str],
               recipe_class: type | None = None, tables: Tables = ()) -> dict[str, Any]:
    """Apply `--set KEY=VALUE`s in order (a later one wins: a script's overrides after its base values); values at
    the keys the schema marks ``path`` (``recipe_class``'s, and in the option ``tables``) are made absolute
    against the working folder."""
    for assignment in sets:
        path, value = parse_set(assignment)
        if recipe_class is not None:    # the value alone at its key, made absolute as a file's would be
            holder = functools.reduce(lambda node, key: {key: node}, reversed(path), value)
            resolve_paths(holder, Path.cwd(), recipe_class, tables)
            value = functools.reduce(lambda node, key: node[key], path, holder)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part == "backend":
                child = node[part] = {"name": child}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {files.printable(assignment)}: [{format_key(path[:-1])}] is not a table")
            node = child
        node[path[-1]] = value
        _record(origins, path, value, "--set")
    return raw


# ------------------------------------------------------------------------------------------ structuring
def _pack_backend(raw: dict[str, Any], problems: Problems) -> dict[str, Any]:
    """`backend = "name"` or `[backend] name=…` + `[backend.<name>]` tables -> BackendSection layout."""
    raw, section = dict(raw), raw.get("backend")
    if isinstance(section, str):
        raw["backend"] = {"name": section, "options": {}}
    elif isinstance(section, dict):
        packed: dict[str, Any] = {"options": {}}
        for key, value in section.items():
            if key == "name":
                packed["name"] = value
            elif isinstance(value, dict):
                packed["options"][key] = value
            else:
                problems.add(("backend", key), f"unknown key{did_you_mean(key, ['name'])}; [backend] holds `name` and "
                             "one `[backend.<name>]` table per backend")
        raw["backend"] = packed
    elif section is not None:
        problems.add(("backend",), f"expected a backend name or a table, got {describe(section)}")
        raw.pop("backend")
    return raw


def _limit_problem(meta: Any, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):     # TOML has nan and inf; no recipe number means either (nan passes every bound)
        return f"must be a finite number, got {value}"
    for key, word, holds in (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le),
                             ("lt", "<", operator.lt)):
        if meta.get(key) is not None and not holds(value, meta[key]):
            return f"must be {word} {meta[key]}, got {value}"
    return None


def check_limits(raw: Any, cls: type, path: KeyPath, problems: Problems) -> None:
    """Range limits on the raw data, so they are reported even when structuring failed elsewhere."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    for f in attrs.fields(cls):
        if f.name not in raw:
            continue
        value, here, tp = raw[f.name], (*path, f.name), hints[f.name]
        if message := _limit_problem(f.metadata, value):
            problems.add(here, message)
        if isinstance(value, str) and len(value) > 4096:
            problems.add(here, f"is {len(value)} characters long; the limit is 4096")
        if attrs.has(tp):
            check_limits(value, tp, here, problems)
        elif _is_list(tp) and isinstance(value, list):
            inner = typing.get_args(tp)[0]
            for i, item in enumerate(value):
                if attrs.has(inner):
                    check_limits(item, inner, (*here, i), problems)
                elif message := _limit_problem(f.metadata, item):
                    problems.add((*here, i), message)


def structure_table(raw: Any, cls: type, problems: Problems, path: KeyPath = ()) -> Any:
    """``raw`` (the table at ``path``) as ``cls`` through the converter, or None when that fails; every problem, the
    limits' too, is added to ``problems``."""
    check_limits(raw, cls, path, problems)
    try:
        return CONVERTER.structure(raw, cls)
    except Exception as exc:  # noqa: BLE001 - every problem is reported
        for problem in collect_errors(exc, path):
            problems.add(*problem)
        return None


def structure(raw: dict[str, Any], problems: Problems, recipe_class: type = Recipe) -> Recipe | None:
    """Types, unknown keys and limits; the rules among keys are the plugins' (``check_recipe``, in ``validate``)."""
    return structure_table(_pack_backend(raw, problems), recipe_class, problems)


@attrs.frozen
class LoadedRecipe:
    """A validated recipe with the file it came from."""

    recipe: Recipe
    path: Path
    shown: str
    origins: dict[KeyPath, str] = attrs.field(eq=False, repr=False)
    sets: tuple[str, ...] = ()          # the `--set` overrides applied, in order (a relaunch repeats them)
    unsets: tuple[str, ...] = ()        # the `--unset` keys, applied before the sets

    def problems(self) -> Problems:
        return Problems(self.shown, dict(self.origins))

    def overrides(self) -> list[str]:
        """The command-line arguments that repeat this recipe's `--unset` and `--set` values."""
        return [*(a for key in self.unsets for a in ("--unset", key)), *(a for s in self.sets for a in ("--set", s))]


def resume_command(loaded: LoadedRecipe | None, run_dir: Path | str) -> str:
    """The shell line that resumes a run in ``run_dir``: the same recipe, `--unset` and `--set` values, quoted so
    it pastes as is (a folder with a space, a TOML string)."""
    recipe = [loaded.shown, *loaded.overrides()] if loaded is not None else ["recipe.toml"]
    return shlex.join(["lora-run", *recipe, "--resume", "--output-dir", str(run_dir)])


def load_recipe(path: str | Path, sets: Iterable[str] = (), unsets: Iterable[str] = (),
                plugins: Any = None) -> LoadedRecipe:
    """Read, merge (`extends`), remove (`--unset`), override (`--set`), structure and check a recipe, with the
    sections ``plugins`` register (default: the installed plugins'). Raises RecipeError."""
    if plugins is None:
        from .plugins import load_plugins

        plugins = load_plugins()
    path, recipe_class, origins = Path(path), plugins.recipe_class, {}
    tables = (*((("backend", name), reg.options) for name, reg in plugins.registry["backend"].items()), *(
        (key, reg.options) for key, (f, _) in _schema_keys(recipe_class).items() if f.metadata.get("keys")
        for reg in plugins.registry.get(f.metadata["keys"], {}).values()))
    raw = apply_unsets(load_raw(path, origins, recipe_class, (), tables), unsets, origins, recipe_class, tables)
    raw = apply_sets(raw, sets, origins, recipe_class, tables)
    problems = Problems(display_path(path), origins)
    recipe = structure(raw, problems, recipe_class)
    if plugins.broken and set(raw) - set(attrs.fields_dict(recipe_class)):   # perhaps the table of a plugin that failed
        problems.add((), "the tables of plugins that failed to load are unknown: " + "; ".join(
            f"{b.name} ({b.error})" for b in plugins.broken))
    problems.raise_if_any()
    assert recipe is not None
    out = recipe.output.dir       # the default is relative to where we run; an unusable dir stays for its check
    if out.strip() and "\x00" not in out and not os.path.isabs(os.path.expanduser(out)):
        recipe = replace(recipe, output={"dir": str(Path.cwd() / recipe.output.dir)})
    return LoadedRecipe(recipe, path, display_path(path), origins, tuple(sets), tuple(unsets))


# ---------------------------------------------------------------------------------------------- writing
def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain TOML-able data (None values left out, backend tables unpacked)."""
    data = _drop_none(CONVERTER.unstructure(recipe))
    data.pop("extends", None)
    backend = data.pop("backend")
    data["backend"] = {"name": backend["name"], **backend.get("options", {})}
    return data


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """The resolved recipe as TOML (tomli-w); loading it gives an equal Recipe."""
    body = tomli_w.dumps(to_dict(recipe))
    if header:
        body = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + body
    return body


def replace(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy with some section fields changed: replace(r, train={"steps": 5})."""
    changes = {name: attrs.evolve(getattr(recipe, name), **fields) for name, fields in sections.items()}
    return attrs.evolve(recipe, **changes)
