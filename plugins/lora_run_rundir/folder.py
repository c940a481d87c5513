"""The run folder: the never-overwrite rule, one lora-run per folder (a lock), the manifest, the log, and the
run's start and end as core's ``execute`` asks for them (:class:`lora_run.run.RunFolder`)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_run import __version__
from lora_run.errors import LoraRunError, OutputError
from lora_run.files import FileProblem, MiB, printable, read_limited, resolved, shown
from lora_run_commands import describe_plugins

from .atomic import (LOCK_HELD, TEMP_FILE, atomic_write_text, disk_full_error, folder_locked, is_disk_full,
                     make_folder, open_append, parse_json, remove_temp_files)
from .provenance import model_identity, package_versions, version_changes
from .cachedir import cache_problems
from .record import EVALUATION, OUTPUT_RECORD, plain_name, tree, unlisted, unrecorded

#: The size limit (bytes) of a JSON file of a run folder read back (manifest, dataset record, checkpoint state,
#: cache index).
JSON_LIMIT = 64 * MiB
MANIFEST = "manifest.json"
RECIPE = "recipe.toml"
LOG = "run.log"
#: The per-file record of the run's dataset (a resumed run compares it with the dataset now).
DATASET_RECORD = "dataset.json"


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")  # only report what is already imported; never import torch here
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
            with contextlib.suppress(Exception):
                info["cudnn"] = torch.backends.cudnn.version()
    from .provenance import gpu_driver

    driver = gpu_driver()
    if driver:
        info["nvidia_driver"] = driver
    return info


LOCK = ".lora-run.lock"
RESERVE = ".lora-run.reserve"
#: Kept free while a run is running and released before its final manifest is written, so a full disk
#: can never leave the manifest at "running".
RESERVE_BYTES = 1 << 20


def _entries(found: list) -> str:
    return f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}"


def is_run_folder(path: Path) -> bool:
    """True for a folder lora-run created: its manifest, its resolved recipe or its lock file is there."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file() and not manifest.is_symlink():
        try:
            if "lora_run_version" in parse_json(read_limited(manifest, "json", JSON_LIMIT)):
                return True
        except (OSError, ValueError, TypeError, FileProblem):
            pass
    recipe = path / RECIPE
    if recipe.is_file() and not recipe.is_symlink():
        try:
            with open(recipe, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"# Resolved from ") and b" by lora-run " in head:
                return True
        except OSError:
            pass
    lock = path / LOCK
    return lock.is_file() and not lock.is_symlink()


class RunLock:
    """One lora-run per run folder: an exclusive ``flock`` on ``<run>/.lora-run.lock``, held while the run
    lives. The kernel drops it when the process ends, however it ends, so a killed run never leaves a stuck
    lock. The file says who holds it (pid, host, start time, command) for the message of the refused one."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return
        try:   # never through a link, never blocking on a FIFO put in its place
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _CLOEXEC | _NOFOLLOW, 0o666)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, 4096) from None
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{shown(self.path)}: {_NOT_OURS}") from None
            raise OutputError(f"{shown(self.path.parent)}: cannot create the run folder's lock file "
                              f"({exc.strerror})") from None
        if not _single_file(os.fstat(fd)):   # the holder's line below is written into it: never into another file
            os.close(fd)
            raise OutputError(f"{shown(self.path)}: {_NOT_OURS}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in LOCK_HELD:
                raise OutputError(f"{shown(self.path.parent)}: another lora-run is using this run folder "
                                  f"({holder}); wait for it to finish or stop it, or use another --output-dir") from None
            raise OutputError(f"{shown(self.path.parent)}: cannot lock the run folder ({exc.strerror})") from None
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": [os.path.basename(sys.argv[0] if sys.argv else "lora-run"), *sys.argv[1:]]}
        with contextlib.suppress(OSError):   # who holds it is informative only (a full disk may refuse it)
            data = (json.dumps(info) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)         # closing the only descriptor drops the flock
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = parse_json(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "{}")
        command = " ".join(str(a) for a in info.get("command", []))
        return printable(f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
                         f"{command}".strip())
    except (OSError, ValueError, AttributeError):
        return "holder unknown"


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: The write probe of ``RunDir.prepare`` (removed at once; one a killed run left is ours).
PROBE = ".write-test"
_NOT_OURS = ("is not a file lora-run made here (a link, a hard link to another file, a folder, a FIFO or a device "
             "under the name of lora-run's own file); lora-run writes that file, so move it away (nothing was touched)")


def _single_file(st: os.stat_result) -> bool:
    """A regular file with no other name: writing it in place changes nothing outside the run folder."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _ours_only(entry: Path) -> bool:
    """An entry that is nothing of value: lora-run's lock, reserve, write probe or the temporary file of an
    interrupted atomic write, by name and as lora-run makes it (a regular file with no other name). A link, a hard
    link, a folder, a FIFO or a device under such a name is someone else's: it makes the folder not empty (a link
    named `.lora-run.reserve` would have had the reserve's megabyte written through it)."""
    if entry.name not in (LOCK, RESERVE, PROBE) and TEMP_FILE.match(entry.name) is None:
        return False
    try:
        return _single_file(os.lstat(entry))
    except OSError:
        return False


