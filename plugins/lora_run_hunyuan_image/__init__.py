"""Built-in model-family plugin `hunyuan-image-2.1` (Tencent's HunyuanImage-2.1, a rectified-flow DiT).

Registered through the `lora_run` entry-point group exactly as a third-party family would be. The package
holds the family's facts (below: `[model.files]` slots, the 32-pixel latent grid of its 32× VAE), the native
adapter (``adapter``, with the memory-model shape), the single-file conversions (``files``), the LoRA layouts
(``lora``) and the tiny test-model builder (``tiny``). No torch import.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

FAMILY = "hunyuan-image-2.1"


@hookimpl
def register_families(register):
    slots = {"transformer": "the diffusion transformer, `hunyuanimage2.1.safetensors`",
             "vae": "the HunyuanImage-2.1 VAE file",
             "qwen": "the Qwen2.5-VL-7B text encoder, `qwen_2.5_vl_7b.safetensors`",
             "byt5": "the ByT5 glyph encoder, `byt5_small_glyphxl_fp16.safetensors`"}
    register(FAMILY, file_slots=slots, pixel_multiple=32, lora_formats=("diffusers", "comfyui", "kohya"),
             default_formats=("kohya", "diffusers"),
             description="HunyuanImage-2.1: rectified-flow DiT, Qwen2.5-VL + ByT5 encoders, 32-px grid",
             adapters={"native": "lora_run_hunyuan_image.adapter:HunyuanImageAdapter"})
