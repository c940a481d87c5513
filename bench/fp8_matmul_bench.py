"""The frozen base's linear layers at FLUX.1-dev's shapes: bf16 against `[train] fp8_matmul`'s float8 op, side
by side in one run, forward + input gradient (the work a frozen layer does in a LoRA step), with the ratios.

    python bench/fp8_matmul_bench.py [--tokens 5120 2048] [--iters 50] [--out bench/results]

Rows per token count (a 1024² step carries 4096 image + 512 text tokens; 512²: 1024 + 512; every layer is timed at
the whole count, an upper bound for the joint blocks' text layers, which see only the 512 text tokens):
``bf16`` (`F.linear` and its input gradient, what speed mode runs), ``fp8 storage`` (memory mode's
dequantising op) and ``fp8 matmul`` (row-wise e4m3 `_scaled_mm`), each compiled by inductor as the training
blocks are (the quantisation fused) and timed with CUDA events. The error
columns are relative L2 errors of the output and the input gradient against float64 with the original bf16
weight. Writes ``bench/results/fp8-matmul-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE.parent / "core", HERE.parent / "plugins"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

#: (in, out, layers of this shape per FLUX.1 step): the joint blocks' q/k/v/out and their text twins (19 × 8),
#: their MLPs (19 × 2 × 2), the single blocks' q/k/v, MLP in and fused out (38 × 3, 38, 38)
SHAPES = [(3072, 3072, 19 * 8 + 38 * 3), (3072, 12288, 19 * 2 + 38), (12288, 3072, 19 * 2), (15360, 3072, 38)]


def main() -> int:
    import torch

    from lora_run_native import accel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[5120, 2048])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    Fp8Linear = accel.fp8_linear_class()

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters / 1e3

    rows = []
    for tokens in args.tokens:
        for k, n, count in SHAPES:
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
            storage = Fp8Linear(lin, torch.bfloat16)
            fp8mm = Fp8Linear(lin, torch.bfloat16)
            accel.use_fp8_matmuls(fp8mm)
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
            exact = x.detach().double() @ lin.weight.double().t() + lin.bias.double()
            exact_dx = dy.double() @ lin.weight.double()

            def step(layer):
                x.grad = None
                layer(x).backward(dy)

            row = {"tokens": tokens, "in": k, "out": n, "layers_per_step": count}
            for name, layer in (("bf16", lin), ("fp8_storage", storage), ("fp8_matmul", fp8mm)):
                compiled = torch.compile(layer, dynamic=False)
                row[f"{name}_ms"] = 1e3 * timed(lambda compiled=compiled: step(compiled))
                row[f"{name}_eager_ms"] = 1e3 * timed(lambda layer=layer: step(layer))
                x.grad = None
                y = layer(x)
                y.backward(dy)
                row[f"{name}_out_err"] = float((y.double() - exact).norm() / exact.norm())
                row[f"{name}_dx_err"] = float((x.grad.double() - exact_dx).norm() / exact_dx.norm())
            row["fp8_matmul_vs_bf16"] = row["bf16_ms"] / row["fp8_matmul_ms"]
            flops = 4 * tokens * k * n
            row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
            row["fp8_matmul_tflops"] = flops / row["fp8_matmul_ms"] / 1e9
            rows.append(row)
            print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
            del lin, storage, fp8mm, x, dy
            torch.cuda.empty_cache()
    for tokens in args.tokens:
        mine = [r for r in rows if r["tokens"] == tokens]
        per_step = {name: sum(r[f"{name}_ms"] * r["layers_per_step"] for r in mine)
                    for name in ("bf16", "fp8_storage", "fp8_matmul")}
        print(f"{tokens} tokens, one FLUX.1 step's frozen linears (forward + input gradient): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in per_step.items())
              + f"; fp8 matmul {per_step['bf16'] / per_step['fp8_matmul']:.2f}× bf16", flush=True)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fp8-matmul-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    (out / name).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
