"""Where a run folder may not go, whatever its state: `lora-run check`, `plan` and every run ask the same."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lora_run.errors import OutputError
from lora_run.files import resolved, shown
from lora_run.recipe import LoadedRecipe
from lora_run.schema import Recipe

from .cachedir import cache_problems, describe
from .folder import RECIPE


#: A recipe value used as a file name must fit in one (with the suffixes lora-run adds) and stay in its folder.
MAX_NAME_BYTES = 160


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name (no folder part, no `..`, no control characters), or None."""
    if not name or not name.strip():
        return "must be a plain file name, got an empty one"
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        return f"must be a plain file name without a folder part, got {name!r}"
    if not name.isprintable():
        return f"must be a plain file name without control characters, got {name!r}"
    if name.startswith("."):
        return f"must not start with a dot (a hidden file), got {name!r}"
    if name != name.strip():
        return f"must not start or end with spaces, got {name!r}"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is {len(name.encode('utf-8'))} bytes long; a file name may have at most {MAX_NAME_BYTES}"
    return None


def output_key_problems(recipe: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """The rules of `[output]`'s keys (``check_recipe``): a plain file name, a folder path, at least one format."""
    o, out = recipe.output, []
    name_problem = file_name_problem(o.name)
    if name_problem:
        out.append((("output", "name"), name_problem))
    if "\x00" in o.dir or not o.dir.strip():
        out.append((("output", "dir"), f"must be a folder path, got {o.dir!r}"))
    if o.formats is not None and not o.formats:
        out.append((("output", "formats"), "must name at least one format"))
    return out


#: The one refusal of a blank ``--output-dir``, whoever is asked: `run`, `check`/`plan` (``output_problems``),
#: ``output_path``, `eval` and `demo`.
EMPTY_OUTPUT_DIR = ("--output-dir: an empty path (an unset variable gives one); name the folder, or leave --output-dir "
                    "out for the command's default")


def empty_output_dir_problem(output_dir: str | None) -> str | None:
    """``EMPTY_OUTPUT_DIR`` for a blank ``--output-dir`` (``--output-dir "$UNSET"``), None for a given or absent one.
    Never taken as absent: `run --overwrite` would replace the recipe's own run folder, `eval` and `demo` would write
    where their default goes, and ``Path("")`` is the working folder. The command line refuses it first
    (``lora_run_commands.arguments.path_argument``); this holds for every caller from Python too."""
    if output_dir is not None and not output_dir.strip():
        return EMPTY_OUTPUT_DIR
    return None


def refuse_empty_output_dir(output_dir: str | None) -> None:
    """Raise ``OutputError`` (exit 2) with ``EMPTY_OUTPUT_DIR`` for a blank ``--output-dir``."""
    problem = empty_output_dir_problem(output_dir)
    if problem is not None:
        raise OutputError(problem)


def folder_problem(path: Path | str) -> str | None:
    """Why ``path`` can neither be used nor be created as a folder, or None: it is a file, a dangling link or a
    link loop, or the way to it runs through something that is not a folder (so `mkdir` would fail later)."""
    if os.path.lexists(path) and not os.path.exists(path):
        return "is a dangling link or a symlink loop"
    if os.path.exists(path):
        return None if os.path.isdir(path) else "exists and is not a folder"
    for parent in Path(path).parents:
        if os.path.lexists(parent):
            if os.path.isdir(parent):
                return None
            return f"cannot be created: {shown(parent)} is not a folder (a file, a dangling link or a symlink loop)"
    return None


def output_path(recipe: Recipe, override: str | None) -> Path:
    """The run folder: ``--output-dir`` when given, else ``[output] dir`` with ``{name}`` replaced by ``[output] name``.
    A blank ``--output-dir`` (``--output-dir "$UNSET"``) is an error: taken as absent, ``--overwrite`` would
    replace the recipe's own run folder."""
    refuse_empty_output_dir(override)
    if override:
        return resolved(os.path.expanduser(override))
    return resolved(recipe.output.dir.replace("{name}", recipe.output.name))


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
            found.append((key, resolved(value)))
        except (OSError, ValueError):
            continue
    return found


def output_problems(recipe: Recipe, override: str | None = None, overwrite: bool = False,
                    recipe_file: Path | None = None) -> list[str]:
    """Why the run folder cannot be used whatever its state: it is a file, a folder above the working folder
    (or, with --overwrite, the working folder itself), or it holds the run's dataset or model (`--overwrite`
    would delete them). Each message names the key (or --output-dir)."""
    empty = empty_output_dir_problem(override)
    if empty is not None:
        return [empty]
    where = f"--output-dir {shown(override)}" if override else f"{{file}}: [output.dir] (= {shown(recipe.output.dir)})"
    try:
        path = output_path(recipe, override)
    except (OSError, ValueError) as exc:
        return [f"{where}: not a usable folder path ({exc})"]
    problems = []
    try:
        unusable = folder_problem(path)
    except OSError as exc:     # e.g. a name too long for the file system
        return [f"{where}: not a usable folder path ({exc.strerror or exc})"]
    if unusable:
        problems.append(f"{where}: {shown(path)} {unusable}")
    cwd = Path.cwd().resolve()
    if path in cwd.parents:
        problems.append(f"{where}: the run folder {shown(path)} contains the working folder; a run needs a folder "
                        "of its own")
    elif path == cwd and overwrite:
        problems.append(f"{where}: --overwrite would replace the working folder {shown(path)}; run from outside it")
    if recipe_file is not None:
        try:
            own = resolved(recipe_file)
        except OSError:
            own = None
        if own is not None and path in own.parents and own != path / RECIPE:   # our own copy may be re-run
            problems.append(f"{where}: the run folder {shown(path)} contains the recipe file {shown(own)}; keep "
                            "recipes outside run folders (--overwrite would delete it)")
    cache = recipe.train.cache_dir
    if cache:
        try:
            unusable = folder_problem(resolved(cache))
        except (OSError, ValueError) as exc:
            unusable = f"is not a usable folder path ({getattr(exc, 'strerror', None) or exc})"
        if unusable:   # the run would load the model, then crash writing its first cache entry
            problems.append(f"{{cache_file}}: [train.cache_dir] (= {shown(cache)}): {unusable}")
        with contextlib.suppress(OSError, ValueError):
            problems.extend(_in_dataset(recipe, resolved(cache), f"{{cache_file}}: [train.cache_dir] (= {shown(cache)})",
                                        "cache folder"))
        if not unusable:   # lora-run writes and replaces files there: only in a folder that is provably its cache
            try:
                foreign = cache_problems(resolved(cache))
            except OSError as exc:
                foreign = []
                problems.append(f"{{cache_file}}: [train.cache_dir] (= {shown(cache)}): cannot be read "
                                f"({exc.strerror or exc})")
            if foreign:
                problems.append(f"{{cache_file}}: [train.cache_dir] (= {shown(cache)}): {describe(foreign)}")
            else:      # a new or empty cache folder that is, or holds, the run folder: each would hold the other's
                with contextlib.suppress(OSError, ValueError):
                    cache_path = resolved(cache)
                    if cache_path == path or cache_path in path.parents:
                        how = "is" if cache_path == path else "contains"
                        problems.append(f"{{cache_file}}: [train.cache_dir] (= {shown(cache)}) {how} the run folder "
                                        f"{shown(path)}; a cache folder is shared by runs and holds lora-run's cache "
                                        "alone: give one outside the run folder (or leave [train] cache_dir out: the "
                                        "run folder's own cache/)")
    problems.extend(input_problems(recipe, path, where, "run folder"))
    return problems


def input_problems(recipe: Recipe, path: Path, where: str, what: str) -> list[str]:
    """Why ``path`` (an output folder, ``what``, named ``where``) cannot hold a run's output: it lies in a dataset
    folder or a local model folder, or contains (or is) one of the recipe's local inputs (the dataset, a regularisation
    set, a local model), so replacing it would delete them. A run folder and `lora-run eval`'s folder ask the same."""
    problems = _in_dataset(recipe, path, where, what)
    for key, value in _inputs(recipe):
        if value == path or path in value.parents:
            problems.append(f"{where}: the {what} {shown(path)} contains [{key}] ({shown(value)}); a {what} "
                            "must not hold the run's inputs (--overwrite would delete them)")
    return problems


#: The inputs whose folders lora-run never writes into, by the start of their key: the dataset's folders and a local
#: model folder (`[model] source`; every file under it is recorded as the model's, and `--overwrite` works beside
#: them). A `[model.files]` file's folder is not the model's (it may be the working folder, where `runs/` goes).
INPUT_FOLDERS = {"dataset.": "dataset", "model.source": "model"}


def _in_dataset(recipe: Recipe, where: Path, named: str, what: str) -> list[str]:
    """A problem for each dataset folder or local model folder (``INPUT_FOLDERS``) that ``where`` (the run, evaluation
    or cache folder, ``named`` by its key) lies in, or for the cache is: lora-run would write into the user's dataset
    or model (a run folder that is one is refused as holding an input)."""
    return [f"{named}: lies in the {kind} folder [{key}] ({shown(value)}); lora-run never writes into a {kind} "
            f"folder, give a {what} outside it"
            for key, value in _inputs(recipe) for start, kind in INPUT_FOLDERS.items()
            if key.startswith(start) and (value in where.parents or value == where and what == "cache folder")]


def raise_output_problems(loaded: LoadedRecipe, override: str | None = None, overwrite: bool = False) -> None:
    problems = output_problems(loaded.recipe, override, overwrite, loaded.path)
    if problems:
        named = loaded.problems()
        files = {"{file}": named.file_for(("output", "dir")), "{cache_file}": named.file_for(("train", "cache_dir"))}
        err = OutputError("\n".join(_named(p, files) for p in problems))
        err.problems = str(err).splitlines()   # type: ignore[attr-defined]  (--json lists each)
        raise err


def _named(problem: str, files: dict[str, str]) -> str:
    for mark, name in files.items():
        problem = problem.replace(mark, name)
    return problem
