"""Built-in model-family plugin `hunyuan-dit-1.2` (Tencent's Hunyuan-DiT v1.2; v1.1 weights too).

Registered through the `lora_run` entry-point group exactly as a third-party family would be: a DDPM
v-prediction DiT on a 16-pixel grid, loaded from diffusers folders only (no `[model.files]` slots), with two
releases `[model] version` may name. The package holds the native adapter (``adapter``, with the memory-model
shape) and the tiny test-model builder (``tiny``). No torch import.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

FAMILY = "hunyuan-dit-1.2"


@hookimpl
def register_families(register):
    register(FAMILY, description="Hunyuan-DiT v1.2 (and v1.1): DDPM v-prediction DiT, CLIP + mT5 encoders, "
                                 "16-px grid; diffusers folders", file_slots={}, pixel_multiple=16,
             versions=("1.1", "1.2"), lora_formats=("diffusers",),
             adapters={"native": "lora_run_hunyuan_dit.adapter:HunyuanDiTAdapter"})
