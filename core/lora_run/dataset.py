"""What a dataset plugin hands the core: items (image + caption), and the caption rules of a recipe."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import attrs

from .files import FileProblem, read_limited
from .schema import DatasetSection


@attrs.frozen
class Item:
    """One image of the dataset with its caption as found on disk."""

    image: Path
    caption: str | None          # None: no caption file
    caption_file: Path | None
    subset: str                  # "subject" or "regularization[0]" …
    is_reg: bool = False
    weight: float = 1.0
    repeats: int = 1
    default_caption: str = ""
    caption_error: str | None = None   # e.g. "not UTF-8"


class DatasetSource(Protocol):
    """What a dataset plugin's factory returns (``check()`` is optional: (key path, message) problems)."""

    def items(self) -> list[Item]:
        """Every image of the subject set and the regularisation sets, in a stable order."""


def training_caption(item: Item, section: DatasetSection) -> str:
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
        data = read_limited(path, "caption")
    except FileProblem as exc:
        return None, f"caption file {exc}"
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "caption is not UTF-8 text"
