"""One GPU run that measures what issue 19 asks, side by side, and prints the ratios.

    python bench/perf.py [--rows ROW ...] [--row-timeout 240] [--budget 470] [--cli-steps 40] [--cli-every N]
                         [--out bench/results] [--work /tmp/lora-run-perf]

Rows (default: all but the ``cli-fast-*`` variants and ``low-vram-8g``, in priority order: a group that would
start after ``--budget`` seconds is skipped and reported so), each group in its own process so a crash (an illegal memory access
poisons a CUDA context) costs only that group; every row is printed and appended to a JSON-lines file the
moment it is measured, so a timeout keeps what was done:

* ``cli-fast``  the shipped fast recipe (``recipes/flux/identity-fast.toml``: all-linear rank 32, Adafactor,
                512 px, five aspect-ratio buckets, 20 images) through the real CLI on the full-size FLUX.1-dev
                transformer (random weights, saved and loaded as a diffusers folder, tiny text encoders of
                FLUX's widths), ``--cli-steps`` steps, samples twice, the recipe's own evaluation grid (60 images).
                Reports the plan line and the split from the manifest's ``artifacts.timing`` (cache, load,
                compile, train, samples, evaluation) and projects the playbook's 1500-step run from it.
* ``cli-fast-warm`` ``cli-fast`` once more, right after it: start-up with the compile caches of the first run
                (``~/.cache/lora-run/compile``) warm (not a default row).
* ``cli-fast-graphs`` the same with ``[train] cuda_graphs = "on"`` (auto turns graphs off above 4 buckets),
                and so ``attention = "auto"`` may pick FlashAttention-4 at 512² (not a default row).
* ``cli-fast-first`` ``cli-fast-graphs`` without the evaluation, for the first run on a machine: it measures the
                cold start-up and fills the compile caches a ``cli-fast-graphs`` whole run in the next device call
                reads (not a default row; no whole-run projection, there is no evaluation in it).
* ``reference`` the plain diffusers + peft step (``flux_step_reference.py``, unchanged: bf16, eager, SDPA,
                fused AdamW) at 1024² and 512², rank 32 attention LoRA; the matmul ceiling and the step FLOPs.
* ``fa2``       lora-run's speed mode (compiled blocks) with SDPA flash (FlashAttention-2), 1024² and 512².
* ``fa4``       the same with FlashAttention-4 (``[train] attention = "fa4"``, the registered op).
* ``graphs``    fa4 at 512² with CUDA graphs, then a no-grad (sampling) call and another training step.
* ``fp8mm``     speed mode with ``[train] fp8_matmul`` (the frozen base's forward and input-gradient GEMMs in
                float8, row-wise scales), 1024² and 512², attention as ``auto`` picks it at 1024² (FA4 where
                installed); reports its own LoRA-gradient error (opt-in: not held to the bf16 bound).
* ``fp8mm-graphs`` the same at 512² with CUDA graphs, a sampling call between two replayed steps.
* ``cli-fast-fp8mm`` ``cli-fast-graphs`` with ``[train] fp8_matmul = true`` (not a default row).
* ``cli-fast-nosamples`` ``cli-fast-first`` without the sample rounds (``sample.every_steps`` past the run's end;
                the checkpoints stay): against ``cli-fast-first`` in the same call, the manifests'
                ``step_s_between_rounds`` say whether a sample round slows the steps after it (not a default row).
* ``cli-fast-stepgraphs`` ``cli-fast-nosamples`` with ``[train] cuda_graphs = "step"``: each micro-step (forward,
                loss, backward) replayed as one CUDA graph per bucket shape instead of every block's graphs; against
                ``cli-fast-nosamples`` in the same call, the steady step and the start-up (not a default row).
* ``recipe-adamw-graphs``, ``recipe-graphs`` the graphs row's step with the shipped fast recipe's LoRA
                (all-linear rank 32, lora-run's own target preset) and attention ``auto``: with the reference's fused
                AdamW, then with the recipe's Adafactor. Against ``graphs`` they split the CLI step's extra time
                between the targets and the optimizer; against ``cli-fast-graphs`` what is left is the real loop's
                (not default rows).
* ``memory``    memory mode (fp8 base, checkpointing for a 24 GiB budget) at 1024², attention ``auto``.
* ``low-vram``  low-vram mode (12 GiB budget) at 1024², attention ``auto``.
* ``low-vram-8g`` low-vram for an 8 GiB budget (most blocks offloaded) at 1024².
* ``memory-fp8mm`` memory mode with ``[train] fp8_matmul`` (the fp8-stored base multiplied in float8 instead of
                dequantised to bf16 first) at 1024² (not a default row).
* ``low-vram-fp8mm`` low-vram mode (12 GiB) with ``[train] fp8_matmul`` at 1024² (not a default row).

Each memory-saving row (memory, low-vram and their variants) is also given as a multiple of the speed step's time
at 1024² in the same run (``fa4``, else ``fa2``): issue 19 states its targets that way.

``--gpu-log`` records the GPU's SM clock, power, temperature, utilisation and clock-event reasons every half
second (``nvidia-smi``) for the whole invocation, beside the JSON (``gpu-<time>.csv``); each CLI row notes its
start and end (Unix time), and ``bench/step_clocks.py`` lines the log up with a run's stretches between rounds.

``--profile`` adds to each speed row at 1024² (fa2, fa4, fp8mm), to the memory-saving rows (memory, low-vram and
their variants) and to the 512² CUDA-graph rows the GPU time of one step split by kernel kind (matmuls in bf16 and
float8, attention, the fp8 base's dequantisation, copies, fused elementwise/reductions, the rest) from
``torch.profiler``, and how much of the step the kernels kept the GPU busy: where the step's time goes, beside
the FLOP floor.

Numerics: the LoRA gradients of every lora-run row against the reference's on the same inputs (512², LoRA B
set non-zero), relative L2 error. Bound for the bf16 paths (``grad_bound``): 3× the reference's own bf16
noise — the same eager step with SDPA's memory-efficient kernel instead of flash, two correct bf16
computations — clamped to [1e-3, 2e-2] (1e-2 when the noise cannot be measured); the fp8 rows report their
own error (the base weights are rounded to e4m3: not a bf16-level difference, opt-in via the plan).

Writes ``bench/results/perf-<time>.json`` and prints a markdown block for docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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

GRAD_BOUND = 1e-2           # used when the reference's own bf16 noise could not be measured
GRAD_BOUND_MAX = 2e-2


def grad_bound(noise: float | None) -> float:
    """A bf16 fast path agrees with the reference when its LoRA-gradient error is at most 3× the reference's
    own bf16 noise (flash vs memory-efficient attention in the same eager step), within [1e-3, 2e-2]."""
    if noise is None:
        return GRAD_BOUND
    return min(GRAD_BOUND_MAX, max(1e-3, 3.0 * noise))
RANK, TARGETS = 32, "attention"
GROUPS = {            # row → the worker group that measures it (rows of one group share one process / model)
    "cli-fast": "cli", "cli-fast-warm": "cli", "cli-fast-graphs": "cli", "cli-fast-first": "cli", "reference": "fa2", "fa2": "fa2",
    "fa4": "fa4", "graphs": "fa4", "memory": "memory", "low-vram": "low-vram", "low-vram-8g": "low-vram-8g",
    "fp8mm": "fp8mm", "fp8mm-graphs": "fp8mm", "cli-fast-fp8mm": "cli", "cli-fast-nosamples": "cli", "cli-fast-stepgraphs": "cli",
    "cli-fast-whole-stepgraphs": "cli", "cli-fast-auto-nosamples": "cli", "memory-fp8mm": "memory-fp8mm",
    "low-vram-fp8mm": "low-vram-fp8mm",
    # the A/B of the in-graph dequantisation: compiled blocks call the opaque fp8 op as before 2026-12-06
    "memory-opaque": "memory-opaque", "low-vram-opaque": "low-vram-opaque",
    # one process each: a second compiled model in the process after the first one's release fails
    # ("Running CUDAGraph after shutdown", 2026-12-04)
    "recipe-adamw-graphs": "recipe-adamw", "recipe-graphs": "recipe-adafactor"}
#: the shipped fast recipe's LoRA (`[lora] targets = "all-linear"`) and optimizer, for the `recipe` group's rows
RECIPE_TARGETS = "all-linear"
DEFAULT_ROWS = ["reference", "fa2", "fa4", "graphs", "cli-fast", "memory", "low-vram"]   # groups run in this order
BUCKETS = [(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)]     # five aspect ratios, ~512² each


class RowTimeout(Exception):
    pass


# ============================================================================================== worker side
def emit(out: Path, row: dict[str, Any]) -> None:
    row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
    print("ROW " + json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def guarded(out: Path, row_id: str, timeout: int, fn: Any, **fields: Any) -> dict[str, Any] | None:
    """Run one row under a time limit (SIGALRM); a failure or timeout becomes an error row, never a crash."""
    import torch

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise RowTimeout(f"row time limit {timeout} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    started = time.perf_counter()
    try:
        row = {"row": row_id, **fields, **fn()}
    except BaseException as exc:  # noqa: BLE001 - one failing row must not take the others down
        if isinstance(exc, KeyboardInterrupt):
            raise
        row = {"row": row_id, **fields, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    row["row_wall_s"] = round(time.perf_counter() - started, 1)
    emit(out, row)
    return row if "error" not in row else None


def free() -> None:
    from flux_bench import free as release

    release()


def timed_steps(model: Any, resolution: int, iters: int = 8, warmup: int = 3, graphs: bool = False,
                optimizer: Any = None) -> dict:
    """The reference's own step (autocast bf16, MSE, backward, fused AdamW), timed with CUDA events
    (`flux_bench.time_model`), each step marked for CUDA-graph trees as the training loop marks it. With
    `graphs`, a sampling call (eager blocks) between two replayed steps must give finite results."""
    import torch

    import flux_step_reference as ref
    from flux_bench import time_model
    from lora_run_native import accel

    def sampling_check(opt: Any, inputs: dict, target: Any) -> dict:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):   # a sampling call: eager blocks
            sample = model(**inputs)[0]
        accel.mark_step_begin(model)
        after = ref.train_step(model, opt, inputs, target)
        torch.cuda.synchronize()
        return {"sampling_ok": bool(torch.isfinite(sample).all()) and bool(torch.isfinite(after))}

    return time_model(model, resolution, 1, iters, warmup, before_step=lambda: accel.mark_step_begin(model),
                      after=sampling_check if graphs else None, optimizer=optimizer)


KERNEL_KINDS = (("dequant (fp8 storage)", ("dequant",)),      # memory modes' `accel._triton_dequant`
                ("copy", ("memcpy", "memset")),            # low-vram's host-to-device weight copies among them
                ("optimizer", ("multi_tensor_apply", "fused_adam")),  # foreach/fused optimizer kernels
                ("fused (triton)", ("triton",)),     # inductor's kernels, even where an op's name is in theirs (fp8)
                ("matmul fp8", ("f8", "e4m3", "fp8", "_qqt")),    # cuBLAS's nvjet_sm90_qq…: float8 inputs
                ("attention", ("flash", "fmha", "attention", "attn")),
                ("matmul bf16", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "sm90")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def kernel_split(model: Any, resolution: int, optimizer: Any = None) -> dict:
    """One step's GPU time by kernel kind (`kernel_kind`), averaged over `flux_bench.profile`'s three steps, and
    its top kernels: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import flux_step_reference as ref
    from lora_run_native import accel

    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer else torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs = ref.make_inputs(resolution, 1)
    target = torch.randn_like(inputs["hidden_states"], dtype=torch.float32)
    for _ in range(2):
        accel.mark_step_begin(model)
        ref.train_step(model, opt, inputs, target)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            accel.mark_step_begin(model)
            ref.train_step(model, opt, inputs, target)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 3 / 1e6
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    del opt
    return dict(gpu_s={k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top=[dict(name=e.key[:100], ms=round(e.self_device_time_total / 3 / 1e3, 2), calls=e.count // 3,
                          kind=kernel_kind(e.key)) for e in top])


def lora_snapshot(model: Any) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_grads(model: Any) -> tuple[dict, float | None]:
    """The reference's LoRA gradients at 512² (eager, SDPA flash, bf16 autocast), LoRA B set non-zero, and the
    reference's own bf16 noise: the relative difference when its attention runs on SDPA's memory-efficient
    kernel instead (two correct bf16 computations of the same step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flux_bench import lora_grads, rel_error

    grads = lora_grads(model, 512)
    try:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            noise = rel_error(lora_grads(model, 512), grads)
    except Exception:  # noqa: BLE001 - without the second kernel the fixed bound applies
        noise = None
    return grads, noise


def grad_error(model: Any, ref_grads: dict, snapshot: dict) -> float:
    """Relative L2 error of this model's LoRA gradients against the reference's, from the same LoRA weights
    (restored from `snapshot`: timed optimizer steps may have moved them) on the same inputs."""
    import torch

    from flux_bench import lora_grads, rel_error

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n])
    return rel_error(lora_grads(model, 512), ref_grads)


def fa4_calls(model: Any) -> int:
    """How many attention calls of one (eager, no-grad) 512² forward ran the FA4 op: 57 when every FLUX
    block's attention reached it (a call that falls back to SDPA is not counted)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import flux_step_reference as ref

    inputs = ref.make_inputs(512, 1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    return sum(e.count for e in prof.key_averages() if e.key == "lora_run::fa4_attention")


def worker(group: str, rows: list[str], out: Path, timeout: int) -> None:
    import torch

    import flux_step_reference as ref
    from lora_run_native import accel, attention, perfmodel

    accel.configure_cuda()
    torch.backends.cuda.enable_cudnn_sdp(False)
    accel.compile_cache_dir()
    if group == "cli":
        steps = int(os.environ.get("PERF_CLI_STEPS", "30"))
        no_rounds = {"eval.enabled": False, "sample.every_steps": steps + 1}   # no sample round before the end
        for row in rows:
            sets = {"cli-fast-graphs": {"train.cuda_graphs": "on"},
                    # the first run on a machine (cold compile caches) without the evaluation: it fills the caches
                    # the next row's whole run reads, and measures the cold start-up
                    "cli-fast-first": {"train.cuda_graphs": "on", "eval.enabled": False},
                    "cli-fast-fp8mm": {"train.cuda_graphs": "on", "train.fp8_matmul": True},
                    # the A/B of the sample rounds (the checkpoints stay)
                    "cli-fast-nosamples": {"train.cuda_graphs": "on", **no_rounds},
                    "cli-fast-stepgraphs": {"train.cuda_graphs": "step", **no_rounds},
                    # the whole run as the fast recipe ships it (samples, evaluation) with the step graphs
                    "cli-fast-whole-stepgraphs": {"train.cuda_graphs": "step"},
                    # the plan `auto` picks (whole-step graphs since 2026-12-05)
                    "cli-fast-auto-nosamples": no_rounds,
                    }.get(row, {})
            guarded(out, row, int(timeout * 1.5), lambda row=row, sets=sets: cli_row(   # model build + a whole run
                Path(os.environ["PERF_WORK"]), steps, row, sets, int(os.environ.get("PERF_CLI_EVERY", "0")) or None))
        return
    build_started = time.perf_counter()
    recipe_group = group.startswith("recipe")       # recipe-adamw, recipe-adafactor
    if recipe_group:       # the reference's builder with lora-run's own all-linear preset (peft regexes)
        from lora_run_native.adapters.base import MMDIT_TARGET_PRESETS

        ref.TARGETS[RECIPE_TARGETS] = MMDIT_TARGET_PRESETS[RECIPE_TARGETS]
    model = ref.build_model(RANK, RECIPE_TARGETS if recipe_group else TARGETS)
    built_s = time.perf_counter() - build_started
    snapshot = lora_snapshot(model)
    ref_grads, noise = reference_grads(model)
    free()

    def speed_rows(row_id: str, plan: Any, choice: Any, **extra: Any) -> None:
        """The speed-mode rows at 1024² and 512²; the LoRA-gradient error is measured once, before timing."""
        err = {}

        def speed(res: int) -> dict:
            if not err:
                err["value"] = grad_error(model, ref_grads, snapshot)
                free()
            row = dict(timed_steps(model, res), grad_rel_error=err["value"], bf16_noise=noise, **extra)
            if res == 1024 and os.environ.get("PERF_PROFILE"):
                row["profile"] = kernel_split(model, res)
            return row
        for res in (1024, 512):
            guarded(out, row_id, timeout, lambda res=res: speed(res), resolution=res, impl="lora-run",
                    plan=plan.describe(), attention=choice.describe())
            free()

    def graphs_row(row_id: str, graphs: Any, choose: Any) -> None:
        """A 512² row with CUDA graphs: the blocks' eager forwards re-wrapped by `graphs` (a plan), the attention
        `choose()` returns, a sampling call between two replayed steps."""
        for block in accel.repeated_blocks(model):       # re-wrap the eager forwards with CUDA graphs
            block.forward = block._lora_run_eager_forward
        torch._dynamo.reset()
        choice = choose()
        accel.apply(model, graphs, "cuda", torch.bfloat16)

        def graphed() -> dict:
            row = timed_steps(model, 512, graphs=True)
            row["allocated_gib"], row["peak_gib"] = row["peak_gib"], row["reserved_gib"]
            if os.environ.get("PERF_PROFILE"):     # the kernels the replayed graphs launch are traced too
                row["profile"] = kernel_split(model, 512)
            return row
        guarded(out, row_id, timeout, graphed, resolution=512, impl="lora-run", plan=graphs.describe(),
                attention=choice.describe())

    if group == "fa2":
        env = dict(matmul_tflops=ref.matmul_ceiling_tflops())
        if "reference" in rows:
            for res in (1024, 512):
                def reference(res: int = res) -> dict:
                    flops = ref.step_flops(model, res, 1)
                    free()
                    return dict(timed_steps(model, res), tflop=flops / 1e12, **env, build_s=built_s)
                guarded(out, "reference", timeout, reference, resolution=res, impl="diffusers+peft",
                        attention="sdpa (FA2)")
                free()
        if "fa2" in rows:
            plan = perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, RANK, TARGETS, cuda_graphs="off")
            choice = attention.setup(model, "sdpa", "cuda")
            accel.apply(model, plan, "cuda", torch.bfloat16)
            speed_rows("fa2", plan, choice)
        return
    if group == "fa4":
        choice = attention.setup(model, "fa4", "cuda")
        if choice.kernel != "fa4":
            for row in rows:
                emit(out, {"row": row, "error": f"FlashAttention-4 not used: {choice.reason}"})
            return
        plan = perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, RANK, TARGETS, cuda_graphs="off")
        routed = fa4_calls(model)
        accel.apply(model, plan, "cuda", torch.bfloat16)
        if "fa4" in rows:
            speed_rows("fa4", plan, choice, fa4_calls=routed)
        if "graphs" in rows:
            graphs_row("graphs", perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, RANK, TARGETS,
                                                     cuda_graphs="on"), lambda: choice)
        return
    if group == "fp8mm":      # the frozen base in fp8, its matmuls float8 (`[train] fp8_matmul`)
        import attrs

        choice = attention.setup(model, "auto", "cuda", tokens=4608)
        accel.store_frozen_linears_in_fp8(model, torch.bfloat16, device="cuda")     # apply: float8 matmuls
        free()
        plan = attrs.evolve(perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, RANK, TARGETS,
                                                cuda_graphs="off"), fp8=True, fp8_matmul=True)
        matmuls = accel.apply(model, plan, "cuda", torch.bfloat16).get("fp8_matmuls")
        if "fp8mm" in rows:
            speed_rows("fp8mm", plan, choice, fp8_matmuls=matmuls)
        if "fp8mm-graphs" in rows:
            graphs = attrs.evolve(perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, RANK, TARGETS,
                                                      cuda_graphs="on"), fp8=True, fp8_matmul=True)
            graphs_row("fp8mm-graphs", graphs, lambda: attention.setup(model, "auto", "cuda", tokens=1536, graphs=True))
        return
    if recipe_group:     # the CLI step's LoRA and optimizer at one 512² shape, CUDA graphs, attention as auto
        from lora_run_native.optim import make_adafactor

        choice = attention.setup(model, "auto", "cuda", tokens=1536, graphs=True)
        plan = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, RANK, RECIPE_TARGETS, cuda_graphs="on")
        accel.apply(model, plan, "cuda", torch.bfloat16)
        layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
        optimizers = {"recipe-adamw-graphs": None,      # the reference's fused AdamW: the targets' cost alone
                      "recipe-graphs": lambda params: make_adafactor(params, lr=1e-4, weight_decay=0.0)}
        for row_id in [r for r in optimizers if r in rows]:
            def recipe_row(make: Any = optimizers[row_id]) -> dict:
                row = timed_steps(model, 512, graphs=True, optimizer=make)
                row["allocated_gib"], row["peak_gib"] = row["peak_gib"], row["reserved_gib"]
                if os.environ.get("PERF_PROFILE"):
                    row["profile"] = kernel_split(model, 512, optimizer=make)
                return row
            guarded(out, row_id, timeout, recipe_row, resolution=512, impl="lora-run", plan=plan.describe(),
                    attention=choice.describe(), lora_layers=layers, targets=RECIPE_TARGETS,
                    optimizer="fused AdamW" if optimizers[row_id] is None else "Adafactor (lora-run's, foreach)")
            free()
        return
    # memory / low-vram rows: a fresh model each (fp8 storage replaces its layers)
    mode, budget = {"memory": ("memory", 24.0), "low-vram": ("low-vram", 12.0),
                    "low-vram-8g": ("low-vram", 8.0), "memory-fp8mm": ("memory", 24.0),
                    "low-vram-fp8mm": ("low-vram", 12.0), "memory-opaque": ("memory", 24.0),
                    "low-vram-opaque": ("low-vram", 12.0)}[group]
    accel.IN_GRAPH_DEQUANT = not group.endswith("-opaque")
    plan = perfmodel.plan_mode(mode, "flux.1-dev", 1024, 1024, 1, RANK, TARGETS, budget_gib=budget)
    if group.endswith("fp8mm"):      # apply switches the stored layers to float8 matmuls
        import attrs

        plan = attrs.evolve(plan, fp8_matmul=True)

    def fp8_row() -> dict:
        choice = attention.setup(model, "auto", "cuda", tokens=4608)
        accel.store_frozen_linears_in_fp8(model, torch.bfloat16, device="cuda")
        accel.apply(model, plan, "cuda", torch.bfloat16)
        free()
        err = grad_error(model, ref_grads, snapshot)
        free()
        estimate = perfmodel.estimate_peak_gib("flux.1-dev", 1024, 1024, 1, RANK, TARGETS, plan)
        row = dict(timed_steps(model, 1024), grad_rel_error=err, bf16_noise=noise, attention=choice.describe(),
                   estimate_gib=estimate, budget_gib=budget)
        if os.environ.get("PERF_PROFILE"):
            row["profile"] = kernel_split(model, 1024)
        return row
    guarded(out, group, timeout, fp8_row, resolution=1024, impl="lora-run", plan=plan.describe(),
            dequant="in the compiled graph" if accel.IN_GRAPH_DEQUANT else "the opaque op")


