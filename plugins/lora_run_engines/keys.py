"""One scheme for checking the files lora-run generates for an engine against what that engine reads.

An engine's key data (extracted from its source at a pinned commit and shipped with its backend) is a
*schema* per table: key → kind, written in one small language:

- ``any`` — the engine reads the key, its value is not checked here;
- ``str``, ``Path`` (a string), ``int``, ``float`` (a finite TOML float: sd-scripts does not convert ``1`` to
  ``1.0``, nor refuse ``nan``), ``int_or_float``, ``bool``, ``null``, ``dict``;
- ``[int,int]`` — a list of exactly those kinds; ``a|b`` — either.

:func:`table_problems` lists the problems of one table (unknown keys, with a close match when there is one,
and values of the wrong kind) in the backend's own words; :func:`value_ok` and ``describe`` (the recipe loader's,
imported here) serve the checks a backend adds (argparse ``nargs``/``choices`` for sd-scripts, required keys for
diffusion-pipe).
No torch, no engine import: ``lora-run check`` runs these.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable, Mapping

from lora_run.recipe import describe  # noqa: F401 - a value for a message, as the recipe loader words it

ANY = "any"


def _scalar_ok(kind: str, value: Any) -> bool:
    if kind == ANY:
        return True
    if kind in ("str", "Path"):
        return isinstance(value, str)
    if kind == "int":
        return type(value) is int
    if kind == "float":
        return type(value) is float and math.isfinite(value)
    if kind == "int_or_float":
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if kind == "bool":
        return type(value) is bool
    if kind == "null":
        return value is None
    if kind == "dict":
        return isinstance(value, dict)
    return False


def value_ok(kind: str, value: Any) -> bool:
    """Whether ``value`` is of ``kind`` (see the module docstring)."""
    for alt in kind.split("|"):
        if alt.startswith("[") and alt.endswith("]"):
            parts = alt[1:-1].split(",")
            if isinstance(value, list) and len(value) == len(parts) and all(map(_scalar_ok, parts, value)):
                return True
        elif _scalar_ok(alt, value):
            return True
    return False


def close_match(key: str, known: Iterable[str]) -> str | None:
    """The known key ``key`` was probably meant to be (a typo), or None."""
    found = difflib.get_close_matches(key, list(known), n=1)
    return found[0] if found else None


def table_problems(table: Mapping[str, Any], schema: Mapping[str, str] | Iterable[str], *,
                   unknown: Callable[[str, str | None], str], wrong: Callable[[str, str, Any], str] | None = None,
                   skip: Iterable[str] = ()) -> list[str]:
    """The problems of ``table`` against ``schema`` (key → kind; a plain list of keys means kind ``any``), in
    the table's order: ``unknown(key, close_match)`` for a key the engine does not read, ``wrong(key, kind,
    value)`` for a value of another kind. Keys in ``skip`` are checked by the caller."""
    kinds = dict(schema) if isinstance(schema, Mapping) else dict.fromkeys(schema, ANY)
    skipped = set(skip)
    out = []
    for key, value in table.items():
        if key in skipped:
            continue
        if key not in kinds:
            out.append(unknown(key, close_match(key, kinds)))
        elif wrong is not None and not value_ok(kinds[key], value):
            out.append(wrong(key, kinds[key], value))
    return out
