"""FLUX.1-dev LoRA step: the reference (bench/flux_step_reference.py, unchanged) and lora-run's modes, side
by side in one run on one GPU. Prints a table with ratios and writes the raw rows as JSON.

    python bench/flux_bench.py --out bench/results [--ranks 32 64] [--quick]

Per configuration: median step time, peak GPU memory (torch max_memory_allocated), ratio to the
reference, fraction of the FLOP floor (step FLOPs counted by torch's FlopCounterMode over the matmul
ceiling measured in the same run), the memory estimate `lora-run plan` prints and its error, and the
relative error of the LoRA gradients against the reference on the same inputs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "plugins"))
sys.path.insert(0, str(HERE.parent / "core"))

import attrs  # noqa: E402
import torch  # noqa: E402

import flux_step_reference as ref  # noqa: E402
from lora_run_native import accel, perfmodel  # noqa: E402


def free() -> None:
    try:  # CUDA-graph trees keep their memory pools until reset: never let one model's pools count for the next
        import torch._inductor.cudagraph_trees as trees
        trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def time_model(model, resolution: int, batch: int, iters: int = 8, warmup: int = 3,
               before_step: Callable[[], None] | None = None,
               after: Callable[[Any, dict, Any], dict] | None = None,
               optimizer: Callable[[list], Any] | None = None) -> dict:
    """The reference's own timing loop and step, without touching the model's checkpointing setup.
    `before_step()` runs before every step (bench/perf.py marks CUDA-graph iterations there); `after(opt,
    inputs, target)` runs once after the timed steps and adds its entries to the row; `optimizer(params)` builds
    the optimizer (default: the reference's fused AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer else torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs = ref.make_inputs(resolution, batch)
    target = torch.randn_like(inputs["hidden_states"], dtype=torch.float32)

    def step():
        if before_step is not None:
            before_step()
        return ref.train_step(model, opt, inputs, target)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    row = dict(median_s=times[len(times) // 2], min_s=times[0], max_s=times[-1],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               reserved_gib=torch.cuda.max_memory_reserved() / 2**30, loss=float(loss), warmup_s=warm_s)
    if after is not None:
        row.update(after(opt, inputs, target))
    del opt
    return row


def profile(model, resolution: int, batch: int) -> dict:
    """Top CUDA kernels over 3 steps, and GPU busy time vs wall time (how much is launch overhead)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    inputs = ref.make_inputs(resolution, batch)
    target = torch.randn_like(inputs["hidden_states"], dtype=torch.float32)
    ref.train_step(model, opt, inputs, target)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            ref.train_step(model, opt, inputs, target)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 3
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    kernels = sorted(prof.key_averages(), key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    busy = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 3 / 1e6
    top = [dict(name=e.key[:90], ms=round(getattr(e, "self_device_time_total", 0) / 3 / 1e3, 2), calls=e.count // 3)
           for e in kernels[:14]]
    del opt, events
    out = dict(wall_s=wall, gpu_busy_s=busy, top=top)
    print(json.dumps(out), flush=True)
    return out


def set_lora_b(model, seed: int = 7) -> None:
    """Non-zero LoRA B (std 1e-3) so every LoRA tensor gets a gradient; identical across models."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype))


def lora_grads(model, resolution: int) -> dict:
    set_lora_b(model)
    model.zero_grad(set_to_none=True)
    inputs = ref.make_inputs(resolution, 1)
    g = torch.Generator(device="cuda").manual_seed(3)
    target = torch.randn(inputs["hidden_states"].shape, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**inputs)[0]
    torch.nn.functional.mse_loss(out.float(), target).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def rel_error(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def build_ours(rank: int, targets: str, plan: accel.PerfPlan):
    model = ref.build_model(rank, targets)
    info = accel.apply(model, plan, "cuda", torch.bfloat16)
    free()
    return model, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--quick", action="store_true", help="1024² batch 1 only")
    ap.add_argument("--modes", nargs="+", default=["memory", "low-vram", "speed"],
                    help="modes; `speed:reduce-overhead` selects a torch.compile mode variant")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of the speed mode")
    args = ap.parse_args()
    accel.configure_cuda()
    torch.backends.cuda.enable_cudnn_sdp(False)
    shapes = [(1024, 1)] if args.quick else [(1024, 1), (512, 4), (512, 1)]
    import diffusers

    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__,
               python=platform.python_version(), matmul_tflops=round(ref.matmul_ceiling_tflops(), 1))
    print(json.dumps(env), flush=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    for rank in args.ranks:
        # ------------------------------------------------------------------ reference (unchanged code)
        model = ref.build_model(rank, args.targets)
        ref_grads = lora_grads(model, 512)   # on the fresh model, before any optimizer step
        free()
        flops, refs = {}, {}
        for res, batch in shapes:
            flops[(res, batch)] = ref.step_flops(model, res, batch)
            free()
            row = ref.measure(res, batch, rank, args.targets, checkpointing=False, model=model)
            row.update(impl="reference", mode="reference", tflop=flops[(res, batch)] / 1e12)
            refs[(res, batch)] = row
            emit(row)
            free()
        row = ref.measure(1024, 1, rank, args.targets, checkpointing=True, model=model)
        row.update(impl="reference", mode="reference+checkpointing")
        emit(row)
        model.disable_gradient_checkpointing()
        del model
        free()
        # ------------------------------------------------------------------ lora-run modes
        for mode in args.modes:
            variant = ""
            if ":" in mode:
                mode, variant = mode.split(":", 1)
            mode_shapes = shapes if mode == "speed" else [(1024, 1)]
            if mode == "speed":  # the CUDA-graph configuration last: its pools outlive the model
                mode_shapes = sorted(mode_shapes, key=lambda s: s == (512, 1))
            for res, batch in mode_shapes:
                plan = perfmodel.plan_mode(mode, "flux.1-dev", res, res, batch, rank, args.targets)
                if variant:
                    plan = attrs.evolve(plan, compile_mode=variant)
                try:
                    model, info = build_ours(rank, args.targets, plan)
                    err = rel_error(lora_grads(model, 512), ref_grads) if (res, batch) == mode_shapes[0] else None
                    free()
                    row = time_model(model, res, batch)
                    if args.profile and (res, batch) in ((1024, 1), (512, 1)) and not variant:
                        row["profile"] = profile(model, res, batch)
                except torch.OutOfMemoryError as exc:
                    row, err, info = dict(error=f"OOM: {str(exc)[:200]}"), None, {}
                estimate = perfmodel.estimate_peak_gib("flux.1-dev", res, res, batch, rank, args.targets, plan)
                r = refs[(res, batch)]
                row.update(impl="lora-run", mode=mode + (f":{variant}" if variant else ""), plan=plan.describe(), resolution=res, batch=batch, rank=rank,
                           targets=args.targets, tflop=flops[(res, batch)] / 1e12, estimate_gib=estimate,
                           grad_rel_error_vs_reference=err, applied=info)
                if "median_s" in row and plan.compile_mode == "reduce-overhead":
                    # CUDA-graph pools are reserved, not "allocated": report what the process really holds
                    row["allocated_gib"], row["peak_gib"] = row["peak_gib"], row["reserved_gib"]
                if "median_s" in row:
                    row.update(speedup_vs_reference=r["median_s"] / row["median_s"],
                               memory_vs_reference=row["peak_gib"] / r["peak_gib"],
                               floor_fraction=(flops[(res, batch)] / (env["matmul_tflops"] * 1e12)) / row["median_s"],
                               estimate_error=estimate / row["peak_gib"] - 1)
                emit(row)
                model = None
                torch._dynamo.reset()
                free()
        for (res, batch), r in refs.items():
            r["floor_fraction"] = (flops[(res, batch)] / (env["matmul_tflops"] * 1e12)) / r["median_s"]
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / f"flux-{stamp}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print("\n| impl | mode | rank | res | batch | median s | peak GiB | vs ref time | vs ref mem | floor % | est GiB | grad err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "median_s" not in r:
            print(f"| {r['impl']} | {r['mode']} | {r.get('rank')} | {r.get('resolution')} | {r.get('batch')} | {r.get('error')} |")
            continue
        print(f"| {r['impl']} | {r['mode']} | {r['rank']} | {r['resolution']} | {r['batch']} | {r['median_s']:.3f} | "
              f"{r['peak_gib']:.1f} | {r.get('speedup_vs_reference', 1):.2f}× | {r.get('memory_vs_reference', 1):.2f} | "
              f"{100 * r.get('floor_fraction', 0):.0f} | {r.get('estimate_gib') or 0:.1f} | "
              f"{r.get('grad_rel_error_vs_reference') or 0:.1e} |")


if __name__ == "__main__":
    main()
