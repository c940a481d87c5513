"""Full-size HunyuanImage-2.1 and Hunyuan-DiT v1.2 LoRA training steps (random weights, cached-style inputs).

    python bench/hunyuan_bench.py [--out bench/results] [--no-fa4] [--families F ...] [--image-sizes 1024 2048]

For each family and size: lora-run's plan for the GPU (memory_mode = "auto"), step time (median of
8 after 3 warm-up steps, CUDA events), peak memory (max_memory_allocated) and the estimate `lora-run plan`
prints. As a baseline, the same step with plain diffusers + peft, bf16 weights, autocast and block
gradient checkpointing (what a user gets without lora-run's modes; for Hunyuan-DiT, which has no
checkpointing in diffusers, without it). Then the same lora-run plan with FlashAttention-4
(`[train] attention = "fa4"`: HunyuanImage-2.1's text-padding mask through the op's `keys_used`, Hunyuan-DiT
through its family's dispatching processor), and, per family at 1024², the LoRA gradients of one eager step
with FA4 against SDPA on the same inputs, with the bound of bench/perf.py (3× SDPA's own bf16 noise: its
default kernel against its math kernel, both bf16).
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

from lora_run_native import accel, attention, perfmodel  # noqa: E402
from flux_bench import rel_error  # noqa: E402
from perf import grad_bound  # noqa: E402

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
    g = torch.Generator(device="cuda").manual_seed(2)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_B" in name:           # non-zero, so every LoRA tensor has a gradient to compare
                p.data.normal_(0, 0.01, generator=g)
    return model


def as_lora_run_builds(model, family: str):
    """What the family's adapter does to a loaded transformer that bears on speed: Hunyuan-DiT's attention
    goes through diffusers' dispatch (lora_run_hunyuan_dit.attention), so the run's kernel reaches it."""
    if family == "hunyuan-dit-1.2":
        from lora_run_hunyuan_dit.attention import use_dispatching_attention

        use_dispatching_attention(model)
    return model


def lora_grads(model, family: str, res: int) -> dict:
    kw, target = inputs(family, res, 1)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**kw)[0]
    torch.nn.functional.mse_loss(out[:, : target.shape[1]].float(), target).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def grad_check(family: str, res: int, rank: int) -> dict:
    """One eager step's LoRA gradients: FA4 against SDPA's default kernel, and SDPA's own bf16 noise (its
    default kernel against its math kernel) for the bound."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = as_lora_run_builds(build(family, rank), family)
    sdpa = lora_grads(model, family, res)
    with sdpa_kernel([SDPBackend.MATH]):
        math = lora_grads(model, family, res)
    choice = attention.setup(model, "fa4", "cuda")
    row = dict(family=family, resolution=res, impl="gradient check", attention=choice.describe())
    if choice.kernel == "fa4":
        fa4 = lora_grads(model, family, res)
        noise = rel_error(math, sdpa)
        row.update(grad_rel_error=rel_error(fa4, sdpa), bf16_noise=noise, grad_bound=grad_bound(noise),
                   tensors=len(sdpa))
        row["grad_ok"] = row["grad_rel_error"] <= row["grad_bound"]
    del model
    free()
    return row


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
    ap.add_argument("--no-fa4", dest="fa4", action="store_false", help="skip the FlashAttention-4 rows")
    ap.add_argument("--families", nargs="+", default=["hunyuan-dit-1.2", "hunyuan-image-2.1"],
                    choices=["hunyuan-dit-1.2", "hunyuan-image-2.1"])
    ap.add_argument("--image-sizes", nargs="+", type=int, default=[1024, 2048], help="HunyuanImage-2.1's sizes")
    args = ap.parse_args()
    accel.configure_cuda()
    import diffusers

    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, diffusers=diffusers.__version__)
    print(json.dumps(env), flush=True)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = []
    sizes_of = {"hunyuan-dit-1.2": [1024], "hunyuan-image-2.1": args.image_sizes}
    for family, sizes in ((f, sizes_of[f]) for f in args.families):
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
            baseline = row
            print(json.dumps(row), flush=True)
            del model
            free()
            plan = perfmodel.choose_mode("auto", family, res, res, 1, args.rank, "attention",
                                         free_gib=total - 1.0, fp8_requested=False)
            estimate = perfmodel.estimate_peak_gib(family, res, res, 1, args.rank, "attention", plan)
            sdpa_row = None
            for kernel in ("sdpa", "fa4") if args.fa4 else ("sdpa",):
                model = as_lora_run_builds(build(family, args.rank), family)
                choice = attention.setup(model, kernel, "cuda")
                accel.apply(model, plan, "cuda", torch.bfloat16)
                free()
                if choice.kernel != kernel:
                    row = dict(error=f"FlashAttention-4 cannot run: {choice.reason}")
                else:
                    try:
                        row = timed(model, family, res)
                    except torch.OutOfMemoryError as exc:
                        row = dict(error=f"OOM {str(exc)[:120]}")
                row.update(family=family, resolution=res, impl="lora-run", plan=plan.describe(),
                           attention=choice.describe(), estimate_gib=estimate)
                if "peak_gib" in row:
                    row["estimate_error"] = estimate / row["peak_gib"] - 1
                    if "median_s" in baseline:
                        row["speedup_vs_baseline"] = baseline["median_s"] / row["median_s"]
                    if sdpa_row and "median_s" in sdpa_row:
                        row["speedup_vs_sdpa"] = sdpa_row["median_s"] / row["median_s"]
                sdpa_row = sdpa_row or row
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
                free()
        if args.fa4:
            row = grad_check(family, 1024, args.rank)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / f"hunyuan-{stamp}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print("\n| family | res | impl | plan / attention | median s | peak GiB | est GiB | vs baseline | vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["impl"] == "gradient check":
            continue
        what = r["plan"] + (f"; {r['attention']}" if r.get("attention") else "")
        print(f"| {r['family']} | {r['resolution']} | {r['impl']} | {what} | {r.get('median_s', float('nan')):.3f} | "
              f"{r.get('peak_gib', float('nan')):.1f} | {r.get('estimate_gib', float('nan')):.1f} | "
              f"{r.get('speedup_vs_baseline', 1.0):.2f}× | {r.get('speedup_vs_sdpa', float('nan')):.2f}× |"
              + (f" {r['error']}" if r.get("error") else ""))
    for r in rows:
        if r["impl"] == "gradient check":
            print(f"{r['family']} LoRA gradients FA4 vs SDPA at {r['resolution']}²: "
                  + (f"{r['grad_rel_error']:.2e} (bound {r['grad_bound']:.2e}, SDPA's bf16 noise {r['bf16_noise']:.2e}, "
                     f"{r['tensors']} tensors): {'ok' if r['grad_ok'] else 'TOO LARGE'}" if "grad_rel_error" in r
                     else r["attention"]))

if __name__ == "__main__":
    main()
