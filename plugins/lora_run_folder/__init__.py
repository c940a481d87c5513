"""Built-in dataset plugin `folder`: images in a folder with a caption file next to each.

Registered through the `lora_run` entry-point group like any third-party plugin. No torch import.
"""
from __future__ import annotations

from pathlib import Path

from lora_run.dataset import Item, read_caption
from lora_run.hookspecs import hookimpl
from lora_run.images import IMAGE_EXTENSIONS
from lora_run.schema import DatasetSection, Recipe


def _images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name. Sub-folders (and symlink loops) are not entered."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                if entry.is_file() or (entry.is_symlink() and not entry.exists()):  # dangling: lint names it
                    found.append(entry)
            except OSError:  # a dangling or looping symlink: lint reports it as unreadable
                found.append(entry)
    return sorted(found, key=lambda p: p.name)


class FolderDataset:
    def __init__(self, section: DatasetSection, recipe: Recipe):
        self.section = section

    def check(self) -> list[tuple[tuple[str, ...], str]]:
        if self.section.path is None:
            return [(("dataset", "path"), "is required for dataset type \"folder\" (the folder of subject images)")]
        return []

    def items(self) -> list[Item]:
        s = self.section
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
