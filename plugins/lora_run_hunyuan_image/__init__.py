"""Built-in model-family plugin `hunyuan-image-2.1` (Tencent's HunyuanImage-2.1, a rectified-flow DiT).

Registered through the `lora_run` entry-point group exactly as a third-party family would be: its
`[model.files]` slots, its 32-pixel latent grid (32× VAE) and the native adapter. No torch import.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

FAMILY = "hunyuan-image-2.1"

FILE_SLOTS = {
    "transformer": "the diffusion transformer, `hunyuanimage2.1.safetensors`",
    "vae": "the HunyuanImage-2.1 VAE file",
    "qwen": "the Qwen2.5-VL-7B text encoder, `qwen_2.5_vl_7b.safetensors`",
    "byt5": "the ByT5 glyph encoder, `byt5_small_glyphxl_fp16.safetensors`",
}


@hookimpl
def register_families(register):
    register(FAMILY, description="HunyuanImage-2.1: rectified-flow DiT, Qwen2.5-VL + ByT5 encoders, 32-px grid",
             file_slots=FILE_SLOTS, pixel_multiple=32,
             adapters={"native": "lora_run_native.adapters.hunyuan_image:HunyuanImageAdapter"})
