"""Built-in backend `kohya`: runs a recipe through kohya-ss/sd-scripts (FLUX.1-dev and HunyuanImage-2.1).

The recipe is translated into sd-scripts' own files — a ``--config_file`` TOML and a ``--dataset_config``
TOML, both checked against sd-scripts' option data before launch (sd-scripts does not type-check its
config file) — and ``accelerate launch`` runs the trainer from the user's checkout, supervised: output
streamed to ``<run>/kohya/train.log``, progress parsed into our hooks, Ctrl-C forwarded, the final LoRA
collected in kohya and diffusers formats. See docs/backend-kohya.md.

Importing this module is cheap: no torch, no sd-scripts.
"""
from __future__ import annotations

from typing import Any

import attrs

from lora_run.hookspecs import hookimpl
from lora_run.schema import option
from lora_run_engines import checkout_option

from .checkout import ENV
from .translate import FLUX, HUNYUAN_IMAGE


@attrs.frozen(kw_only=True)
class KohyaOptions:
    """`[backend.kohya]`: where sd-scripts is and how to launch and supervise it."""

    sd_scripts: str | None = checkout_option("kohya-ss/sd-scripts", ENV)
    python: str | None = option(None, "Python interpreter of sd-scripts' environment, used as `python -m "
                                "accelerate.commands.launch`. Default: the interpreter running lora-run.")
    num_processes: int = option(1, "`accelerate launch --num_processes` (GPUs to train on).", ge=1, le=64)
    num_cpu_threads_per_process: int = option(1, "`accelerate launch --num_cpu_threads_per_process`.", ge=1,
                                              le=256)
    blocks_to_swap: int | None = option(None, "sd-scripts `--blocks_to_swap`: transformer blocks kept in CPU "
                                        "memory and swapped in per step (FLUX ≤ 35, HunyuanImage ≤ 37). "
                                        "Saves VRAM, costs speed.", ge=0)
    cpu_offload_checkpointing: bool = option(False, "sd-scripts `--cpu_offload_checkpointing` (saves ≤ 1 GB, "
                                             "~15% slower; not together with blocks_to_swap).")
    cache_latents: bool = option(True, "Cache VAE latents to disk next to the staged images "
                                 "(`--cache_latents_to_disk`).")
    cache_text_encoder_outputs: bool | None = option(None, "Cache text-encoder outputs to disk. Default: on, "
                                                     "unless caption dropout or text-encoder training forbid it.")
    tokenizer_cache_dir: str | None = option(None, "sd-scripts `--tokenizer_cache_dir`: where it keeps the "
                                             "tokenizers it downloads from the hub on first use (for offline runs; "
                                             "relative to the recipe file).", path=True)
    tensorboard: bool = option(False, "Write TensorBoard logs to `<run>/kohya/logs` (`--log_with tensorboard`).")
    stall_minutes: float = option(20.0, "Stop sd-scripts when it prints nothing for this many minutes "
                                  "(0 = never).", ge=0.0)
    timeout_hours: float | None = option(None, "Stop sd-scripts after this many hours in total.", gt=0.0)
    remove_old_staging: bool = option(False, "After staging under `[train] cache_dir`, remove the folders earlier "
                                      "runs of this recipe staged there (lora-run's marker; the same `[dataset]` "
                                      "table, model and settings; staged before this one) that no run is using. "
                                      "Off: every staged folder is kept.")
    extra_args: dict[str, Any] = option(factory=dict, doc="More sd-scripts options, as in its config file "
                                        "(`{ full_bf16 = true }`); each is checked against sd-scripts' option "
                                        "list. Options lora-run sets from the recipe cannot be overridden here.")


