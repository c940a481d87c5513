"""FLUX.2 shapes for the native backend's memory model (``lora_run_native.perfmodel``; no torch).

Parameter counts and LoRA layer sizes follow from the architectures (diffusers' ``Flux2Transformer2DModel``:
a double block holds 8 h² of attention and 2 × 9 h² of SwiGLU feed-forward, a single block 9 h² + 4 h² of
fused projections, the shared modulation 15 h²): [dev] 8 double + 48 single blocks at h = 6144 (32.3 B),
[klein] 9B 8 + 24 at h = 4096 (9.1 B), [klein] 4B 5 + 20 at h = 3072 (3.9 B). The compiled activation bytes
per token and block were measured on [klein] 4B at 1024² (H200, bench/results/gpu-acceptance-20261202-1614.json:
19.96 GiB allocated in speed and 16.34 GiB in memory mode, where FLUX.1's 80 500 B predicted 17.1 and 13.4):
107 500 B at h = 3072 (SwiGLU's 6 h-wide gate and the single block's fused 9 h projection keep more than
FLUX.1's blocks), scaled by width for the other variants; the eager value is FLUX.1's scaled by the same ratio
(not measured). At run time the estimate is rescaled to the model actually loaded.
"""
from __future__ import annotations

from lora_run_native.shapes import FamilyShape, preset_inputs


def lora_shapes(h: int, doubles: int, singles: int) -> dict[str, list[tuple[int, int, int]]]:
    ff = 3 * h
    attention = [(doubles * 8, h, h), (singles, h, 3 * h + 2 * ff), (singles, h + ff, h)]
    mlp = [(doubles * 2, h, 2 * ff), (doubles * 2, ff, h)]
    modulation = [(2, h, 6 * h), (1, h, 3 * h)]
    return {"attention": attention, "attention+mlp": attention + mlp, "all-linear": attention + mlp + modulation}


def lora_inputs(h: int, doubles: int, singles: int) -> dict[str, float]:
    """Elements a token feeds into the LoRA-wrapped layers per forward (its own stream's q, k, v, out and
    SwiGLU in/out in a two-stream block; the fused input and output projections of a one-stream block)."""
    ff = 3 * h
    attention = doubles * 4 * h + singles * (h + h + ff)
    mlp = doubles * (h + ff)
    return preset_inputs(attention, mlp)


def params(h: int, doubles: int, singles: int, text_hidden: int, guidance: bool) -> float:
    per = h * h
    blocks = doubles * 26 * per + singles * 13 * per
    shared = 15 * per + 2 * per + (2 if guidance else 1) * (256 * h + per) + 3 * text_hidden * h + 2 * 128 * h
    return float(blocks + shared)


def shape(h: int, doubles: int, singles: int, text_hidden: int, guidance: bool,
          low_vram_gib: float = 12.0) -> FamilyShape:
    scale = h / 3072
    return FamilyShape(params(h, doubles, singles, text_hidden, guidance), doubles + singles, h, 16, 512,
                       107_500.0 * scale, 134_000.0 * scale, lora_shapes(h, doubles, singles), low_vram_gib,
                       lora_inputs_per_token=lora_inputs(h, doubles, singles))


#: [dev]'s smallest plan is for a 24 GB card (fp8 storage, every block checkpointed, as few blocks streamed
#: from host memory as fit); `memory` (fp8 + checkpointing, no offload) is its 80 GB plan
DEV_SHAPE = shape(6144, 8, 48, 5120, True, low_vram_gib=22.0)
KLEIN_9B_SHAPE = shape(4096, 8, 24, 4096, False)
KLEIN_4B_SHAPE = shape(3072, 5, 20, 2560, False)
#: `lora-run plan` for [klein] estimates the 9B (the larger; at run time the loaded model's own shape is used)
KLEIN_SHAPE = KLEIN_9B_SHAPE
