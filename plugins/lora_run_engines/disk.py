"""Before an engine is started: what its run will write, against the free space of the run folder.

A backend describes what its engine and lora-run will write (a :class:`Writes`): how many saves the generated
config asks for and the bytes of one as it lies on disk (the engine's LoRA, its resumable state, lora-run's
converted copies), what the end of the run adds, other parts (DeepSpeed checkpoints, sample images).
:func:`check_free_space` refuses a run that cannot fit, before launch (exit 2: nothing is trained), as the native
backend's ``Trainer.check_disk_space`` does before its first step.

Sizes are model-free (no model is loaded here): a LoRA's parameters come from the family's shape
(``lora_run_native.perfmodel.lora_params``, counted in diffusers' layout, where q, k and v are separate layers;
sd-scripts' fused qkv layers hold fewer, so its files come out smaller than estimated), the optimizer state from
``lora_run_native.memory.OPTIMIZER_BYTES``. No torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from lora_run.errors import RecipeError
from lora_run.files import human_size

#: bytes per element of a LoRA saved at [output] save_precision
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def lora_parameters(recipe: Any, preset: str | None = None) -> int | None:
    """The LoRA's parameters for the family's shape, the rank and ``preset`` (default [lora] targets); None when the
    family declares no shape (then nothing is checked)."""
    from lora_run_native.perfmodel import family_shape, lora_params

    shape = family_shape(recipe.model.family)
    preset = preset or recipe.lora.targets
    if shape is None or preset not in shape.lora_shapes:
        return None
    return lora_params(recipe.model.family, preset, recipe.lora.rank, shape)


def lora_file_bytes(parameters: int, precision: str) -> int:
    """One ``.safetensors`` LoRA file of ``parameters`` elements at ``precision``, with header room."""
    from lora_run_native.outputs import HEADER_BYTES

    return parameters * PRECISION_BYTES[precision] + HEADER_BYTES


def state_bytes(parameters: int, optimizer: str) -> int:
    """A resumable state: the fp32 trainable weights and the optimizer's state (`memory.OPTIMIZER_BYTES` per
    element; an unknown optimizer counts as AdamW), with room for its files' headers (pickles, safetensors)."""
    from lora_run_native.memory import OPTIMIZER_BYTES
    from lora_run_native.outputs import HEADER_BYTES

    return parameters * (4 + OPTIMIZER_BYTES.get(optimizer, 8)) + HEADER_BYTES


def multiples(every: int | None, total: int) -> int:
    """How many of the steps (or epochs) 1…``total`` are multiples of ``every`` (0 without a cadence)."""
    return total // every if every else 0


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
        from lora_run_native.train import DISK_SLACK

        at_once = min(self.saves, keep_last + 1)
        saves = max(at_once * self.save, min(self.saves, keep_last) * self.save + self.final)
        return saves + sum(n for _, n in self.others) + DISK_SLACK

    def describe(self, keep_last: int) -> str:
        from lora_run_native.train import DISK_SLACK

        parts = [f"{self.saves} save(s) of {human_size(self.save)} ({self.save_is}), at most "
                 f"{min(self.saves, keep_last + 1)} kept at once with [train.keep_last] = {keep_last}",
                 f"at the end {human_size(self.final)} ({self.final_is})",
                 *(f"{what}, {human_size(n)}" for what, n in self.others),
                 f"{human_size(DISK_SLACK)} for logs and the evaluation"]
        return "; ".join(parts)


def check_free_space(run_dir: Path, writes: Writes, keep_last: int) -> None:
    """Refuse (RecipeError, exit 2) a run whose ``writes`` cannot fit in the free space of ``run_dir``'s file
    system; an unknown free space (None) is not checked."""
    from lora_run_rundir import free_bytes

    free = free_bytes(run_dir)
    needed = writes.needed(keep_last)
    if free is None or needed <= free:
        return
    raise RecipeError(
        f"[output.dir] {run_dir}: this {writes.engine} run will write about {human_size(needed)} "
        f"({writes.describe(keep_last)}) but its file system has {human_size(free)} free; nothing was trained. "
        "Free some space, or lower [train.keep_last] or save less often ([train.save_every_steps])")
