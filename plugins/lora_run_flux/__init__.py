"""Built-in model-family plugin `flux.1-dev` (Black Forest Labs' FLUX.1-dev, a rectified-flow MMDiT).

Registered through the `lora_run` entry-point group exactly as a third-party family would be. The package
holds everything about the family: its facts (below), the native backend's adapter (``adapter``), the
single-file conversions (``files``), the LoRA layouts (``lora``), the memory-model shape (on the adapter) and
the tiny test-model builder (``tiny``). kohya and diffusion-pipe know FLUX.1 through their own engines.
No torch import: `lora-run check` and `lora-run plugins` load this module.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

FAMILY = "flux.1-dev"


@hookimpl
def register_families(register):
    register(FAMILY, description="FLUX.1-dev: rectified-flow MMDiT, CLIP-L + T5-XXL text encoders, 16-px grid",
             pixel_multiple=16, adapters={"native": "lora_run_flux.adapter:FluxAdapter"},
             default=True,                          # the family a recipe without `[model] family` trains
             samplers=("flux-shift",),              # σ shifted by the image's token count, as FLUX samples
             lora_formats=("kohya", "diffusers", "comfyui"), default_formats=("kohya", "diffusers"), file_slots={
                 "transformer": "the diffusion transformer, `flux1-dev.safetensors` (BFL layout)",
                 "vae": "the autoencoder, `ae.safetensors`",
                 "clip_l": "the CLIP-L text encoder, `clip_l.safetensors`",
                 "t5xxl": "the T5-XXL text encoder, `t5xxl_fp16.safetensors`"})
