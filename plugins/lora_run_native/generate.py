"""Image generation with a trained LoRA: used by evaluation (and by anyone comparing LoRA files).

    generate_images(recipe, lora_path, jobs, out_dir, device=None) -> list[dict]

Each job is ``{"name", "prompt", "seed", "strength", "steps", "guidance", "width", "height"}``. The family's
base pipeline is built once from ``recipe.model`` (hub id, diffusers folder or single files, through the
adapter), the LoRA file (kohya or diffusers format; ``None`` = the base model) is loaded once, and every job
is generated with the LoRA scale set to its ``strength``. The starting noise is drawn on the CPU from the
job's seed, so a seed gives the same image on every device. Images are written atomically as
``<out_dir>/<name>.png``; the jobs come back with ``"path"`` added.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

JOB_KEYS = ("name", "prompt", "seed", "strength", "steps", "guidance", "width", "height")


def _device(device: Any) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate_images(recipe: Any, lora_path: str | Path | None, jobs: list[dict[str, Any]], out_dir: str | Path,
                    device: Any = None) -> list[dict[str, Any]]:
    import io

    import torch

    from lora_run.errors import OutputError
    from lora_run.rundir import atomic_write_bytes

    from .adapters import adapter_class

    for n, job in enumerate(jobs):
        missing = [k for k in JOB_KEYS if k not in job]
        if missing:
            raise ValueError(f"generation job {n} lacks {', '.join(missing)}")
    dev = _device(device)
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    adapter = adapter_class(recipe.model.family)(recipe, device=dev)
    dtype = adapter.compute_dtype if dev.type == "cuda" or recipe.train.mixed_precision == "no" else torch.float32
    if lora_path is not None and not Path(lora_path).is_file():
        raise OutputError(f"{lora_path}: LoRA file not found")
    pipe = adapter.load_pipeline(torch.device("cpu") if dev.type == "cuda" else dev, dtype)
    if lora_path is not None:
        adapter.load_lora_into_pipeline(pipe, Path(lora_path))
    if dev.type == "cuda":
        place_pipeline(pipe, dev, recipe)
    out = Path(out_dir)
    results = []
    with torch.no_grad():
        for job in jobs:
            image = adapter.generate(pipe, prompt=job["prompt"], seed=int(job["seed"]), steps=int(job["steps"]),
                                     guidance=float(job["guidance"]), width=int(job["width"]), height=int(job["height"]),
                                     lora_scale=float(job["strength"]) if lora_path is not None else 1.0)
            target = out / f"{job['name']}.png"
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(target, buf.getvalue())
            results.append({**job, "path": str(target)})
    del pipe
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return results


def place_pipeline(pipe: Any, device: Any, recipe: Any) -> str:
    """Put a CPU-loaded pipeline on the GPU whole when it fits the memory this run may use (the free memory,
    capped by ``[train] gpu_memory_gib``), else stream it block by block from the host (diffusers' group
    offloading, one block ahead on a side stream): a 24 GB card evaluates FLUX.1-dev's 24 GB transformer
    that way. Returns which placement was used."""
    import torch

    from .train import cap_gpu_memory, gpu_budget_gib

    cap_gpu_memory(recipe, device)
    free, _source = gpu_budget_gib(recipe, device)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30
    if size <= free * 0.8:
        pipe.to(device)
        return "whole"
    pipe.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                              use_stream=True)
    return "group-offload"
