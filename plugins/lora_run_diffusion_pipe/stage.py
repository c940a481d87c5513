"""Stage the training sets for diffusion-pipe: one folder per set with the images and their training captions.

Why not point diffusion-pipe at the dataset folders: it writes its cache into them (read-only datasets fail),
it reads ``<stem>.txt`` captions as they are (our trigger policy and the regularisation sets' default caption
would be lost), and it skips images without a caption. Here every usable image (after lint) is linked (or
copied) as ``<stem>_<hash>`` (the stem made safe for a file name: ``lora_run_engines.stage.safe_stem``)
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
``cache/`` folder diffusion-pipe keeps there is left alone. The naming, the digest and the publishing are
``lora_run_engines.stage``'s, which the kohya backend stages with too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lora_run.dataset import Item
from lora_run_folder import training_caption
from lora_run.schema import Recipe
from lora_run_engines.stage import Sets, Staged, content_digest, publish, staged_files

__all__ = ["PASS_THROUGH", "Sets", "content_digest", "set_of", "stage", "wanted_sets"]

#: Image files diffusion-pipe reads with Pillow as they are (others are converted to PNG).
PASS_THROUGH = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def set_of(item: Item) -> str:
    if not item.is_reg:
        return "subject"
    index = item.subset.rsplit("[", 1)[-1].rstrip("]")
    return f"reg-{index}"


def wanted_sets(recipe: Recipe, items: list[Item], set_names: list[str], *, lint: Any = None,
                copy: bool = False) -> Sets:
    """Every staged file of every set (``set_names``, in order): the image (a link, a copy, or a converted PNG) and
    its training caption, named ``<safe stem>_<hash of image bytes and caption>``
    (``lora_run_engines.stage.staged_files``)."""
    return {name: staged_files((i for i in items if set_of(i) == name),
                               lambda item: training_caption(item, recipe.dataset), lint=lint, copy=copy,
                               pass_through=PASS_THROUGH)
            for name in set_names}


def _removable(wanted: dict[str, Staged]) -> Callable[[Path], bool]:
    return lambda entry: entry.name != "cache"        # diffusion-pipe's cache stays


def stage(sets: Sets, root: Path, key: str = "") -> dict[str, int]:
    """Make `root/<set>/` hold the files of every set, and `root` lora-run's marker with ``key``
    (``translate.staging_key``); returns the number of images per set (``lora_run_engines.stage.publish``: a new
    ``root`` renamed into place whole, an existing one only checked). No cache is carried: diffusion-pipe's is one
    per set, keyed by the whole set's file list with its absolute paths (docs/backend-diffusion-pipe.md)."""
    return publish(sets, root, _removable, key=key)