def _create_new(path: Path) -> int:
    """A file descriptor of a new, empty regular file at ``path``, created exclusively and never through a link;
    lora-run's own leftover there (``_ours_only``: a killed run's) is removed first, anything else is left alone and
    the creation fails (FileExistsError)."""
    if os.path.lexists(path) and _ours_only(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)      # a name, never a target: another name of the file keeps its data
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW, 0o666)


#: The run's own records and folders at the top of a run folder (the cache, checkpoints, samples, TensorBoard logs,
#: the evaluation, the LoRA in diffusers layout): a resumed run writes them again, so each must still be a regular
#: file, or a folder, where it is there at all.
_RUN_FILES = (MANIFEST, RECIPE, LOG, DATASET_RECORD)
#: The external backends' working folders are among them: a resumed engine run writes its configs there and prunes
#: and stages in it, so a link there would have it write and delete in the link's target.
_RUN_FOLDERS = ("cache", "checkpoints", "samples", "logs", "eval", "diffusers", "kohya", "diffusion-pipe")
#: What runs write at the top of a run folder besides the files their manifest names (the final LoRA).
RUN_ENTRIES = {*_RUN_FILES, *_RUN_FOLDERS}
#: The native backend's cache in a run folder without a `[train] cache_dir`: lora-run's cache entries alone.
CACHE = "cache"


def _recorded_names(path: Path, node: Any) -> set[str]:
    """The top-level names under ``path`` of the file paths a manifest records (its artifacts)."""
    if isinstance(node, (dict, list)):
        return set().union(*(_recorded_names(path, v) for v in (node.values() if isinstance(node, dict) else node)))
    if isinstance(node, str) and node.startswith(str(path) + os.sep):
        return {node[len(str(path)) + 1:].split(os.sep, 1)[0]}
    return set()


#: The manifest key listing the top-level entries the folder's runs wrote (any backend's, a third party's too).
WRITTEN = "written"
#: The manifest key listing every entry inside the folders runs wrote (``a/b`` paths, as ``record.tree`` lists them)
#: that a run's writers wrote (``RunDir.claim``, ``RunDir.writing``), never a walk of the folders: a user's file added
#: inside one (a picked sample in ``samples/``, notes in ``checkpoints/``), before, during or after a run, is no run's,
#: and `--overwrite` refuses to delete it as it refuses one at the top.
FILES = "files"
#: The manifest key listing the paths a run is writing now (``RunDir.writing``), recorded before it writes there: a
#: run killed meanwhile leaves what it wrote under them unlisted in ``FILES``, and this says whose it is.
WRITING = "writing"
#: ... and the entries under them that were there, no run's, when the writing began: a killed run's unfinished
#: writes are what else is there.
OTHERS = "writing_found"


def own_folders(path: Path, manifest: dict[str, Any]) -> list[str]:
    """The top-level names of ``path`` whose insides the runs' record ``FILES`` covers: the fixed folders of a run and
    those its manifest lists as written (an evaluation's ``eval-*`` folder has a record of its own)."""
    written = manifest.get(WRITTEN)
    names = set(_RUN_FOLDERS) | ({n for n in written if isinstance(n, str)} if isinstance(written, list) else set())
    # the run's own cache (thousands of entries in a large run) is checked by what it holds instead: ``unrecorded_files``
    return sorted(n for n in names if n not in _RUN_FILES and n != CACHE and plain_name(n))


