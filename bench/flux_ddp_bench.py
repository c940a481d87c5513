"""Data-parallel scaling of the native FLUX.1-dev step: 1, 2 (and 4) GPUs through `lora-run --gpus N`.

    python bench/flux_ddp_bench.py --out bench/results [--gpus 1 2 4] [--steps 20 --warmup 8] [--work /tmp/ddp]

What it measures: a real `lora-run --gpus N` run (a subprocess: validation, torchrun started through
`torch.distributed.run`, N processes each running `python -m lora_run`, the Accelerator's DDP over the LoRA
gradients with NCCL, rank 0 writing) on a FLUX.1-dev
model with the **full-size transformer architecture** (19 double + 38 single blocks, 3072 wide; random bf16
weights), small random text encoders of the right widths (T5 4096, CLIP-L 768, one layer each — they only
fill the cache) and an 8× VAE. Training: 1024² images, batch 1 per GPU, rank 32 attention LoRA,
`memory_mode = "speed"`, bf16. Per N: the median wall time between rank 0's per-step TensorBoard events
(`train/loss`, written at the end of each optimizer step) after `--warmup` steps (compilation included in
the warm-up), samples/s = N / step time, and the scaling efficiency
samples/s(N) / (N × samples/s(1)). Writes `ddp-<timestamp>.json` and prints a table.

Needs N CUDA GPUs and about 30 GB of free disk for the random model (built once under --work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "plugins"))
sys.path.insert(0, str(HERE.parent / "core"))

FULL = {"head_dim": 128, "heads": 24, "double": 19, "single": 38}    # FLUX.1-dev's transformer


def build_model(folder: Path) -> Path:
    """Tiny encoders of FLUX's widths + the full-size transformer (random bf16, initialised on the GPU)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from lora_run_native import tiny

    if (folder / "transformer" / "config.json").is_file() and (folder / ".complete").is_file():
        return folder
    sizes = dict(tiny.TINY)
    tiny.TINY.update({"clip_hidden": 768, "t5_d_model": 4096, "t5_heads": 32})
    try:
        tiny.build_tiny_flux(folder)
    finally:
        tiny.TINY.clear()
        tiny.TINY.update(sizes)
    hd = FULL["head_dim"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=FULL["double"], num_single_layers=FULL["single"],
            attention_head_dim=hd, num_attention_heads=FULL["heads"], joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
    with torch.no_grad():                 # default init is fine for timing; keep activations finite
        for p in transformer.parameters():
            if p.dim() >= 2:
                p.mul_(0.5)
    transformer.save_pretrained(folder / "transformer", max_shard_size="10GB")
    del transformer
    torch.cuda.empty_cache()
    (folder / ".complete").write_text("ok")
    return folder


RECIPE = """
[model]
family = "flux.1-dev"
source = "{model}"
offline = true

[dataset]
path = "{data}"
trigger = "ohwx"
resolution = 1024
bucket_min = 1024
bucket_max = 1024
bucket_step = 64
min_images = 1

[lora]
rank = 32
alpha = 32.0
targets = "attention"

[optimizer]
name = "adamw"
lr = 1e-4

[scheduler]
name = "constant"

[train]
steps = {steps}
batch_size = 1
gpus = {gpus}
mixed_precision = "bf16"
memory_mode = "speed"
cache_dir = "{cache}"
seed = 1

[eval]
enabled = false

[output]
name = "bench"

[backend]
name = "native"

[backend.native]
text_max_length = 512
progress_bar = false
tensorboard = true
"""


def step_times(run: Path) -> list[float]:
    """Wall times of rank 0's `train/loss` TensorBoard events, one per optimizer step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times: list[float] = []
    for folder in sorted({p.parent for p in run.joinpath("logs").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            times.extend(e.wall_time for e in acc.Scalars("train/loss"))
    return sorted(times)


def run_one(model: Path, data: Path, work: Path, gpus: int, steps: int, warmup: int) -> dict:
    import subprocess

    recipe = work / f"recipe-{gpus}.toml"
    recipe.write_text(RECIPE.format(model=model, data=data, steps=steps, gpus=gpus, cache=work / "cache"))
    run = work / f"run-{gpus}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "core"), str(HERE.parent / "plugins"),
                                                         os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_run", str(recipe), "--gpus", str(gpus), "--output-dir", str(run),
                    "--overwrite"], env=env, check=True)
    total = time.perf_counter() - started
    times = step_times(run)
    gaps = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    step_s = statistics.median(gaps) if gaps else float("nan")
    return {"gpus": gpus, "steps": steps, "warmup": warmup, "step_s": step_s, "samples_per_s": gpus / step_s,
            "wall_s": round(total, 1), "gaps": gaps}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--gpus", type=int, nargs="+", default=None, help="default: 1, 2 and 4 where available")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--work", default="/tmp/lora-run-ddp-bench")
    args = ap.parse_args()
    count = torch.cuda.device_count()
    if count == 0:
        sys.exit("this benchmark needs CUDA GPUs")
    counts = args.gpus or [n for n in (1, 2, 4) if n <= count]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = build_model(work / "flux-full-random")
    data = work / "images"
    if not data.is_dir():
        from lora_run_devtools.testing import make_images

        make_images(data, count=args.images, size=(1024, 1024))
    rows = []
    for n in counts:
        row = run_one(model, data, work, n, args.steps, args.warmup)
        rows.append(row)
        print(f"{n} GPU(s): {row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s", flush=True)
    base = next((r for r in rows if r["gpus"] == 1), None)
    print("\n| GPUs | s/step | samples/s | scaling efficiency |\n|---|---|---|---|")
    for r in rows:
        r["efficiency"] = (r["samples_per_s"] / (r["gpus"] * base["samples_per_s"])) if base else None
        eff = f"{r['efficiency']:.0%}" if r["efficiency"] is not None else "n/a"
        print(f"| {r['gpus']} | {r['step_s']:.3f} | {r['samples_per_s']:.2f} | {eff} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ddp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "gpus_available": count,
                                "torch": torch.__version__, "python": platform.python_version(), "rows": rows},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
