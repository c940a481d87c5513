"""What the backends that drive an external engine (kohya sd-scripts, diffusion-pipe) share.

A library, not a plugin (no entry point, no hooks), as ``lora_run_formats`` is for LoRA layouts:

- :func:`checkout_option` / :func:`configured_path` / :func:`resolve_path` — where the engine's checkout is (a recipe
  option, else an environment variable) and paths from the recipe, relative to the recipe's folder;
- :func:`git_state` — the commit and cleanliness of an engine checkout, for the manifest;
- :func:`commented` — a generated file's comment header (who wrote it, from what, how to re-run);
- :func:`split_output` — the supervisor's reader loop: an engine's output split into lines on ``\\n`` and
  ``\\r`` (progress bars redraw with ``\\r``), a runaway line flushed at 1 MiB;
- :func:`explain` — why an engine failed, from the tail of its output: its own last exception line (not the
  launcher's wrapper around it) and a hint for the failures we recognise;
- :func:`safetensors_keys` — the tensor names of a ``.safetensors`` file, read from its header (no torch);
- :func:`model_file_problems` / :func:`source_folder_problems` — the native backend's checks of what the
  ``[model.files]`` files and the ``[model] source`` folder are (another component's, family's or model size's),
  run before the engine starts, so every backend refuses the same files with the same words;
- :func:`stage_link` — place a dataset file in a staging folder as a symlink, atomically, copying where the
  file system has no symlinks;
- :func:`dataset_key` — the name of a staged view's folder under ``[train] cache_dir`` (shared by runs): a hash of
  the ``[dataset]`` table, the model and what else the backend's staged files and caches depend on;
- :func:`borrowed_memory_estimate` — an engine has no memory model of its own: the estimate of a backend that
  registered one, for the equivalent settings, labelled as that backend's.

Its modules, for every engine backend:

- :mod:`lora_run_engines.supervise` — ``Supervisor``: the engine as a child process (own process group, log,
  progress hooks, Ctrl-C → the engine's graceful quit or SIGINT → SIGTERM → SIGKILL, the output's tail);
- :mod:`lora_run_engines.stage` — the dataset staged as the engine reads it (links, converted PNGs, captions),
  named by content; a new folder renamed into place whole, an existing one only checked; lora-run's marker in each,
  the engine's valid caches carried into a new one, folders in use held, earlier unused ones removed on request;
- :mod:`lora_run_engines.output` — the LoRA an engine wrote, checked before lora-run reports it (whole, finite, the
  recipe's rank, the family's modules in the engine's layout);
- :mod:`lora_run_engines.keys` — one scheme for checking generated files against the keys the engine reads;
- :mod:`lora_run_engines.tomlfile` — generated TOML as the engines' ``toml`` 0.10.2 reader reads it (lists of
  tables as ``[[…]]`` blocks; the values it would read back otherwise, named).

No torch, no engine import: ``lora-run check`` loads the backends that use this.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable

from lora_run.files import resolved, shown

#: A line longer than this without a line break is passed on anyway (an engine printing without newlines).
MAX_LINE_BYTES = 1 << 20
#: The characters of one output line an engine's parser reads (the log keeps the whole line): a progress or step
#: line is far shorter, and a parser's time then stays bounded whatever an engine prints.
PARSE_CHARS = 16384
#: A step, total or epoch number in an engine's progress line: at most 9 digits (a billion steps). A longer run of
#: digits is no progress (and `int()` refuses one of 4300 digits or more).
STEP_NUMBER = r"\d{1,9}(?!\d)"


def resolve_path(value: str, base: Path) -> Path:
    """A path from the recipe: ``~`` expanded, a relative one taken from ``base`` (the recipe's folder)."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else resolved(base / path)


def checkout_option(checkout: str, env_var: str) -> Any:
    """The options-table field naming the engine's checkout (``configured_path`` reads it): a path, relative to the
    recipe file, unset by default, ``env_var`` standing in."""
    from lora_run.schema import option

    return option(None, f"Path of the {checkout} checkout (relative paths are relative to the recipe file; given with "
                  f"`--set`, to the working folder). Default: the `{env_var}` environment variable.", path=True)


def configured_path(option: str | None, base: Path, env_var: str) -> tuple[Path | None, str | None]:
    """(the engine checkout's path, ``env_var`` when it came from that environment variable, else None): the
    recipe option wins over the variable; (None, None) when neither is set."""
    if option:
        return resolve_path(option, base), None
    env = os.environ.get(env_var, "").strip()
    if env:
        return resolved(os.path.expanduser(env)), env_var
    return None, None


def git_state(path: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, has uncommitted changes to tracked files) of a checkout; (None, None) when it is not a git
    repository or git is missing; dirty is None when only the status could not be read."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, encoding="utf-8",
                                  errors="replace", timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), (bool(status.strip()) if status is not None else None)


