"""The evaluation's generation step, one transformer call, side by side: how lora-run runs it now and the levers.

    python bench/generation_bench.py [--batch 8] [--resolution 512] [--iters 10] [--out bench/results]

The fast recipe's evaluation generates 60 images at 512², 20 steps each, in pipeline calls of up to 8 images
(``generate.max_batch``); each transformer call is replayed from a CUDA graph (``graphed.graphed_forward``) of the
eager blocks with the LoRA unmerged. The 2026-12-06 run of record measured that generation at about 36% of the
matmul ceiling, against 54% for the isolated compiled training step at the same size. This measures, on the
full-size FLUX.1-dev transformer with random weights and the recipe's all-linear rank 32 LoRA, under ``no_grad``
in bf16 (as the pipeline loads it), the median time of one transformer call of ``--batch`` images for:

- ``eager``: the blocks eager, replayed from a CUDA graph — what ``generate_images`` does now;
- ``compiled``: each block ``torch.compile``'d (inductor, static shapes), replayed from a CUDA graph. Its first call's
  compilation time is reported: peft's LoRA scale is a Python float the compiled code is specialised on, so each
  LoRA strength of the evaluation would compile again;
- ``merged``: the LoRA merged into the base weights (peft's ``merge``), blocks eager, replayed;
- ``merged-compiled``: both.

Each row reports its output's relative difference from ``eager`` (bf16 kernels differ; merging rounds ``W + s·BA``
to bf16) and its rate against the matmul ceiling measured in the same run. Writes
``bench/results/generation-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE.parent / "core", HERE.parent / "plugins", HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

VARIANTS = ("eager", "compiled", "merged-compiled", "merged")


def build(rank: int, config: dict | None = None, device: str = "cuda"):
    """The transformer with the recipe's all-linear LoRA, its B non-zero (std 1e-2, seeded), all in bf16."""
    import torch

    import flux_step_reference as ref
    from lora_run_native.adapters.base import MMDIT_TARGET_PRESETS

    ref.TARGETS["all-linear"] = MMDIT_TARGET_PRESETS["all-linear"]
    model = ref.build_model(rank, "all-linear", config=config, device=device)
    g = torch.Generator(device="cpu").manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
            p.data = p.data.to(torch.bfloat16)   # the pipeline's dtype, LoRA included (build_model keeps it float32)
            p.requires_grad_(False)
    return model.eval()


def set_variant(model, compiled: dict, variant: str) -> None:
    """Merge or unmerge the LoRA (peft: ``W ± s·BA`` in place) and put each block's compiled or eager forward."""
    from peft.tuners.lora import LoraLayer

    from lora_run_native.accel import repeated_blocks

    want_merged, want_compiled = variant.startswith("merged"), variant.endswith("compiled")
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.merged != want_merged:
            module.merge() if want_merged else module.unmerge()
    for block in repeated_blocks(model):
        if want_compiled:
            block.forward = compiled[id(block)]
        elif "forward" in vars(block):
            del block.forward


def forward_flops(model, inputs) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return float(counter.get_total_flops())


def measure(model, inputs, iters: int) -> dict:
    """The first (eager or compiling) call's time, then the median of ``iters`` graph replays, CUDA events."""
    import torch

    from lora_run_native.graphed import graphed_forward

    with torch.no_grad(), graphed_forward(model) as graphs:
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model(**inputs)[0]
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        model(**inputs)                                  # the recording
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        replayed = graphs.replays
        failed = graphs.failed
    times.sort()
    return {"first_call_s": round(first, 2), "median_s": times[len(times) // 2], "min_s": times[0],
            "replays": replayed, "graph_failed": failed, "output": out.float()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    import torch

    import flux_step_reference as ref
    from lora_run_native import accel
    from lora_run_native.accel import repeated_blocks

    accel.configure_cuda()
    torch.backends.cuda.enable_cudnn_sdp(False)      # crashes inside the FLUX step (docs/gpu-acceptance.md)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "batch": args.batch, "resolution": args.resolution, "rank": args.rank,
           "targets": "all-linear", "matmul_tflops": round(ref.matmul_ceiling_tflops(), 1)}
    print(json.dumps(env), flush=True)
    model = build(args.rank)
    inputs = ref.make_inputs(args.resolution, args.batch)
    flops = forward_flops(model, inputs)
    env["tflop_per_call"] = round(flops / 1e12, 2)
    rows, reference = [], None
    compiled = {id(b): torch.compile(b.forward, dynamic=False) for b in repeated_blocks(model)}
    for variant in args.variants:
        set_variant(model, compiled, variant)
        try:
            row = measure(model, inputs, args.iters)
        except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        out = row.pop("output", None)
        if out is not None:
            if reference is None:
                reference = out
            row["rel_diff_vs_eager"] = float((out - reference).norm() / reference.norm())
            row["tflops"] = round(flops / row["median_s"] / 1e12, 1)
            row["ceiling_fraction"] = round(flops / row["median_s"] / 1e12 / env["matmul_tflops"], 3)
        row = {"variant": variant, **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "eager" and "median_s" in r), None)
    print(f"\none transformer call, {args.batch} images at {args.resolution}², {env['tflop_per_call']} TFLOP, "
          f"{env['gpu']}, matmul ceiling {env['matmul_tflops']} TFLOP/s:")
    for r in rows:
        if "median_s" in r:
            vs = f", {base['median_s'] / r['median_s']:.2f}× eager" if base else ""
            print(f"  {r['variant']:<16} {r['median_s'] * 1000:7.1f} ms ({r['ceiling_fraction']:.0%} of the ceiling"
                  f"{vs}; first call {r['first_call_s']} s; output vs eager {r['rel_diff_vs_eager']:.1e})")
        else:
            print(f"  {r['variant']:<16} {r.get('error')}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "generation-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json"
    (out_dir / name).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
