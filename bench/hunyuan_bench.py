"""Full-size HunyuanImage-2.1 and Hunyuan-DiT v1.2 LoRA training steps (random weights, cached-style inputs).

    python bench/hunyuan_bench.py [--out bench/results]

For each family and size: lora-run's plan for an 80 GB GPU (memory_mode = "auto"), step time (median of
8 after 3 warm-up steps, CUDA events), peak memory (max_memory_allocated) and the estimate `lora-run plan`
prints. As a baseline, the same step with plain diffusers + peft, bf16 weights, autocast and block
gradient checkpointing (what a user gets without lora-run's modes; for Hunyuan-DiT, which has no
checkpointing in diffusers, without it).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "plugins"))
sys.path.insert(0, str(HERE.parent / "core"))

import torch  # noqa: E402

from lora_run_native import accel, perfmodel  # noqa: E402

IMAGE_CONFIG = dict(in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=(1, 1),
                    qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=3584, text_embed_2_dim=1472,
                    rope_theta=256.0, rope_axes_dim=(64, 64))
DIT_CONFIG = dict(num_layers=40, hidden_size=1408, num_attention_heads=16, attention_head_dim=88, patch_size=2,
                  in_channels=4, learn_sigma=True, mlp_ratio=4.3637, cross_attention_dim=1024,
                  cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                  sample_size=128, use_style_cond_and_image_meta_size=False)
IMAGE_TARGETS = (r".*(transformer_blocks|single_transformer_blocks)\.\d+\.attn\."
                 r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
DIT_TARGETS = r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def free() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def build(family: str, rank: int):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            if family == "hunyuan-image-2.1":
                from diffusers import HunyuanImageTransformer2DModel
                model = HunyuanImageTransformer2DModel(**IMAGE_CONFIG)
            else:
                from diffusers import HunyuanDiT2DModel
                model = HunyuanDiT2DModel(**DIT_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=IMAGE_TARGETS if family == "hunyuan-image-2.1" else DIT_TARGETS)
    inject_adapter_in_model(config, model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def inputs(family: str, res: int, batch: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1)
    bf16 = torch.bfloat16
    if family == "hunyuan-image-2.1":
        side = res // 32
        mask = torch.zeros(batch, 1000, dtype=torch.long, device="cuda")
        mask[:, :256] = 1
        mask2 = torch.zeros(batch, 128, dtype=torch.long, device="cuda")
        mask2[:, :16] = 1
        kw = dict(hidden_states=torch.randn(batch, 64, side, side, device="cuda", dtype=bf16, generator=g),
                  timestep=torch.rand(batch, device="cuda", generator=g) * 1000,
                  encoder_hidden_states=torch.randn(batch, 1000, 3584, device="cuda", dtype=bf16, generator=g),
                  encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(batch, 128, 1472, device="cuda", dtype=bf16, generator=g),
                  encoder_attention_mask_2=mask2, return_dict=False)
        target = torch.randn(batch, 64, side, side, device="cuda", generator=g)
    else:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        side = res // 8
        grid = res // 16
        crop = get_resize_crop_region_for_grid((grid, grid), 512 // 16)
        rope = get_2d_rotary_pos_embed(88, crop, (grid, grid), output_type="pt")
        kw = dict(hidden_states=torch.randn(batch, 4, side, side, device="cuda", dtype=bf16, generator=g),
                  timestep=torch.randint(0, 1000, (batch,), device="cuda", generator=g).to(bf16),
                  encoder_hidden_states=torch.randn(batch, 77, 1024, device="cuda", dtype=bf16, generator=g),
                  text_embedding_mask=torch.ones(batch, 77, dtype=torch.long, device="cuda"),
                  encoder_hidden_states_t5=torch.randn(batch, 256, 2048, device="cuda", dtype=bf16, generator=g),
                  text_embedding_mask_t5=torch.ones(batch, 256, dtype=torch.long, device="cuda"),
                  image_rotary_emb=tuple(r.to("cuda") for r in rope), return_dict=False)
        target = torch.randn(batch, 4, side, side, device="cuda", generator=g)
    return kw, target


def step(model, opt, kw, target) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**kw)[0]
    out = out[:, : target.shape[1]]          # Hunyuan-DiT: train the first half (learn_sigma)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed(model, family: str, res: int, batch: int = 1, iters: int = 8, warmup: int = 3) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    kw, target = inputs(family, res, batch)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(model, opt, kw, target)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step(model, opt, kw, target)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return dict(median_s=times[len(times) // 2], peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                reserved_gib=torch.cuda.max_memory_reserved() / 2**30, loss=float(loss), warmup_s=warm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    accel.configure_cuda()
    import diffusers

    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, diffusers=diffusers.__version__)
    print(json.dumps(env), flush=True)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = []
    for family, sizes in (("hunyuan-dit-1.2", [1024]), ("hunyuan-image-2.1", [1024, 2048])):
        for res in sizes:
            # baseline: plain diffusers + peft, bf16 weights, block checkpointing where diffusers has it
            model = build(family, args.rank)
            if family == "hunyuan-image-2.1":
                model.enable_gradient_checkpointing(gradient_checkpointing_func=lambda m, *a, **kw:
                                                    torch.utils.checkpoint.checkpoint(m, *a, use_reentrant=False, **kw))
            try:
                row = timed(model, family, res)
            except torch.OutOfMemoryError as exc:
                row = dict(error=f"OOM {str(exc)[:120]}")
            row.update(family=family, resolution=res, impl="diffusers+peft",
                       plan="eager, bf16, " + ("block checkpointing" if family != "hunyuan-dit-1.2" else "no checkpointing"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            free()
            plan = perfmodel.choose_mode("auto", family, res, res, 1, args.rank, "attention",
                                         free_gib=total - 1.0, fp8_requested=False)
            model = build(family, args.rank)
            accel.apply(model, plan, "cuda", torch.bfloat16)
            free()
            try:
                row = timed(model, family, res)
            except torch.OutOfMemoryError as exc:
                row = dict(error=f"OOM {str(exc)[:120]}")
            estimate = perfmodel.estimate_peak_gib(family, res, res, 1, args.rank, "attention", plan)
            row.update(family=family, resolution=res, impl="lora-run", plan=plan.describe(), estimate_gib=estimate)
            if "peak_gib" in row:
                row["estimate_error"] = estimate / row["peak_gib"] - 1
                base = rows[-1]
                if "median_s" in base:
                    row["speedup_vs_baseline"] = base["median_s"] / row["median_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            free()
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / f"hunyuan-{stamp}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print("\n| family | res | impl | plan | median s | peak GiB | est GiB | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['resolution']} | {r['impl']} | {r['plan']} | {r.get('median_s', float('nan')):.3f} | "
              f"{r.get('peak_gib', float('nan')):.1f} | {r.get('estimate_gib', float('nan')):.1f} | "
              f"{r.get('speedup_vs_baseline', 1.0):.2f}× |")


if __name__ == "__main__":
    main()
