"""Stage the training sets for diffusion-pipe: one folder per set with the images and their training captions.

Why not point diffusion-pipe at the dataset folders: it writes its cache into them (read-only datasets fail),
it reads ``<stem>.txt`` captions as they are (our trigger policy and the regularisation sets' default caption
would be lost), and it skips images without a caption. Here every usable image (after lint) is linked (or
copied) as ``NNNNN_<hash>_<stem>`` (the stem made safe for a file name: ``lora_run_engines.stage.safe_stem``)
next to the same name's ``.txt`` holding exactly the caption we train with. Images the
lint had to convert (EXIF rotation, CMYK, 16-bit, alpha, palette, animation) are written as converted PNGs,
so diffusion-pipe sees the same pixels our other backends train on. The file names carry a hash of the image
bytes and the caption: diffusion-pipe keys its cache on the file list, not on file contents, so an edited
image or caption gets a new name and is cached afresh, while an unchanged set reuses the cache. Entries from an earlier staging that are
no longer wanted are removed; the ``cache/`` folder diffusion-pipe keeps there is left alone.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from lora_run.dataset import Item
from lora_run_folder import training_caption
from lora_run_folder.images import open_rgb
from lora_run.schema import Recipe
from lora_run_engines.stage import Staged, safe_stem, sync_folder

#: Image files diffusion-pipe reads with Pillow as they are (others are converted to PNG).
PASS_THROUGH = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def set_of(item: Item) -> str:
    if not item.is_reg:
        return "subject"
    index = item.subset.rsplit("[", 1)[-1].rstrip("]")
    return f"reg-{index}"


def stage(recipe: Recipe, items: list[Item], root: Path, set_names: list[str], *, copy: bool = False) -> dict[str, int]:
    """Populate `root/<set>/` for every set; returns the number of images per set."""
    counts: dict[str, int] = {}
    for name in set_names:
        members = [item for item in items if set_of(item) == name]
        wanted: dict[str, Staged] = {}
        for index, item in enumerate(members):
            caption = training_caption(item, recipe.dataset)
            digest = hashlib.sha256(item.image.read_bytes() + b"\0" + caption.encode("utf-8")).hexdigest()[:10]
            stem = f"{index:05d}_{digest}_{safe_stem(item.image.stem)}"
            suffix = item.image.suffix.lower()
            if open_rgb(item.image).notes or suffix not in PASS_THROUGH:
                wanted[f"{stem}.png"] = Staged("png", item.image)
            else:
                wanted[f"{stem}{suffix}"] = Staged("copy" if copy else "link", item.image.resolve())
            wanted[f"{stem}.txt"] = Staged("text", text=caption)
        sync_folder(root / name, wanted, lambda entry: entry.name != "cache")   # diffusion-pipe's cache stays
        counts[name] = len(members)
    return counts
