"""Stage the training sets for diffusion-pipe: one folder per set with the images and their training captions.

Why not point diffusion-pipe at the dataset folders: it writes its cache into them (read-only datasets fail),
it reads ``<stem>.txt`` captions as they are (our trigger policy and the regularisation sets' default caption
would be lost), and it skips images without a caption. Here every usable image (after lint) is linked (or
copied) as ``NNNNN_<hash>_<stem>`` (the stem made safe for a file name: ``lora_run_engines.stage.safe_stem``)
next to the same name's ``.txt`` holding exactly the caption we train with. Images the
lint had to convert (EXIF rotation, CMYK, 16-bit, alpha, palette, animation) are written as converted PNGs,
so diffusion-pipe sees the same pixels our other backends train on. The file names carry a hash of the image
bytes and the caption: diffusion-pipe keys its cache on the file list, not on file contents, so an edited
image or caption gets a new name and is cached afresh, while an unchanged set reuses the cache.

What is staged (:func:`wanted_sets`) comes from the dataset lint's result (each image's SHA-256 and whether it was
converted), so no image is read again to name it; :func:`content_digest` is its hash, part of the staging folder's
name under ``[train] cache_dir`` (``translate.staging_root``). :func:`stage` writes a folder that does not exist yet
aside and renames it into place whole, so a run never sees, nor writes over, a half-staged folder another run is
reading; a folder that exists already holds the same content (its name says so) and is only checked (nothing is
written when it is as wanted). Entries no longer wanted (in the run folder's own ``data/``) are removed; the
``cache/`` folder diffusion-pipe keeps there is left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from lora_run.dataset import Item
from lora_run_folder import training_caption
from lora_run_folder.images import decode_rgb, read_image_bytes
from lora_run_folder.lint import file_key
from lora_run.schema import Recipe
from lora_run_engines.stage import Staged, safe_stem, sync_folder

#: Image files diffusion-pipe reads with Pillow as they are (others are converted to PNG).
PASS_THROUGH = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

#: set name → staged file name → what it is
Sets = dict[str, dict[str, Staged]]


def set_of(item: Item) -> str:
    if not item.is_reg:
        return "subject"
    index = item.subset.rsplit("[", 1)[-1].rstrip("]")
    return f"reg-{index}"


def _image_facts(item: Item, lint: Any) -> tuple[str, bool]:
    """(SHA-256 of the image's bytes, whether the lint converted it) from the lint's result; an item the lint did not
    hash (no report given) is read and decoded here, once."""
    digests = lint.files.get(file_key(item)) if lint is not None else None
    if digests and digests.get("image"):
        converted = any(f.code == "converted" and f.file == str(item.image) for f in lint.findings)
        return digests["image"], converted
    opened = decode_rgb(read_image_bytes(item.image))
    return opened.sha256, bool(opened.notes)


def wanted_sets(recipe: Recipe, items: list[Item], set_names: list[str], *, lint: Any = None,
                copy: bool = False) -> Sets:
    """Every staged file of every set (``set_names``, in order): the image (a link, a copy, or a converted PNG) and
    its training caption, named ``NNNNN_<hash of image bytes and caption>_<safe stem>``."""
    sets: Sets = {}
    for name in set_names:
        wanted: dict[str, Staged] = {}
        for index, item in enumerate(i for i in items if set_of(i) == name):
            caption = training_caption(item, recipe.dataset)
            sha, converted = _image_facts(item, lint)
            digest = hashlib.sha256(f"{sha}\0{caption}".encode("utf-8", "surrogateescape")).hexdigest()[:10]
            stem = f"{index:05d}_{digest}_{safe_stem(item.image.stem)}"
            suffix = item.image.suffix.lower()
            if converted or suffix not in PASS_THROUGH:
                wanted[f"{stem}.png"] = Staged("png", item.image)
            else:
                wanted[f"{stem}{suffix}"] = Staged("copy" if copy else "link", item.image.resolve())
            wanted[f"{stem}.txt"] = Staged("text", text=caption)
        sets[name] = wanted
    return sets


def content_digest(sets: Sets) -> str:
    """A hash of everything :func:`stage` writes: each set's file names (which carry each image's and caption's
    hash), how each is made (link, copy, PNG), from which file, and each caption's text."""
    listing = [[name, file, s.kind, str(s.source or ""), s.text]
               for name, files in sets.items() for file, s in sorted(files.items())]
    return hashlib.sha256(json.dumps(listing, ensure_ascii=False).encode("utf-8", "surrogateescape")).hexdigest()


def _sync(sets: Sets, root: Path) -> None:
    for name, wanted in sets.items():
        sync_folder(root / name, wanted, lambda entry: entry.name != "cache")   # diffusion-pipe's cache stays


def stage(sets: Sets, root: Path) -> dict[str, int]:
    """Make `root/<set>/` hold the files of every set; returns the number of images per set.

    A ``root`` that exists (this run folder's earlier attempt, or a shared folder keyed by this content) is brought to
    what is wanted in place: nothing is written where a file is as wanted already. A new ``root`` is staged in a
    hidden folder beside it and renamed into place whole; when another run renamed its own there first, theirs (of
    the same content) is used and ours removed."""
    if root.is_dir():
        _sync(sets, root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        building = root.with_name(f".{root.name}.{os.getpid()}.{secrets.token_hex(4)}.staging")
        building.mkdir()
        try:
            _sync(sets, building)
            try:
                os.rename(building, root)
            except OSError:
                if not root.is_dir():
                    raise
                _sync(sets, root)       # another run's, of the same content: checked, nothing rewritten
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return {name: sum(1 for file in wanted if not file.endswith(".txt")) for name, wanted in sets.items()}
