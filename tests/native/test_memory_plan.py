"""The GPU memory plan (`[train] memory_mode`, `gpu_memory_gib`) as a user on each GPU size meets it, on CPU: the
planner's choice over every family × shipped recipe × budget × batch × resolution against the documented model
(docs/performance.md, "The modes"), `lora-run plan` / `check` against the run's own choice, refusals, and the
plan line's reasons for overriding the recipe's memory settings.

The property checker is run on the real planner and on planted mistakes, each of which it must catch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora_run.recipe import load_recipe, replace
from lora_run_native import memory, perfmodel
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


# ------------------------------------------------------------------------------- the plan the run will choose
def with_cap(recipe, gib, **train):
    return replace(recipe, train={"gpu_memory_gib": gib, **train})


@pytest.mark.parametrize("name", RECIPES)
def test_the_plan_shows_the_run_s_choice_within_gpu_memory_gib(name):
    """`lora-run plan`'s estimate under `[train] gpu_memory_gib` is the plan the run chooses within it (the allocator
    cap, nothing held after caching): it fits, or the recipe is refused. Before, the plan ignored the budget and
    printed the speed estimate on every card (the control)."""
    r = shipped(name)
    shape = perfmodel.family_shape(r.model.family)
    for gib in BUDGETS[1:]:
        capped = with_cap(r, gib)
        plan, estimate = memory.gpu_plan(capped, shape)
        run = perfmodel.choose_mode("auto", r.model.family, r.dataset.resolution, r.dataset.resolution,
                                    r.train.batch_size, r.lora.rank, r.lora.targets, perfmodel.allocator_cap_gib(gib),
                                    r.model.base_precision == "fp8", shape=shape, dropout=r.lora.dropout,
                                    steps=r.train.steps, cuda_graphs=r.train.cuda_graphs,
                                    step_shapes=memory.step_shapes(r, 1))
        assert plan == run, (name, gib)
        assert memory.estimate_memory_gib(capped, shape) == estimate
        speed = memory.gpu_mode_estimates(capped, shape)["speed"][1]
        if perfmodel.fits(estimate, perfmodel.allocator_cap_gib(gib)):
            assert estimate <= gib * MARGIN
        if speed > gib:       # the control: the speed estimate the plan printed before does not fit this card
            assert estimate < speed and not perfmodel.fits(speed, perfmodel.allocator_cap_gib(gib))


def test_issue_19_targets_for_the_shipped_flux_recipe():
    """Issue 19: a big GPU gets the speed plan, a 24 GB card an fp8 plan, 8–12 GB the low-vram plan."""
    r = shipped("flux/identity-fast.toml")
    modes = {gib: memory.gpu_plan(with_cap(r, gib))[0] for gib in (8.0, 12.0, 24.0, 48.0, 80.0)}
    assert [modes[g].mode for g in (8.0, 12.0)] == ["low-vram", "low-vram"] and modes[8.0].offload_blocks
    assert modes[24.0].mode == "memory" and modes[24.0].fp8
    assert modes[48.0].mode == modes[80.0].mode == "speed" and not modes[80.0].fp8


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


# ------------------------------------------------------------------------------------- the recipe's settings
def test_the_plan_says_where_it_overrides_the_recipe_s_memory_settings():
    """On CUDA the mode decides fp8 storage and checkpointing; the run's plan line and `lora-run plan` say where
    that overrides `[model] base_precision` / `[train] gradient_checkpointing`, in `auto` and explicit modes alike."""
    r = shipped("flux/identity-fast.toml")
    notes = {}
    for label, recipe in {
        "auto, 80 GiB": with_cap(r, 80.0),
        "auto, 24 GiB, checkpointing off": with_cap(replace(r, model={"base_precision": "bf16"}), 24.0,
                                                    gradient_checkpointing=False, batch_size=4),
        "speed": replace(r, train={"memory_mode": "speed"}),
        "memory, bf16": with_cap(replace(r, model={"base_precision": "bf16"}), 48.0, memory_mode="memory"),
    }.items():
        plan, _gib = memory.gpu_plan(recipe)
        notes[label] = " ".join(perfmodel.setting_notes(plan, recipe.model.base_precision == "fp8",
                                                        recipe.train.gradient_checkpointing))
    assert "\"fp8\" is a memory setting not needed here" in notes["auto, 80 GiB"]
    assert "gradient_checkpointing] is a memory setting speed mode does not use" in notes["auto, 80 GiB"]
    assert "\"bf16\" is a memory setting: memory mode stores the base in fp8" in notes[
        "auto, 24 GiB, checkpointing off"]
    assert "gradient_checkpointing] = false is a memory setting: memory mode recomputes" in notes[
        "auto, 24 GiB, checkpointing off"]
    assert "speed mode does not use" in notes["speed"] and "fp8" not in notes["speed"]   # explicit speed keeps fp8
    assert "memory mode stores the base in fp8" in notes["memory, bf16"]


# ------------------------------------------------------------------------------------------ through the CLI
def padded(model: Path, to: Path, parameters: float) -> Path:
    """A copy of a tiny model whose transformer's safetensors header claims ``parameters`` (a sparse tensor appended:
    no disk used): `lora-run plan` and `check` read only headers, so it stands for the full-size model."""
    import shutil

    shutil.copytree(model, to)
    path = to / "transformer" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    count = sum(math.prod(e["shape"]) for name, e in header.items() if name != "__metadata__")
    extra = int(parameters) - count
    header["lora_run_test_padding"] = {"dtype": "F8_E4M3", "shape": [extra],
                                       "data_offsets": [len(body), len(body) + extra]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + body)
        f.truncate(8 + len(text) + len(body) + extra)
    return to


@pytest.fixture(scope="module")
def full_flux(tmp_path_factory):
    from lora_run_flux.tiny import build_tiny_flux

    root = tmp_path_factory.mktemp("full")
    tiny = build_tiny_flux(root / "tiny")
    return tiny, padded(tiny, root / "full", perfmodel.family_shape("flux.1-dev").params)


def plan_cli(run_cli, source: Path, *sets: str, command: str = "plan"):
    argv = [command, REPO / "recipes" / "flux" / "identity-fast.toml", "--set", f"model.source=\"{source}\""]
    for s in sets:
        argv += ["--set", s]
    return run_cli(*argv)


def test_plan_on_each_gpu_size(full_flux, run_cli):
    _tiny, full = full_flux
    expected = {8: "low-vram", 12: "low-vram", 24: "memory", 80: "speed", 141: "speed"}
    for gib, mode in expected.items():
        done = plan_cli(run_cli, full, f"train.gpu_memory_gib={gib}")
        assert done.returncode == 0, done.stderr
        line = next(x for x in done.stdout.splitlines() if x.startswith("# note: GPU plan (auto within"))
        assert f"[train] gpu_memory_gib = {gib} GiB): {mode}," in line and "the fastest that fits" in line, line
        estimate = float(done.stdout.split("# memory estimate: ")[1].split(" ")[0])
        assert estimate <= gib * MARGIN and f"estimated {estimate:.1f} GiB" in line
    done = plan_cli(run_cli, full)
    assert "GPU plan (auto): the fastest that fits" in done.stdout and "low-vram from" in done.stdout


@pytest.mark.parametrize("command", ["plan", "check"])
def test_a_budget_nothing_fits_is_refused_before_anything_runs(full_flux, run_cli, command):
    _tiny, full = full_flux
    done = plan_cli(run_cli, full, "train.gpu_memory_gib=8", "train.batch_size=4", "dataset.resolution=768",
                    command=command)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "[train.gpu_memory_gib] = 8 GiB: no plan fits" in done.stderr, done.stderr
    assert "What fits: [train] batch_size = 2 with gradient_accumulation × 2" in done.stderr, done.stderr
    assert "[dataset] resolution = 640" in done.stderr and "[train] gpu_memory_gib ≥ " in done.stderr
    explicit = plan_cli(run_cli, full, "train.gpu_memory_gib=24", "train.memory_mode=\"speed\"",
                        "model.base_precision=\"bf16\"", command=command)
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert "[train.memory_mode] \"speed\": the plan \"speed" in explicit.stderr
    assert "What fits: [train] memory_mode = \"auto\" (here: memory, compiled, fp8 base" in explicit.stderr
    fits = plan_cli(run_cli, full, "train.gpu_memory_gib=8", command=command)     # batch 1 at 512² fits 8 GiB
    assert "no plan fits" not in fits.stderr and "[train.gpu_memory_gib]" not in fits.stderr, fits.stderr


def test_a_model_of_another_size_is_not_refused_by_the_full_size_estimate(full_flux, run_cli):
    """A tiny (or pruned) model: the plan estimates the full-size model, so it says so and does not refuse; the run
    plans for the model it loads."""
    tiny, _full = full_flux
    done = plan_cli(run_cli, tiny, "train.gpu_memory_gib=2")
    assert done.returncode == 0, done.stderr
    assert "not refused here: the transformer's weights hold" in done.stdout


@pytest.mark.parametrize("value, words", [("0", "must be > 0.0"), ("-8", "must be > 0.0"), ("nan", "finite"),
                                          ("inf", "finite"), ("\"12GB\"", "expected float"), ("true", "expected float"),
                                          ("1e6", "must be <= 4096")])
def test_bad_budgets_are_refused_by_name(full_flux, run_cli, value, words):
    done = plan_cli(run_cli, full_flux[1], f"train.gpu_memory_gib={value}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "[train.gpu_memory_gib]" in done.stderr and words in done.stderr, done.stderr


def test_several_gpus_plan_per_gpu(full_flux, run_cli):
    done = plan_cli(run_cli, full_flux[1], "train.gpu_memory_gib=24", "train.gpus=2")
    assert done.returncode == 0, done.stderr
    assert "every figure is per GPU; [train] gpu_memory_gib is each process's budget" in done.stdout
    single = plan_cli(run_cli, full_flux[1], "train.gpu_memory_gib=24")
    assert single.stdout.split("# memory estimate: ")[1][:8] == done.stdout.split("# memory estimate: ")[1][:8]


def test_klein_plans_for_the_size_it_will_train(tmp_path):
    """[klein] 4B or 9B: the size the transformer's weights hold where their headers can be read, else `[model]
    version` or the hub id; the 9B, the larger, with a note where nothing says."""
    import lora_run_flux2.shapes as flux2
    from lora_run_flux2.tiny import build_tiny_flux2
    from lora_run_native.adapters import adapter_class

    r = shipped("flux2/identity-fast.toml")
    assert r.model.source == "black-forest-labs/FLUX.2-klein-base-4B" and r.model.version is None

    def planned(**model):
        return adapter_class("flux.2-klein")(replace(r, model=model)).planning_shape()

    assert planned() == (flux2.KLEIN_4B_SHAPE, None)
    assert planned(version="base-9b", source="black-forest-labs/FLUX.2-klein-base-9B") == (flux2.KLEIN_9B_SHAPE, None)
    tiny = build_tiny_flux2(tmp_path / "tiny")
    for name, shape in (("4b", flux2.KLEIN_4B_SHAPE), ("9b", flux2.KLEIN_9B_SHAPE)):
        assert planned(source=str(padded(tiny, tmp_path / name, shape.params))) == (shape, None)
    shape, note = planned(source=str(tiny))
    assert "parameters, not the 3.88 B of the full-size flux.2-klein" in note
    (tiny / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shape, note = planned(source=str(tiny))
    assert shape is flux2.KLEIN_9B_SHAPE and "does not say whether it is [klein] 4B or 9B" in note