# --------------------------------------------------------------------------------------------- CLI row
def make_dataset(folder: Path, count: int = 20) -> Path:
    """`count` images in five aspect-ratio buckets, drawn shapes on gradients, each with a caption."""
    import random

    from PIL import Image, ImageDraw

    if folder.is_dir() and len(list(folder.glob("*.png"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        w, h = BUCKETS[i % len(BUCKETS)]
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            draw.ellipse((x0, y0, x0 + rng.randrange(20, w // 2), y0 + rng.randrange(20, h // 2)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"ohwx, a photo number {i}, outdoors")
    return folder


def cli_row(work: Path, steps: int, name: str = "cli-fast", extra: dict[str, Any] | None = None,
            every: int | None = None) -> dict[str, Any]:
    import fullsize
    import gpu_acceptance as acc

    started = time.perf_counter()
    model = fullsize.build_flux(work / "models" / "flux-full", "tiny")
    free()
    built = time.perf_counter() - started
    data = make_dataset(work / "data-5buckets")
    out = work / "runs" / name
    every = every or max(1, steps // 2)
    sets = {"model.source": str(model), "model.offline": True, "dataset.path": str(data),
            "dataset.min_images": 1, "output.name": name, "train.steps": steps,
            "train.save_every_steps": every, "sample.every_steps": every,
            "backend.native.progress_bar": False, **(extra or {})}
    args = [*acc.cli(), str(REPO / "recipes" / "flux" / "identity-fast.toml"), "--output-dir", str(out),
            "--overwrite", *acc.set_args(sets)]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "core"), str(REPO / "plugins"), env.get("PYTHONPATH", "")])
    run_started, started_at = time.perf_counter(), time.time()
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work,
                            start_new_session=True)
    cli_pgid_file(work).write_text(f"{proc.pid}\n")
    try:
        rc = proc.wait()
    except RowTimeout:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RowTimeout(f"the CLI run did not finish; log tail: {acc.tail(log, 4)}") from None
    finally:                     # the run has ended (or was stopped): nothing for the orchestrator to stop
        if proc.poll() is not None:
            cli_pgid_file(work).unlink(missing_ok=True)
    wall = time.perf_counter() - run_started
    manifest = acc.manifest(out)
    art = manifest.get("artifacts") or {}
    timing = art.get("timing") or {}
    plan = art.get("gpu_plan") or {}
    plan_line = next((line for line in log.read_text(errors="replace").splitlines() if line.startswith("GPU plan")), "")
    row = dict(sets=extra or {}, exit=rc, started_at=round(started_at, 1), ended_at=round(time.time(), 1), status=manifest.get("status"), wall_s=wall, build_model_s=built, steps=steps, every=every,
               step_s=timing.get("step_s"), timing=timing, plan=plan.get("plan"), attention=plan.get("attention"),
               attention_reason=plan.get("attention_reason"), plan_line=plan_line,
               peak_gib=timing.get("peak_reserved_gib"), shapes=timing.get("shapes"))
    if rc != 0 or manifest.get("status") != "completed":
        row["error"] = f"exit {rc}, status {manifest.get('status')}: {manifest.get('error') or acc.tail(log, 6)}"
    return row


# ========================================================================================== orchestrator
def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "python": platform.python_version(), "commit": commit()}
    try:
        probe = subprocess.run([sys.executable, "-c", (
            "import json, torch, diffusers\n"
            "try:\n import importlib.metadata as m; fa4 = m.version('flash-attn-4')\n"
            "except Exception: fa4 = None\n"
            "print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, "
            "cuda=torch.version.cuda, diffusers=diffusers.__version__, flash_attn_4=fa4)))")],
            capture_output=True, text=True, timeout=120)
        info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    except Exception as exc:  # noqa: BLE001
        info["probe_error"] = str(exc)[:200]
    return info


def commit() -> str | None:
    """The product commit measured: `LORA_RUN_COMMIT` (the device's copy of the tree has no history of its own)
    or git's HEAD here."""
    if os.environ.get("LORA_RUN_COMMIT"):
        return os.environ["LORA_RUN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


#: what must agree for the calls of one run to be joined (`--merge`)
SAME_RUN = ("gpu", "torch", "cuda", "diffusers", "flash_attn_4", "commit")


def merge(paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run from the JSON of several invocations on the same machine, product commit and packages (a device call
    is limited to 600 s; the whole 1500-step CLI run needs a call of its own): their rows in order, a row measured
    again replacing the earlier one. Different machines, commits or packages are refused (ValueError naming the
    key and the files), so every ratio of the joined table compares like with like."""
    runs = [(path, json.loads(Path(path).read_text())) for path in paths]
    first_path, first = runs[0]
    for path, run in runs[1:]:
        for key in SAME_RUN:
            if run["env"].get(key) != first["env"].get(key):
                raise ValueError(f"{path}: {key} is {run['env'].get(key)!r}, {first_path} has "
                                 f"{first['env'].get(key)!r}: not one run")
    rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    for _, run in runs:
        for row in run["rows"]:
            key = (row["row"], row.get("resolution"))
            # a row that failed before its first measurement has no resolution: it stands for every one of its row
            same = [k for k in rows if k[0] == key[0] and None in (k[1], key[1])] if key not in rows else [key]
            if "error" in row and any("error" not in rows[k] for k in same):
                continue           # a skipped or failed repeat does not hide a measured row
            for k in same:
                rows.pop(k)
            rows[key] = {k: v for k, v in row.items()
                         if not k.startswith("vs_") and k not in ("floor_fraction", "times_speed", "speed_row")}
    env = {**first["env"], "date": f"{first['env'].get('date')} to {runs[-1][1]['env'].get('date')}",
           "merged_from": [Path(p).name for p, _ in runs]}
    return env, list(rows.values())


#: what ``--gpu-log`` asks nvidia-smi for (the clock-event reasons are a bit mask: 0x4 power cap, 0x20/0x40
#: thermal slowdown, 0x1 idle; see ``nvidia-smi --help-query-gpu``)
GPU_LOG_FIELDS = ("timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used,"
                  "clocks_event_reasons.active")


def start_gpu_log(path: Path) -> subprocess.Popen | None:
    """nvidia-smi writing one line every 0.5 s to ``path`` until terminated; None where it cannot run."""
    for fields in (GPU_LOG_FIELDS, GPU_LOG_FIELDS.rsplit(",", 1)[0]):     # older drivers lack the reasons field
        try:
            probe = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True,
                                   text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        if probe.returncode == 0:
            return subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,nounits", "-lms", "500",
                                     "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def cli_pgid_file(work: Path) -> Path:
    """Where a cli row notes the process group of the CLI run it starts. The run has its own session, so a row
    timeout can stop all of it; the orchestrator stops it too when it kills a worker at the group's limit. On
    2026-12-03 a killed worker's CLI run went on evaluating on the GPU into the next device call and shared the
    GPU with that call's measurements."""
    return work / "cli-run.pgid"


def stop_cli_run(work: Path) -> None:
    """SIGKILL the process group of a CLI run a killed worker left behind (a finished one is gone: no-op)."""
    try:
        pgid = int(cli_pgid_file(work).read_text())
        cli_pgid_file(work).unlink()
        os.killpg(pgid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def run_group(group: str, rows: list[str], args: argparse.Namespace, jsonl: Path, limit: float) -> None:
    env = {**os.environ, "PERF_WORK": str(args.work), "PERF_CLI_STEPS": str(args.cli_steps),
           "PERF_CLI_EVERY": str(args.cli_every or 0), "PYTHONUNBUFFERED": "1",
           **({"PERF_PROFILE": "1"} if getattr(args, "profile", False) else {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", group, "--rows", *rows, "--jsonl", str(jsonl),
           "--row-timeout", str(args.row_timeout)]
    print(f"== {group}: {' '.join(rows)} (limit {limit:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc, why = proc.wait(timeout=max(1.0, limit)), "crashed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, why = -9, f"stopped at the group's limit of {limit:.0f} s"
    stop_cli_run(Path(args.work))
    if rc != 0:
        print(f"== {group}: worker exit {rc}, {why}", flush=True)
        done = {r["row"] for r in read_rows(jsonl)}
        for row in rows:
            if row not in done:
                with jsonl.open("a") as f:
                    f.write(json.dumps({"row": row, "error": f"worker exit {rc} ({why})",
                                        **(stopped_cli_run(Path(args.work), row) if group == "cli" else {})}) + "\n")


def stopped_cli_run(work: Path, row: str) -> dict[str, Any]:
    """What a cli row's CLI run measured before its worker was stopped or crashed (the manifest's timing is written
    only at its end): its run.log's phases (``gpu_acceptance.run_log_phases``: start to cache, cache to step 10, the
    steady step time, the rounds, the final LoRA) and its output's last lines (an evaluation under way says so there).
    On 2026-12-06 the group's limit stopped the whole 1500-step run in its evaluation and the row kept nothing but
    "worker exit -9"; its timings had to be read off the machine by hand."""
    import gpu_acceptance as acc

    out: dict[str, Any] = {}
    phases = acc.run_log_phases(work / "runs" / row / "run.log")
    if phases:
        out["partial_timing"] = phases
    log = work / "logs" / f"{row}.log"
    if log.is_file():
        out["log_tail"] = acc.tail(log, 4)
    return out


def read_rows(jsonl: Path) -> list[dict[str, Any]]:
    if not jsonl.is_file():
        return []
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios: each row against the reference (same resolution), FA4 against FA2, the FLOP floor, the CLI step
    against the isolated speed step at 512², and the projected 1500-step run."""
    by = {(r["row"], r.get("resolution")): r for r in rows if "error" not in r}
    ceiling = next((r.get("matmul_tflops") for r in rows if r.get("matmul_tflops")), None)
    for r in rows:
        if "error" in r or "median_s" not in r:
            continue
        res = r.get("resolution")
        ref = by.get(("reference", res))
        if ref:
            r["vs_reference"] = ref["median_s"] / r["median_s"]
            if ceiling and ref.get("tflop"):
                r["floor_fraction"] = ref["tflop"] * 1e12 / (ceiling * 1e12) / r["median_s"]
        fa2 = by.get(("fa2", res))
        if fa2 and r["row"] != "fa2" and r["row"] != "reference":
            r["vs_fa2"] = fa2["median_s"] / r["median_s"]
        bf16 = by.get(({"fp8mm": "fa4", "fp8mm-graphs": "graphs", "memory-fp8mm": "memory",
                        "low-vram-fp8mm": "low-vram"}.get(r["row"], ""), res))
        if bf16:        # a float8-matmul row against the bf16 row of the same kernel and CUDA-graph setting
            r["vs_bf16_row"] = bf16["median_s"] / r["median_s"]
        speed = by.get(("fa4", 1024)) or by.get(("fa2", 1024))
        if speed and r.get("median_s") and r["row"].startswith(("memory", "low-vram")):
            r["times_speed"] = r["median_s"] / speed["median_s"]    # the "at ≤ 1.2× the speed-mode time"
            r["speed_row"] = speed["row"]
        if r.get("grad_rel_error") is not None:
            r["grad_bound"] = grad_bound(r.get("bf16_noise")) if r["row"] in ("fa2", "fa4", "graphs") else None
            r["grad_ok"] = r["grad_rel_error"] <= r["grad_bound"] if r["grad_bound"] else None
    summary: dict[str, Any] = {}
    for name in (row for row, group in GROUPS.items() if group == "cli"):
        cli = by.get((name, None))
        if not (cli and cli.get("step_s")):
            continue
        t = cli["timing"]
        isolated = [by[k]["median_s"] for k in (("graphs", 512), ("fa4", 512), ("fa2", 512)) if k in by]
        if name == "cli-fast-fp8mm":
            isolated = [by[k]["median_s"] for k in (("fp8mm-graphs", 512), ("fp8mm", 512)) if k in by]
        if isolated:
            cli["vs_isolated_512"] = cli["step_s"] / min(isolated)
        if by.get(("recipe-graphs", 512), {}).get("median_s"):      # the same LoRA and optimizer, isolated
            cli["vs_recipe_512"] = cli["step_s"] / by[("recipe-graphs", 512)]["median_s"]
        # start-up: the load, and every step's time beyond the steady step (compilation is the first step of each
        # shape, CUDA-graph recording the next ones: train_s - steps × step_s counts both; compile_s only the first)
        warmup = t.get("compile_s") or 0
        if t.get("train_s") is not None and t.get("steps"):
            warmup = max(warmup, t["train_s"] - t["steps"] * cli["step_s"])
        cli["warmup_s"] = round(warmup, 1)
        cli["startup_s"] = round((t.get("load_s") or 0) + warmup, 1)
        rounds = max(1, cli["steps"] // (cli.get("every") or max(1, cli["steps"] // 2)))
        per_round = (t.get("samples_s") or 0) / rounds
        if (cli.get("sets") or {}).get("eval.enabled") is False:
            summary[name] = cli        # no evaluation measured: no whole-run projection
            continue
        cli["projected_1500_s"] = round((t.get("cache_s") or 0) + cli["startup_s"] + 1500 * cli["step_s"] + 6 * per_round + (t.get("checkpoints_s") or 0) * 6 / rounds
                                        + (t.get("evaluate_s") or 0) + (t.get("finish_s") or 0), 1)
        summary["cli" if name == "cli-fast" else name] = cli
    return summary


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any], name: str) -> str:
    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    lines = [f"Run `{name}`: {env.get('gpu')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers "
             f"{env.get('diffusers')}, flash-attn-4 {env.get('flash_attn_4')}, {env.get('date')}.", "",
             "| row | res | plan / attention | median s | peak GiB | vs reference | vs FA2 | floor % | LoRA-grad rel. err (bound) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["row"].startswith("cli-fast"):
            continue
        if "error" in r:
            lines.append(f"| {r['row']} | {r.get('resolution', '')} | | **failed**: {r['error'][:160]} | | | | | |")
            continue
        what = r.get("plan") or r.get("impl", "")
        if r.get("attention"):
            what += f"; {r['attention']}"
        if r.get("fa4_calls") is not None:
            what += f"; {r['fa4_calls']} of 57 attention calls on FA4"
        err = ""
        if r.get("grad_rel_error") is not None:
            err = f"{r['grad_rel_error']:.1e}" + (f" (≤ {r['grad_bound']:.1e}: {'yes' if r['grad_ok'] else 'NO'})"
                                                 if r.get("grad_bound") else " (fp8 base, reported)")
        extra = " (sampling ok)" if r.get("sampling_ok") else (" (SAMPLING FAILED)" if r.get("sampling_ok") is False else "")
        lines.append(f"| {r['row']}{extra} | {r.get('resolution', '')} | {what} | {f(r.get('median_s'))} | "
                     f"{f(r.get('peak_gib'), '{:.1f}')} | {f(r.get('vs_reference'), '{:.2f}×')} | "
                     f"{f(r.get('vs_fa2'), '{:.2f}×')} | {f(100 * r['floor_fraction'] if r.get('floor_fraction') else None, '{:.0f}')} | {err} |")
    for r in rows:
        if r.get("times_speed"):
            lines.append(f"\n{r['row']} at {r.get('resolution')}²: {r['times_speed']:.2f}× the speed step's time "
                         f"({r['speed_row']} at 1024²) in this run, {f(r.get('peak_gib'), '{:.1f}')} GiB")
        if r.get("vs_bf16_row"):
            lines.append(f"\n{r['row']} at {r.get('resolution')}²: {r['vs_bf16_row']:.2f}× the same plan without float8 "
                         "matmuls in this run")
        if r.get("profile"):
            split = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in r["profile"]["gpu_s"].items())
            busy = sum(r["profile"]["gpu_s"].values())
            idle = (f"; kernels busy {1000 * busy:.0f} of the step's {1000 * r['median_s']:.0f} ms, the rest GPU idle "
                    "(host-bound)" if r.get("median_s") else "")
            lines.append(f"\n{r['row']} at {r.get('resolution')}², GPU time of one step by kernel kind: {split}{idle}")
    clis = [r for r in rows if r["row"].startswith("cli-fast")]
    if clis:
        lines += ["", "Shipped fast recipe through the CLI (`recipes/flux/identity-fast.toml`, full-size FLUX.1-dev "
                  "transformer, random weights, 20 images in 5 buckets):", "",
                  "| row | steps | plan | attention | step s | vs isolated 512² | cache s | load s | compile s | "
                  "train s | samples s | eval s | wall s | start-up s | projected 1500 steps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for cli in clis:
            if "error" in cli:
                partial = f" (what it measured: {cli['partial_timing']})" if cli.get("partial_timing") else ""
                lines.append(f"| {cli['row']} | **failed**: {cli['error'][:300]}{partial} |")
                continue
            t = cli.get("timing") or {}
            cells = [cli["row"], cli["steps"], cli.get("plan"), cli.get("attention"), f(cli.get("step_s")),
                     f(cli.get("vs_isolated_512"), "{:.2f}×"), t.get("cache_s"), t.get("load_s"), t.get("compile_s"),
                     t.get("train_s"), t.get("samples_s"), t.get("evaluate_s"), f(cli.get("wall_s"), "{:.0f}"),
                     cli.get("startup_s"), f(cli.get("projected_1500_s"), "{:.0f} s")]
            lines.append("| " + " | ".join("–" if c is None or c == "" else str(c) for c in cells) + " |")
        for cli in clis:
            if cli.get("vs_recipe_512"):
                lines.append(f"\n{cli['row']}: {cli['vs_recipe_512']:.2f}× the isolated step with the recipe's LoRA "
                             "and optimizer (`recipe-graphs`)")
        for cli in clis:
            if cli.get("plan_line"):
                lines.append(f"\n{cli['row']} plan line: `{cli['plan_line']}`")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=sorted(GROUPS))
    ap.add_argument("--row-timeout", type=int, default=240, help="seconds per row (a row over it is an error row)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run; later groups are "
                    "skipped when it is spent")
    ap.add_argument("--cli-steps", type=int, default=30)
    ap.add_argument("--cli-every", type=int, help="samples and checkpoints every N steps in the cli rows (default: "
                    "twice a run; the recipe's own schedule is 250: --cli-steps 1500 --cli-every 250 is the whole run)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default="/tmp/lora-run-perf")
    ap.add_argument("--profile", action="store_true", help="split the GPU time of the 1024² speed and memory-saving rows and the 512² graph rows by kernel kind")
    ap.add_argument("--gpu-log", action="store_true", help="log the GPU's clocks, power and temperature every "
                    "0.5 s (nvidia-smi) to gpu-<time>.csv beside the JSON")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="no GPU needed: join the perf-*.json of "
                    "several calls of one run (same machine, commit and packages) into one table and one JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge:
        try:
            env, rows = merge(args.merge)
        except (OSError, ValueError, KeyError) as exc:
            print(f"perf.py --merge: {exc}", file=sys.stderr)
            return 2
        summary = analyse(rows)
        name = "perf-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-merged.json"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(dict(env=env, rows=rows, summary=summary), indent=1))
        print(markdown(env, rows, summary, name) + "\n\nJoined from " + ", ".join(env["merged_from"]) + ".")
        return 0
    if args.worker:
        worker(args.worker, args.rows, Path(args.jsonl), args.row_timeout)
        return 0
    started = time.perf_counter()
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    jsonl = out / f"perf-{stamp}.jsonl"
    env = environment()
    print(json.dumps(env), flush=True)
    logger = start_gpu_log(out / f"gpu-{stamp}.csv") if args.gpu_log else None
    order: list[str] = []
    for row in args.rows:
        if GROUPS[row] not in order:
            order.append(GROUPS[row])
    for group in order:
        rows = [r for r in args.rows if GROUPS[r] == group]
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            with jsonl.open("a") as f:
                for row in rows:
                    f.write(json.dumps({"row": row, "error": "skipped: the run's --budget was spent"}) + "\n")
            continue
        limit = min(left, args.row_timeout * (len(rows) * (1.5 if group == "cli" else 1) + 2) + 60)
        run_group(group, rows, args, jsonl, limit)
    if logger is not None:
        logger.terminate()
        logger.wait()
    rows = read_rows(jsonl)
    summary = analyse(rows)
    name = f"perf-{stamp}.json"
    (out / name).write_text(json.dumps(dict(env=env, rows=rows, summary=summary,
                                            wall_s=round(time.perf_counter() - started, 1)), indent=1))
    print("\n" + markdown(env, rows, summary, name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
