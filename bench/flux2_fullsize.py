"""FLUX.2 full-size rows: the real [klein] 4B/9B and [dev] 32 B transformers with random weights, trained through
the CLI (`lora-run recipes/flux2/identity-fast.toml --set …`) on one GPU, beside a plain diffusers + peft step.

    python bench/flux2_fullsize.py --variant dev --mode low-vram --steps 8 [--resolution 1024] [--work /tmp/f2]
    python bench/flux2_fullsize.py --variant klein-4b --mode speed --steps 8 --reference
    python bench/flux2_fullsize.py --variant klein-tiny --mode speed --steps 2 --device cpu   # CPU smoke run

Prints one JSON row: step time, peak reserved/allocated GiB, the plan and its estimate (and the error of
the estimate against the measured peak), and with ``--reference`` the plain diffusers + peft step (the
diffusers FLUX.2 LoRA example's step: bf16 base, LoRA on the example's default modules, gradient
checkpointing, AdamW, MSE) timed on the same inputs shape.

For the GPU acceptance bench (bench/gpu_acceptance.py) this module offers, without importing torch at import:
``FAMILIES`` (row family key → recipe family), ``builders()`` (asset key → folder builder) and ``rows()`` (rows
in gpu_acceptance's format); to add them: ``FAMILIES.update(flux2_fullsize.FAMILIES)``, the builders to
``build_assets``' table, ``rows()`` to ``all_rows()``. Model folders are diffusers folders (random bf16 weights,
full-size transformer and VAE; text encoders of the real width but one head and a small MLP per layer — they
only fill the cache), skipped when already complete (``.complete`` written last).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO / "core", REPO / "plugins", HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

#: variant: (family, transformer width, double blocks, single blocks, text-encoder width)
VARIANTS = {"klein-4b": ("flux.2-klein", 3072, 5, 20, 2560), "klein-9b": ("flux.2-klein", 4096, 8, 24, 4096),
            "dev": ("flux.2-dev", 6144, 8, 48, 5120), "klein-tiny": ("flux.2-klein", 0, 0, 0, 0),
            "dev-tiny": ("flux.2-dev", 0, 0, 0, 0)}
FAMILIES = {"klein": "flux.2-klein", "dev": "flux.2-dev"}
MODES = ("speed", "memory", "low-vram")


# ------------------------------------------------------------------------------------------------ models
def _small_text_encoder(kind: str, width: int, vocab: int) -> Any:
    """A text encoder of the real width and depth (the layers FLUX.2 reads exist) but 1 head, small MLP."""
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    if kind == "klein":
        return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=27, tie_word_embeddings=True, **common))
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                 image_size=32, patch_size=16, head_dim=16)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=MistralConfig(num_hidden_layers=30, **common),
                                                           vision_config=vision, image_token_index=8,
                                                           spatial_merge_size=1))


def save_sharded(model: Any, folder: Path, spill: Path | None = None, reserve_gib: float = 16.0,
                 max_shard_size: str = "5GB", free_bytes: Any = None) -> list[Path]:
    """Save ``model`` as a sharded diffusers folder (``config.json``, the safetensors index, the shards) when
    its disk may be too small: a shard that would leave less than ``reserve_gib`` free there is written into
    ``spill`` (a RAM-backed folder such as /dev/shm) and linked from ``folder``. [dev]'s bf16 transformer is
    60.2 GiB and the lent GPU machine has 64 GiB of disk in all. ``reserve_gib`` is what the runs that follow
    need: with 4 GiB kept free, the [dev] rows' caches, compile caches and checkpoints filled the disk on the
    third row (2026-12-03); 16 GiB keeps about 45 GiB of shards on disk and 15 GiB in RAM. The folder loads with ``from_pretrained`` as
    any other (the hub's own cache links its files the same way). Returns the spilled shards."""
    import shutil

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME

    free_bytes = free_bytes or (lambda path: shutil.disk_usage(path).free)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("diffusion_pytorch_model*.safetensors*"):   # the tiny model this folder began as
        stale.unlink()
    model.save_config(folder)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=max_shard_size)
    spilled = []
    for name, keys in split.filename_to_tensors.items():
        tensors = {k: state[k].detach().to("cpu").contiguous() for k in keys}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        target = folder / name
        if spill is not None and free_bytes(folder) - size < reserve_gib * 2**30:
            spill.mkdir(parents=True, exist_ok=True)
            room = free_bytes(spill)
            if room - size < 2**30:
                raise SystemExit(f"flux2_fullsize: {name} ({size / 2**30:.1f} GiB) fits neither {folder}'s disk "
                                 f"(keeping {reserve_gib:g} GiB free) nor {spill} ({room / 2**30:.1f} GiB free)")
            save_file(tensors, spill / name, metadata={"format": "pt"})
            target.symlink_to(spill / name)
            spilled.append(spill / name)
        else:
            save_file(tensors, target, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return spilled


def build_flux2(folder: Path, variant: str = "klein-4b", spill: Path | None = None) -> Path:
    """A diffusers folder of ``variant`` (see ``VARIANTS``) with random weights; the ``*-tiny`` variants are
    the test models (CPU smoke runs). ``spill``: a second folder for the transformer's shards the disk cannot
    hold (``save_sharded``; default ``$LORA_RUN_BENCH_SPILL``)."""
    import torch

    from lora_run_flux2.tiny import build_tiny_flux2

    folder = Path(folder)
    if (folder / ".complete").is_file():
        return folder
    family, width, doubles, singles, text_width = VARIANTS[variant]
    kind = "klein" if family == "flux.2-klein" else "dev"
    build_tiny_flux2(folder, kind)
    if width:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        # built in bf16 from the start: [dev]'s 32 B parameters in float32 (128 GB) and their bf16 copy would not
        # fit one H200 together
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                transformer = Flux2Transformer2DModel(
                    in_channels=128, num_layers=doubles, num_single_layers=singles, attention_head_dim=128,
                    num_attention_heads=width // 128, joint_attention_dim=3 * text_width,
                    guidance_embeds=kind == "dev")
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():                       # activations stay finite through the random blocks
            for p in transformer.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
        spill = spill or (Path(os.environ["LORA_RUN_BENCH_SPILL"]) if os.environ.get("LORA_RUN_BENCH_SPILL") else None)
        spilled = save_sharded(transformer, folder / "transformer", spill / variant if spill else None)
        if spilled:
            print(f"flux2_fullsize: {len(spilled)} transformer shard(s) in {spill}, linked from {folder}", flush=True)
        del transformer
        vocab = len(AutoTokenizer.from_pretrained(folder / "tokenizer"))
        with torch.device(device):
            _small_text_encoder(kind, text_width, vocab).to(torch.bfloat16).save_pretrained(folder / "text_encoder")
            AutoencoderKLFlux2().to(torch.bfloat16).save_pretrained(folder / "vae")
        if device == "cuda":
            torch.cuda.empty_cache()
    (folder / ".complete").write_text(variant)
    return folder


def builders() -> dict[str, Any]:
    return {f"{v}-full": (lambda f, v=v: build_flux2(f, v)) for v in ("klein-4b", "klein-9b", "dev")}


def rows() -> list[dict[str, Any]]:
    """Rows in gpu_acceptance's format: [klein] 4B and [dev] in each mode at 1024², [dev] in 24 and 80 GiB budgets."""
    out = []
    for variant, fam in (("klein-4b", "klein"), ("dev", "dev")):
        for mode in MODES:
            out.append({"id": f"full-{variant}-1024-{mode}", "group": "flux2", "family": fam,
                        "sets": {"train.memory_mode": mode, "train.steps": 6}, "kind": "run",
                        "model": f"{variant}-full", "timeout": 600, "resolution": 1024})
    for gib in (24, 80):     # a 24 GB card (low-vram, blocks streamed) and an 80 GB one (memory, some checkpointed)
        out.append({"id": f"budget-dev-1024-{gib}gib", "group": "flux2", "family": "dev", "kind": "run",
                    "sets": {"train.memory_mode": "auto", "train.gpu_memory_gib": float(gib), "train.steps": 4},
                    "model": "dev-full", "timeout": 600, "resolution": 1024, "budget": gib})
    return out


# ------------------------------------------------------------------------------------------- the CLI run
def _dataset(work: Path, resolution: int) -> Path:
    from PIL import Image

    from lora_run_native.demo import build_dataset

    out = work / f"data-{resolution}"
    if out.is_dir():
        return out
    build_dataset(work / "data")
    out.mkdir(parents=True)
    for image in sorted((work / "data" / "subject").glob("*.png")):
        with Image.open(image) as im:
            im.resize((resolution, resolution), Image.BICUBIC).save(out / image.name)
        (out / image.with_suffix(".txt").name).write_text(image.with_suffix(".txt").read_text())
    return out


def run_cli(variant: str, mode: str, steps: int, resolution: int, work: Path, device: str) -> dict[str, Any]:
    family = VARIANTS[variant][0]
    model = build_flux2(work / "models" / variant, variant)
    data = _dataset(work, resolution)
    out = work / "runs" / f"{variant}-{mode}-{resolution}"
    sets = {"model.family": family, "model.source": str(model), "model.offline": True, "dataset.path": str(data),
            "dataset.resolution": resolution, "dataset.bucket_min": resolution, "dataset.bucket_max": resolution,
            "dataset.min_images": 4, "lora.targets": "attention", "train.steps": steps,
            "train.memory_mode": mode, "train.save_every_steps": steps, "eval.enabled": False,
            "backend.native.progress_bar": False, "backend.native.tensorboard": False,
            "backend.native.text_max_length": 128, "output.name": "bench"}
    if device == "cpu":
        sets.update({"train.mixed_precision": "no", "sample.every_steps": steps, "sample.steps": 2,
                     "sample.width": resolution, "sample.height": resolution})
    import tomli_w

    args = [sys.executable, "-m", "lora_run.cli", str(REPO / "recipes" / "flux2" / "identity-fast.toml"),
            "--output-dir", str(out), "--overwrite"]
    for key, value in sets.items():
        args += ["--set", tomli_w.dumps({"v": value}).strip().replace("v = ", f"{key}=", 1)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=work)
    wall = time.perf_counter() - started
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    art = manifest.get("artifacts") or {}
    timing, plan = art.get("timing") or {}, art.get("gpu_plan") or {}
    row = {"variant": variant, "family": family, "mode": mode, "resolution": resolution, "steps": steps,
           "exit": done.returncode, "status": manifest.get("status"), "wall_s": round(wall, 1),
           "step_s": timing.get("step_s"), "peak_reserved_gib": timing.get("peak_reserved_gib"),
           "peak_allocated_gib": timing.get("peak_allocated_gib"), "plan": plan.get("plan"),
           "estimate_gib": plan.get("estimate_gib")}
    if row["estimate_gib"] and row["peak_reserved_gib"]:
        row["estimate_error"] = round(row["estimate_gib"] / row["peak_reserved_gib"] - 1, 3)
    if done.returncode != 0:
        row["error"] = (manifest.get("error") or done.stderr[-2000:])
    return row


# ------------------------------------------------------------------------------ plain diffusers + peft
def reference_step(variant: str, resolution: int, steps: int, work: Path, folder: Path | None = None
                   ) -> dict[str, Any]:
    """The diffusers FLUX.2 LoRA example's step on the same model: bf16 base on the GPU, LoRA (rank 32) on its
    default modules, gradient checkpointing, AdamW, MSE on the packed tokens. Median step time and peak."""
    import statistics

    import torch
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from lora_run_flux2 import latents

    model_dir = build_flux2(folder or work / "models" / variant, variant)
    transformer = Flux2Transformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.bfloat16)
    transformer.to("cuda").requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    singles = transformer.config.num_single_layers
    targets = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
               *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)]]
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // 16
    x = torch.randn(1, 128, side, side, device="cuda")
    text = torch.randn(1, 128, transformer.config.joint_attention_dim, device="cuda", dtype=torch.bfloat16)
    guidance = torch.ones(1, device="cuda") if transformer.config.guidance_embeds else None
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", torch.bfloat16):
            pred = transformer(hidden_states=latents.pack(x).to(torch.bfloat16), encoder_hidden_states=text,
                               timestep=torch.full((1,), 0.5, device="cuda"), guidance=guidance,
                               img_ids=latents.image_ids(1, side, side, "cuda"),
                               txt_ids=latents.text_ids(1, text.shape[1], "cuda"), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), latents.pack(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1000)
    return {"variant": variant, "mode": "diffusers+peft", "resolution": resolution, "steps": steps,
            "step_s": round(statistics.median(times), 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="klein-4b")
    parser.add_argument("--mode", choices=MODES, default="speed")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flux2-bench"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--reference", action="store_true", help="also time the plain diffusers + peft step")
    parser.add_argument("--reference-only", action="store_true", help="time only the diffusers + peft step")
    parser.add_argument("--model", type=Path, default=None,
                        help="the variant's folder, already built (e.g. gpu_acceptance's WORK/models/dev-full)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows_out = [] if args.reference_only else [
        run_cli(args.variant, args.mode, args.steps, args.resolution, args.work, args.device)]
    if (args.reference or args.reference_only) and args.device == "cuda":
        rows_out.append(reference_step(args.variant, args.resolution, args.steps, args.work, args.model))
    print(json.dumps(rows_out, indent=2))
    return 0 if not rows_out or rows_out[0].get("exit", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
