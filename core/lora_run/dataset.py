"""What a dataset plugin hands the core: items (image + caption) and the lint
report the ``lint_dataset`` hook fills (errors stop a run before any model loads)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import attrs

from .files import printable, shown

ERROR, WARNING, INFO = "error", "warning", "info"


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


@attrs.frozen
class Finding:
    level: str
    code: str
    message: str
    file: str = ""


@attrs.define
class LintReport:
    """What the ``lint_dataset`` implementations found. ``usable`` starts as every item; an implementation
    removes the ones it refuses. ``dataset_hash`` and ``files`` (``"subset/name"`` -> image and caption
    digests) let a resumed run notice a changed dataset."""

    findings: list[Finding] = attrs.field(factory=list)
    usable: list[Item] = attrs.field(factory=list)
    counts: dict[str, int] = attrs.field(factory=dict)
    dataset_hash: str = ""
    files: dict[str, dict[str, str]] = attrs.field(factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]

    def add(self, level: str, code: str, message: str, file: Path | str = "") -> None:
        self.findings.append(Finding(level, code, message, str(file)))

    def table(self) -> str:
        """A readable table: one line per finding, errors first."""
        order = {ERROR: 0, WARNING: 1, INFO: 2}
        rows = sorted(self.findings, key=lambda f: (order.get(f.level, 3), f.code, f.file))
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        lines = [f"dataset: {counts}; {len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        width = max((len(r.level) for r in rows), default=0)
        for r in rows:
            where = f"{shown(r.file)}: " if r.file else ""
            lines.append(f"  {r.level.upper():<{width}}  {r.code:<22} {where}{printable(r.message)}")
        return "\n".join(lines)
