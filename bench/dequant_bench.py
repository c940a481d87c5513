"""Memory mode's dequantisation of the fp8 base at FLUX.1-dev's shapes: the kernel's GPU time against the bytes
it must move, and what one dequantising layer costs the host, side by side with candidate tilings, in one run.

    python bench/dequant_bench.py [--tokens 4608] [--out bench/results]

For every frozen linear shape of a FLUX.1 step (with how many layers of it one step runs):
- ``gpu_us``: the device time of one dequantisation (fp8 e4m3 weight and its per-row scale in, bf16 out), from
  ``torch.profiler``'s kernel records (so the host's launch time is not in it), for lora-run's kernel
  (``accel._triton_dequant``) and for each candidate tiling (rows × columns per program, warps);
- ``floor_us``: the bytes moved (1 read + 2 written per weight) at the copy bandwidth measured in the same run
  (a device-to-device bf16 copy of 1 GiB);
- ``host_us``: the host's time per call of the dequantising layer's forward (``lora_run::fp8_linear``) and of its
  input gradient, enqueued while the GPU is held busy, so it is the launch path alone;
- ``matmul_us``: the bf16 matmul of the layer at ``--tokens`` rows, for scale.

Every candidate's output is compared with the current kernel's, bit for bit. Writes
``bench/results/dequant-<time>.json``.
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

#: (out, in, layers per FLUX.1 step): the joint blocks' q/k/v/out and text twins (19 × 8) and the single blocks'
#: q/k/v (38 × 3); MLP in (19 × 2 + 38); MLP out (19 × 2); the single blocks' fused out (38); the modulations
#: (adaLN: 19 × 2 joint, 38 single), which see one row (the time embedding) per image
SHAPES = [(3072, 3072, 19 * 8 + 38 * 3), (12288, 3072, 19 * 2 + 38), (3072, 12288, 19 * 2), (3072, 15360, 38),
          (18432, 3072, 19 * 2), (9216, 3072, 38)]
#: candidate tilings: (rows per program, columns per program, warps)
TILINGS = [(1, 1024, 4), (1, 4096, 8), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8), (32, 256, 8),
           (4, 2048, 8)]


def tiled_kernel():
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_tiled(w_ptr, s_ptr, out_ptr, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offset = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        w = tl.load(w_ptr + offset, mask=mask).to(tl.float32)
        scale = tl.load(s_ptr + rows, mask=rows < n_rows, other=0.0)
        tl.store(out_ptr + offset, (w * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    def run(w8, scale, rows_per, block, warps):
        n_rows, n_cols = w8.shape
        out = torch.empty((n_rows, n_cols), dtype=torch.bfloat16, device=w8.device)
        grid = (triton.cdiv(n_rows, rows_per), triton.cdiv(n_cols, block))
        dequant_tiled[grid](w8, scale, out, n_rows, n_cols, ROWS=rows_per, BLOCK=block, num_warps=warps)
        return out
    return run


def device_us(fn, calls: int = 20) -> float:
    """Mean device time per call of the kernels ``fn`` launches (profiler records), after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0)
    return total / calls