def unrecorded_files(path: Path, manifest: dict[str, Any]) -> list[str]:
    """The entries inside a run folder's own folders that its manifest's ``FILES`` does not list and no run was
    writing when it stopped (``WRITING``: a killed run's unfinished writes there are its own): no run's. None to
    compare with (no list: a folder from before it; a killed run of a lora-run from before ``WRITING``) gives none."""
    if not isinstance(manifest.get(FILES), list) or (manifest.get("status") == "running"
                                                     and not isinstance(manifest.get(WRITING), list)):
        return []
    cache = path / CACHE
    foreign_cache = [] if os.path.islink(cache) else [f"{CACHE}/{p}" for p in cache_problems(cache)]
    return [rel for rel in unlisted(path, own_folders(path, manifest), manifest.get(FILES))
            if not unfinished(manifest, rel)] + foreign_cache


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def unfinished(manifest: dict[str, Any], rel: str) -> bool:
    """Whether ``rel`` (an ``a/b`` path of the run folder) is under a folder the manifest's run was writing when it
    stopped (``WRITING``; ``""``: the folder itself) and was not there, no run's, when that writing began (``OTHERS``):
    a killed run's unfinished write."""
    def under(path: str, folder: str) -> bool:
        return "/" not in path if folder == "" else path == folder or path.startswith(folder + "/")
    return (any(under(rel, w) for w in _strings(manifest.get(WRITING)))
            and not any(under(rel, o) for o in _strings(manifest.get(OTHERS)) if o))


def foreign_entries(path: Path, existing: list[Path], manifest: dict[str, Any]) -> list[Path]:
    """The entries of a run folder that no run wrote (a user's notes, a folder of their own): `--overwrite`
    would delete them with the old run. A run's entries are those its manifest lists as written (or, in a folder
    from before that list, names the manifest's artifacts) and the fixed ones above (its folders only where the
    list may lack them: a manifest from before it, a killed run's; without a manifest of lora-run's, its recipe
    and log); an evaluation `lora-run eval` wrote next to the final LoRA (an ``eval-*`` folder) is a run's too,
    when its record says so and it holds nothing the record does not list (``record.unrecorded``): a folder
    merely holding a `metrics.json` or `report.html` is not."""
    written = manifest.get(WRITTEN)
    recorded = _recorded_names(path, manifest.get("artifacts")) | (
        {n for n in written if isinstance(n, str)} if isinstance(written, list) else set())
    if not isinstance(manifest.get("lora_run_version"), str):
        # no manifest of lora-run's: a run stopped before its first one wrote its recipe and log alone (a folder that
        # merely holds a recipe.toml copied from a run folder is no run's: its `logs/`, `samples/` are the user's)
        fixed = _BEFORE_MANIFEST
    elif isinstance(written, list) and manifest.get("status") != "running":
        fixed = set(_RUN_FILES)    # the list is whole: a run's folders are there (a `samples/` it never made is not)
    else:
        fixed = RUN_ENTRIES        # a manifest from before the list, or a killed run's: its folders may be unlisted
    out = []
    for entry in existing:
        if entry.name in fixed or entry.name in recorded or _ours_only(entry):
            continue
        if manifest.get("status") == "running" and unfinished(manifest, entry.name):
            continue
        if entry.name.startswith("eval-") and unrecorded(entry, EVALUATION) == []:
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e.name)


def _misshapen(path: Path) -> list[str]:
    """The run's own entries that are no longer what runs write (a folder where the manifest was, a file where
    the checkpoints go, a link), each named."""
    out = []
    for name in _RUN_FILES:
        entry = path / name
        if os.path.lexists(entry) and (entry.is_symlink() or not entry.is_file()):
            out.append(f"{name} is not a regular file")
    for name in _RUN_FOLDERS:
        entry = path / name
        if os.path.lexists(entry) and (entry.is_symlink() or not entry.is_dir()):
            out.append(f"{name} is not a folder")
    return out


#: All a run writes before its first manifest (besides its lock, reserve and temporary files).
_BEFORE_MANIFEST = {RECIPE, LOG}


def _manifest_damage(path: Path) -> str | None:
    """Why a run folder's manifest cannot be trusted by ``--resume``, or None: it does not read as a JSON object
    lora-run wrote, its ``written`` list or its ``status`` has the wrong type, or it is missing while the folder holds
    more than a run writes before its first manifest. (Its other values are informative: one of the wrong type is
    dropped, not trusted.)"""
    manifest = path / MANIFEST
    if not os.path.lexists(manifest):
        try:
            later = sorted(c.name for c in path.iterdir() if c.name not in _BEFORE_MANIFEST and not _ours_only(c))
        except OSError:      # an unreadable folder: ``prepare`` names it
            return None
        return (f"is missing, while the folder holds what runs write after it ({', '.join(shown(n) for n in later[:4])}"
                f"{', …' if len(later) > 4 else ''})") if later else None
    try:
        data = parse_json(read_limited(manifest, "json", JSON_LIMIT))
    except FileProblem as exc:
        return str(exc)
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno})"
    except (OSError, ValueError) as exc:
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if not isinstance(data, dict):
        return f"is not a JSON object (a {type(data).__name__})"
    if not isinstance(data.get("lora_run_version"), str):
        return "is not one lora-run wrote (no lora_run_version)"
    written = data.get(WRITTEN, [])
    if not isinstance(written, list) or not all(isinstance(n, str) for n in written):
        return f"has a damaged \"{WRITTEN}\" list (a list of the names of what runs wrote here)"
    if not isinstance(data.get("status", ""), str):     # whether the run completed: a completed one is not trained again
        return "has a damaged \"status\" (not a text)"
    return None


