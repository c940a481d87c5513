"""Writing files safely: atomically (a temporary file in the same folder, fsynced, then renamed), with a full
disk reported as one line naming the file, and the temporary files of interrupted writes found again."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from lora_run.errors import BackendError, OutputError
from lora_run.files import human_size, shown


def parse_json(raw: bytes | str):
    """``json.loads`` for a file lora-run reads back (a run folder's records, a cache's index, a staged folder's
    marker): JSON nested deeper than the decoder's recursion limit (``[[[[…``, a few bytes a level) is a
    ``ValueError`` like any other text that is not JSON, not a ``RecursionError`` no reader expects."""
    import json

    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to read") from None


class DiskFullError(BackendError):
    """The disk (or the quota) filled up; the message names the file and the space it needs."""


def _umask() -> int:
    """The process umask; read from /proc where possible (setting it, even briefly, races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _honour_umask(fd: int) -> None:
    """mkstemp creates files 0600; give the file the mode any other tool would (0666 minus the umask)."""
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())


def is_disk_full(exc: BaseException) -> bool:
    """An OSError (or a safetensors error wrapping one) that says the disk or the quota is full."""
    if isinstance(exc, DiskFullError):      # already one line naming its file: never wrapped again
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def free_bytes(path: Path) -> int | None:
    """Free bytes of the file system holding ``path`` (its nearest existing folder); None when unknown, as for a
    file system that reports no size at all (some network and FUSE mounts say 0 of 0)."""
    for folder in (Path(path), *Path(path).parents):
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            continue
        return usage.free if usage.total > 0 else None
    return None


def disk_full_error(path: Path, needed: int | None) -> DiskFullError:
    """One line: the file, the space it needs and the space there is."""
    free = free_bytes(Path(path).parent)
    need = f"about {human_size(needed)} free" if needed else "more free space"
    have = f"{human_size(free)} free now" if free is not None else "free space unknown"
    return DiskFullError(f"{shown(path)}: No space left on device (writing it needs {need}; {have} on that file "
                         "system); free some space, then continue with --resume")


def make_folder(path: Path, label: str | None = None, what: str = "output folder") -> None:
    """``path`` made, with its parents, where missing. A folder that cannot be made (a read-only file system, a
    kernel file system such as ``/proc``, a file in the way) is lora-run's error naming it, ``label``: (default: the
    path) "cannot create the <what> (reason)", exit 2; a full disk is ``DiskFullError``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, 4096) from None
        raise OutputError(f"{label or shown(path)}: cannot create the {what} ({exc.strerror or exc})") from None


#: what ``flock(LOCK_EX | LOCK_NB)`` answers when another process holds the lock
LOCK_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _open_folder(folder: Path) -> int:
    """A descriptor of the folder itself, to ``flock`` (nothing is added to the folder)."""
    return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """One lora-run writer per folder that is no run folder (an evaluation's, the demo's): an exclusive ``flock`` on
    the folder itself (its directory, so nothing is added to it), held while the block runs. Another writer holding it
    is refused, exit 2 (two `lora-run eval` or `lora-run demo` into one folder at once: the second's ``--overwrite``
    deleted the first's images, or its model was rebuilt under it); the kernel drops the lock when the process ends,
    however it ends. ``what`` names the writer for the message ("an evaluation")."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    try:
        fd = _open_folder(folder)
    except OSError as exc:
        raise OutputError(f"{shown(folder)}: cannot open the folder to lock it ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in LOCK_HELD:
                raise OutputError(f"{shown(folder)}: another lora-run is writing {what} in this folder now; wait for "
                                  "it to finish or stop it, or use another --output-dir (nothing was touched)"
                                  ) from None
            raise OutputError(f"{shown(folder)}: cannot lock the folder ({exc.strerror or exc})") from None
        yield
    finally:
        os.close(fd)


def folder_locked(folder: Path) -> bool:
    """Whether another process holds :func:`folder_lock` on ``folder`` now (a writer is at work there)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    try:
        fd = _open_folder(folder)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in LOCK_HELD
    finally:
        os.close(fd)     # closing drops a lock just taken
    return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: never a half-written file."""
    with atomic_path(path, len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path, needed: int | None = None) -> Iterator[Path]:
    """For writers that want a file name (safetensors.save_file): yields a temp path, fsynced and renamed on
    success. A full disk becomes a DiskFullError naming ``path`` (``needed``: the bytes the write needs, if
    known)."""
    in_the_way(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, needed) from exc
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:    # the writer may have replaced the file (safetensors 0.8 writes it 0600)
            _honour_umask(fh.fileno())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise disk_full_error(path, needed) from exc
        raise


def in_the_way(path: Path) -> None:
    """Refuse to write ``path`` where something lora-run does not replace is in the way: a folder under the file's
    name (renaming onto it fails, or would replace an empty one), or a file (or anything but a folder) where one of
    its folders goes. OutputError (exit 2) names it; nothing is written and nothing removed. A link at ``path`` is
    replaced, not followed (its target is never written)."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise OutputError(f"{shown(path)}: is a folder where lora-run writes a file; move it away (nothing in it was "
                          "touched)")
    for folder in Path(path).parents:
        if os.path.isdir(folder):
            break
        if os.path.lexists(folder):
            raise OutputError(f"{shown(folder)}: is {'a link to nowhere' if os.path.islink(folder) else 'not a folder'}"
                              f", but lora-run writes {shown(path)} inside it; move it away")


#: Temporary files of our atomic writes: ``.<final name>.<8 random characters>.tmp`` (tempfile.mkstemp).
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left under ``folder`` (ours only: the
    exact name pattern of ``atomic_write_bytes``/``atomic_path``; links are never followed). Call it only
    while holding the run folder's lock, so no live writer owns them."""
    removed = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in names:
            if TEMP_FILE.match(name):
                target = Path(root) / name
                if target.is_file() and not target.is_symlink():
                    with contextlib.suppress(OSError):
                        target.unlink()
                        removed.append(target)
    return removed


def own_copy(path: Path) -> None:
    """Give ``path`` its own bytes where it is a regular file with other names (a hard link: ``st_nlink`` > 1, as in a
    run folder copied with ``cp -al``): it is copied to a temporary file beside it and that is renamed over it
    atomically, so the other names keep the old bytes and a write in place reaches this file alone. Anything else
    (no file, a single-link file, a link or another kind of file) is left as it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink <= 1:
        return
    with atomic_path(path, st.st_size) as tmp:
        shutil.copyfile(path, tmp)


_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
    | getattr(os, "O_CLOEXEC", 0)


def open_append(path: Path, errors: str = "strict") -> IO[str]:
    """``path`` opened for appending text (created when missing), only as a regular file of its own: a hard link is
    broken first (``own_copy``), so an append never grows another name's file; a link, a FIFO (which would block the
    open), a device or a folder under the name is refused with an OutputError (exit 2) naming it, nothing written."""
    for _ in range(3):     # a hard link made between the copy and the open: copied again
        own_copy(path)
        try:
            fd = os.open(path, _APPEND, 0o666)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EMLINK):
                raise OutputError(f"{shown(path)}: {_NOT_A_LOG}") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OutputError(f"{shown(path)}: {_NOT_A_LOG}")
        if st.st_nlink <= 1:
            os.set_blocking(fd, True)
            return os.fdopen(fd, "a", encoding="utf-8", errors=errors)
        os.close(fd)
    raise OutputError(f"{shown(path)}: keeps getting other names (hard links) while lora-run appends to it")


_NOT_A_LOG = ("is not a regular file (a link, a FIFO, a device or a folder under the name of a file lora-run appends "
              "to); move it away (nothing was written)")
