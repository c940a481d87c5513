"""What a run will still write, against the free space of its run folder's file system: the check every backend
makes before training (the native backend before its first step, the external engines before launch), so a run
that cannot finish stops at once (exit 2) instead of failing at its end."""
from __future__ import annotations

from pathlib import Path

import attrs

from lora_run.errors import RecipeError
from lora_run.files import human_size

from .atomic import free_bytes

#: room kept for the logs, the manifest and the evaluation's images (its 60 images at 768² are at most 101 MiB
#: as raw pixels)
DISK_SLACK = 128 * 2**20


@attrs.frozen
class Writes:
    """What a run will still write into the run folder. ``saves`` saves of ``save`` bytes each, at most
    [train] keep_last + 1 on disk at once (the newest is written before the oldest is deleted); at the end
    ``final`` bytes beside the ``keep_last`` kept saves; ``others``: (what, bytes) written besides."""

    engine: str
    saves: int
    save: int
    save_is: str                        # what one save holds, for the message
    final: int
    final_is: str
    others: tuple[tuple[str, int], ...] = ()

    def needed(self, keep_last: int) -> int:
        at_once = min(self.saves, keep_last + 1)
        saves = max(at_once * self.save, min(self.saves, keep_last) * self.save + self.final)
        return saves + sum(n for _, n in self.others) + DISK_SLACK

    def describe(self, keep_last: int) -> str:
        parts = [f"{self.saves} save(s) of {human_size(self.save)} ({self.save_is}), at most "
                 f"{min(self.saves, keep_last + 1)} kept at once with [train.keep_last] = {keep_last}",
                 f"at the end {human_size(self.final)} ({self.final_is})",
                 *(f"{what}, {human_size(n)}" for what, n in self.others),
                 f"{human_size(DISK_SLACK)} for logs and the evaluation"]
        return "; ".join(parts)


def check_free_space(run_dir: Path, writes: Writes, keep_last: int) -> None:
    """Refuse (RecipeError, exit 2) a run whose ``writes`` cannot fit in the free space of ``run_dir``'s file
    system; an unknown free space (None) is not checked."""
    free = free_bytes(run_dir)
    needed = writes.needed(keep_last)
    if free is None or needed <= free:
        return
    raise RecipeError(
        f"[output.dir] {run_dir}: this {writes.engine} run will write about {human_size(needed)} "
        f"({writes.describe(keep_last)}) but its file system has {human_size(free)} free; nothing was trained. "
        "Free some space, or lower [train.keep_last] or save less often ([train.save_every_steps])")
