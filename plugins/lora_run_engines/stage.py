"""Staging a dataset for an engine: one folder per image set, holding exactly the files the engine must read.

Engines read images and ``<stem>.txt`` captions from folders, so each backend decides the file names and
what each file is (a :class:`Staged`); :func:`sync_folder` makes the folder hold exactly that: a link to the
user's image (a copy where asked, or where the file system has no symlinks), a PNG for an image the dataset
lint had to convert (EXIF rotation, CMYK, 16-bit, alpha, …: every backend trains on the same pixels), and
the training caption. A file already as wanted is left alone (a re-run re-uses the engine's caches); an
entry no longer wanted is removed when the backend's ``removable`` says so (the engine's own cache is kept).
Only lora-run's staging folders are ever touched. No torch.

What both engine backends stage, and how, is one implementation here:

- :func:`staged_files` — one set's files, each image named ``<safe stem>_<hash of image bytes and caption>`` beside
  its caption: the engines key their caches beside the images (sd-scripts' ``*.npz``, diffusion-pipe's ``cache/``)
  on the file name, not the contents, so an edited image or caption gets a new name and a fresh cache, while an
  image added or removed renames nothing else (no index in the name). Each image's SHA-256 and whether it was
  converted come from the dataset lint's result (no image is read again);
- :func:`content_digest` — a hash of everything staged (file names, what each is made from, caption texts), part of
  the staging folder's name under ``[train] cache_dir`` (with :func:`lora_run_engines.dataset_key`), so recipes
  that stage anything different never share a folder;
- :func:`publish` — a folder that does not exist yet is staged aside and renamed into place whole (when another run
  renamed its own there first, theirs, of the same content, is used and ours removed); a folder that exists is only
  checked: nothing is written where a file is as wanted, so no run rewrites a file another run is reading. Every
  folder gets lora-run's marker (:data:`MARKER`: the key of what else the engine's caches depend on and, per staged
  image, its bytes' SHA-256 and kind), and a backend's ``carry`` (kohya's) brings into a new folder the engine's
  caches that the markers prove valid there (:func:`sources`: the folders beside it staged with the same key);
- :func:`use` / :func:`remove_earlier` — a run holds the shared folder it stages (a shared ``flock`` beside it,
  passed on to the engine) until the engine is done; with the backend's ``remove_old_staging`` a run removes the
  folders beside its own that hold the marker with its key, are older, and no run holds;
- :func:`linted` — the run's linted items, or for ``lora-run plan`` (no lint yet) the lint run here, so the plan
  names the folder the run stages;
- :func:`staged_size` / :func:`upscale_note` — an image's size as the engine sees it once staged, and the plan's note
  naming the images an engine scales up to its bucket (lora-run's own data pipeline never does).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import attrs

from . import stage_link


def safe_stem(stem: str) -> str:
    """An image's stem as part of a staged file name: letters, digits, ``._-`` (others become ``_``), at most 80
    characters, so the name fits the file system (a 255-byte stem plus our prefix does not) and holds no line
    break or quote for the engine to trip over."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "image"


@attrs.frozen
class Staged:
    """What one staged file is: ``link`` / ``copy`` of ``source``, ``png`` (``source`` decoded and converted
    as the dataset lint does), or ``text`` (a caption)."""

    kind: str
    source: Path | None = None
    text: str = ""
    sha: str = ""        # an image's: the SHA-256 of the bytes the lint read (the name carries its hash)


def place(target: Path, staged: Staged) -> None:
    """Make ``target`` what ``staged`` says, atomically; nothing is written when it already is."""
    from lora_run_rundir import atomic_path, atomic_write_text

    if staged.kind == "text":
        if target.is_file() and not target.is_symlink() and target.read_text("utf-8") == staged.text:
            return
        atomic_write_text(target, staged.text)
        return
    assert staged.source is not None
    if staged.kind == "link":
        stage_link(staged.source, target)
        return
    if target.is_file() and not target.is_symlink() and \
            target.stat().st_mtime_ns >= staged.source.stat().st_mtime_ns and \
            (staged.kind == "png" or target.stat().st_size == staged.source.stat().st_size):
        return
    if target.is_symlink():
        target.unlink()
    with atomic_path(target) as tmp:
        if staged.kind == "copy":
            shutil.copyfile(staged.source, tmp)
        elif staged.kind == "png":
            from lora_run_folder.images import open_rgb

            open_rgb(staged.source).image.save(tmp, format="PNG")  # type: ignore[attr-defined]
        else:
            raise ValueError(f"unknown staging kind {staged.kind!r}")