class RunDir:
    """A run's output folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock: RunLock | None = None
        self.created = False        # this run created the folder (or found it empty): it may remove it again
        self.existed = False        # ... and the (empty) folder was there before
        self.resumed = False
        self.manifest_written = False
        self.started = time.time()
        self.found: set[str] = set()    # top-level names that were there before this run (never recorded as written)
        self.before: set[str] = set()   # ... with lora-run's own leftovers (a run that undoes itself leaves them be)
        # what runs wrote here, as their writers say (``claim``, ``writing``), never a walk of the folder: the top-level
        # names (WRITTEN), the entries inside (FILES), and the paths being written now (WRITING)
        self.names: set[str] = set()
        self.files: set[str] = set()
        self.claimed: set[str] = set()   # the entries inside that writers named ahead: listed before they exist
        self.busy: list[tuple[str, set[str]]] = []     # (folder, what was there, no run's, when writing began)
        self.reserved = False           # this run made the reserve file (``unreserve`` removes only that)
        self.run: Any = None            # the run (``start``): its recipe names the base model recorded at the end

    def prepare(self, *, overwrite: bool, resume: bool) -> None:
        """Create and lock the folder; refuse a non-empty one unless resuming or told to overwrite, and
        never replace a folder lora-run did not create."""
        p = self.path
        if p.is_symlink() and not p.exists():
            raise OutputError(f"{shown(p)}: the output path is a dangling link")
        if p.exists() and not p.is_dir():
            raise OutputError(f"{shown(p)}: the output path exists and is not a folder")
        try:   # our lock, reserve and temporary files alone are nothing of value (a run killed very early)
            everything = list(p.iterdir()) if p.is_dir() else []
        except OSError as exc:
            raise OutputError(f"{shown(p)}: cannot read the output folder ({exc.strerror})") from None
        existing = [c for c in everything if not _ours_only(c)]
        self.found, self.before = {c.name for c in existing}, {c.name for c in everything}
        if resume:
            self.check_resumable()
            self._lock()
            # what the earlier starts wrote is this run's; a user's file added inside its folders since stays theirs
            manifest = self.read_manifest()
            self.files = tree(p, own_folders(p, manifest)) - set(unrecorded_files(p, manifest))
            if manifest.get("status") == "running":    # a killed start's unfinished writes at the top are the run's
                adopted = {n for n in self.found if unfinished(manifest, n)}
                self.names, self.found = adopted, self.found - adopted
        elif existing and not overwrite:
            if is_run_folder(p):       # a run at work there is named first: "use --resume" would not help
                self._lock()
                self.release()
            raise OutputError(f"{shown(p)}: the output folder is not empty ({_entries(existing)}); use --resume to "
                              "continue that run, --overwrite to replace it, or --output-dir for a new folder")
        elif existing and overwrite:
            if not is_run_folder(p):
                raise OutputError(f"{shown(p)}: --overwrite replaces only a run folder lora-run created (one with "
                                  f"its {MANIFEST}); this folder holds other files ({_entries(existing)}) and is "
                                  "left alone; choose another --output-dir")
            manifest = self.read_manifest()
            foreign = [e.name for e in foreign_entries(p, existing, manifest)] + unrecorded_files(p, manifest)
            if foreign:
                names = ", ".join(shown(n) for n in foreign[:8]) + (", …" if len(foreign) > 8 else "")
                unproven = [n for n in foreign if n.startswith("eval-") and "/" not in n and (p / n).is_dir()]
                hint = (f" ({', '.join(shown(n) for n in unproven[:4])}: an evaluation folder holds lora-run's record "
                        f"{OUTPUT_RECORD} listing all it holds; one without, from an earlier lora-run, or holding "
                        "other files, is left to you)") if unproven else ""
                raise OutputError(f"{shown(p)}: --overwrite would delete {_entries(foreign)} no lora-run run wrote "
                                  f"there ({names}); move them out of the run folder, or choose another --output-dir"
                                  + hint)
            # an evaluation `lora-run eval` is writing into the folder now (it holds its folder's lock): deleted with
            # the old run, it failed (exit 1) and its record came back in the new run folder
            busy = [e.name for e in existing if e.name.startswith("eval-") and e.is_dir() and not e.is_symlink()
                    and folder_locked(e)]
            if busy:
                raise OutputError(f"{shown(p)}: --overwrite would delete {', '.join(shown(n) for n in busy[:4])}, "
                                  "which a `lora-run eval` is writing now; wait for it to finish or stop it, or choose "
                                  "another --output-dir (nothing was touched)")
            self._lock()             # refuses while another run uses it
            self._clear()
        else:
            self.created, self.existed = True, p.is_dir()
            make_folder(p)
            self._lock()
        probe = p / PROBE
        try:
            os.close(_create_new(probe))
            probe.unlink()
        except FileExistsError:
            self.release()
            raise OutputError(f"{shown(probe)}: {_NOT_OURS}") from None
        except OSError as exc:
            self.release()
            raise OutputError(f"{shown(p)}: cannot write to the output folder ({exc.strerror})") from None

    def check_resumable(self) -> None:
        """``--resume``, before anything is written (the ``check_resume`` hook asks first, ``prepare`` again): a run
        folder lora-run wrote, its own entries still as it wrote them, and a manifest it can trust (``_manifest_damage``).
        OutputError (exit 2) names what is wrong."""
        p = self.path
        # a run killed between writing recipe.toml and its first manifest is still resumable
        if not (p / MANIFEST).is_file() and not (p / RECIPE).is_file():
            raise OutputError(f"{shown(p)}: nothing to resume (no {MANIFEST}); start without --resume")
        if not is_run_folder(p):
            raise OutputError(f"{shown(p)}: nothing to resume: {MANIFEST} there was not written by lora-run")
        misshapen = _misshapen(p)
        if misshapen:   # the run would train and then fail writing there (exit 1); nothing is touched now
            raise OutputError(f"{shown(p)}: cannot resume: {'; '.join(misshapen)} (not as lora-run wrote it); "
                              "restore it, or start a new run with --output-dir")
        damage = _manifest_damage(p)
        if damage:      # the resume would rewrite it without the record of what lora-run wrote here
            raise OutputError(f"{shown(p / MANIFEST)}: cannot resume: the manifest {damage}; it records which files "
                              "lora-run wrote in this run folder (the only ones it may replace or delete), and a resume "
                              "would rewrite it without that record; restore it (from a backup), or start a new run "
                              "with --output-dir (nothing was written)")

    def _lock(self) -> None:
        lock = RunLock(self.path)
        lock.acquire()
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.record_files()
            self.lock.release()
            self.lock = None

    def _clear(self) -> None:
        """--overwrite: move the old run aside, start the new folder (locked), then delete the old one."""
        path = self.path
        trash = path.with_name(f".{path.name}.old-{int(time.time())}-{os.getpid()}")
        old_lock = self.lock
        try:
            path.rename(trash)
            path.mkdir()
        except OSError as exc:
            raise OutputError(f"{shown(path)}: cannot replace the old run ({exc.strerror})") from None
        self.created = True
        self.found, self.before, self.names, self.files, self.claimed, self.busy = set(), set(), set(), set(), set(), []
        try:
            self._lock()
        except OutputError as exc:
            raise OutputError(f"{exc} (the old run was moved to {shown(trash)})") from None
        if old_lock is not None:
            old_lock.release()
        shutil.rmtree(trash, ignore_errors=True)

    def reserve(self) -> None:
        """Set aside RESERVE_BYTES (released by ``unreserve`` before the final manifest is written) in a file of its
        own: never written through a link or into a file with another name; where something else has the name, no
        reserve is made (it is a safety margin, not a need)."""
        try:
            fd = _create_new(self.path / RESERVE)
        except OSError:
            return
        self.reserved = True
        with contextlib.suppress(OSError), os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())

    def unreserve(self) -> None:
        """Remove the reserve this run made (only that: what else has its name stays)."""
        if self.reserved:
            with contextlib.suppress(OSError):
                os.unlink(self.path / RESERVE)
            self.reserved = False

    def remove_created(self) -> bool:
        """Undo a run that stopped before it wrote anything of value (a failed pre-flight): remove the folder
        if this run created it, else only what this run wrote into the empty folder it found. Never follows
        links. Returns True when the folder is gone or empty again."""
        if not self.created:
            return False
        p = self.path
        try:
            for entry in p.iterdir():
                if entry.name in self.before:     # there before this run: not this run's to remove
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except OSError:
            return False
        self.release()
        if not self.existed:
            with contextlib.suppress(OSError):
                p.rmdir()
        return True

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        self.claim(Path(name).as_posix())
        atomic_write_text(target, text)
        return target

    def claim(self, *rels: str) -> None:
        """Record the paths ``rels`` (relative to the folder, ``a/b``) as this run's, before it writes them: the
        manifest lists them (as long as they exist), so `--overwrite` may replace them and a killed run's record has
        them. For a file or folder whose name the writer knows; :meth:`writing` for a folder it writes into."""
        if any(rel.startswith("/") or ".." in rel.split("/") or not all(rel.split("/")) for rel in rels):
            raise ValueError(f"claim: {rels!r}: paths inside the run folder, relative, without '..'")
        new = {rel for rel in rels if rel not in self.claimed and rel not in self.names}
        for rel in new:
            self._own(rel, claimed=True)
        if new:
            self._persist()

    @contextlib.contextmanager
    def writing(self, *folders: str) -> Iterator[None]:
        """Around a writer whose names are not known ahead (a checkpoint, a sample round, a tracker's logs, an
        engine's working folder; ``""``: the top of the run folder, with what a folder made there holds, not the
        insides of folders already there): what appears under ``folders`` while it runs is this run's, nothing that
        was there before. The manifest names ``folders`` as being written first (``WRITING``),
        so a run killed meanwhile leaves a record of whose their new entries are."""
        before = {rel: self._below(rel) for rel in folders}
        entries = [(rel, {e for e in before[rel] if not self._is_own(e)}) for rel in folders]
        self.busy.extend(entries)
        self._persist()
        try:
            yield
        finally:
            for entry in entries:
                self.busy.remove(entry)
                for new in sorted(self._below(entry[0]) - before[entry[0]]):
                    self._own(new)
                    if entry[0] == "" and new != CACHE:       # a folder made at the top: all it holds is new
                        for rel in tree(self.path, [new]):
                            self._own(rel)
            self._persist()

    def _is_own(self, rel: str) -> bool:
        return rel in self.files or rel in self.claimed or ("/" not in rel and (rel in self.names or rel in RUN_ENTRIES))

    def _own(self, rel: str, claimed: bool = False) -> None:
        """``rel`` and the folders above it are this run's; ``claimed``: named before it is written, so listed whether
        it exists yet or not (a run killed right after writing it has it on record)."""
        parts = rel.split("/")
        self.names.add(parts[0])
        (self.claimed if claimed else self.files).update("/".join(parts[:n]) for n in range(2, len(parts) + 1))

    def _below(self, rel: str) -> set[str]:
        """``rel`` and every entry under it (``a/b`` paths; ``""``: the entries at the top of the run folder, not what
        they hold); a link is never followed, the cache's entries are not listed (``cachedir`` checks them)."""
        if rel == "":
            try:
                return {c.name for c in self.path.iterdir() if not _ours_only(c)}
            except OSError:
                return set()
        if not os.path.lexists(self.path / rel):
            return set()
        return {rel} if rel.split("/")[0] == CACHE else {rel} | tree(self.path, [rel])

    def _persist(self) -> None:
        """The record of what this run writes, into the manifest (once it has one; a follower process has none)."""
        if self.manifest_written and self.lock is not None:
            with contextlib.suppress(OSError, LoraRunError):    # a full disk: the next record brings it up to date
                self.update_manifest()

    def read_manifest(self) -> dict[str, Any]:
        try:
            data = parse_json(read_limited(self.path / MANIFEST, "json", JSON_LIMIT))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError, FileProblem):
            return {}

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.read_manifest()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        data[WRITTEN] = self._written(data.get(WRITTEN))
        data.update(self._writers_record())
        self._write_manifest(data)
        return data

    def _write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.path / MANIFEST, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def _writers_record(self) -> dict[str, list[str]]:
        """What the run's writers say now: ``FILES``, and ``WRITING`` with its ``OTHERS``."""
        return {FILES: self._files(), WRITING: sorted({rel for rel, _ in self.busy}),
                OTHERS: sorted(set().union(*(others for _, others in self.busy)))}

    def _written(self, before: Any) -> list[str]:
        """The top-level entries runs wrote here: those recorded before, and those this run's writers wrote (what was
        there already, a user's file added during a run or between a run and its --resume, is never counted)."""
        names = {n for n in before if isinstance(n, str)} if isinstance(before, list) else set()
        return sorted(names | (self.names - self.found))

    def _files(self) -> list[str]:
        """``FILES``: the entries inside the run's folders that its writers named ahead, and those they wrote (and
        earlier starts') that exist."""
        return sorted(self.claimed | {rel for rel in self.files if os.path.lexists(self.path / rel)})

    def record_files(self) -> None:
        """Bring the manifest's ``FILES`` up to date (what hooks wrote after the final manifest, the loss log's last
        rows), while this run still holds the folder; a failure to write it is no error (the record is a safeguard)."""
        if not self.manifest_written or self.lock is None:
            return
        data = self.read_manifest()
        if not isinstance(data.get("lora_run_version"), str):
            return
        record = self._writers_record()
        if any(data.get(key) != value for key, value in record.items()):
            data.update(record)
            with contextlib.suppress(OSError, LoraRunError):
                self._write_manifest(data)

    def log(self, message: str) -> None:
        """Append to run.log; the log is informative, so a failed append (a full disk) is not an error. A run.log with
        other names (a run folder copied with ``cp -al``) gets its own copy first: the copy's log never grows."""
        with contextlib.suppress(OSError, OutputError):
            with open_append(self.path / LOG) as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    # ------------------------------------------------------------------------- the run's start and end
    def start(self, run: Any, *, allow_dataset_change: bool) -> None:
        """After ``prepare``: the temporary files of an interrupted write removed (on resume), a `[train] cache_dir`
        made lora-run's cache (``cachedir.claim_cache``), the reserve set aside, the resolved recipe, the manifest
        (status "running"; the process count of a launched run) and the dataset record written."""
        from lora_run.recipe import dump_recipe, replace

        recipe, loaded, report, resume = run.recipe, run.loaded, run.lint, run.resume
        self.started, self.resumed, self.run = time.time(), resume, run
        if resume:
            cache = resolved(recipe.train.cache_dir) if recipe.train.cache_dir else None
            if cache is None or self.path in cache.parents:   # a shared cache may have live writers
                for tmp in remove_temp_files(self.path):
                    self.log(f"removed the temporary file of an interrupted write: {tmp.name}")
        if recipe.train.cache_dir:     # made lora-run's cache (its marker) before any backend writes there
            from .cachedir import claim_cache

            claim_cache(Path(recipe.train.cache_dir))
        self.reserve()
        # `[output] dir` is this folder, whether `--output-dir` or the recipe named it, from any working folder: the
        # run's recipe says where it runs, and the recorded one, re-run (`--resume` too), finds it
        run.recipe = recipe = replace(recipe, output={"dir": str(self.path)})
        self.write_text(RECIPE, dump_recipe(
            recipe,
            header=f"Resolved from {loaded.shown} by lora-run {__version__}.\nRe-run with: lora-run {self.path / RECIPE}"))
        before = self.read_manifest() if resume else {}
        manifest = manifest_base(run, before.get("model"))
        manifest.update(status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if run.process.launched:
            manifest["processes"] = {"world_size": run.process.world}
        if resume:

            def earlier(key: str) -> list[Any]:   # a damaged manifest's value is dropped, not trusted
                value = before.get(key)
                return value if isinstance(value, list) else []
            manifest["resumed_at"] = [*earlier("resumed_at"), manifest.pop("started_at")]
            changes = version_changes(before, manifest)
            if changes:     # allowed (a fix may be what the resume is for), but the result may differ: said and kept
                run.echo(f"warning: this run was started with other versions ({'; '.join(changes)}); the resumed "
                         "run may not end bitwise equal to an uninterrupted one")
                manifest["resumed_with_other_versions"] = [*earlier("resumed_with_other_versions"),
                                                           {"at": manifest["resumed_at"][-1], "changes": changes}]
                # what the run began with stays on record: this start's versions are kept beside it
                for key in ("lora_run_version", "packages"):
                    if key in before:
                        manifest[f"started_with_{key}"] = before.get(f"started_with_{key}", before[key])
            manifest["invocations"] = [*earlier("invocations"), manifest["invocations"][-1]]
            if allow_dataset_change:
                manifest["dataset_change_allowed_at"] = [*earlier("dataset_change_allowed_at"),
                                                         manifest["resumed_at"][-1]]
        self.update_manifest(**manifest)
        self.manifest_written = True
        self.write_text(DATASET_RECORD, json.dumps({"hash": report.dataset_hash, "files": report.files},
                                                   indent=1, sort_keys=True) + "\n")
        self.log(f"lora-run {__version__}: {loaded.shown} with backend {recipe.backend.name}")

    def record_plan(self, plan: Any) -> None:
        """The files the backend's plan names, and the plan in the manifest; its notes (what a backend does not use
        of the recipe, how it reads it) in run.log too, as `lora-run plan` shows them."""
        for name, content in plan.files.items():
            self.write_text(name, content)
        self.update_manifest(plan={"steps": plan.steps, "commands": plan.commands, "notes": list(plan.notes),
                                   "memory_estimate_gib": plan.memory_estimate_gib, "memory_mode": plan.memory_mode})
        for note in plan.notes:
            self.log(f"plan note: {note}")

    def error_for(self, exc: BaseException) -> LoraRunError | None:
        """A full disk met by a write outside the atomic writers (a tracker, a library), as one line naming the
        file; None for any other crash."""
        if is_disk_full(exc):
            return disk_full_error(Path(getattr(exc, "filename", None) or self.path), None)
        return None

    def finish(self, status: str, error: BaseException | None, artifacts: dict[str, Any],
               echo: Callable[[str], None]) -> None:
        """The run's end: the reserve released, then the final manifest; a fresh run that stopped before it wrote
        anything of value, with bad input (exit 2) found by a backend's pre-flight or before its manifest
        existed, removes what it wrote, so the corrected command just works."""
        self.unreserve()
        code = getattr(error, "exit_code", None)
        undo = (not self.resumed and status == "failed" and (code == 2 or not self.manifest_written)
                and not _valuable(self.path))
        if undo and self.remove_created():
            echo(f"note: nothing was kept in {self.path}: the run stopped before training (fix the problem and "
                 "run the same command again)")
            return
        try:
            from .provenance import lora_digests

            final = {"hardware": hardware(), "lora_files": lora_digests(self.path, artifacts)}   # torch is loaded now
            before = self.read_manifest()
            if self.run is not None:     # a hub model is in the local cache now: its commit is known
                final["model"] = model_identity_of(self.run, before.get("model"))
            artifacts = dict(artifacts)
            steps = artifacts.pop("steps_this_start", None)      # a backend's: the steps this start trained
            finished, duration = time.strftime("%Y-%m-%dT%H:%M:%S%z"), round(time.time() - self.started, 2)
            invocations = before.get("invocations")
            if isinstance(invocations, list) and invocations and isinstance(invocations[-1], dict):
                # this start's own record (a start that was killed has none: it could write nothing)
                invocations[-1].update(status=status, finished_at=finished, duration_s=duration,
                                       **({"steps": steps} if isinstance(steps, list) else {}))
                final["invocations"] = invocations
            self.update_manifest(status=status, finished_at=finished, duration_s=duration, artifacts=artifacts,
                                 error=(str(error) or type(error).__name__) if error else None, **final)
        except (OSError, LoraRunError) as exc:
            echo(f"warning: could not record the final status \"{status}\" in {self.file(MANIFEST)}: {exc}")
        self.log(f"run {status}")


def manifest_base(run: Any, earlier_model: Any = None) -> dict[str, Any]:
    """The manifest's record of what the run is made of; ``earlier_model``: the base model's record of an earlier
    start of the same run (its file digests are reused where the files did not change)."""
    r, report = run.recipe, run.lint
    return {
        "lora_run_version": __version__,
        "recipe": str(run.loaded.path.resolve()),
        "command": sys.argv,
        "cwd": os.getcwd(),
        # every start of the run (the first, then each --resume): the command line, in the folder it ran in
        "invocations": [{"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cwd": os.getcwd(),
                         "command": ["lora-run", *sys.argv[1:]]}],
        "packages": package_versions(),
        "backend": r.backend.name,
        "family": r.model.family,
        "model_source": r.model.source or dict(r.model.files),
        "plugins": [{k: p[k] for k in ("name", "distribution", "version")} for p in describe_plugins(run.plugins)],
        "dataset": {"path": r.dataset.path, "hash": report.dataset_hash, **report.counts},
        "seed": r.train.seed,
        "lora": {"rank": r.lora.rank, "alpha": r.lora.alpha, "targets": r.lora.targets},
        "lr": r.optimizer.lr,
        "steps": r.train.steps,
        "epochs": r.train.epochs,
        "hardware": hardware(),
        "external_tools": {},
        "model": model_identity_of(run, earlier_model),
    }


def model_identity_of(run: Any, earlier: Any) -> dict[str, Any]:
    """The base model's identity (``provenance.model_identity``); the family's default hub model where the recipe
    names no source and no files."""
    model, default = run.recipe.model, None
    if not model.source and not dict(model.files):
        with contextlib.suppress(Exception):     # the native adapter knows the family's default hub id
            import importlib

            where = run.plugins.registry["family"][model.family].adapters.get("native", "")
            module, _, name = where.partition(":")
            default = getattr(getattr(importlib.import_module(module), name), "default_hub_id", None)
    return model_identity(model, default, earlier)


def _valuable(folder: Path) -> bool:
    """Did a run write something worth keeping (a LoRA or checkpoint file anywhere but the cache)?"""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "cache" and not os.path.islink(os.path.join(root, d))]
        if any(n.endswith(".safetensors") and not n.startswith(".") for n in names):
            return True
    return False
