"""diffusion-pipe's output folder: find the run, its saved LoRAs and checkpoints; convert to our formats.

diffusion-pipe names each run folder by the UTC time it started (``%Y%m%d_%H-%M-%S``) and cannot be told a
name, so the run's folder is the newest such folder that was not there before the launch. Inside it,
``epoch<N>/`` and ``step<N>/`` hold saved LoRAs (FLUX: ``pytorch_lora_weights.safetensors``, diffusers keys;
HunyuanImage: ``adapter_model.safetensors``, ComfyUI keys), ``global_step<N>/`` + ``latest`` DeepSpeed's
resumable state. A save folder is complete once its ``tmp/`` staging folder is gone.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import attrs

RUN_FOLDER = re.compile(r"^\d{8}_\d{2}-\d{2}-\d{2}$")
SAVE_FOLDER = re.compile(r"^(epoch|step)(\d+)$")
CHECKPOINT_FOLDER = re.compile(r"^global_step(\d+)$")
LORA_FILES = {"flux.1-dev": "pytorch_lora_weights.safetensors", "hunyuan-image-2.1": "adapter_model.safetensors"}
#: the key layout of those files (`lora_run_engines.output.module_pattern`)
LORA_LAYOUTS = {"flux.1-dev": "diffusers", "hunyuan-image-2.1": "comfyui"}


@attrs.frozen
class SavedLora:
    name: str            # epoch3 / step500
    kind: str            # epoch / step
    number: int
    folder: Path
    file: Path


def run_folders(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.is_dir() and RUN_FOLDER.match(p.name))


def new_run_folder(output_dir: Path, before: set[str]) -> Path | None:
    """The newest timestamped folder that did not exist before the launch."""
    fresh = [name for name in run_folders(output_dir) if name not in before]
    return output_dir / fresh[-1] if fresh else None


def resumable_run(output_dir: Path) -> str | None:
    """The newest run folder holding a DeepSpeed checkpoint (`latest` + its `global_step*` folder)."""
    for name in reversed(run_folders(output_dir)):
        tag = latest_checkpoint(output_dir / name)
        if tag is not None:
            return name
    return None


def latest_checkpoint(run_folder: Path) -> str | None:
    latest = run_folder / "latest"
    try:
        tag = latest.read_text("utf-8").strip()
    except OSError:
        return None
    return tag if tag and (run_folder / tag).is_dir() else None


def checkpoint_step(tag: str | None) -> int | None:
    """N of a DeepSpeed checkpoint tag `global_step<N>` (what `latest` names); None for anything else."""
    match = CHECKPOINT_FOLDER.match(tag or "")
    return int(match[1]) if match else None


def final_save(saves: list[SavedLora], max_steps: int | None, epochs: int) -> SavedLora | None:
    """The newest of `saves` that diffusion-pipe makes at the end of training: `step<N>` with N ≥ `max_steps` in a
    run that `max_steps` ends, else `epoch<N>` with N ≥ `epochs`; None when there is none."""
    for saved in reversed(saves):
        if max_steps is not None and saved.kind == "step" and saved.number >= max_steps:
            return saved
        if max_steps is None and saved.kind == "epoch" and saved.number >= epochs:
            return saved
    return None


def saved_loras(run_folder: Path | None, family: str) -> list[SavedLora]:
    """Complete save folders, oldest first (steps, then the final folder in save order)."""
    if run_folder is None or not run_folder.is_dir():
        return []
    found = []
    for entry in run_folder.iterdir():
        match = SAVE_FOLDER.match(entry.name)
        if not match or not entry.is_dir() or (entry / "tmp").exists():
            continue
        file = entry / LORA_FILES[family]
        if not file.is_file():
            others = sorted(entry.glob("*.safetensors"))
            if len(others) != 1:
                continue
            file = others[0]
        found.append(SavedLora(entry.name, match[1], int(match[2]), entry, file))
    return sorted(found, key=lambda s: (s.folder.stat().st_mtime_ns, s.number))


def prune(run_folder: Path, family: str, keep: int) -> list[Path]:
    """Delete all but the `keep` newest save folders and DeepSpeed checkpoints (never the `latest` one)."""
    removed: list[Path] = []
    saves = saved_loras(run_folder, family)
    for old in saves[:-keep] if keep > 0 else []:
        shutil.rmtree(old.folder, ignore_errors=True)
        removed.append(old.folder)
    latest = latest_checkpoint(run_folder)
    checkpoints = sorted((int(m[1]), p) for p in run_folder.iterdir()
                         if p.is_dir() and (m := CHECKPOINT_FOLDER.match(p.name)))
    newest = latest and CHECKPOINT_FOLDER.match(latest)
    limit = int(newest[1]) if newest else None
    for number, path in checkpoints[:-keep] if keep > 0 else []:
        if path.name == latest or limit is None or number >= limit:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------ conversion
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def to_our_formats(saved: SavedLora, family: str, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kohya state dict, diffusers state dict) of a diffusion-pipe LoRA (alpha = rank, scale 1)."""
    from lora_run_formats import load_lora

    state, _meta = load_lora(saved.file)
    if family == "flux.1-dev":
        from lora_run_formats import flux

        diffusers = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()}
        kohya = flux.diffusers_to_kohya(diffusers, alpha=float(rank), rank=rank)
    else:
        from lora_run_formats import hunyuan_image

        kohya = hunyuan_image.to_sd_scripts_names(hunyuan_image.comfy_to_kohya(state))
        diffusers = hunyuan_image.comfy_to_diffusers(state)
    return kohya, diffusers


