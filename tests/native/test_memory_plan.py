"""The GPU memory plan (`[train] memory_mode`, `gpu_memory_gib`) as a user on each GPU size meets it, on CPU: the
planner's choice over every family × shipped recipe × budget × batch × resolution against the documented model
(docs/performance.md, "The modes"), and what a refusal suggests.

The property checker is run on the real planner and on planted mistakes, each of which it must catch."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from lora_run.recipe import load_recipe
from lora_run_native import perfmodel
from lora_run_native.accel import PerfPlan

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("flux/identity-fast.toml", "flux/identity-hifi.toml", "flux2/identity-fast.toml",
           "flux2/identity-hifi.toml", "hunyuan-dit/identity.toml", "hunyuan-image/identity.toml")
#: GiB a run may use: 0 (a GPU another process filled) and 4 (less than any plan) up to an H200's 141
BUDGETS = (0.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 80.0, 141.0)
#: the documented share of the budget a plan must fit (docs/performance.md: 5% margin)
MARGIN = 0.95


def shapes() -> dict[str, object]:
    """Every family's shape, and [klein]'s two sizes."""
    import lora_run_flux2.shapes as flux2

    found = {family: perfmodel.SHAPES[family] for family in perfmodel.SHAPES}
    found["flux.2-klein (4B)"] = flux2.KLEIN_4B_SHAPE
    found["flux.2-klein (9B)"] = flux2.KLEIN_9B_SHAPE
    return found


def shipped(name: str):
    return load_recipe(REPO / "recipes" / name).recipe


def candidates(shape, fp8_matmul: bool) -> list[PerfPlan]:
    """Every plan of the documented model, fastest first: speed; memory mode with 0 … all blocks checkpointed;
    low-vram with 1 … all blocks streamed (low-vram streaming none is memory mode with every block checkpointed)."""
    plans = [PerfPlan("speed", compile=True)]
    plans += [PerfPlan("memory", compile=True, fp8=True, checkpoint_blocks=n) for n in range(shape.blocks + 1)]
    plans += [PerfPlan("low-vram", compile=True, fp8=True, checkpoint_blocks=shape.blocks, offload_blocks=k)
              for k in range(1, shape.blocks + 1)]
    return [perfmodel.with_precision(p, "auto", False, fp8_matmul) for p in plans]


def key(plan: PerfPlan) -> tuple:
    return plan.mode, plan.fp8, plan.fp8_matmul, plan.checkpoint_blocks, plan.offload_blocks


def grid():
    """(family, shape, recipe settings) × resolution × batch: each shipped recipe's LoRA, dropout, fp8 and fp8-matmul
    settings on every family (a recipe runs on another family with `--set model.family=…`)."""
    for name in RECIPES:
        r = shipped(name)
        for fp8_matmul in (False, True):
            for family, shape in shapes().items():
                fam = family.split(" ")[0]
                for res in (512, 768, 1024, 2048):
                    for batch in (1, 2, 4):
                        yield (name, fam, shape, res, batch, r.lora.rank, r.lora.targets, r.lora.dropout,
                               r.model.base_precision == "fp8", fp8_matmul)


def real_auto(free, family, res, batch, rank, preset, shape, dropout, fp8_requested, fp8_matmul):
    return perfmodel.choose_mode("auto", family, res, res, batch, rank, preset, free, fp8_requested, shape=shape,
                                 dropout=dropout, fp8_matmul=fp8_matmul, steps=1500)


def violations(choose, limit: int = 5) -> list[str]:
    """Where ``choose`` breaks the documented model: a plan over the budget when one fits; not the fastest that fits
    (the recipe's fp8 and checkpointing are memory settings `auto` decides: the choice is among the model's plans
    whatever the recipe says); not the smallest when none fits; a slower plan with more memory."""
    found: list[str] = []
    for name, family, shape, res, batch, rank, preset, dropout, fp8_req, fp8mm in grid():
        plans = candidates(shape, fp8mm)
        rank_of = {key(p): i for i, p in enumerate(plans)}
        gib = [perfmodel.estimate_peak_gib(family, res, res, batch, rank, preset, p, shape, dropout) for p in plans]
        previous = None
        for free in BUDGETS:
            where = f"{name} on {family}, {res}², batch {batch}, fp8_matmul {fp8mm}, {free:g} GiB"
            plan = choose(free, family, res, batch, rank, preset, shape, dropout, fp8_req, fp8mm)
            if key(plan) not in rank_of:
                found.append(f"{where}: {plan.describe()} is not a plan of the model")
                continue
            chosen = rank_of[key(plan)]
            fitting = [i for i, g in enumerate(gib) if g <= free * MARGIN]
            if fitting and gib[chosen] > free * MARGIN:
                found.append(f"{where}: {plan.describe()} needs {gib[chosen]:.1f} GiB, over the budget")
            elif fitting and chosen != fitting[0]:
                found.append(f"{where}: {plan.describe()}, but {plans[fitting[0]].describe()} fits and is faster")
            elif not fitting and chosen != len(plans) - 1:
                found.append(f"{where}: nothing fits, but {plan.describe()} is not the smallest plan")
            if previous is not None and chosen > previous:
                found.append(f"{where}: {plan.describe()} is slower than the plan for less memory")
            previous = chosen
            if len(found) >= limit:
                return found
    return found


def test_auto_picks_the_fastest_plan_that_fits_on_every_gpu_size():
    assert violations(real_auto) == []


def _auto_in_order(modes):
    def choose(free, family, res, batch, rank, preset, shape, dropout, fp8_requested, fp8_matmul):
        budget = free * MARGIN
        for mode in modes:
            plan = perfmodel.with_precision(perfmodel.plan_mode(mode, family, res, res, batch, rank, preset, budget,
                                                                shape=shape, dropout=dropout), "auto", False,
                                            fp8_matmul)
            if perfmodel.estimate_peak_gib(family, res, res, batch, rank, preset, plan, shape, dropout) <= budget:
                return plan
        return plan
    return choose


def _most_checkpointing_first(free, family, res, batch, rank, preset, shape, dropout, fp8_requested, fp8_matmul):
    plan = real_auto(free, family, res, batch, rank, preset, shape, dropout, fp8_requested, fp8_matmul)
    return PerfPlan("memory", compile=True, fp8=True, checkpoint_blocks=shape.blocks) if plan.mode == "memory" else plan


PLANTED = {
    # plans into the whole budget: no room for the model's error
    "no margin": lambda free, *a: real_auto(free / MARGIN, *a),
    # `if free_gib` took 0 GiB free for "not known" and planned the speed plan (the bug fixed here)
    "0 GiB taken for unknown": lambda free, *a: real_auto(free or None, *a),
    # low-vram tried before memory mode: streaming where checkpointing would do
    "modes out of order": _auto_in_order(("speed", "low-vram", "memory")),
    # memory mode checkpointing every block where fewer fit
    "most checkpointing first": _most_checkpointing_first,
    # the recipe's fp8 honoured by `auto` (before issue 19): a big GPU trains an fp8 speed plan
    "recipe's fp8 honoured": lambda free, f, res, b, r, p, s, d, fp8, mm: perfmodel.with_precision(
        real_auto(free, f, res, b, r, p, s, d, fp8, mm), "speed", fp8, mm),
}


@pytest.mark.parametrize("mistake", sorted(PLANTED))
def test_the_property_catches_each_planted_mistake(mistake):
    assert violations(PLANTED[mistake], limit=1), mistake


def test_mode_thresholds_are_where_auto_changes_mode():
    """`lora-run plan` prints, without a budget, from how much memory auto picks each mode: exact thresholds."""
    for name, family, shape, res, batch, rank, preset, dropout, _fp8, fp8mm in grid():
        if batch != 1 or res not in (512, 1024):
            continue
        t = perfmodel.mode_thresholds(family, res, res, batch, rank, preset, shape, dropout, fp8mm)
        assert t["speed"] > t["memory"] > t["low-vram"], (name, family, t)
        for mode, free in t.items():
            above = real_auto(free * 1.001, family, res, batch, rank, preset, shape, dropout, False, fp8mm)
            below = real_auto(free * 0.999, family, res, batch, rank, preset, shape, dropout, False, fp8mm)
            gib = perfmodel.estimate_peak_gib(family, res, res, batch, rank, preset, below, shape, dropout)
            assert above.mode == mode, (name, family, res, mode, free)
            if mode == "low-vram":          # below the last threshold nothing fits: the smallest plan, refused
                assert not perfmodel.fits(gib, free * 0.999), (name, family, res)
            else:
                assert below.mode != mode and perfmodel.fits(gib, free * 0.999), (name, family, res, mode, free)


def test_what_fits_suggestions_fit():
    """Each change a refusal suggests fits where the recipe's smallest plan does not; the control: suggesting the
    bare estimate as `gpu_memory_gib` (without the allocator's quarter GiB) does not."""
    checked = 0
    for name, family, shape, res, batch, rank, preset, dropout, _fp8, fp8mm in grid():
        if fp8mm or res < 1024:
            continue
        for cap in (4.0, 8.0, 12.0):
            available = perfmodel.allocator_cap_gib(cap)
            smallest = perfmodel.smallest_plan(family, shape=shape)

            def fits(h=res, b=batch, r=rank):
                gib = perfmodel.estimate_peak_gib(family, h, h, b, r, preset, smallest, shape, dropout)
                return perfmodel.fits(gib, available)

            if fits():
                continue
            for option in perfmodel.what_fits(family, res, res, batch, rank, preset, available, shape=shape,
                                              dropout=dropout, capped=True):
                value = float(option.split(" = " if " = " in option else " ≥ ")[1].split(" ")[0])
                if option.startswith("[train] batch_size"):
                    assert fits(b=int(value)) and batch % int(value) == 0, (name, family, option)
                elif option.startswith("[dataset] resolution"):
                    assert fits(h=int(value)) and value % 64 == 0, (name, family, option)
                elif option.startswith("[lora] rank"):
                    assert fits(r=int(value)), (name, family, option)
                else:
                    assert option.startswith("[train] gpu_memory_gib"), option
                    gib = perfmodel.estimate_peak_gib(family, res, res, batch, rank, preset, smallest, shape, dropout)
                    assert perfmodel.fits(gib, perfmodel.allocator_cap_gib(value)), (name, family, option)
                    assert not perfmodel.fits(gib, perfmodel.allocator_cap_gib(math.ceil(gib / MARGIN * 10) / 10))
                checked += 1
    assert checked > 100
