"""sd-scripts' progress bar, parsed for :class:`lora_run_engines.supervise.Supervisor`.

sd-scripts reports training progress through tqdm (on stderr, updated with carriage returns)::

    steps:  10%|█         | 150/1500 [01:23<12:34,  1.79it/s, avr_loss=0.123]

:func:`parse_progress` turns such a line into a :class:`Progress`; the supervisor collapses the redraws of a
step and reports each step once, with the values sd-scripts drew last for it. No torch here.
"""
from __future__ import annotations

import math
import re

import attrs

from lora_run_engines import STEP_NUMBER

#: the bar after its description (`steps`) and colon. The description is read backwards from the colon
#: (`_description`): a pattern starting with a lazy `[\w ./-]*?` before the colon took time quadratic in a line's
#: length without one (26 s for 64 000 letters)
_BAR = re.compile(
    rf":\s*(?P<pct>\d{{1,3}})%\|[^|]*\|\s*(?P<step>{STEP_NUMBER})/(?P<total>{STEP_NUMBER})\s*"
    r"\[(?P<elapsed>[\d:]+)<(?P<remaining>[\d:?]+),\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>it/s|s/it)?"
    r"(?:,\s*(?P<post>[^\]]*))?\]")


def _description(line: str, end: int) -> str:
    """The bar's description: the letters, digits and ``_ ./-`` right before ``end`` (its colon)."""
    start = end
    while start > 0 and (line[start - 1].isalnum() or line[start - 1] in "_ ./-"):
        start -= 1
    return line[start:end]


_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf|-inf)$", re.I)


@attrs.frozen
class Progress:
    """One parsed progress-bar update of sd-scripts' training loop."""

    step: int
    total: int
    it_per_s: float | None
    elapsed: str
    remaining: str
    values: dict[str, float]        # the bar's postfix: avr_loss, and whatever else sd-scripts shows

    @property
    def loss(self) -> float | None:
        for key in ("loss", "current_loss", "loss/current", "avr_loss", "loss/average"):
            if key in self.values:
                return self.values[key]
        return None


def parse_progress(line: str, desc: str = "steps") -> Progress | None:
    """The training bar's state from one output line, or None (other bars, e.g. latent caching, are skipped)."""
    match = None
    for m in _BAR.finditer(line):
        if _description(line, m.start()).strip().endswith(desc):
            match = m
    if match is None:
        return None
    rate: float | None = None
    if match["rate"] not in (None, "?"):
        value = float(match["rate"])
        if match["unit"] == "s/it":
            rate = 1.0 / value if value > 0 else None
        else:
            rate = value
    values: dict[str, float] = {}
    for part in (match["post"] or "").split(","):
        key, sep, raw = part.partition("=")
        raw = raw.strip()
        if sep and _NUMBER.match(raw):
            values[key.strip()] = float(raw)
    return Progress(int(match["step"]), int(match["total"]), rate, match["elapsed"], match["remaining"], values)


def training_progress(line: str) -> Progress | None:
    """The training bar's state from one output line for the supervisor; the bar's first draw (`0/N [00:00<?,
    ?it/s]`, or `k/N` after a resume: no rate, no values) is not progress."""
    progress = parse_progress(line)
    if progress is not None and progress.it_per_s is None and not progress.values:
        return None
    return progress


def finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)
