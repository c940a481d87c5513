"""Before an engine is started: what its run will write, against the free space of the run folder.

A backend describes what its engine and lora-run will write (a ``lora_run_rundir.space.Writes``): how many saves the generated
config asks for and the bytes of one as it lies on disk (the engine's LoRA, its resumable state, lora-run's
converted copies), what the end of the run adds, other parts (DeepSpeed checkpoints, sample images).
:func:`lora_run_rundir.space.check_free_space` refuses a run that cannot fit, before launch (exit 2: nothing is
trained), as the native backend does before its first step.

Sizes are model-free (no model is loaded here): a LoRA's parameters come from the family's shape
(``lora_run_native.perfmodel.lora_params``, counted in diffusers' layout, where q, k and v are separate layers;
sd-scripts' fused qkv layers hold fewer, so its files come out smaller than estimated), the optimizer state from
``lora_run_native.memory.OPTIMIZER_BYTES``. No torch.
"""
from __future__ import annotations

from typing import Any

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