def sync_folder(folder: Path, wanted: dict[str, Staged], removable: Callable[[Path], bool]) -> None:
    """``folder`` holds every ``wanted`` file (name → what it is); other entries that are ``removable`` go. A link
    (or anything but a folder) in the folder's place is refused (``not_staged_here``): what is removed there would be
    removed in the link's target."""
    if os.path.islink(folder) or (os.path.lexists(folder) and not folder.is_dir()):
        raise not_staged_here(folder, "a link or not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name in wanted or not removable(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name, staged in wanted.items():
        place(folder / name, staged)


#: set name (a folder under the staging root) → staged file name → what it is
Sets = dict[str, dict[str, Staged]]


def linted(ctx: Any) -> tuple[list[Any], Any]:
    """(usable items, lint report) of a run context; without a lint yet (``lora-run plan``) the dataset is linted
    here, only to name what would be staged (the run uses its own lint): ([], None) when that fails."""
    items, report = list(ctx.items), ctx.lint
    if report is None and not items:
        try:
            from lora_run.run import lint

            report = lint(ctx.recipe, ctx.plugins)
            items = report.usable
        except Exception:  # noqa: BLE001 - only for the plan's folder name (the run uses its own lint)
            items, report = [], None
    return items, report


def staged_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image as an engine sees it once staged: the header's size, sides swapped for an EXIF
    orientation of 5 to 8 (the lint stages such images rotated); None when unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - an unreadable image is the lint's to report
        return None
    if width <= 0 or height <= 0:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def upscale_note(engine: str, items: Iterable[Any], bucket: Callable[[int, int], tuple[int, int]], bucket_min: int,
                 how: str, shown: int = 3) -> str | None:
    """The plan's note naming the images of ``items`` that ``engine`` scales *up* to cover its bucket (``bucket``:
    an image's (width, height) → the engine's bucket for it), or None when it scales none. lora-run's own data
    pipeline never upscales: it trains such an image at a smaller bucket, so this is where the engine's training
    differs. Images the lint skips (a side below ``bucket_min``) are not counted."""
    found = []
    for item in items:
        size = staged_size(item.image)
        if size is None or min(size) < bucket_min:
            continue
        width, height = bucket(*size)
        if width > size[0] or height > size[1]:
            found.append(f"{Path(item.image).name} ({size[0]}×{size[1]} → {width}×{height})")
    if not found:
        return None
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return (f"{len(found)} image(s) are smaller than the bucket {engine} puts them in and are scaled up to it ({how}): "
            f"{', '.join(found[:shown])}{more}. lora-run's native backend never upscales (it trains such an image at "
            "a smaller bucket); use larger images to train the same pixels on every backend")


def _image_facts(item: Any, lint: Any, converted: set[str]) -> tuple[str, bool]:
    """(SHA-256 of the image's bytes, whether the lint converted it) from the lint's result; an item the lint did not
    hash (no report given) is read and decoded here, once."""
    from lora_run_folder.lint import file_key

    digests = lint.files.get(file_key(item)) if lint is not None else None
    if digests and digests.get("image"):
        return digests["image"], str(item.image) in converted
    from lora_run_folder.images import decode_rgb, read_image_bytes

    opened = decode_rgb(read_image_bytes(item.image))
    return opened.sha256, bool(opened.notes)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:10]


