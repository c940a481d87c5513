"""Reading the files a user hands lora-run, within limits, and naming them safely in messages: every such file is
checked before it is opened (a regular file, never a device, FIFO or socket; no larger than the limit of its kind,
which the plugin reading that kind names). docs/reliability.md ("Unbounded reads") lists the kinds and limits.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30

#: The size limit (bytes) of a recipe or a file it `extends`.
RECIPE_LIMIT = 1 * MiB


class FileProblem(Exception):
    """The file cannot be used; ``str()`` says why (without the file name)."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_input_file(path: Path | str, kind: str, limit: int) -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file within ``limit`` bytes (the limit
    of ``kind``, which messages name: "over the 64.0 KiB limit for caption files")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileProblem("not found" + (" (a dangling link)" if os.path.islink(path) else "")) from None
    except (OSError, ValueError) as exc:
        raise FileProblem(f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise FileProblem(f"is {what}, not a regular file")
    if st.st_size > limit:
        raise FileProblem(f"is {human_size(st.st_size)}, over the {human_size(limit)} limit for {kind} files")
    return st


def read_limited(path: Path | str, kind: str, limit: int) -> bytes:
    """The bytes of a checked input file; a file that grows past its limit while read is refused too."""
    check_input_file(path, kind, limit)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise FileProblem(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise FileProblem(f"is over the {human_size(limit)} limit for {kind} files")
    return data


def resolved(path: Path | str) -> Path:
    """``Path(path).resolve()`` leaving a symlink loop unresolved, as Python 3.13 does (3.11/3.12 raise RuntimeError)."""
    return Path(os.path.realpath(path))


def shown(value: Path | str) -> str:
    """A file name for a message: as is when printable, else quoted with escapes (a newline stays ``\\n``)."""
    text = str(value)
    return text if text.isprintable() else f'"{printable(text)}"'


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped, so a message stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
