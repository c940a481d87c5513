"""Model-family plugin for Black Forest Labs' FLUX.2: `flux.2-klein` ([klein] 4B/9B, base and distilled, Qwen3
text encoder) and `flux.2-dev` ([dev], 32 B, Mistral-3 text encoder).

A third-party-style family package: registered through the `lora_run` entry-point group (`pyproject.toml`)
with `register_families` only; the native backend finds its adapters (`lora_run_flux2.adapter`) through the
registration. kohya's sd-scripts has no FLUX.2 trainer and lora-run's diffusion-pipe backend does not
translate it, so those backends refuse the families with the reason (their `family_notes`).
See docs/flux2.md. No torch import: `lora-run check` and `lora-run plugins` load this module.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

KLEIN = "flux.2-klein"
DEV = "flux.2-dev"

KLEIN_SLOTS = {
    "transformer": "the [klein] transformer, `flux-2-klein-base-4b.safetensors` (BFL/ComfyUI layout)",
    "vae": "the FLUX.2 autoencoder, `flux2-vae.safetensors`",
    "qwen3": "the Qwen3 text encoder in transformers' layout, `qwen_3_4b.safetensors` (bf16)",
}
DEV_SLOTS = {
    "transformer": "the [dev] transformer, `flux2-dev.safetensors` (BFL/ComfyUI layout)",
    "vae": "the FLUX.2 autoencoder, `flux2-vae.safetensors`",
    "mistral": "the Mistral-3 text encoder in transformers' layout (bf16; not the scaled-fp8 file)",
}


#: the LoRA layouts the family writes (docs/lora-formats.md) and those a recipe gets unless it says
FORMATS = ("kohya", "diffusers", "comfyui")
DEFAULT_FORMATS = ("kohya", "diffusers")


@hookimpl
def register_families(register):
    register(KLEIN, description="FLUX.2 [klein] 4B/9B (base or distilled): rectified-flow MMDiT, Qwen3 text "
                                "encoder, no guidance embedding, 16-px grid",
             file_slots=KLEIN_SLOTS, pixel_multiple=16, versions=("base-4b", "base-9b", "4b", "9b"),
             samplers=("flux-shift",), lora_formats=FORMATS, default_formats=DEFAULT_FORMATS,
             adapters={"native": "lora_run_flux2.adapter:Flux2KleinAdapter"})
    register(DEV, description="FLUX.2 [dev] (32 B): rectified-flow MMDiT, Mistral-3 text encoder, distilled "
                              "guidance embedding, 16-px grid",
             file_slots=DEV_SLOTS, pixel_multiple=16, samplers=("flux-shift",), lora_formats=FORMATS,
             default_formats=DEFAULT_FORMATS,
             adapters={"native": "lora_run_flux2.adapter:Flux2DevAdapter"})