def staged_files(items: Iterable[Any], caption: Callable[[Any], str], *, lint: Any = None, copy: bool = False,
                 pass_through: Collection[str] | None = None) -> dict[str, Staged]:
    """One set's files: per item its image — a link (a copy with ``copy``) to it, or a converted PNG where the lint
    converted it or its suffix is not in ``pass_through`` (None: every suffix) — and ``<stem>.txt`` holding
    ``caption(item)``, the stem ``<safe stem>_<hash of the image bytes and that text>``.

    The name depends on the item alone, never on its place in the set: an image added or removed leaves every other
    name (and the engine's caches named after it) as it was. The engines sort the names, so the order they read is
    the safe stems' order, the dataset folder's own for ordinary names. Two items that would get one stem (the same
    bytes and caption under one safe stem: ``a.png`` and ``a.PNG``, ``a b.png`` and ``a_b.png``; compared without
    case, for case-insensitive file systems) are told apart by a hash of their own file's path as well, so no two
    images share a caption file or a cache. Each image's SHA-256 and whether it was converted come from the dataset
    lint's result (no image is read again)."""
    converted = {f.file for f in lint.findings if f.code == "converted"} if lint is not None else set()
    rows = []
    for item in items:
        text = caption(item)
        sha, was_converted = _image_facts(item, lint, converted)
        rows.append((item, text, sha, was_converted, safe_stem(item.image.stem)))
    stems = [f"{safe}_{_key(sha, text)}" for _, text, sha, _, safe in rows]
    clashing = Counter(stem.casefold() for stem in stems)
    for n, (item, text, sha, _, safe) in enumerate(rows):
        if clashing[stems[n].casefold()] > 1:
            stems[n] = f"{safe}_{_key(sha, text, str(item.image))}"
    taken: set[str] = set()
    for n, (item, text, sha, _, safe) in enumerate(rows):     # the same file listed twice: its occurrence too
        extra = 1
        while stems[n].casefold() in taken:
            extra += 1
            stems[n] = f"{safe}_{_key(sha, text, str(item.image), str(extra))}"
        taken.add(stems[n].casefold())
    wanted: dict[str, Staged] = {}
    for stem, (item, text, sha, was_converted, _) in zip(stems, rows):
        suffix = item.image.suffix.lower()
        if was_converted or (pass_through is not None and suffix not in pass_through):
            wanted[f"{stem}.png"] = Staged("png", item.image, sha=sha)
        else:
            wanted[f"{stem}{suffix}"] = Staged("copy" if copy else "link", item.image.resolve(), sha=sha)
        wanted[f"{stem}.txt"] = Staged("text", text=text)
    return wanted


def content_digest(sets: Sets) -> str:
    """A hash of everything :func:`publish` writes: each set's file names (which carry each image's and caption's
    hash), how each is made (link, copy, PNG), from which file, and each caption's text."""
    listing = [[name, file, s.kind, str(s.source or ""), s.text]
               for name, files in sets.items() for file, s in sorted(files.items())]
    return hashlib.sha256(json.dumps(listing, ensure_ascii=False).encode("utf-8", "surrogateescape")).hexdigest()


def staged_stems(wanted: dict[str, Staged]) -> set[str]:
    """The stems of a set's staged files (each image's and its caption's)."""
    return {name.rsplit(".", 1)[0] for name in wanted}


def cache_owner(name: str, stems: Collection[str]) -> str | None:
    """The stem among ``stems`` an engine's cache file named after a staged image (``<stem>_….npz``) belongs to
    (the longest that ``name`` starts with, followed by ``_``); None for a file of no such stem."""
    found = None
    for at, char in enumerate(name):
        if char == "_" and name[:at] in stems:
            found = name[:at]
    return found


#: lora-run's record in every folder it stages: what it staged (per set, each image's stem, file, kind and the SHA-256
#: the lint read) and ``key``, everything else the engine's caches depend on (the folder's name without the staged
#: content). It marks a folder lora-run made, and says which caches of another folder are valid in a new one.
MARKER = "lora-run-staging.json"
#: a marker larger than this is not lora-run's (it holds one line per staged image)
MARKER_LIMIT = 64 << 20

#: what an engine backend's :func:`publish` ``carry`` is called with: (the folder being staged, the sets, the folders
#: whose caches may serve it, each with its marker); it links the engine's caches that are valid there
Carry = Callable[[Path, Sets, list[tuple[Path, dict[str, Any]]]], None]


