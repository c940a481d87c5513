"""Built-in backend `diffusion-pipe`: runs a recipe through tdrussell/diffusion-pipe (DeepSpeed, pipeline parallel).

The recipe becomes diffusion-pipe's main config and dataset config (tomli-w, every key checked against the
keys diffusion-pipe reads), the training images are staged with their captions in the run directory, and
`deepspeed --num_gpus=N train.py --deepspeed --config <file>` runs in the user's diffusion-pipe checkout. Its
output is parsed into progress and lifecycle hooks; the saved LoRA is converted to our kohya and diffusers
files. FLUX.1-dev and HunyuanImage-2.1 only. See docs/backend-diffusion-pipe.md.

Registered through the `lora_run` entry-point group like any third-party plugin; no torch import here.
"""
from __future__ import annotations

from lora_run.hookspecs import hookimpl

from .options import DiffusionPipeOptions

COMMON = {
    "regularization", "caption_dropout", "lora_dropout", "fp8", "save_every_epochs", "save_every_steps", "epochs",
    "steps", "multi_gpu", "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
    "timestep_sampling:shift", "targets:all-linear", "optimizer:adamw", "optimizer:adamw8bit",
    "optimizer:prodigy", "scheduler:constant", "scheduler:constant_with_warmup", "loss:mse", "loss:huber",
    "loss:smooth-l1",
}
CAPABILITIES = {
    "flux.1-dev": COMMON | {"guidance", "timestep_sampling:flux-shift"},
    "hunyuan-image-2.1": set(COMMON),
}
_TARGETS = ("diffusion-pipe puts the LoRA on every Linear of the double and single blocks and offers no module "
            "list; its exclude_modules cannot carve this preset out exactly (HunyuanImage fuses q/k/v with the MLP "
            "input in linear1); use lora.targets = \"all-linear\"")
_SCHEDULE = ("diffusion-pipe's linear/cosine decay runs over epochs × steps-per-epoch counted after the warmup, "
             "ignores max_steps and ends at a fixed floor, so the shape differs from ours; use "
             "\"constant_with_warmup\"")
REASONS = {
    "text_encoder_training": "diffusion-pipe caches the text embeddings and trains no text-encoder LoRA for FLUX or "
                             "HunyuanImage",
    "regularization_weight": "diffusion-pipe's [[directory]] entries have no loss weight (only num_repeats); use "
                             "repeats instead",
    "noise_offset": "diffusion-pipe has no noise offset setting",
    "min_snr_gamma": "diffusion-pipe reads min_snr_gamma for SDXL only; FLUX and HunyuanImage are flow-matching",
    "guidance": "HunyuanImage-2.1 (base) has no guidance embedding",
    "timestep_weighting": "diffusion-pipe has no flow-matching loss weighting",
    "lora_alpha": "diffusion-pipe forces alpha = rank (an alpha key raises NotImplementedError); set lora.alpha "
                  "equal to lora.rank (the LoRA then acts at scale 1; adjust lr instead)",
    "lora_modules": "diffusion-pipe targets every Linear of the transformer blocks and has no module list",
    "sampling": "diffusion-pipe does not sample images during training (its maintainer declined it, issues "
                "#119/#331); the evaluation after training still renders images",
    "targets:attention": _TARGETS,
    "targets:attention+mlp": _TARGETS,
    "timestep_sampling:flux-shift": "diffusion-pipe computes flux_shift from (h/2)·(w/2) latent positions, a quarter "
                                    "of HunyuanImage's patch-1 token count, so the shift differs from ours",
    "optimizer:adafactor": "diffusion-pipe has no built-in Adafactor; its fallback (pytorch_optimizer.AdaFactor) does "
                           "not match transformers' Adafactor that our recipes mean; use adamw, adamw8bit or prodigy",
    "scheduler:cosine": _SCHEDULE,
    "scheduler:linear": _SCHEDULE,
    "loss:pseudo-huber": "diffusion-pipe no longer reads pseudo_huber_c (documented in its example, ignored since "
                         "89f0eeb); it has huber (huber_delta) and smooth-l1 (smooth_l1_beta)",
}
FAMILY_NOTES = {
    "hunyuan-dit-1.2": "diffusion-pipe has no Hunyuan-DiT model type; its Hunyuan types are HunyuanImage-2.1 and "
                       "the video models",
    "flux.2-klein": "diffusion-pipe trains FLUX.2 (model type flux2, ComfyUI files; checkout 8f83dbf) but this backend "
                    "does not translate it yet; lora-run's native backend trains it",
    "flux.2-dev": "diffusion-pipe trains FLUX.2 (model type flux2, ComfyUI files; checkout 8f83dbf) but this backend "
                  "does not translate it yet; lora-run's native backend trains it",
}


def make_backend(ctx):
    from .backend import DiffusionPipeBackend

    return DiffusionPipeBackend(ctx)


@hookimpl
def register_backends(register):
    register("diffusion-pipe", make_backend, options=DiffusionPipeOptions, capabilities=CAPABILITIES,
             description="tdrussell/diffusion-pipe through DeepSpeed (pipeline-parallel, multi-GPU); FLUX.1-dev "
                         "and HunyuanImage-2.1",
             reasons=REASONS, family_notes=FAMILY_NOTES)
