r"""The TOML files lora-run writes for an engine, as the engine's own reader reads them.

sd-scripts and diffusion-pipe both read their configs with the ``toml`` package (0.10.2, pinned by sd-scripts'
requirements), not with ``tomllib``. That reader misreads some valid TOML that tomli-w writes:

- an array of inline tables (tomli-w's form for a list of tables) whose strings hold a ``'``, or ``",``, loses
  its tables: sd-scripts' ``subsets`` under a run folder named ``it's`` came back empty. :func:`dumps` therefore
  writes every list of tables as ``[[name]]`` blocks (diffusion-pipe also needs that: its inline tables cannot be
  pickled for its caching processes);
- a string that is ``"`` or begins with ``""`` is read as ``""``, and a string in an array that begins (after
  blanks: the reader strips every character Python calls white space that tomli-w writes as it is, the no-break
  and other Unicode spaces too, not only `` `` and tab) with ``,`` is split or crashes the reader;
- a string holding a control character that tomli-w writes as a ``\uXXXX`` escape (U+0000–U+0007, U+000B,
  U+000E–U+001F, U+007F) followed anywhere by a backslash and ``u`` (``\x1b`` … ``C:\users``) stops
  the reader ("Reserved escape sequence used"): it decodes the ``\u`` escapes before the ``\\`` ones.
  No way of writing these avoids that, so :func:`misread` names such values and the backend refuses them with the
  recipe key.

No torch, no engine import.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Iterator

import tomli_w

_BARE = re.compile(r"[A-Za-z0-9_-]+")
#: the white space the engines' reader strips off a list item (``str.strip``) that tomli-w writes unescaped
_RAW_BLANKS = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and (c in " \t" or ord(c) > 0x7f))
#: a control character tomli-w escapes as ``\uXXXX``, later followed by a literal backslash-u
_ESCAPE_THEN_BACKSLASH_U = re.compile(r"[\x00-\x07\x0b\x0e-\x1f\x7f].*\\u", re.DOTALL)


def _table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _holds_table_list(value: Any) -> bool:
    if _table_list(value):
        return True
    return isinstance(value, dict) and any(_holds_table_list(v) for v in value.values())


def _key(parts: tuple[str, ...]) -> str:
    return ".".join(p if _BARE.fullmatch(p) else tomli_w.dumps({p: 0})[:-len(" = 0\n")] for p in parts)


def dumps(data: dict[str, Any], where: tuple[str, ...] = ()) -> str:
    """TOML text (tomli-w, native types) in which every list of tables is written as ``[[name]]`` blocks, never
    as an array of inline tables (see the module docstring)."""
    text = tomli_w.dumps({k: v for k, v in data.items() if not _holds_table_list(v)})
    for key, value in data.items():
        if not _holds_table_list(value):
            continue
        name = (*where, key)
        entries = value if isinstance(value, list) else [value]
        header = f"[[{_key(name)}]]" if isinstance(value, list) else f"[{_key(name)}]"
        for entry in entries:
            text += ("\n" if text else "") + header + "\n" + dumps(entry, name)
    return text


def _strings(value: Any, where: tuple[Any, ...], in_array: bool = False) -> Iterator[tuple[tuple[Any, ...], str, bool]]:
    if isinstance(value, str):
        yield where, value, in_array
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*where, i), in_array=not isinstance(item, dict))


def misread(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(key path, why) for every string of ``data`` that the engines' ``toml`` 0.10.2 reader would not read back
    as written (see the module docstring); empty when every value round-trips."""
    out = []
    for where, text, in_array in _strings(data, ()):
        if text == '"' or text.startswith('""'):
            out.append((where, f"{text[:40]!r} begins with a double quote that the engine's TOML reader (toml "
                        "0.10.2) reads as an empty string"))
        elif in_array and text.lstrip(_RAW_BLANKS).startswith(","):
            out.append((where, f"{text[:40]!r} begins with a comma, which the engine's TOML reader (toml 0.10.2) "
                        "splits off a list item"))
        elif _ESCAPE_THEN_BACKSLASH_U.search(text):
            out.append((where, f"{text[:40]!r} holds a control character and, after it, a backslash before u, "
                        "which the engine's TOML reader (toml 0.10.2) cannot read (\"Reserved escape sequence\")"))
    return out


def misread_at(files: Iterable[tuple[str, dict[str, Any]]],
               key_of: Callable[[str, tuple[Any, ...]], tuple[str, ...]]) -> list[tuple[tuple[str, ...], str, tuple, str]]:
    """(recipe key, file name, key path, why) for the values of generated ``files`` (name, data) that ``misread``
    names, the first one of each recipe key only; ``key_of(name, key path)`` is the recipe key a value comes from."""
    out: list[tuple[tuple[str, ...], str, tuple, str]] = []
    for name, data in files:
        for path, why in misread(data):
            where = key_of(name, path)
            if where not in [w for w, *_ in out]:
                out.append((where, name, path, why))
    return out
