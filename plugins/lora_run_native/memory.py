"""A first estimate of the peak accelerator memory of a native run (`lora-run plan` shows it).

Deliberately simple (the GPU issue refines it): frozen base weights at their storage precision, the LoRA
(weights, gradients, optimizer state), activations kept for backward (block inputs with gradient
checkpointing, roughly a block's worth of intermediates otherwise), and a fixed CUDA/runtime overhead.
Text encoders and the VAE are not counted: they leave the GPU before training.
"""
from __future__ import annotations

import math
from typing import Any

OPTIMIZER_BYTES = {"adafactor": 4, "adamw": 8, "adamw8bit": 2, "prodigy": 16}   # state bytes per LoRA parameter
OVERHEAD_GIB = 1.5


def plan_budget_gib(recipe: Any) -> float | None:
    """The memory a run of ``recipe`` may use as `lora-run plan` knows it: ``[train] gpu_memory_gib``'s allocator cap
    (the run subtracts what it already holds, nothing after caching), None without it (the run reads the GPU)."""
    from . import perfmodel

    cap = recipe.train.gpu_memory_gib
    return None if cap is None else perfmodel.allocator_cap_gib(cap)


def step_shapes(recipe: Any, shapes: int, one_process: bool = True) -> int | None:
    """The bucket shapes (``shapes``) whole-step CUDA graphs would record for ``recipe``, for `[train] cuda_graphs =
    "auto"` to weigh, or None where a run does not replay whole steps by itself: several processes, a trained text
    encoder (its steps run eagerly), float8 matmuls (not measured under step graphs)."""
    r = recipe
    if not one_process or r.text_encoder.train or r.train.fp8_matmul:
        return None
    return shapes


def _plan_args(recipe: Any, shape: Any, size: tuple[int, int] | None) -> tuple[tuple, dict]:
    r = recipe
    height, width = size or (r.dataset.resolution, r.dataset.resolution)
    return ((r.model.family, height, width, r.train.batch_size, r.lora.rank, r.lora.targets),
            dict(compile=r.train.compile != "off", shape=shape, dropout=r.lora.dropout,
                 step_shapes=step_shapes(r, 1)))


def gpu_mode_estimates(recipe: Any, shape: Any = None, size: tuple[int, int] | None = None
                       ) -> dict[str, tuple[str, float]]:
    """CUDA with mixed precision: {mode: (plan description, estimated peak GiB)} at ``size`` (height, width; default
    the base resolution), from the measured memory model in perfmodel.py: speed unbounded, memory and low-vram
    within ``[train] gpu_memory_gib`` (without it: 24 GiB and the family's low-vram budget)."""
    from . import perfmodel

    r = recipe
    args, kw = _plan_args(r, shape, size)
    budget = _margin(plan_budget_gib(r))

    def planned(mode: str, **change: Any) -> tuple[Any, float]:
        plan = perfmodel.plan_mode(mode, *args, budget_gib=None if mode == "speed" else budget,
                                   cuda_graphs=r.train.cuda_graphs, steps=r.train.steps, **{**kw, **change})
        plan = perfmodel.with_precision(plan, r.train.memory_mode, r.model.base_precision == "fp8",
                                        r.train.fp8_matmul)
        return plan, perfmodel.estimate_peak_gib(*args, plan, shape, dropout=r.lora.dropout)

    out = {}
    for mode in ("speed", "memory", "low-vram"):
        plan, gib = planned(mode)
        if not perfmodel.room_for_step_graphs(plan, r.train.cuda_graphs, budget, lambda: gib):
            plan, gib = planned(mode, step_shapes=None)          # as the run decides (perfmodel.choose_mode)
        out[mode] = (plan.describe(), gib)
    return out


def _margin(budget: float | None) -> float | None:
    from .perfmodel import PLAN_MARGIN

    return None if budget is None else budget * PLAN_MARGIN


def refusal(recipe: Any, plan: Any, estimate: float, available: float, source: str, shape: Any,
            size: tuple[int, int], outcome: str) -> str:
    """``perfmodel.refusal`` for ``recipe``'s plan at ``size`` (height, width) that does not fit ``available`` GiB
    (``source``: where that figure comes from; ``outcome``: what the run does about it)."""
    from . import perfmodel

    r = recipe
    return perfmodel.refusal(r.train.memory_mode, plan, estimate, available, source, r.model.family, *size,
                             r.train.batch_size, r.lora.rank, r.lora.targets, shape, r.lora.dropout, r.train.fp8_matmul,
                             r.train.compile != "off", r.train.gpu_memory_gib, outcome, r.dataset.bucket_min)