def marker_text(sets: Sets, key: str) -> str:
    """The marker (:data:`MARKER`) of a folder holding ``sets``, staged with ``key``: the same bytes for the same
    content (no time, no run), so a folder checked by another run is not rewritten."""
    staged = {name: {file.rsplit(".", 1)[0]: {"file": file, "kind": s.kind, "image": s.sha}
                     for file, s in sorted(files.items()) if s.kind != "text"}
              for name, files in sets.items()}
    return json.dumps({"lora_run_staging": 1, "key": key, "sets": staged}, indent=1, sort_keys=True) + "\n"


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a folder lora-run staged (a regular file, within :data:`MARKER_LIMIT`, of the form
    :func:`marker_text` writes); None for anything else: no marker, another program's file, a damaged one."""
    from lora_run_rundir import parse_json

    path = root / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MARKER_LIMIT:
            return None
        data = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("lora_run_staging") != 1 or not isinstance(data.get("key"), str) \
            or not isinstance(data.get("sets"), dict):
        return None
    def plain(name: Any) -> bool:       # a name in its folder, never a path
        return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name

    for name, files in data["sets"].items():
        if not plain(name) or not isinstance(files, dict) or not all(
                plain(stem) and isinstance(f, dict) and plain(f.get("file")) and
                all(isinstance(f.get(k), str) for k in ("kind", "image")) for stem, f in files.items()):
            return None
    return data


