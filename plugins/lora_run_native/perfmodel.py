"""Peak-memory model and mode planner for the native trainer (no torch: `lora-run plan` uses it).

peak ≈ resident base weights + LoRA training state (fp32 weights, grads, two optimizer moments)
      + activations: every block run without checkpointing keeps ``act_per_token`` bytes per token,
        a checkpointed block keeps only its input (``boundary_per_token``), and the block being
        recomputed in backward needs its full working set once
      + a fixed allowance for the optimizer step, the loss and allocator slack.
The per-token coefficients were measured on an H100 (bench/flux_bench.py, results in bench/results/);
``lora-run plan`` prints the estimate, and the benchmark prints estimate vs. measured peak.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from .accel import PerfPlan
from .shapes import FamilyShape, RegisteredShapes  # noqa: F401 - FamilyShape re-exported

GiB = 2**30


#: family -> FamilyShape, from the installed families' native adapters (``memory_shape``)
SHAPES = RegisteredShapes()
OVERHEAD_GIB = 0.6


#: `auto` plans into this share of the memory a run may use, and a plan whose estimate is above it stops the run:
#: the estimates are within 10% of the measured allocated peaks, and the caching allocator reserves above those
PLAN_MARGIN = 0.95
#: what the allocator is capped below ``[train] gpu_memory_gib``: the caching allocator's fraction check lets
#: one mapping cross it (FLUX.2 [dev] streaming under a 24 GiB cap reserved 24.02 GiB), and a run under a cap
#: keeps its cache up to the cap, so the reserved peak is the cap plus that overshoot
ALLOCATOR_SLACK_GIB = 0.25


def allocator_cap_gib(cap: float) -> float:
    """The limit the CUDA allocator gets for ``[train] gpu_memory_gib = cap``: ``ALLOCATOR_SLACK_GIB`` below it
    (a twentieth of a cap under 5 GiB), so that the reserved peak, the allocator's cache included, stays inside
    ``cap``. It is also what a run under the cap may use (less what the process already holds)."""
    return cap - min(ALLOCATOR_SLACK_GIB, cap / 20)


def fits(estimate_gib: float, available_gib: float | None) -> bool:
    """Whether a plan estimated at ``estimate_gib`` fits the memory a run may use (None: not known, it fits)."""
    return available_gib is None or estimate_gib <= available_gib * PLAN_MARGIN


def default_budget_gib(mode: str, shape: FamilyShape) -> float:
    """The budget an explicit `memory` / `low-vram` mode is sized for where no GPU is known (`lora-run plan` without
    `[train] gpu_memory_gib`): a 24 GiB card, and the family's low-vram budget (``FamilyShape.low_vram_gib``)."""
    return shape.low_vram_gib if mode == "low-vram" else 24.0


def family_shape(family: str) -> FamilyShape | None:
    """The ``memory_shape`` the family's native adapter declares, None where it declares none."""
    return SHAPES.get(family)
CUDA_GRAPH_MAX_TOKENS = 2048     # measured: 512² batch 1 runs 1.46× faster with graphs, 1024² only 1.03×
#: graph shapes (distinct token counts of the buckets: the compiled blocks see (batch, tokens, width), so a
#: bucket and its transpose share graphs) up to which speed mode replays CUDA graphs; the shapes' graphs share
#: one memory pool (only one shape's replay is live at a time)
CUDA_GRAPH_MAX_BUCKETS = 8
#: Measured on an H200 (bench/results/gpu-acceptance-20261203-092015.json and …-092325.json, one machine, one
#: commit: the shipped fast recipe's 5 buckets = 3 token counts, 100 steps, full-size FLUX.1): CUDA graphs cut
#: the steady step from 0.318 s to 0.153 s (0.165 s saved) but start-up (compilation, and the recording of
#: every block's graphs for each token count) took 160 s instead of 17 s: about 48 s per token count, warm
#: compile caches or cold alike. With several shapes, `auto` replays graphs only where the run wins that time
#: back (3 token counts: from about 870 steps).
CUDA_GRAPH_RECORD_S_PER_SHAPE = 48.0
#: `auto` replays whole steps only where the memory it may use holds this multiple of the plan's estimate: the
#: first GPU runs of step graphs (the fast recipe, H100, 2026-12-05) reserved 56.8 GiB for a 32.2-GiB estimate
#: (33.7 allocated) when each shape recorded at its second call, an eager step's activations beside the graphs'
#: pool. With recordings waiting for every shape's eager call (the order since), the same run reserved 49.3 GiB
#: (33.8 allocated; H100, 2026-12-06, bench/results/perf-20261206-075243.json): 1.53 × the estimate, and 1.6 holds it.
STEP_GRAPHS_HEADROOM = 1.6
CUDA_GRAPH_SAVED_S_PER_STEP = 0.165
#: LoRA dropout keeps each LoRA layer's dropped input for the backward: bytes per element (compiled: the bf16
#: copy, measured as the whole of the high-fidelity FLUX.1 recipe's excess over the model without it, 8.2 GiB
#: at 768²; eager also keeps the boolean mask)
DROPOUT_BYTES_COMPILED = 2.0
DROPOUT_BYTES_EAGER = 3.0