def gpu_plan(recipe: Any, shape: Any = None, size: tuple[int, int] | None = None) -> tuple[Any, float]:
    """(PerfPlan, estimated peak GiB) of the recipe's `memory_mode` at ``size`` as the run chooses it within
    ``plan_budget_gib``; without a budget, `auto` is the speed plan (the most it uses on any GPU)."""
    from . import perfmodel

    r = recipe
    args, kw = _plan_args(r, shape, size)
    plan = perfmodel.choose_mode(r.train.memory_mode, *args, plan_budget_gib(r), r.model.base_precision == "fp8",
                                 cuda_graphs=r.train.cuda_graphs, steps=r.train.steps, fp8_matmul=r.train.fp8_matmul,
                                 **kw)
    return plan, perfmodel.estimate_peak_gib(*args, plan, shape, dropout=r.lora.dropout)


def estimate_memory_gib(recipe: Any, shape: Any = None, size: tuple[int, int] | None = None) -> float | None:
    """Peak GiB on the accelerator for one training step at ``size`` (height, width; default the base resolution,
    which no bucket exceeds in area) (None: the family's adapter declares no ``memory_shape``).

    With mixed precision this is the CUDA estimate of the plan the recipe's memory_mode chooses within `[train]
    gpu_memory_gib` (``gpu_plan``; `auto` without it: the speed plan, the most it will use)."""
    from . import perfmodel

    f = shape or perfmodel.SHAPES.get(recipe.model.family)
    if f is None:
        return None
    if recipe.train.mixed_precision != "no":
        return gpu_plan(recipe, f, size)[1]
    weight_bytes = 1 if recipe.model.base_precision == "fp8" else (4 if recipe.train.mixed_precision == "no" else 2)
    base = f.params * weight_bytes
    lora_params = perfmodel.lora_params(recipe.model.family, recipe.lora.targets, recipe.lora.rank, f)
    lora = lora_params * (4 + 4 + OPTIMIZER_BYTES.get(recipe.optimizer.name, 8))
    side = recipe.dataset.bucket_max
    area = min(side * side, max(recipe.dataset.resolution ** 2, 1))
    tokens = math.ceil(area / f.latent_factor ** 2) + f.text_tokens
    act_bytes = 2 if recipe.train.mixed_precision != "no" else 4
    per_block_input = tokens * f.hidden * act_bytes * recipe.train.batch_size
    if recipe.train.gradient_checkpointing:
        activations = f.blocks * per_block_input + 24 * per_block_input
    else:
        activations = f.blocks * 24 * per_block_input
    return (base + lora + activations) / 2**30 + OVERHEAD_GIB


def equivalent_estimate(recipe: Any, swapped_blocks: int = 0) -> tuple[float, str] | None:
    """This memory model's peak-GiB estimate for the settings an external trainer (sd-scripts,
    diffusion-pipe) runs the recipe with: eager, the recipe's base precision, every block checkpointed when
    `gradient_checkpointing` is on, `swapped_blocks` blocks' weights in CPU memory. (GiB, what it assumed),
    or None for a family this model does not know."""
    from . import perfmodel
    from .accel import PerfPlan

    r = recipe
    shapes = perfmodel.family_shape(r.model.family)
    if shapes is None:
        return None
    if r.train.mixed_precision == "no":
        return estimate_memory_gib(r), "fp32, eager"
    blocks = shapes.blocks if r.train.gradient_checkpointing else 0
    plan = PerfPlan("external", compile=False, fp8=r.model.base_precision == "fp8", checkpoint_blocks=blocks,
                    offload_blocks=min(max(swapped_blocks, 0), shapes.blocks))
    gib = perfmodel.estimate_peak_gib(r.model.family, r.dataset.resolution, r.dataset.resolution,
                                      r.train.batch_size, r.lora.rank, r.lora.targets, plan, dropout=r.lora.dropout)
    return gib, plan.describe().replace("external, ", "") + f", batch {r.train.batch_size} at {r.dataset.resolution}²"