def host_us(fn, calls: int = 50) -> float:
    """The host's time per call of ``fn`` while the GPU is kept busy (the queue never waits on the device)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000 // 1000 * 50)     # about 50 ms of device time ahead of the calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def copy_bandwidth() -> float:
    """Bytes per second (read + write) of a device-to-device bf16 copy of 1 GiB."""
    import torch

    big = torch.empty(512 * 2**20, dtype=torch.bfloat16, device="cuda")
    return 2 * big.numel() * 2 / (device_us(lambda: big.clone(), 5) * 1e-6)


def host_breakdown(current, tokens: int) -> dict[str, float]:
    """Where a dequantising layer's host time goes, at 3072×3072: the Triton launch alone, the matmul alone, the
    two in plain Python, the same through the custom op (``torch.library.custom_op``) and through an op defined
    with the low-level ``torch.library.Library`` API, and a chain of eight layers inside one compiled function
    (inductor calls the op from its generated code: per call, against the same chain of bf16 ``F.linear`` and of
    lora-run's fp8 layer as compiled blocks run it, dequantising inside the graph)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    w = torch.randn(3072, 3072, device="cuda")
    scale = (w.abs().amax(dim=1, keepdim=True) / 448).float()
    w8 = (w / scale).to(torch.float8_e4m3fn)
    want = current(w8, scale, torch.bfloat16)
    dy = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16)
    lib = torch.library.Library("lora_run_bench", "DEF")
    lib.define("grad_input(Tensor grad, Tensor w8, Tensor scale) -> Tensor")
    lib.impl("grad_input", lambda g, q, s: g @ current(q, s, g.dtype), "CUDA")
    lib.define("linear(Tensor x, Tensor w8, Tensor scale) -> Tensor")
    lib.impl("linear", lambda x, q, s: F.linear(x, current(q, s, x.dtype)), "CUDA")
    torch.library.register_fake("lora_run_bench::linear", lambda x, q, s: x.new_empty((*x.shape[:-1], q.shape[0])),
                                lib=lib)

    @torch.library.custom_op("lora_run_bench::linear_cuda", mutates_args=(), device_types="cuda",
                             schema="(Tensor x, Tensor q, Tensor s) -> Tensor")
    def linear_cuda(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(x, current(q, s, x.dtype))

    linear_cuda.register_fake(lambda x, q, s: x.new_empty((*x.shape[:-1], q.shape[0])))
    grad_op, low_level = torch.ops.lora_run.fp8_linear_grad_input, torch.ops.lora_run_bench.grad_input
    fp8_op = torch.ops.lora_run.fp8_linear

    def chain(op):
        def run(y):
            for _ in range(8):
                y = op(y)
            return y
        return torch.compile(run, dynamic=False)

    with torch.no_grad():
        fp8_chain = chain(lambda y: fp8_op(y, w8, scale, None))
        from lora_run_native import accel

        layer = accel.fp8_linear_class()(torch.nn.Linear(3072, 3072, bias=False, device="cuda"), torch.bfloat16)
        in_graph_chain = chain(layer)       # the layer as compiled blocks run it since c661879
        library_chain = chain(lambda y: torch.ops.lora_run_bench.linear(y, w8, scale))
        cuda_only_chain = chain(lambda y: linear_cuda(y, w8, scale))
        bf16_chain = chain(lambda y: F.linear(y, want))
        out = {
            "triton_dequant": host_us(lambda: current(w8, scale, torch.bfloat16)),
            "matmul": host_us(lambda: dy @ want),
            "python_dequant_matmul": host_us(lambda: dy @ current(w8, scale, dy.dtype)),
            "custom_op": host_us(lambda: grad_op(dy, w8, scale)),
            "library_op": host_us(lambda: low_level(dy, w8, scale)),
            "compiled_fp8_per_call": host_us(lambda: fp8_chain(dy)) / 8,
            "compiled_in_graph_dequant_per_call": host_us(lambda: in_graph_chain(dy)) / 8,
            "compiled_library_op_per_call": host_us(lambda: library_chain(dy)) / 8,
            "compiled_custom_op_cuda_per_call": host_us(lambda: cuda_only_chain(dy)) / 8,
            "compiled_bf16_per_call": host_us(lambda: bf16_chain(dy)) / 8,
        }
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fp8_chain(dy)
        torch.cuda.synchronize()
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:14]
        print("host time of 80 custom-op calls inside compiled code, by op (self µs per call): " + "; ".join(
            f"{e.key[:60]} {e.self_cpu_time_total / 80:.1f} ({e.count // 10}/chain)" for e in top), flush=True)
    return out


def main() -> int:
    import torch
    import torch.nn.functional as F

    from lora_run_native import accel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--host-only", action="store_true", help="only the host-time split")
    args = ap.parse_args()
    current = accel._triton_dequant()
    tiled = tiled_kernel()
    Fp8Linear = accel.fp8_linear_class()

    if args.host_only:
        print(json.dumps({k: round(v, 1) for k, v in host_breakdown(current, args.tokens).items()}))
        return 0
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    rows, per_step = [], {}
    for n, k, count in SHAPES:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        layer = Fp8Linear(lin, torch.bfloat16)
        w8, scale = layer.w8, layer.scale
        want = current(w8, scale, torch.bfloat16)
        row = {"out": n, "in": k, "layers_per_step": count,
               "floor_us": 1e6 * 3 * w8.numel() / bandwidth,
               "current_gpu_us": device_us(lambda: current(w8, scale, torch.bfloat16))}
        for rows_per, block, warps in TILINGS:
            name = f"tiled_{rows_per}x{block}w{warps}"
            got = tiled(w8, scale, rows_per, block, warps)
            row[f"{name}_same"] = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
            row[f"{name}_gpu_us"] = device_us(lambda: tiled(w8, scale, rows_per, block, warps))
        m = 1 if n in (18432, 9216) else args.tokens
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        op, grad_op = torch.ops.lora_run.fp8_linear, torch.ops.lora_run.fp8_linear_grad_input
        row["rows"] = m
        row["matmul_us"] = device_us(lambda: F.linear(x, want))
        row["forward_gpu_us"] = device_us(lambda: op(x, w8, scale, layer.bias))
        row["forward_host_us"] = host_us(lambda: op(x, w8, scale, layer.bias))
        row["grad_input_host_us"] = host_us(lambda: grad_op(dy, w8, scale))
        row["bf16_linear_host_us"] = host_us(lambda: F.linear(x, want, layer.bias))
        rows.append(row)
        print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        for key, value in row.items():
            if key.endswith("_us") and key != "matmul_us":
                per_step[key] = per_step.get(key, 0.0) + value * count / 1e3
        torch.cuda.empty_cache()
    host = host_breakdown(current, args.tokens)
    print("host µs per call, 3072×3072 at the token count: " + json.dumps({k: round(v, 1) for k, v in host.items()}),
          flush=True)
    print("one pass over a FLUX.1 step's frozen linears (ms): " + ", ".join(
        f"{k.removesuffix('_us')} {v:.1f}" for k, v in sorted(per_step.items(), key=lambda kv: kv[1])), flush=True)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"dequant-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    (out / name).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "bandwidth_tb_s": bandwidth / 1e12, "rows": rows,
                                        "per_step_ms": per_step, "host_us": host}, indent=1))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