#: what a TOML comment may not hold (U+0000–U+0008, U+000A–U+001F, U+007F): tomllib refuses the whole file
_COMMENT_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def commented(header: str, body: str) -> str:
    """``body`` (a generated TOML file) under ``header``, each header line a ``#`` comment. A control character the
    header holds (a recipe path can) is written as its escape (``\\x1b``): TOML forbids it in a comment."""
    def line(text: str) -> str:
        return _COMMENT_FORBIDDEN.sub(lambda m: ascii(m.group())[1:-1], text)

    return "".join(f"# {line(part)}\n" for part in header.splitlines()) + "\n" + body


def split_output(read: Callable[[], bytes], emit: Callable[[bytes], None]) -> None:
    """Call ``emit`` with every non-blank line ``read()`` yields until it returns b"" (end of output) or the
    pipe fails (OSError, ValueError: closed under us); the unfinished last line is emitted too."""
    pending = b""
    try:
        while True:
            chunk = read()
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"\r\n|\r|\n", pending)
            pending = parts.pop()
            for part in parts:
                if part.strip():
                    emit(part)
            if len(pending) > MAX_LINE_BYTES:
                emit(pending)
                pending = b""
    except (OSError, ValueError):
        pass
    if pending.strip():
        emit(pending)


_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)")


def explain(tail: Iterable[str], hints: Iterable[tuple[tuple[str, ...], str]] = (),
            wrappers: tuple[str, ...] = ("CalledProcessError",)) -> str:
    """``": <last exception line>"`` of an engine's output tail (skipping the launchers' ``wrappers``) followed by
    the hint of the first ``(needles, hint)`` whose needle occurs in the tail; "" when neither is found."""
    lines = list(tail)
    cause = ""
    for line in reversed(lines):
        match = _EXCEPTION.match(line.strip())
        if match and not any(w in match[1] for w in wrappers):
            cause = f": {match[1][:300]}"
            break
    text = "\n".join(lines)
    for needles, hint in hints:
        if any(n in text for n in needles):
            return f"{cause} ({hint})"
    return cause


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's checked header (ValueError saying why when it is not one)."""
    from lora_run_formats import read_header, tensor_names

    return tensor_names(read_header(path))


def model_file_problems(recipe: Any, files: dict[str, Any]) -> list[tuple[tuple, str]]:
    """What the ``[model.files]`` files (slot -> path: those the engine reads that its own checks found complete) are
    where their slots do not take them: the native backend's one check (``ModelAdapter.single_file_problems``: a
    file of another component, family or model size, named with what it is), for the recipe's family; none for a
    family without a native adapter (nothing declares its files' kinds)."""
    adapter = _native_adapter(recipe)
    if adapter is None:
        return []
    return adapter.single_file_problems({key: Path(value) for key, value in files.items() if value})


def source_folder_problems(recipe: Any, folder: Path) -> list[tuple[tuple, str]]:
    """The problems of the diffusers folder ``folder`` an engine loads components from, at ``[model.source]``: the
    native backend's check (``ModelAdapter.source_folder_problems``: another family's model first, then its files
    and configs against the family's), for the recipe's family; none for a family without a native adapter."""
    adapter = _native_adapter(recipe)
    if adapter is None:
        return []
    return adapter(recipe).source_folder_problems(folder, shown(folder))


def _native_adapter(recipe: Any) -> Any:
    """The native backend's adapter class of the recipe's family, or None where the family has none."""
    from lora_run_native.adapters import adapter_class

    try:
        return adapter_class(recipe.model.family)
    except KeyError:
        return None


def stage_link(source: Path, target: Path) -> None:
    """``target`` becomes a symlink to ``source`` (a copy where symlinks are not possible), replaced atomically;
    nothing is done when it already points there."""
    source = source.resolve()
    if target.is_symlink() and Path(os.readlink(target)) == source:
        return
    tmp = target.with_name(f".{target.name}.link")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.symlink(source, tmp)
    except OSError:  # no symlinks on this file system: copy
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def dataset_key(recipe: Any, *more: Any) -> str:
    """The staged view's folder under ``[train] cache_dir`` (shared by runs): one per ``[dataset]`` table (paths,
    trigger, caption extension and defaults, repeats, buckets, …), model family and source, and whatever else the
    backend's staged files or the engine's caches beside them depend on (``more``, JSON-able), so recipes sharing a
    cache folder never stage over each other's files, and a resume or a rerun finds its own with the engine's
    caches."""
    import hashlib

    from lora_run.recipe import to_dict

    key = json.dumps([to_dict(recipe).get("dataset"), recipe.model.family, recipe.model.source, *more],
                     sort_keys=True, default=str)
    return "dataset-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def borrowed_memory_estimate(recipe: Any, plugins: Any, swapped_blocks: int = 0) -> tuple[float, str] | None:
    """For a backend without its own memory model: (GiB, label) from the first backend that offers one
    (its registered `memory_estimate`), for the equivalent settings, labelled as that backend's estimate."""
    for reg in plugins.registry["backend"].values():
        estimate = reg.memory_estimate
        if callable(estimate) and recipe.model.family in reg.capabilities:
            found = estimate(recipe, swapped_blocks)
            if found is not None:
                gib, assumed = found
                return round(gib, 1), f"lora-run's {reg.name} memory model for the equivalent settings: {assumed}"
    return None
