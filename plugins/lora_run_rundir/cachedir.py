"""`[train] cache_dir`: a folder outside the run folder that runs share, where lora-run writes the native backend's
caches (``latents/``, ``text/``, each with an ``index.json`` it replaces) and the engines' staged datasets
(``kohya-data/``, ``diffusion-pipe/``). lora-run writes there only when the folder is provably its own:

- a folder that does not exist yet, or an empty one: the run makes it a cache (:func:`claim_cache`);
- a folder holding lora-run's marker, :data:`CACHE_MARKER` (a regular file of the form :func:`claim_cache` writes),
  written when a run makes the folder a cache: anything else the user keeps beside lora-run's entries is never read
  or touched;
- a cache from before the marker, whose every entry is named and shaped as lora-run makes it: ``latents/`` and
  ``text/`` holding lora-run's ``index.json`` (a JSON object of sources to 64-hex keys), folders named by two hex
  digits holding ``<key>.safetensors`` entries of their own prefix, and the temporary files of interrupted writes;
  ``kohya-data/`` and ``diffusion-pipe/`` holding ``dataset-<12 hex>`` folders, their ``.dataset-<12 hex>.lock``
  files and the hidden folders of a staging or a removal cut short. The first run that uses it adds the marker.

Anything else (a model folder, ``/``, a folder of someone's files, a link or a file where lora-run writes a folder)
is refused by `check`, `plan` and every run's pre-flight, for every backend, before anything is written (exit 2,
naming ``[train.cache_dir]`` and the entries; ``output.output_problems``). No torch.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from lora_run.errors import OutputError
from lora_run.files import FileProblem, read_limited, shown

from .atomic import TEMP_FILE, atomic_write_text, make_folder, parse_json

#: lora-run's mark in a cache folder it made (or took over as an empty folder or an earlier lora-run's cache).
CACHE_MARKER = "lora-run-cache.json"
#: the marker's bytes: the same for every run, so runs sharing the folder never rewrite it
MARKER_TEXT = json.dumps({"lora_run_cache": 1, "about": "a cache folder of lora-run ([train] cache_dir): it writes "
                          "and replaces files in latents/, text/, kohya-data/ and diffusion-pipe/ here"},
                         indent=1) + "\n"
#: a marker larger than this is not lora-run's
MARKER_LIMIT = 4096
#: what lora-run writes at the top of a cache folder: the native backend's caches, the engines' staged datasets
ENCODED = ("latents", "text")
STAGED = ("kohya-data", "diffusion-pipe")
INDEX = "index.json"
_PREFIX = re.compile(r"^[0-9a-f]{2}$")
_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
_STAGED_FOLDER = re.compile(r"^(dataset-[0-9a-f]{12}|\.dataset-[0-9a-f]{12}\.\d+\.[0-9a-f]{8}\.(staging|removing))$")
_STAGED_LOCK = re.compile(r"^\.dataset-[0-9a-f]{12}\.lock$")
#: how many entries a refusal names
_SHOWN = 4


def _kind(path: Path) -> str:
    """"folder", "file" (regular), "link" or "other" (a FIFO, device, socket), links not followed; "" when gone."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISLNK(mode):
        return "link"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def is_marked(folder: Path) -> bool:
    """Whether ``folder`` holds lora-run's cache marker: a regular file (no link) within :data:`MARKER_LIMIT` holding
    a JSON object with ``"lora_run_cache": 1``."""
    path = folder / CACHE_MARKER
    if _kind(path) != "file":
        return False
    try:
        if path.stat().st_size > MARKER_LIMIT:
            return False
        data = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("lora_run_cache") == 1


def _temp(entry: Path) -> bool:
    """The temporary file of one of lora-run's atomic writes (a regular file under its exact name pattern)."""
    return TEMP_FILE.match(entry.name) is not None and _kind(entry) == "file"


def _is_index(path: Path) -> bool:
    """lora-run's cache index: a JSON object of source → 64-hex key."""
    from .folder import JSON_LIMIT

    try:
        data = parse_json(read_limited(path, "json", JSON_LIMIT))
    except (OSError, ValueError, FileProblem):
        return False
    return isinstance(data, dict) and all(isinstance(v, str) and _KEY.match(v) for v in data.values())


