"""Built-in model-family plugin `flux.1-dev` (Black Forest Labs' FLUX.1-dev, a rectified-flow MMDiT).

Registered through the `lora_run` entry-point group exactly as a third-party family would be. It states the
family's facts once: the `[model.files]` slots, the latent grid and which class teaches each backend the
family (the native adapter; kohya and diffusion-pipe know FLUX.1 through their own engines).
No torch import: `lora-run check` and `lora-run plugins` load this module.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

FAMILY = "flux.1-dev"

FILE_SLOTS = {
    "transformer": "the diffusion transformer, `flux1-dev.safetensors` (BFL layout)",
    "vae": "the autoencoder, `ae.safetensors`",
    "clip_l": "the CLIP-L text encoder, `clip_l.safetensors`",
    "t5xxl": "the T5-XXL text encoder, `t5xxl_fp16.safetensors`",
}


@hookimpl
def register_families(register):
    register(FAMILY, description="FLUX.1-dev: rectified-flow MMDiT, CLIP-L + T5-XXL text encoders, 16-px grid",
             file_slots=FILE_SLOTS, pixel_multiple=16,
             adapters={"native": "lora_run_native.adapters.flux:FluxAdapter"})
