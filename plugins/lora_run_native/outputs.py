"""The LoRA files a native run writes: every format of ``[output] formats`` the family supports.

The trained parameters are read from the peft-wrapped modules (``<module>.lora_A.<adapter>.weight``) into
plain peft state dicts (``<module>.lora_A.weight``) in fp32 with the ``alpha / rank`` scale *not* folded in.
The adapter turns them into each format (``ModelAdapter.lora_files``); they are cast to
``[output] save_precision`` and written atomically with our metadata (and kohya's ``ss_*`` / ``modelspec.*``
keys for the kohya format).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")
SAVE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def trainable_parameters(module: Any) -> dict[str, Any]:
    """name → parameter of every trainable (LoRA) parameter of ``module``."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def lora_state_dict(module: Any | None) -> dict[str, Any]:
    """peft-style LoRA state dict of ``module`` (adapter name removed), fp32 copies on CPU."""
    if module is None:
        return {}
    out = {}
    for name, p in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[_ADAPTER_NAME.sub(r".\1.weight", name)] = p.detach().to("cpu").float().clone()
    return out


def run_metadata(recipe: Any, *, step: int, counts: dict[str, int], started_at: str) -> dict[str, str]:
    """Metadata keywords (kohya ``ss_*`` names where one exists) describing the training run."""
    r = recipe
    meta: dict[str, Any] = {
        "network_dim": r.lora.rank, "network_alpha": r.lora.alpha, "network_dropout": r.lora.dropout,
        "network_args": {"targets": r.lora.targets, "modules": r.lora.modules},
        "learning_rate": r.optimizer.lr, "unet_lr": r.optimizer.lr,
        "text_encoder_lr": r.optimizer.lr * r.text_encoder.lr_ratio if r.text_encoder.train else 0.0,
        "optimizer": r.optimizer.name, "lr_scheduler": r.scheduler.name, "lr_warmup_steps": r.scheduler.warmup_steps,
        "max_train_steps": r.train.steps, "num_epochs": r.train.epochs, "steps": step, "seed": r.train.seed,
        "mixed_precision": r.train.mixed_precision, "fp8_base": r.model.base_precision == "fp8",
        "gradient_checkpointing": r.train.gradient_checkpointing,
        "gradient_accumulation_steps": r.train.gradient_accumulation, "noise_offset": r.train.noise_offset,
        "loss_type": r.train.loss, "guidance_scale": r.train.guidance, "timestep_sampling": r.train.timestep_sampling,
        "sigmoid_scale": r.train.sigmoid_scale, "discrete_flow_shift": r.train.shift,
        "weighting_scheme": r.train.timestep_weighting, "model_prediction_type": "raw",
        "num_train_images": counts.get("subject images", 0), "num_reg_images": counts.get("regularisation images", 0),
        "ss_resolution": f"({r.dataset.resolution}, {r.dataset.resolution})", "enable_bucket": True,
        "min_bucket_reso": r.dataset.bucket_min, "max_bucket_reso": r.dataset.bucket_max,
        "output_name": r.output.name, "training_started_at": started_at,
        "title": r.output.name, "trigger_phrase": r.dataset.trigger,
    }
    meta["modelspec.resolution"] = f"{r.dataset.resolution}x{r.dataset.resolution}"
    meta["lora_run_family"] = r.model.family
    meta["lora_run_backend"] = "native"
    return {k: _text(v) for k, v in meta.items()}


def _text(value: Any) -> str:
    import json

    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


#: room for a safetensors file's header: tensor names and offsets, the run's metadata
HEADER_BYTES = 64 * 1024


def _format_tensors(adapter: Any, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, recipe: Any,
                    metadata: dict[str, str]) -> Any:
    """(format, tensors at the save precision, metadata) of every requested format the family writes."""
    import torch

    dtype = getattr(torch, SAVE_DTYPES[recipe.output.save_precision])
    te_rank = recipe.text_encoder.rank or recipe.lora.rank
    for fmt in recipe.output.formats:
        if fmt not in adapter.lora_formats:
            continue
        tensors, meta = adapter.lora_files(fmt, transformer_sd, te_sd, rank=recipe.lora.rank, alpha=recipe.lora.alpha,
                                           te_rank=te_rank if te_sd else None, metadata=dict(metadata))
        yield fmt, {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v)
                    for k, v in tensors.items()}, meta


def write_loras(adapter: Any, folder: Path, base: str, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *,
                recipe: Any, metadata: dict[str, str], suffix: str = "",
                claim: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """Write the LoRA in every requested format under ``folder``; returns {format: path}. ``claim`` is told each
    file's path relative to ``folder`` before it is written (the run folder's ``RunDir.claim``)."""
    from lora_run_formats import save_lora

    written = {}
    for fmt, tensors, meta in _format_tensors(adapter, transformer_sd, te_sd, recipe=recipe, metadata=metadata):
        rel = adapter.output_name(fmt, base + suffix)
        if claim is not None:
            claim(rel)
        written[fmt] = save_lora(Path(folder) / rel, tensors, meta)
    return written


def lora_files_bytes(adapter: Any, transformer_sd: dict[str, Any], te_sd: dict[str, Any], *, recipe: Any) -> int:
    """The bytes `write_loras` writes for these state dicts: each format's tensors as its conversion lays them out
    (a fused layer's block-diagonal up weights, or one down weight where the fused ones are equal: the layout
    depends on the values, so real tensors are converted), plus header room per file."""
    return sum(sum(t.nelement() * t.element_size() for t in tensors.values()) + HEADER_BYTES
               for _, tensors, _ in _format_tensors(adapter, transformer_sd, te_sd, recipe=recipe, metadata={}))