def _encoded(folder: Path, strict: bool) -> list[str]:
    """What in ``latents/`` or ``text/`` is not lora-run's cache. A marked cache (``strict`` False) is only checked for
    what lora-run writes through (a link or a file where a prefix folder goes, the index not a regular file)."""
    out = []
    for entry in sorted(folder.iterdir()):
        name, kind = f"{folder.name}/{entry.name}", _kind(entry)
        if entry.name == INDEX:
            if kind != "file":
                out.append(f"{name} (not a regular file)")
            elif strict and not _is_index(entry):
                out.append(f"{name} (not lora-run's cache index)")
        elif _PREFIX.match(entry.name):
            if kind != "folder":
                out.append(f"{name} (a {kind or 'missing entry'} where lora-run keeps a folder of entries)")
            elif strict:
                out.extend(f"{name}/{e.name}" for e in sorted(entry.iterdir())
                           if not (_ENTRY.match(e.name) and e.name.startswith(entry.name) and _kind(e) == "file")
                           and not _temp(e))
        elif strict and not _temp(entry):
            out.append(name)
    return out


def _staged(folder: Path, strict: bool) -> list[str]:
    """What in ``kohya-data/`` or ``diffusion-pipe/`` is not lora-run's staging (its staged folders, their locks and
    the hidden folders of a staging or a removal cut short); the staging itself checks each folder's own marker."""
    out = []
    for entry in sorted(folder.iterdir()):
        name, kind = f"{folder.name}/{entry.name}", _kind(entry)
        if _STAGED_FOLDER.match(entry.name):
            if kind != "folder":
                out.append(f"{name} (a {kind} where lora-run stages a folder)")
        elif _STAGED_LOCK.match(entry.name):
            if kind != "file":
                out.append(f"{name} (a {kind} where lora-run keeps a lock file)")
        elif strict:
            out.append(name)
    return out


def cache_problems(folder: Path) -> list[str]:
    """The entries of the cache folder ``folder`` that are not lora-run's (see the module's docstring), each named
    relative to it; empty when lora-run may use it as its cache (it does not exist yet, it is empty, it holds the
    marker, or it is provably an earlier lora-run's cache)."""
    if not folder.is_dir():
        return []      # missing (made by the run), or not a folder: ``folder_problem`` names that
    strict = not is_marked(folder)
    out = []
    for entry in sorted(folder.iterdir()):
        name, kind = entry.name, _kind(entry)
        if name == CACHE_MARKER:
            if strict:
                out.append(f"{name} (not lora-run's marker)")
        elif name.startswith(f".{CACHE_MARKER}.") and _temp(entry):
            continue
        elif name in ENCODED + STAGED:
            if kind != "folder":
                out.append(f"{name} (a {kind} where lora-run keeps a folder)")
            else:
                out.extend((_encoded if name in ENCODED else _staged)(entry, strict))
        elif strict:
            out.append(name)
    return out


def describe(problems: list[str]) -> str:
    """The problems of :func:`cache_problems` as one clause for a message."""
    listed = ", ".join(shown(p) for p in problems[:_SHOWN]) + (", …" if len(problems) > _SHOWN else "")
    return (f"is not a cache folder lora-run made: it holds {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} "
            f"that {'is' if len(problems) == 1 else 'are'} not lora-run's cache ({listed}); lora-run writes and "
            f"replaces files in a cache folder, so it uses only a new or empty folder or one holding its "
            f"{CACHE_MARKER}; give another folder (nothing was written)")


def claim_cache(folder: Path) -> None:
    """Make ``folder`` (a run's ``[train] cache_dir``) lora-run's cache before anything is written there: create it when
    missing, check it again (:func:`cache_problems`; it may have changed since the pre-flight) and write the marker
    where it is missing (an empty folder, an earlier lora-run's cache). OutputError (exit 2) when the folder is not
    lora-run's, nothing written."""
    make_folder(folder, f"[train.cache_dir] (= {shown(folder)})", "cache folder")
    problems = cache_problems(folder)
    if problems:
        raise OutputError(f"[train.cache_dir] (= {shown(folder)}): {describe(problems)}")
    if not is_marked(folder):
        atomic_write_text(folder / CACHE_MARKER, MARKER_TEXT)