def comfy_file(saved: SavedLora, family: str) -> dict[str, Any] | None:
    """The `comfyui` output: HunyuanImage's ComfyUI layout (`diffusion_model.` keys, scale 1); None for FLUX,
    whose kohya and diffusers files ComfyUI loads directly."""
    if family == "flux.1-dev":
        return None
    from lora_run_formats import hunyuan_image, load_lora

    state, _meta = load_lora(saved.file)
    return hunyuan_image.kohya_to_comfy(hunyuan_image.comfy_to_kohya(state))


def metadata(family: str, recipe: Any, *, steps: int | None, examples: int, commit: str) -> dict[str, str]:
    r = recipe
    fields = dict(
        network_dim=r.lora.rank, network_alpha=r.lora.rank, network_dropout=r.lora.dropout,
        learning_rate=r.optimizer.lr, unet_lr=r.optimizer.lr, optimizer=r.optimizer.name,
        lr_scheduler=r.scheduler.name, lr_warmup_steps=r.scheduler.warmup_steps, max_train_steps=steps,
        num_train_images=examples, resolution=f"{r.dataset.resolution},{r.dataset.resolution}",
        output_name=r.output.name, title=r.output.name, trigger_phrase=r.dataset.trigger or None,
        mixed_precision=r.train.mixed_precision, training_backend="diffusion-pipe", trainer_commit=commit,
    )
    if family == "flux.1-dev":
        from lora_run_formats import flux

        return flux.kohya_metadata(**fields)
    from lora_run_formats import hunyuan_image

    return hunyuan_image.kohya_metadata(**fields)


def write_formats(saved: SavedLora, family: str, recipe: Any, folder: Path, *, steps: int | None, examples: int,
                  commit: str) -> dict[str, str]:
    """Write `<name>.safetensors` (kohya), `<name>.diffusers.safetensors` and/or (HunyuanImage)
    `<name>.comfyui.safetensors` into `folder`; returns {"lora_kohya": path, "lora_diffusers": path,
    "lora_comfyui": path} for the formats the recipe asks for."""
    import torch

    from lora_run_formats import save_lora

    kohya, diffusers = to_our_formats(saved, family, recipe.lora.rank)
    dtype = getattr(torch, TORCH_DTYPES[recipe.output.save_precision])

    def cast(state: dict[str, Any]) -> dict[str, Any]:
        return {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in state.items()}

    out: dict[str, str] = {}
    name = recipe.output.name
    if "kohya" in recipe.output.formats:
        path = folder / f"{name}.safetensors"
        save_lora(path, cast(kohya), metadata(family, recipe, steps=steps, examples=examples, commit=commit))
        out["lora_kohya"] = str(path)
    if "diffusers" in recipe.output.formats:
        path = folder / f"{name}.diffusers.safetensors"
        save_lora(path, cast(diffusers), {"format": "pt", "lora_run.backend": "diffusion-pipe",
                                          "lora_run.rank": str(recipe.lora.rank)})
        out["lora_diffusers"] = str(path)
    comfy = comfy_file(saved, family) if "comfyui" in recipe.output.formats else None
    if comfy is not None:
        path = folder / f"{name}.comfyui.safetensors"
        save_lora(path, cast(comfy), {"format": "pt", "lora_run.backend": "diffusion-pipe",
                                      "lora_run.rank": str(recipe.lora.rank), "lora_run.layout": "comfyui"})
        out["lora_comfyui"] = str(path)
    return out
