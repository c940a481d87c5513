"""The `[backend.diffusion-pipe]` table."""
from __future__ import annotations

from typing import Literal

import attrs

from lora_run.schema import option
from lora_run_engines import checkout_option

ENV_PATH = "LORA_RUN_DIFFUSION_PIPE"


@attrs.frozen(kw_only=True)
class DiffusionPipeOptions:
    """Options of the diffusion-pipe backend (tdrussell/diffusion-pipe, launched through DeepSpeed)."""

    path: str | None = checkout_option("tdrussell/diffusion-pipe (a `git clone --recurse-submodules`)", ENV_PATH)
    deepspeed: str | None = option(None, "The `deepspeed` launcher; default: the `deepspeed` executable next to "
                                   "the running Python, else the first on PATH.", path=True)
    num_gpus: int = option(1, "GPUs to launch on (`deepspeed --num_gpus`).", ge=1, le=64)
    pipeline_stages: int = option(1, "Pipeline-parallel stages: one model copy is split over this many GPUs; the "
                                  "other factor of `num_gpus` is data parallelism (must divide `num_gpus`).",
                                  ge=1, le=64)
    partition_split: list[int] = option(factory=list, doc="Layer indices where pipeline stages start "
                                        "(`pipeline_stages - 1` numbers, increasing); empty: split by parameter "
                                        "count.")
    blocks_to_swap: int = option(0, "Transformer blocks kept in CPU memory and swapped in (LoRA only, "
                                 "`pipeline_stages = 1`; FLUX up to 34, HunyuanImage up to 36).", ge=0, le=64)
    activation_checkpointing: Literal["recipe", "on", "off", "unsloth"] = option(
        "recipe", "`recipe` follows `[train] gradient_checkpointing`; `unsloth` is diffusion-pipe's CPU-offloading "
        "variant (less memory, a little slower).")
    reentrant_activation_checkpointing: bool = option(False, "Use the reentrant checkpoint function (may be "
                                                      "needed with `pipeline_stages > 1`).")
    caching_batch_size: int = option(1, "Batch size of the latent / text-embedding caching pass.", ge=1, le=1024)
    checkpoint_every_minutes: int | None = option(
        None, "Save DeepSpeed's resumable state every N minutes. Default: every `save_every_epochs` epochs when "
        "the recipe saves by epoch, else every 30 minutes (`--resume` needs one).", ge=1, le=100000)
    master_port: int | None = option(None, "Rendezvous port for the DeepSpeed processes (default 29500); set it "
                                     "to run two trainings on one machine.", ge=1024, le=65535)
    nccl_p2p_disable: bool = option(False, "Set `NCCL_P2P_DISABLE=1` (needed on RTX 4000-series cards).")
    nccl_ib_disable: bool = option(False, "Set `NCCL_IB_DISABLE=1` (needed on RTX 4000-series cards).")
    expandable_segments: bool = option(False, "Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (less "
                                       "fragmentation).")
    stall_timeout: float = option(1800.0, "Stop the run when diffusion-pipe prints nothing for this many seconds "
                                  "(0: never). Caching a large dataset can be quiet for a while.", ge=0.0)
    timeout: float | None = option(None, "Stop the run after this many seconds in total (default: no limit).",
                                   gt=0.0)
    interrupt_grace: float = option(600.0, "After Ctrl-C, how long to wait for diffusion-pipe to write a "
                                    "resumable checkpoint and quit before it is stopped hard.", ge=0.0)
    stop_on_nan: bool = option(True, "Stop the run when the loss becomes NaN or infinite.")
    copy_images: bool = option(False, "Stage the training images as copies instead of symbolic links (for "
                               "filesystems without symlinks).")
    remove_old_staging: bool = option(False, "After staging under `[train] cache_dir`, remove the folders earlier "
                                      "runs of this recipe staged there (lora-run's marker; the same `[dataset]` "
                                      "table, model and settings; staged before this one), diffusion-pipe's cache "
                                      "with them, that no run is using. Off: every staged folder is kept.")