COMMON = {
    "steps", "epochs", "save_every_steps", "save_every_epochs", "regularization", "regularization_weight",
    "caption_dropout", "lora_alpha", "fp8", "sampling", "multi_gpu",
    "timestep_sampling:uniform", "timestep_sampling:sigmoid", "timestep_sampling:logit-normal",
    "timestep_sampling:shift",
    "optimizer:adafactor", "optimizer:adamw", "optimizer:adamw8bit", "optimizer:prodigy",
    "scheduler:constant", "scheduler:constant_with_warmup", "scheduler:cosine", "scheduler:linear",
    "loss:mse", "loss:pseudo-huber",
}
CAPABILITIES = {
    FLUX: COMMON | {"guidance", "text_encoder_training", "targets:attention+mlp", "targets:all-linear",
                    "timestep_sampling:flux-shift"},
    HUNYUAN_IMAGE: COMMON | {"targets:attention+mlp", "targets:all-linear"},
}
REASONS = {
    "noise_offset": "sd-scripts accepts --noise_offset, but its FLUX.1 and HunyuanImage trainers draw plain "
                    "randn noise: the value would only be written into the metadata",
    "min_snr_gamma": "sd-scripts' FLUX.1 and HunyuanImage trainers return the loss unchanged, so --min_snr_gamma "
                     "would be ignored (it is meaningless for flow matching anyway)",
    "timestep_weighting": "sd-scripts applies weighting_scheme loss weights only with model_prediction_type = "
                          "sigma_scaled, which also changes the target to x0; lora-run trains the raw velocity",
    "lora_dropout": "sd-scripts' --network_dropout drops the LoRA down-projection's outputs, not its input as "
                    "[lora] dropout does",
    "lora_modules": "[lora] modules names diffusers modules; sd-scripts selects BFL-layout modules by layer type "
                    "(use a targets preset)",
    "targets:attention": "the single blocks fuse q/k/v with the MLP input in one `linear1` layer, which "
                         "sd-scripts' LoRA networks wrap as a whole, so single-block attention alone cannot get a "
                         "LoRA; use `attention+mlp` (FLUX.1: every block linear except modulation) or `all-linear`",
    "loss:huber": "sd-scripts has no classic Huber loss: its `huber` is the pseudo-Huber 2c(√(x²+c²)−c); use "
                  "`pseudo-huber`",
    "loss:smooth-l1": "sd-scripts' `smooth_l1` is 2(√(x²+c²)−c), a rescaled pseudo-Huber, not the PyTorch "
                      "SmoothL1 that lora-run's `smooth-l1` is",
    "text_encoder_training": "sd-scripts trains no text encoder for HunyuanImage-2.1 (--network_train_unet_only "
                             "is required)",
    "guidance": "HunyuanImage-2.1 has no guidance embedding to train with",
    "timestep_sampling:flux-shift": "sd-scripts' flux_shift takes μ from (h/2)·(w/2) latent positions (FLUX.1's "
                                    "packed 2×2 patches), a quarter of HunyuanImage-2.1's patch-1 token count, so the "
                                    "shift differs from lora-run's flux-shift; HunyuanImage-2.1 samples with a fixed "
                                    "shift (use timestep_sampling = \"shift\" with train.shift, 5 upstream)",
}
FAMILY_NOTES = {
    "hunyuan-dit-1.2": "sd-scripts has no Hunyuan-DiT trainer: the draft pull requests #1378 and #1397 were never "
                       "merged; lora-run's native backend trains it",
    "flux.2-klein": "sd-scripts has no FLUX.2 trainer (its flux_train_network.py loads FLUX.1 only; checkout 48d368f); "
                    "lora-run's native backend trains it",
    "flux.2-dev": "sd-scripts has no FLUX.2 trainer (its flux_train_network.py loads FLUX.1 only; checkout 48d368f); "
                  "lora-run's native backend trains it",
}


def _factory(ctx: Any) -> Any:
    from .backend import KohyaBackend

    return KohyaBackend(ctx)


@hookimpl
def register_backends(register):
    register("kohya", _factory, options=KohyaOptions, capabilities=CAPABILITIES,
             description="kohya-ss/sd-scripts (FLUX.1-dev, HunyuanImage-2.1), launched and supervised",
             reasons=REASONS, family_notes=FAMILY_NOTES)
