"""A family's shape for the native backend's memory model (no torch): each family's adapter carries one as
``memory_shape``; ``perfmodel`` and ``memory`` read it from there, so no table here names a family."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import attrs


@attrs.frozen
class FamilyShape:
    params: float               # transformer parameters
    blocks: int                 # repeated blocks
    hidden: int
    latent_factor: int          # pixels per token side (VAE factor × patch)
    text_tokens: int            # tokens that travel through the blocks with the image tokens
    act_per_token_compiled: float   # bytes per token per non-checkpointed block (compiled blocks)
    act_per_token_eager: float      # the same without compile
    lora_shapes: dict[str, list[tuple[int, int, int]]]  # preset -> [(count, in, out)]
    low_vram_gib: float = 12.0      # the budget `low-vram` plans for when no GPU is known (`lora-run plan`)
    #: preset -> elements one token feeds into the LoRA-wrapped layers in one forward, summed over the blocks:
    #: with LoRA dropout each of those inputs is kept (dropped) for the LoRA's backward
    lora_inputs_per_token: dict[str, float] = attrs.field(factory=dict)
    #: `[train] cuda_graphs = "auto"` may replay whole micro-steps as CUDA graphs (stepgraph.py) for this family:
    #: set where a GPU run has shown the recording to work and pay; the blocks' graphs otherwise
    whole_step_graphs: bool = False


def mmdit_lora_shapes(double: int, single: int, hidden: int, ff: int) -> dict[str, list[tuple[int, int, int]]]:
    """(count, in, out) of the linear layers each LoRA preset wraps in diffusers' MMDiT layout (``double``
    two-stream blocks, ``single`` one-stream blocks; the presets of ``adapters.base.MMDIT_TARGET_PRESETS``)."""
    h = hidden
    attention = [(double * 8, h, h), (single * 3, h, h)]
    mlp = [(double * 2, h, ff), (double * 2, ff, h), (single, h, ff), (single, h + ff, h)]
    modulation = [(double * 2, h, 6 * h), (single, h, 3 * h)]
    return {"attention": attention, "attention+mlp": attention + mlp, "all-linear": attention + mlp + modulation}


def preset_inputs(attention: float, mlp: float) -> dict[str, float]:
    """``lora_inputs_per_token`` per preset from the attention layers' and the MLP's inputs per token
    (``all-linear`` adds only modulation layers, which see one vector per sample)."""
    return {"attention": float(attention), "attention+mlp": float(attention + mlp),
            "all-linear": float(attention + mlp)}


def mmdit_lora_inputs(double: int, single: int, hidden: int, ff: int) -> dict[str, float]:
    """``lora_inputs_per_token`` of the presets of ``mmdit_lora_shapes``: in a two-stream block a token passes
    its own stream's q, k, v, out and feed-forward; in a one-stream block q, k, v, the MLP input and the
    output projection (attention and MLP concatenated). Modulation layers see one vector per sample."""
    h = hidden
    attention = double * 4 * h + single * 3 * h
    mlp = double * (h + ff) + single * (h + h + ff)
    return preset_inputs(attention, mlp)


class RegisteredShapes(Mapping):
    """family -> FamilyShape of every installed family whose native adapter declares ``memory_shape``."""

    def _table(self) -> dict[str, FamilyShape]:
        from .adapters import registered_adapters

        found = {}
        for family, cls in registered_adapters().items():
            shape = getattr(cls, "memory_shape", None)
            if shape is not None:
                found[family] = shape
        return found

    def __getitem__(self, family: str) -> FamilyShape:
        return self._table()[family]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())
