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
from lora_run.files import FileProblem, read_limited, shown
from lora_run.hookspecs import hookimpl
from lora_run.recipe import format_key
from lora_run.schema import Recipe
from lora_run_training.sections import DatasetKeys

from .images import IMAGE_EXTENSIONS, UNREAD_IMAGE_EXTENSIONS

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
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        return None, "caption is " + ("UTF-16 text; save it as UTF-8" if utf16 else "not UTF-8 text")


def _listing(folder: Path, extensions: frozenset[str]) -> list[Path]:
    """The entries directly in `folder` with one of `extensions` (any case) that are not folders, sorted by name.
    Hidden names (a leading dot: `.DS_Store`, macOS's `._photo.jpg`) are left out; sub-folders (`__MACOSX`) and
    symlink loops are not entered."""
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
        if entry.suffix.lower() in extensions:
            try:
                # anything but a folder: a dangling link, a pipe or a device named like an image is the lint's to
                # name, never silently left out
                if not entry.is_dir():
                    found.append(entry)
            except OSError:  # a looping symlink: lint reports it as unreadable
                found.append(entry)
    return sorted(found, key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return _listing(folder, IMAGE_EXTENSIONS)


def unread_images(section: DatasetKeys) -> list[Path]:
    """Files of the subject and regularisation folders in an image format the folder type does not read (GIF,
    TIFF, HEIC, …): the lint names each, so none is left out unseen."""
    folders = ([section.path] if section.path is not None else []) + [reg.path for reg in section.regularization]
    return [f for folder in dict.fromkeys(folders) for f in _listing(Path(folder), UNREAD_IMAGE_EXTENSIONS)]


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
    return out + extension_problems(d) + same_folder_problems(d)


def same_folder_problems(section: DatasetKeys) -> list[tuple[tuple[Any, ...], str]]:
    """Regularisation sets that read the subject folder, or the folder of an earlier set (links resolved): its
    images would be trained twice, or as both the subject and "not the subject"."""
    out: list[tuple[tuple[Any, ...], str]] = []
    subject = _real(section.path)
    seen = {subject: "the subject folder [dataset.path]"} if subject else {}
    for n, reg in enumerate(section.regularization):
        real = _real(reg.path)
        if real is None:             # no folder at all (a NUL byte, say): the folder checks name it
            continue
        if real in seen:
            fix = ("give a folder of other people (playbook §6)" if real == subject
                   else "use one set with more repeats or a larger weight")
            out.append((("dataset", "regularization", n, "path"), f"is {seen[real]} ({shown(real)}); {fix}"))
        else:
            seen[real] = f"the folder of [dataset.regularization[{n}].path]"
    return out


def _real(path: str | None) -> str | None:
    """``path`` with its links resolved, or None where it names no file at all (empty, a NUL byte)."""
    try:
        return os.path.realpath(path) if path else None
    except (ValueError, OSError):
        return None


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
    if recipe.dataset.type == "folder":
        from lora_run.dataset import WARNING

        for path in unread_images(recipe.dataset):
            report.add(WARNING, "unread-format", f"{path.suffix} images are not read (only "
                       f"{' '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG or JPEG to train on it", path)
