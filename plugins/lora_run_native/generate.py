"""Image generation with a trained LoRA: used by evaluation (and by anyone comparing LoRA files).

    generate_images(recipe, lora_path, jobs, out_dir, device=None, on_image=None) -> list[dict]

Each job is ``{"name", "prompt", "seed", "strength", "steps", "guidance", "width", "height"}``. The family's base
pipeline is built once from ``recipe.model`` (hub id, diffusers folder or single files, through the adapter), the
LoRA file (kohya or diffusers format; ``None`` = the base model) is loaded once, and every job is generated with the
LoRA scale set to its ``strength``. A LoRA whose matrices do not form LoRAs or do not fit the model is refused from
the headers before the pipeline is built (``ModelAdapter.lora_problem``, OutputError). The starting noise is drawn
on the CPU from the job's seed, so a seed gives the same image on every device. Images are written atomically as
``<out_dir>/<name>.png``; the jobs come back, in their order, with ``"path"`` added, and ``"seconds"``: the wall
time of the pipeline call that made the image (its PNG written), shared equally by the images of that call, so the
sum over the jobs is the generation time without the pipeline's load. ``on_image`` (optional) is called with each
job, ``"path"`` added, as soon as its image is written (the evaluation scores it meanwhile). On a GPU holding the
whole pipeline the transformer's calls are replayed from CUDA graphs (``graphed.py``): the same kernels without the
host's per-kernel launch cost, which bounds the eager forward at these sizes.

Jobs equal in ``strength``, ``steps``, ``guidance``, ``width`` and ``height`` are generated together, whatever
their prompt, in one pipeline call with a batch of starting latents and one prompt per image (``batch_groups``;
the adapter's ``generate_batch``), at most ``max_batch(width, height)`` images a call: each latent is still drawn
from its own job's seed and each image conditioned on its own job's prompt (text padded to the family's fixed
length, or masked), so the images are the one-at-a-time images up to kernel-level float differences.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

JOB_KEYS = ("name", "prompt", "seed", "strength", "steps", "guidance", "width", "height")
#: pixels generated in one pipeline call at most (8 images at 512², 2 at 1024²): bounds the activations and the
#: VAE decode of a batch
BATCH_PIXELS = 2 * 1024 * 1024


def max_batch(width: int, height: int, placement: str = "whole") -> int:
    """How many ``width`` × ``height`` images one pipeline call generates at most: ``BATCH_PIXELS`` worth, at
    least 1; 1 when the pipeline is streamed from the host (``group-offload``: memory is what is short)."""
    if placement == "group-offload":
        return 1
    return max(1, BATCH_PIXELS // (int(width) * int(height)))


def batch_groups(jobs: list[dict[str, Any]], limit: Callable[[int, int], int]) -> list[list[int]]:
    """Indices of ``jobs`` in groups of one pipeline call each: jobs equal in ``strength``, ``steps``,
    ``guidance``, ``width`` and ``height`` (compared as the pipeline gets them: ``steps``, ``width``, ``height``
    as ints, ``strength``, ``guidance`` as floats), whatever their prompt, name and seed and wherever they are in
    the list, in the order they appear; groups come in the order of their first job. A group of ``n`` jobs is cut,
    in order, into ``k = ceil(n / limit(width, height))`` runs (never more calls than the limit needs): runs of
    ``limit`` jobs and a last, shorter one, except where ``k`` runs of equal length fit (``n`` a multiple of
    ``k``), which are taken instead: 14 jobs at a limit of 8 go as 7 + 7, not 8 + 6.

    Why: on the GPU the transformer's calls are replayed from CUDA graphs (``graphed.py``), one recorded per
    distinct call key (an eager call, a warm-up and a capture each; at most ``graphed.MAX_GRAPHS`` a pipeline), and
    the key holds the batch size (and the LoRA scale where the pipeline passes it as an argument), so every
    distinct batch size of a strength costs a recording. Equal runs drop a group's second size at no extra call.
    Cuts of near-equal but different sizes (9 at 8 as 5 + 4) keep two sizes, as 8 + 1 does, so they buy no
    recording; the plain cut stays there (its full runs share one size with the other groups' full runs)."""
    groups: dict[tuple, list[int]] = {}
    for n, job in enumerate(jobs):
        key = (float(job["strength"]), int(job["steps"]), float(job["guidance"]), int(job["width"]),
               int(job["height"]))
        groups.setdefault(key, []).append(n)
    out = []
    for key, members in groups.items():
        size = max(1, int(limit(key[3], key[4])))
        calls = -(-len(members) // size)
        if len(members) % size and len(members) % calls == 0:
            size = len(members) // calls           # equal runs: one batch size where the plain cut has two
        out.extend(members[i:i + size] for i in range(0, len(members), size))
    return out


def _device(device: Any) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate_images(recipe: Any, lora_path: str | Path | None, jobs: list[dict[str, Any]], out_dir: str | Path,
                    device: Any = None, on_image: Callable[[dict[str, Any]], None] | None = None
                    ) -> list[dict[str, Any]]:
    from .accel import torch_settings
    from .adapters.base import libraries_quieted

    for n, job in enumerate(jobs):
        missing = [k for k in JOB_KEYS if k not in job]
        if missing:
            raise ValueError(f"generation job {n} lacks {', '.join(missing)}")
    dev = _device(device)
    with torch_settings(tf32=True), libraries_quieted():    # the training step's settings (its samples'), restored
        return _generate(recipe, lora_path, jobs, out_dir, dev, on_image)


def _generate(recipe: Any, lora_path: str | Path | None, jobs: list[dict[str, Any]], out_dir: str | Path,
              dev: Any, on_image: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    import io
    import sys
    import time

    import torch

    from lora_run.errors import OutputError
    from lora_run_rundir import atomic_write_bytes

    from .adapters import adapter_class
    from .graphed import graphed_forward

    adapter = adapter_class(recipe.model.family)(recipe, device=dev)
    dtype = adapter.compute_dtype if dev.type == "cuda" or recipe.train.mixed_precision == "no" else torch.float32
    if lora_path is not None and not Path(lora_path).is_file():
        raise OutputError(f"{lora_path}: LoRA file not found")
    misfit = adapter.lora_problem(lora_path) if lora_path is not None else None
    if misfit is not None:       # from the headers, before the pipeline loads (minutes for a full-size model)
        raise OutputError(f"{lora_path}: {misfit}")
    pipe = adapter.load_pipeline(torch.device("cpu") if dev.type == "cuda" else dev, dtype)
    if lora_path is not None:
        adapter.load_lora_into_pipeline(pipe, Path(lora_path))
    placement = place_pipeline(pipe, dev, recipe) if dev.type == "cuda" else "whole"
    out = Path(out_dir)
    paths: dict[int, str] = {}
    seconds: dict[int, float] = {}
    on_gpu = dev.type == "cuda" and placement == "whole"
    with torch.no_grad(), graphed_forward(pipe.transformer, enabled=on_gpu) as graphs:
        for group in batch_groups(jobs, lambda w, h: max_batch(w, h, placement)):
            started = time.monotonic()
            first = jobs[group[0]]
            images = adapter.generate_batch(
                pipe, prompt=[jobs[n]["prompt"] for n in group], seeds=[int(jobs[n]["seed"]) for n in group],
                steps=int(first["steps"]),
                guidance=float(first["guidance"]), width=int(first["width"]), height=int(first["height"]),
                lora_scale=float(first["strength"]) if lora_path is not None else 1.0)
            if len(images) != len(group):
                raise RuntimeError(f"{adapter.family}: generate_batch returned {len(images)} images for "
                                   f"{len(group)} seeds")
            for n, image in zip(group, images):
                target = out / f"{jobs[n]['name']}.png"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                atomic_write_bytes(target, buf.getvalue())
                paths[n] = str(target)
                if on_image is not None:     # the image is on disk: the caller may score it while the next are made
                    on_image({**jobs[n], "path": str(target)})
            share = (time.monotonic() - started) / len(group)      # read once: the call's images share it exactly
            seconds.update((n, share) for n in group)
    if graphs.calls:                        # calls are counted only where the transformer was wrapped
        print(f"generation: the transformer's {graphs.describe()}", file=sys.stderr)
    results = [{**job, "path": paths[n], "seconds": round(seconds[n], 4)} for n, job in enumerate(jobs)]
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
