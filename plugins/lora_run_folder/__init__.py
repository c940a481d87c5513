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


def trigger_pattern(trigger: str, ignore_case: bool = False) -> re.Pattern[str] | None:
    """The trigger as a whole word (None for no trigger): ``ohwx`` is not found in ``ohwxman`` or ``bohwx``, nor
    ``sks`` in ``asks``; a trigger of several words matches with any run of spaces between them. A trigger's end
    that is punctuation (``<ohwx>``) needs no word break beside it."""
    words = trigger.split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    start = rf"(?<![^\W{_UNSPACED}])" if _spaced_word(words[0][0]) else ""
    end = rf"(?![^\W{_UNSPACED}])" if _spaced_word(words[-1][-1]) else ""
    return re.compile(start + body + end, re.IGNORECASE if ignore_case else 0)


#: Scripts written without spaces between words (Han, kana, Hangul's attached particles, Thai, Lao, Myanmar, Khmer):
#: a trigger beside or made of such letters needs no word break there ("一张ohwx的照片", "一张小明的照片").
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf"
             "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff")


def _spaced_word(char: str) -> bool:
    """A word character of a script that separates words with spaces (Latin, Cyrillic, Greek, digits …)."""
    return re.match(rf"[^\W{_UNSPACED}]", char) is not None


def has_trigger(caption: str, trigger: str, ignore_case: bool = False) -> bool:
    """Whether ``caption`` holds ``trigger`` as a whole word (``trigger_pattern``); case counts unless
    ``ignore_case`` (T5 reads ``OHWX`` and ``ohwx`` as different tokens)."""
    pattern = trigger_pattern(trigger, ignore_case)
    return pattern is not None and pattern.search(caption) is not None


def training_caption(item: Item, section: DatasetKeys) -> str:
    """The caption a sample is trained with (before caption dropout)."""
    caption = (item.caption or "").strip()
    if item.is_reg:
        return caption or item.default_caption
    trigger = section.trigger.strip()
    if section.trigger_policy == "prepend" and trigger and not has_trigger(caption, trigger):
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


def caption_file(image: Path, extension: str) -> Path:
    """The caption file of ``image``: the image's name with its last extension replaced by ``extension``; where no
    such file exists, one whose name differs from it only in letter case (``a.TXT``, as a dataset made on Windows
    or macOS has it) when there is exactly one."""
    wanted = image.with_suffix(extension)
    if os.path.lexists(wanted):
        return wanted
    try:
        names = [n for n in os.listdir(image.parent) if n.lower() == wanted.name.lower()]
    except OSError:
        return wanted
    return image.parent / names[0] if len(names) == 1 else wanted


def subfolder_images(section: DatasetKeys) -> list[tuple[Path, int]]:
    """The sub-folders of the subject and regularisation folders that hold images (folder, how many): the folder
    type reads only the images directly in a set's folder (a kohya-style ``10_ohwx`` sub-folder is not entered), so
    the lint names each rather than leave its images out unseen. Linked sub-folders (a loop back to the folder) and
    hidden ones are not looked into."""
    folders = ([section.path] if section.path is not None else []) + [reg.path for reg in section.regularization]
    out = []
    for folder in dict.fromkeys(folders):
        try:
            subs = sorted(e for e in Path(folder).iterdir()
                          if not e.name.startswith(".") and not e.is_symlink() and e.is_dir())
        except (OSError, ValueError):
            continue
        for sub in subs:
            count = len(_listing(sub, IMAGE_EXTENSIONS))
            if count:
                out.append((sub, count))
    return out


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
    resolution, a trigger policy has a trigger, no regularisation set's default caption holds the trigger, caption
    extensions are file extensions."""
    d, out = recipe.dataset, []
    if d.bucket_min > d.bucket_max:
        out.append((("dataset", "bucket_min"), f"must be <= bucket_max ({d.bucket_max}), got {d.bucket_min}"))
    if not d.bucket_min <= d.resolution <= d.bucket_max:
        out.append((("dataset", "resolution"), f"must lie between bucket_min ({d.bucket_min}) and bucket_max "
                    f"({d.bucket_max}), got {d.resolution}"))
    if d.trigger_policy != "none" and not d.trigger.strip():
        out.append((("dataset", "trigger"), f"is empty but trigger_policy is \"{d.trigger_policy}\"; set a "
                    "unique trigger token or trigger_policy = \"none\""))
    for n, reg in enumerate(d.regularization):
        if has_trigger(reg.default_caption, d.trigger, ignore_case=True):
            out.append((("dataset", "regularization", n, "default_caption"), f"holds the trigger "
                        f"\"{d.trigger.strip()}\": it must never appear in a regularisation caption (playbook §6); "
                        "use a class phrase such as \"a person\""))
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
            cap_file = caption_file(image, s.caption_extension)
            text, error = read_caption(cap_file)
            out.append(Item(image, text, cap_file if text is not None or error else None, "subject",
                            repeats=s.repeats, caption_error=error))
        for n, reg in enumerate(s.regularization):
            for image in _images(Path(reg.path)):
                cap_file = caption_file(image, reg.caption_extension)
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

        for folder, count in subfolder_images(recipe.dataset):
            report.add(WARNING, "sub-folder", f"{count} image{'s' * (count != 1)} in this sub-folder "
                       f"{'are' if count != 1 else 'is'} not read (only the images directly in a set's folder are); "
                       "move them up or point the set at the sub-folder", folder)
        for path in unread_images(recipe.dataset):
            report.add(WARNING, "unread-format", f"{path.suffix} images are not read (only "
                       f"{' '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG or JPEG to train on it", path)
