"""Built-in dataset plugin: the `folder` type (images in a folder with a caption file next to each) and the
dataset machinery every type shares: the caption a sample is trained with (``training_caption``), opening
images safely (``images``), the rules among the `[dataset]` keys (``check_recipe``) and the dataset lint
(``lint``, through the ``lint_dataset`` hook, so it checks the items of any dataset type).

Registered through the `lora_run` entry-point group like any third-party plugin. No torch import.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lora_run.dataset import Item
from lora_run.errors import RecipeError
from lora_run.files import FileProblem, read_limited
from lora_run.hookspecs import hookimpl
from lora_run.recipe import format_key
from lora_run.schema import Recipe
from lora_run_training.sections import DatasetKeys

from .images import IMAGE_EXTENSIONS

#: The size limit (bytes) of one caption file.
CAPTION_LIMIT = 64 * 1024


def training_caption(item: Item, section: DatasetKeys) -> str:
    """The caption a sample is trained with (before caption dropout)."""
    caption = (item.caption or "").strip()
    if item.is_reg:
        return caption or item.default_caption
    trigger = section.trigger.strip()
    if section.trigger_policy == "prepend" and trigger and trigger not in caption:
        return f"{trigger}, {caption}" if caption else trigger
    return caption


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(text, error) for a caption file; a missing file gives (None, None)."""
    if not os.path.lexists(path):
        return None, None
    try:
        data = read_limited(path, "caption", CAPTION_LIMIT)
    except FileProblem as exc:
        return None, f"caption file {exc}"
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "caption is not UTF-8 text"


def _images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name. Sub-folders (and symlink loops) are not entered."""
    if not os.path.isdir(folder):        # os.path: an over-long or unreadable path is "not a folder", not a crash
        return []
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:                      # unreadable folder: the lint names it
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                # anything but a folder: a dangling link, a pipe or a device named like an image is the lint's to
                # name, never silently left out
                if not entry.is_dir():
                    found.append(entry)
            except OSError:  # a looping symlink: lint reports it as unreadable
                found.append(entry)
    return sorted(found, key=lambda p: p.name)


def extension_problems(section: DatasetKeys) -> list[tuple[tuple[Any, ...], str]]:
    """The caption extensions of the subject and regularisation sets that are no file extension."""
    return [(where, f"must be a file extension such as \".txt\", got {ext!r}")
            for where, ext in [(("dataset", "caption_extension"), section.caption_extension),
                               *((("dataset", "regularization", n, "caption_extension"), reg.caption_extension)
                                 for n, reg in enumerate(section.regularization))]
            if not re.fullmatch(r"\.[^\s/\\\x00]+", ext)]


def dataset_key_problems(recipe: Recipe) -> list[tuple[tuple[Any, ...], str]]:
    """The rules among `[dataset]`'s keys (``check_recipe``, for every dataset type): the buckets hold the
    resolution, a trigger policy has a trigger, caption extensions are file extensions."""
    d, out = recipe.dataset, []
    if d.bucket_min > d.bucket_max:
        out.append((("dataset", "bucket_min"), f"must be <= bucket_max ({d.bucket_max}), got {d.bucket_min}"))
    if not d.bucket_min <= d.resolution <= d.bucket_max:
        out.append((("dataset", "resolution"), f"must lie between bucket_min ({d.bucket_min}) and bucket_max "
                    f"({d.bucket_max}), got {d.resolution}"))
    if d.trigger_policy != "none" and not d.trigger.strip():
        out.append((("dataset", "trigger"), f"is empty but trigger_policy is \"{d.trigger_policy}\"; set a "
                    "unique trigger token or trigger_policy = \"none\""))
    return out + extension_problems(d)


class FolderDataset:
    def __init__(self, section: DatasetKeys, recipe: Recipe):
        self.section = section

    def check(self) -> list[tuple[tuple[str, ...], str]]:
        if self.section.path is None:
            return [(("dataset", "path"), "is required for dataset type \"folder\" (the folder of subject images)")]
        return []

    def items(self) -> list[Item]:
        s = self.section
        unusable = extension_problems(s)    # never lint with a caption file name that cannot be formed
        if unusable:
            raise RecipeError([f"[{format_key(where)}] {message}" for where, message in unusable])
        out = []
        for image in _images(Path(s.path)) if s.path is not None else ():
            cap_file = image.with_suffix(s.caption_extension)
            text, error = read_caption(cap_file)
            out.append(Item(image, text, cap_file if text is not None or error else None, "subject",
                            repeats=s.repeats, caption_error=error))
        for n, reg in enumerate(s.regularization):
            for image in _images(Path(reg.path)):
                cap_file = image.with_suffix(reg.caption_extension)
                text, error = read_caption(cap_file)
                out.append(Item(image, text, cap_file if text is not None or error else None,
                                f"regularization[{n}]", is_reg=True, weight=reg.weight, repeats=reg.repeats,
                                default_caption=reg.default_caption, caption_error=error))
        return out


@hookimpl
def register_datasets(register):
    register("folder", FolderDataset, description="images + same-name caption files in a folder")


@hookimpl
def check_recipe(recipe: Recipe) -> list:
    return dataset_key_problems(recipe)


@hookimpl
def lint_dataset(recipe, items, report):
    from .lint import lint_dataset as lint

    lint(recipe, items, report)