def graph_shapes(family: str, sizes: set[tuple[int, int]] | list[tuple[int, int]],
                 shape: FamilyShape | None = None) -> int:
    """How many shapes the compiled blocks see for these bucket sizes (height, width): their distinct token
    counts (a bucket and its transpose carry the same number of tokens and share graphs)."""
    return len({tokens(family, h, w, shape) for h, w in sizes})


def graphs_pay_off(buckets: int, steps: int | None) -> bool:
    """Several graph shapes: each records its graphs once (measured ~48 s); a replayed step saves ~0.165 s."""
    if buckets <= 1 or steps is None:
        return True
    return steps * CUDA_GRAPH_SAVED_S_PER_STEP >= buckets * CUDA_GRAPH_RECORD_S_PER_SHAPE


def shape_of_model(family: str, model: object, lora_parameters: int, rank: int, preset: str) -> FamilyShape:
    """The family's shape rescaled to the model actually loaded (a tiny test model, a pruned variant):
    its parameter count, repeated blocks and width, and the LoRA it really carries. Activation bytes per
    token scale with the width."""
    from .accel import repeated_blocks

    base = family_shape(family)
    params = float(sum(p.numel() for p in model.parameters()))   # type: ignore[attr-defined]
    blocks = len(repeated_blocks(model)) or base.blocks
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "attention_head_dim", None)
    hidden = int(heads * head_dim) if heads and head_dim else int(getattr(config, "hidden_size", 0) or base.hidden)
    scale = hidden / base.hidden
    per_rank = max(1, lora_parameters // max(1, rank))
    inputs = {k: v * scale * blocks / base.blocks for k, v in base.lora_inputs_per_token.items()}
    return attrs.evolve(base, params=params, blocks=blocks, hidden=hidden,
                        act_per_token_compiled=base.act_per_token_compiled * scale,
                        act_per_token_eager=base.act_per_token_eager * scale,
                        lora_shapes={preset: [(1, per_rank, 0)]}, lora_inputs_per_token=inputs)


def lora_params(family: str, preset: str, rank: int, shape: FamilyShape | None = None) -> int:
    return sum(n * rank * (i + o) for n, i, o in (shape or family_shape(family)).lora_shapes[preset])


def tokens(family: str, height: int, width: int, shape: FamilyShape | None = None) -> int:
    s = shape or family_shape(family)
    return (height // s.latent_factor) * (width // s.latent_factor) + s.text_tokens


def estimate_peak_gib(family: str, height: int, width: int, batch: int, rank: int, preset: str,
                      plan: PerfPlan, shape: FamilyShape | None = None, dropout: float = 0.0) -> float:
    s = shape or family_shape(family)
    n_tok = tokens(family, height, width, s) * batch
    offloaded_share = plan.offload_blocks / s.blocks
    weight_bytes = s.params * (1.0 + 4.0 / s.hidden if plan.fp8 else 2.0)
    resident = weight_bytes * (1.0 - offloaded_share * 0.98)   # embedders/norms stay resident
    if plan.offload_blocks:
        resident += 2 * weight_bytes / s.blocks                 # the block in use and the one prefetched
    lora = lora_params(family, preset, rank, s) * 16.0
    per_token = s.act_per_token_compiled if plan.compile else s.act_per_token_eager
    boundary = s.hidden * 2.0                                     # block input kept by checkpointing (bf16)
    ckpt = min(s.blocks, max(plan.checkpoint_blocks, plan.offload_blocks))
    activations = n_tok * ((s.blocks - ckpt) * per_token + ckpt * boundary + (per_token if ckpt else 0.0))
    if dropout > 0:     # kept by the blocks that are not recomputed, and by the one being recomputed
        kept = (s.blocks - ckpt + (1 if ckpt else 0)) / s.blocks
        element = DROPOUT_BYTES_COMPILED if plan.compile else DROPOUT_BYTES_EAGER
        activations += n_tok * s.lora_inputs_per_token.get(preset, 0.0) * element * kept
    return (resident + lora + activations) / GiB + OVERHEAD_GIB


def plan_mode(mode: str, family: str, height: int, width: int, batch: int, rank: int, preset: str,
              budget_gib: float | None = None, compile: bool = True, buckets: int = 1,
              shape: FamilyShape | None = None, cuda_graphs: str = "auto", dropout: float = 0.0,
              steps: int | None = None, step_shapes: int | None = None) -> PerfPlan:
    """The PerfPlan for a mode; `memory`/`low-vram` checkpoint/offload just enough blocks for the budget.
    `cuda_graphs` decides how speed mode replays CUDA graphs: "step" replays each whole micro-step as one graph
    (stepgraph.py), "on" each compiled block's own; `auto` graphs small steps (at most CUDA_GRAPH_MAX_TOKENS
    tokens): whole steps where the family has them measured (`FamilyShape.whole_step_graphs`), the run can
    (`step_shapes`, its bucket shapes, is given: one process, no text-encoder training) and they are at most
    MAX_GRAPHS, else the blocks', for at most CUDA_GRAPH_MAX_BUCKETS
    token counts and, with several, enough `steps` to win the recording back. With several bucket shapes the
    blocks compile with a symbolic token dimension."""
    plan = _plan_mode(mode, family, height, width, batch, rank, preset, budget_gib, compile, buckets, shape,
                      cuda_graphs, dropout, steps, step_shapes)
    return attrs.evolve(plan, dynamic_tokens=plan.compile and buckets > 1)


def _plan_mode(mode: str, family: str, height: int, width: int, batch: int, rank: int, preset: str,
               budget_gib: float | None, compile: bool, buckets: int, shape: FamilyShape | None,
               cuda_graphs: str, dropout: float, steps: int | None, step_shapes: int | None = None) -> PerfPlan:
    from .stepgraph import MAX_GRAPHS

    s = shape or family_shape(family)
    # CUDA graphs pay off when a step is launch-bound (few tokens) and shapes do not vary much
    launch_bound = tokens(family, height, width, s) * batch <= CUDA_GRAPH_MAX_TOKENS
    whole = (cuda_graphs == "auto" and launch_bound and s.whole_step_graphs and step_shapes is not None
             and step_shapes <= MAX_GRAPHS)
    if mode == "speed" and compile and (cuda_graphs == "step" or whole):
        return PerfPlan("speed", compile=True, step_graphs=True)
    if mode == "speed":
        small = launch_bound and buckets <= CUDA_GRAPH_MAX_BUCKETS
        graphs = compile and (cuda_graphs == "on" or (cuda_graphs == "auto" and small
                                                      and graphs_pay_off(buckets, steps)))
        return PerfPlan("speed", compile=compile, compile_mode="reduce-overhead" if graphs else "default")
    if mode == "memory":
        budget = budget_gib if budget_gib is not None else default_budget_gib(mode, s)
        for n in range(0, s.blocks + 1):
            plan = PerfPlan("memory", compile=compile, fp8=True, checkpoint_blocks=n)
            if estimate_peak_gib(family, height, width, batch, rank, preset, plan, s, dropout) <= budget:
                return plan
        return PerfPlan("memory", compile=compile, fp8=True, checkpoint_blocks=s.blocks)
    if mode == "low-vram":
        budget = budget_gib if budget_gib is not None else default_budget_gib(mode, s)
        for n in range(0, s.blocks + 1):
            plan = PerfPlan("low-vram", compile=compile, fp8=True, checkpoint_blocks=s.blocks, offload_blocks=n)
            if estimate_peak_gib(family, height, width, batch, rank, preset, plan, s, dropout) <= budget:
                return plan
        return PerfPlan("low-vram", compile=compile, fp8=True, checkpoint_blocks=s.blocks, offload_blocks=s.blocks)
    raise ValueError(f"unknown mode {mode!r}")


def with_precision(plan: PerfPlan, requested: str, fp8_requested: bool, fp8_matmul: bool) -> PerfPlan:
    """The recipe's precision keys on a mode's plan: `[train] fp8_matmul` makes the base fp8 and its matmuls
    float8 in every mode; `[model] base_precision = "fp8"` makes an explicitly requested mode's base fp8
    (`auto` decides the storage itself)."""
    if fp8_matmul:
        return attrs.evolve(plan, fp8=True, fp8_matmul=True)
    return attrs.evolve(plan, fp8=True) if fp8_requested and requested != "auto" else plan


def room_for_step_graphs(plan: PerfPlan, cuda_graphs: str, budget: float | None,
                         estimate: Callable[[], float]) -> bool:
    """False where `auto` chose whole-step graphs (``plan``) but the memory the run may use (``budget``, GiB) does not
    hold ``STEP_GRAPHS_HEADROOM`` × the plan's ``estimate()``: what their recording may reserve. The run then
    replays the blocks' graphs instead; an explicit `"step"` is honoured as asked."""
    return not (plan.step_graphs and cuda_graphs == "auto" and budget is not None
                and budget < STEP_GRAPHS_HEADROOM * estimate())


def choose_mode(requested: str, family: str, height: int, width: int, batch: int, rank: int, preset: str,
                free_gib: float | None, fp8_requested: bool, compile: bool = True, buckets: int = 1,
                shape: FamilyShape | None = None, cuda_graphs: str = "auto", dropout: float = 0.0,
                steps: int | None = None, fp8_matmul: bool = False, step_shapes: int | None = None) -> PerfPlan:
    """`auto`: the fastest mode whose estimate fits in `free_gib` (minus a 5% margin). The recipe's
    `base_precision = "fp8"` is a memory setting: an explicit mode honours it, `auto` decides itself (a GPU
    with room gets the bf16 speed plan, a small one an fp8 plan). `fp8_matmul` (`[train] fp8_matmul`, opt-in)
    makes every mode's base fp8 and its matmuls float8."""
    budget = None if free_gib is None else free_gib * PLAN_MARGIN      # 0 GiB free is a budget, not "unknown"
    kw = dict(compile=compile, buckets=buckets, shape=shape, cuda_graphs=cuda_graphs, dropout=dropout, steps=steps)

    def planned(mode: str, mode_budget: float | None, whole_steps: int | None = step_shapes) -> PerfPlan:
        plan = with_precision(plan_mode(mode, family, height, width, batch, rank, preset, budget_gib=mode_budget,
                                        step_shapes=whole_steps, **kw), requested, fp8_requested, fp8_matmul)
        if not room_for_step_graphs(plan, cuda_graphs, budget, lambda: estimate_peak_gib(
                family, height, width, batch, rank, preset, plan, shape, dropout)):
            return planned(mode, mode_budget, None)
        return plan

    if requested != "auto":
        return planned(requested, budget if requested != "speed" else None)
    for mode in ("speed", "memory", "low-vram"):
        candidate = planned(mode, budget)
        if budget is None or estimate_peak_gib(family, height, width, batch, rank, preset, candidate, shape,
                                               dropout) <= budget:
            return candidate
    return planned("low-vram", budget)


def round_up(value: float, step: float = 0.1) -> float:
    return math.ceil(value / step) * step


def smallest_plan(family: str, compile: bool = True, shape: FamilyShape | None = None,
                  fp8_matmul: bool = False) -> PerfPlan:
    """The plan that needs the least memory: low-vram with every block checkpointed and streamed from the host."""
    blocks = (shape or family_shape(family)).blocks
    plan = PerfPlan("low-vram", compile=compile, fp8=True, checkpoint_blocks=blocks, offload_blocks=blocks)
    return with_precision(plan, "low-vram", True, fp8_matmul)


def mode_thresholds(family: str, height: int, width: int, batch: int, rank: int, preset: str,
                    shape: FamilyShape | None = None, dropout: float = 0.0, fp8_matmul: bool = False,
                    compile: bool = True) -> dict[str, float]:
    """{mode: the least memory a run may use (GiB) with which `auto` picks that mode}: the speed plan from its
    estimate, memory mode from its plan with every block checkpointed, low-vram from `smallest_plan`; below the
    last nothing fits. (`auto` is monotone in the memory: each threshold is exact.)"""
    s = shape or family_shape(family)
    plans = {"speed": with_precision(PerfPlan("speed", compile=compile), "auto", False, fp8_matmul),
             "memory": with_precision(PerfPlan("memory", compile=compile, fp8=True, checkpoint_blocks=s.blocks),
                                      "auto", False, fp8_matmul),
             "low-vram": smallest_plan(family, compile, s, fp8_matmul)}
    return {mode: estimate_peak_gib(family, height, width, batch, rank, preset, plan, s, dropout) / PLAN_MARGIN
            for mode, plan in plans.items()}


def what_fits(family: str, height: int, width: int, batch: int, rank: int, preset: str, available_gib: float,
              requested: str = "auto", shape: FamilyShape | None = None, dropout: float = 0.0,
              fp8_matmul: bool = False, compile: bool = True, capped: bool = False, bucket_min: int = 256) -> list[str]:
    """What would fit ``available_gib`` where the recipe's plan does not, each a recipe change with its estimate:
    `auto` (for an explicit mode), fewer samples per step (a divisor of the batch, the rest accumulated), a smaller
    resolution, a lower rank, and the memory the recipe's smallest plan needs (``capped``: as `[train]
    gpu_memory_gib`, whose allocator cap is a little lower)."""
    s = shape or family_shape(family)

    def smallest(h: int, w: int, b: int, r: int) -> float:
        return estimate_peak_gib(family, h, w, b, r, preset, smallest_plan(family, compile, s, fp8_matmul), s, dropout)

    out = []
    if requested != "auto":
        plan = choose_mode("auto", family, height, width, batch, rank, preset, available_gib, False, compile,
                           shape=s, dropout=dropout, fp8_matmul=fp8_matmul)
        gib = estimate_peak_gib(family, height, width, batch, rank, preset, plan, s, dropout)
        if fits(gib, available_gib):
            out.append(f"[train] memory_mode = \"auto\" (here: {plan.describe()}, about {gib:.1f} GiB)")
    if not fits(smallest(height, width, batch, rank), available_gib):
        fewer = next((b for b in range(batch - 1, 0, -1)
                      if batch % b == 0 and fits(smallest(height, width, b, rank), available_gib)), None)
        if fewer:
            out.append(f"[train] batch_size = {fewer} with gradient_accumulation × {batch // fewer} (about "
                       f"{smallest(height, width, fewer, rank):.1f} GiB)")
        side = next((n for n in range(max(height, width) // 64 * 64 - 64, 255, -64)
                     if fits(smallest(n, n, batch, rank), available_gib)), None)
        if side:
            out.append(f"[dataset] resolution = {side}" + (f" and bucket_min ≤ {side}" if side < bucket_min else "")
                       + f" (about {smallest(side, side, batch, rank):.1f} GiB)")
        lower = next((r for r in (rank // 2, rank // 4, 4) if 4 <= r < rank
                      and fits(smallest(height, width, batch, r), available_gib)), None)
        if lower:
            out.append(f"[lora] rank = {lower} (about {smallest(height, width, batch, lower):.1f} GiB)")
        need = mode_thresholds(family, height, width, batch, rank, preset, s, dropout, fp8_matmul, compile)["low-vram"]
        if capped:
            out.append(f"[train] gpu_memory_gib ≥ {math.ceil((need + ALLOCATOR_SLACK_GIB) * 10) / 10:g}")
        else:
            out.append(f"a GPU with {math.ceil(need * 10) / 10:g} GiB free")
    return out


#: what a refusal says happens: the run's, `lora-run plan`'s and `check`'s, and an explicit mode's warning
STOPPED = "nothing was trained"
WILL_STOP = "the run stops before caching or training (exit 2)"
WARNED = "training anyway, it may run out of memory"


def refusal_key(requested: str, cap: float | None) -> tuple[str, str]:
    """The recipe key a plan that does not fit is charged to: `[train] gpu_memory_gib` for `auto` under a cap (the
    cap decides), else `[train] memory_mode` (an explicit mode, or `auto` on the GPU's free memory)."""
    return ("train", "gpu_memory_gib") if requested == "auto" and cap is not None else ("train", "memory_mode")


def refusal(requested: str, plan: PerfPlan, estimate_gib: float, available_gib: float, source: str, family: str,
            height: int, width: int, batch: int, rank: int, preset: str, shape: FamilyShape | None = None,
            dropout: float = 0.0, fp8_matmul: bool = False, compile: bool = True, cap: float | None = None,
            outcome: str = STOPPED, bucket_min: int = 256) -> str:
    """The message of a run whose plan does not fit (`lora-run plan`, `check` and the run word it alike): the key
    that decides it (`[train.gpu_memory_gib]` for `auto` under a cap, else `[train.memory_mode]`), the plan, its
    estimate against the memory the run may use (``source``: where that figure comes from), what happens
    (``outcome``) and what would fit (``what_fits``)."""
    key = ".".join(refusal_key(requested, cap))
    if requested != "auto":
        head = f"[{key}] \"{requested}\": the plan \"{plan.describe()}\""
    elif cap is not None:
        head = f"[{key}] = {cap:g} GiB: no plan fits (memory_mode \"auto\"); the smallest, \"{plan.describe()}\","
    else:
        head = f"[{key}] \"auto\": no plan fits the free GPU memory; the smallest, \"{plan.describe()}\","
    options = what_fits(family, height, width, batch, rank, preset, available_gib, requested, shape, dropout,
                        fp8_matmul, compile, capped=cap is not None, bucket_min=bucket_min)
    return (f"{head} needs about {estimate_gib:.1f} GiB at {width}x{height}, batch {batch}, but this run may use "
            f"{max(available_gib, 0):.1f} GiB ({source}; a plan must fit {PLAN_MARGIN:.0%} of it); {outcome}. "
            + ("What would fit: " if outcome == WARNED else "What fits: ")
            + "; or ".join(options or ["more GPU memory"]))


def setting_notes(plan: PerfPlan, base_fp8: bool, checkpointing: bool) -> list[str]:
    """Where the plan overrides `[model] base_precision` and `[train] gradient_checkpointing` (on CUDA with mixed
    precision both are memory settings the mode decides), and why: the run's plan line and `lora-run plan` say so."""
    out = []
    if base_fp8 and not plan.fp8:
        out.append("[model.base_precision] \"fp8\" is a memory setting not needed here, the base stays bf16")
    elif plan.fp8 and not base_fp8:
        out.append("[train.fp8_matmul] stores the base in fp8" if plan.fp8_matmul else
                   f"[model.base_precision] \"bf16\" is a memory setting: {plan.mode} mode stores the base in fp8")
    if checkpointing and not plan.checkpoint_blocks:
        out.append("[train.gradient_checkpointing] is a memory setting " + (
            "speed mode does not use" if plan.mode == "speed" else "not needed here") + ", no block is recomputed")
    elif plan.checkpoint_blocks and not checkpointing:
        out.append(f"[train.gradient_checkpointing] = false is a memory setting: {plan.mode} mode recomputes "
                   f"{plan.checkpoint_blocks} blocks to fit")
    return out