def sources(root: Path, key: str) -> list[tuple[Path, dict[str, Any]]]:
    """The folders beside ``root`` (``dataset-*``, real folders, not ``root``) that lora-run staged with the same
    ``key``, each with its marker, the most recently staged first: whose engine caches may serve ``root``."""
    found = []
    try:
        entries = list(root.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name == root.name or not entry.name.startswith("dataset-") or entry.is_symlink() \
                or not entry.is_dir():
            continue
        marker = read_marker(entry)
        if marker is not None and marker["key"] == key:
            try:
                found.append((-(entry / MARKER).stat().st_mtime_ns, entry.name, entry, marker))
            except OSError:
                continue
    return [(entry, marker) for _, _, entry, marker in sorted(found)]


def publish(sets: Sets, root: Path,
            removable: Callable[[dict[str, Staged]], Callable[[Path], bool]], *, key: str = "",
            carry: Carry | None = None, shared: bool = True) -> dict[str, int]:
    """Make ``root/<set>/`` hold the files of every set, and ``root`` the marker (:data:`MARKER`); returns the number
    of images (files but captions) per set.

    A ``root`` that exists (this run folder's earlier attempt, or a ``shared`` folder whose name says it holds this
    content) is brought to what is wanted in place: nothing is written where a file is as wanted already; an entry
    not wanted goes where ``removable(the set's wanted files)(entry)`` says so. A new ``root`` is staged in a hidden
    folder beside it and renamed into place whole, so no run sees a half-staged folder; when another run renamed its
    own there first, theirs (of the same content) is checked, rewriting nothing, and ours removed.

    ``carry`` (the engine backend's) brings the engine's caches that are valid here from elsewhere before the engine
    starts: into a new ``shared`` folder from the folders beside it staged with the same ``key`` (:func:`sources`),
    and into a folder that is not ``shared`` (a run folder's own) from its earlier staging, before what is no
    longer wanted goes. A ``shared`` folder that exists gets nothing: another run's engine may be writing there."""
    def sync(into: Path, keep: bool = False) -> None:
        for name, wanted in sets.items():
            sync_folder(into / name, wanted, (lambda _entry: False) if keep else removable(wanted))

    from lora_run_rundir import atomic_write_text

    text = marker_text(sets, key)

    def mark(into: Path) -> None:
        path = into / MARKER
        if path.is_symlink() or not path.is_file() or path.read_text("utf-8", "replace") != text:
            atomic_write_text(path, text)

    if os.path.islink(root) or (os.path.lexists(root) and not root.is_dir()):
        raise not_staged_here(root, "a link or not a folder")
    if root.is_dir():
        if read_marker(root) is None:     # not a folder lora-run staged: nothing in it is ours to replace or remove
            raise not_staged_here(root, f"a folder without lora-run's staging record ({MARKER})")
        if not shared and carry is not None:
            earlier = read_marker(root)
            if earlier is not None and earlier["key"] == key:
                sync(root, keep=True)           # the new names beside the old, whose caches may serve them
                carry(root, sets, [(root, earlier)])
        sync(root)
        mark(root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        building = root.with_name(f".{root.name}.{os.getpid()}.{secrets.token_hex(4)}.staging")
        building.mkdir()
        try:
            sync(building)
            if carry is not None and shared:
                carry(building, sets, sources(root, key))
            mark(building)
            try:
                os.rename(building, root)
            except OSError:
                if not root.is_dir():
                    raise
                sync(root)       # another run's, of the same content: checked, nothing rewritten
                mark(root)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return {name: sum(1 for file in wanted if not file.endswith(".txt")) for name, wanted in sets.items()}


def not_staged_here(folder: Path, what: str) -> Exception:
    """The refusal (exit 2) to stage into ``folder``, which is ``what``: staging removes the files no longer wanted,
    so it works only in folders lora-run made (a real folder holding its marker), never through a link (a run
    folder's ``kohya/data`` linked to the dataset's parent had the dataset's images and captions deleted)."""
    from lora_run.errors import OutputError
    from lora_run.files import shown

    return OutputError(f"{shown(folder)}: is {what}, where lora-run stages the dataset for the engine (and removes "
                       "the staged files no longer wanted); move it away, lora-run stages it again (nothing was "
                       "touched)")


# ---------------------------------------------------------------------------- shared folders in use, and old ones
def lock_path(root: Path) -> Path:
    """The lock file of a shared staged folder: beside it (``.<name>.lock``), so it can be taken before the folder
    exists and outlives the folder's removal while a waiting run still holds it open."""
    return root.with_name(f".{root.name}.lock")


def _flock(path: Path, mode: int) -> int | None:
    """A file descriptor of ``path`` (created if missing) locked with ``mode`` (``fcntl.LOCK_SH`` or ``LOCK_EX``,
    with ``LOCK_NB``: None when another holds it); the lock is on the file at ``path`` when it is taken (a lock file
    removed or replaced while waiting is opened again), so a remover and a user never hold two different files."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(path)
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def use(root: Path) -> int:
    """Hold ``root`` (a staged folder under ``[train] cache_dir``) in use: a shared lock on its :func:`lock_path`,
    taken before the folder is checked or staged and held while the returned descriptor is open (the run closes it
    when its engine is done; the engine inherits it, so a lora-run killed under a running engine leaves it held).
    :func:`remove_earlier` removes no folder held so; it holds the lock exclusively while it moves a folder away, and
    a run waiting here meanwhile finds no folder and stages its own."""
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    fd = _flock(lock_path(root), fcntl.LOCK_SH)
    assert fd is not None
    return fd


@contextlib.contextmanager
def held(root: Path | None) -> Iterator[int | None]:
    """:func:`use` for a ``with`` block, its descriptor closed at the end (``root`` None: nothing held, None)."""
    fd = use(root) if root is not None else None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def remove_earlier(root: Path, key: str) -> list[str]:
    """Remove the folders beside ``root`` that an earlier run of this recipe staged and no run uses; returns their
    names. ``root`` must be staged (:func:`publish`) and held (:func:`use`). A folder goes only when all of this holds:

    - its name is ``dataset-*``, a real folder (no link), and it holds lora-run's marker (:data:`MARKER`) with the
      same ``key`` as ``root`` (the same `[dataset]` table, model files, precisions and engine settings: an earlier
      version of this recipe's dataset; another recipe's folders are never touched);
    - its marker is older than ``root``'s (a folder staged after this one, e.g. by a run of a later edit, stays);
    - no run holds it (:func:`use`): its lock is taken exclusively without waiting, and kept while the folder is moved
      to a hidden name (``.<name>.<pid>.<hex>.removing``), so no run starts using it meanwhile; the marker is read
      again under the lock. The moved folder is then deleted.

    Anything else under the cache folder, any folder without the marker (another program's, or one an earlier
    lora-run staged), is left alone."""
    import fcntl

    mine = read_marker(root)
    if mine is None or mine["key"] != key:
        return []
    try:
        since = (root / MARKER).stat().st_mtime_ns
    except OSError:
        return []
    removed = []
    for entry, _marker in sources(root, key):
        try:
            older = (entry / MARKER).stat().st_mtime_ns < since
        except OSError:
            older = False
        if not older:
            continue
        fd = _flock(lock_path(entry), fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:              # a run uses it
            continue
        moved = None
        try:
            marker = read_marker(entry)
            if marker is not None and marker["key"] == key and not entry.is_symlink():
                hidden = entry.with_name(f".{entry.name}.{os.getpid()}.{secrets.token_hex(4)}.removing")
                os.rename(entry, hidden)
                moved = hidden
                os.unlink(lock_path(entry))     # under the lock: a run waiting on it opens a new one
        except OSError:
            pass
        finally:
            os.close(fd)
        if moved is not None:
            shutil.rmtree(moved, ignore_errors=True)
            removed.append(entry.name)
    return sorted(removed)
