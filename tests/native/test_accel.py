"""GPU modes (accel.py) on the CPU parts that can run here, and the memory model against the benchmark data."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import accel, perfmodel  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def tiny_flux_with_lora():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[8, 12, 12])
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def inputs():
    h = w = 4
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, h * w, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3), guidance=torch.ones(1), return_dict=False)


def grads(model):
    model.zero_grad(set_to_none=True)
    out = model(**inputs())[0]
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fp8_storage_equals_a_model_with_e4m3_rounded_weights():
    model = tiny_flux_with_lora()
    rounded = copy.deepcopy(model)
    Fp8Linear = accel.fp8_linear_class()
    stored = copy.deepcopy(model)
    count = accel.store_frozen_linears_in_fp8(stored, torch.bfloat16)
    layers = [m for m in stored.modules() if isinstance(m, Fp8Linear)]
    assert count == len(layers) > 20
    assert all(m.w8.dtype == torch.float8_e4m3fn for m in layers)
    # the reference: every replaced weight rounded through the same e4m3 + per-row scale, kept in float32
    with torch.no_grad():
        for (name, module), (_, new) in zip(rounded.named_modules(), stored.named_modules()):
            if isinstance(new, Fp8Linear):
                module.weight.copy_(new.w8.float() * new.scale)
    out_a, g_a = grads(rounded)
    out_b, g_b = grads(stored)
    assert torch.allclose(out_a, out_b, atol=1e-5, rtol=1e-4)
    assert g_a.keys() == g_b.keys() and all(torch.allclose(g_a[k], g_b[k], atol=1e-6, rtol=1e-4) for k in g_a)
    # LoRA layers stay trainable float32; the frozen storage is 1 byte per weight
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)


def test_fp8_custom_op_backward_in_bf16():
    Fp8Linear = accel.fp8_linear_class()
    lin = torch.nn.Linear(64, 96).requires_grad_(False)
    layer = Fp8Linear(lin, torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    w = (layer.w8.float() * layer.scale)
    expected = torch.ones(5, 96) @ w
    assert y.dtype == torch.bfloat16 and torch.allclose(x.grad.float(), expected, rtol=2e-2, atol=2e-2)


def _saved_by_compiled_training(fn, x, backend):
    """What a compiled training call of ``fn`` saves for backward (shape, dtype) and the graphs dynamo handed the
    backend; the output and the input's gradient."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs, saved = [], []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    x = x.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = torch.compile(fn, backend=recording)(x)
    y.float().sum().backward()
    torch._dynamo.reset()
    return saved, "".join(graphs), y.detach(), x.grad


@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", "inductor"])
def test_compiled_fp8_layers_dequantise_in_their_graph_and_save_only_the_fp8_weight(backend, monkeypatch):
    """Inside a compiled block an fp8 layer's dequantisation is part of the graph (an opaque op there cost ~145 µs
    of host per call on the GPU), and the partitioner still saves the 1-byte weight, never a bf16 copy of it; the
    output and input gradient are the eager op's. Controls: the same visible dequantisation without the
    checkpoint saves the bf16 weights (so the check can fail), and with the switch off the graph calls the op."""
    Fp8Linear = accel.fp8_linear_class()
    torch.manual_seed(0)
    first = Fp8Linear(torch.nn.Linear(64, 96).requires_grad_(False), torch.bfloat16)
    second = Fp8Linear(torch.nn.Linear(96, 48).requires_grad_(False), torch.bfloat16)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    weights = {(96, 64), (48, 96)}

    def block(inp):
        return second(torch.nn.functional.gelu(first(inp)))

    saved, code, y, dx = _saved_by_compiled_training(block, x, backend)
    assert "lora_run.fp8_linear" not in code and "checkpoint" in code
    assert not [s for s in saved if s[0] in weights and s[1] != torch.float8_e4m3fn], saved
    assert {s for s in saved if s[1] == torch.float8_e4m3fn} == {(w, torch.float8_e4m3fn) for w in weights}
    eager_x = x.clone().requires_grad_()
    eager_y = block(eager_x)
    eager_y.float().sum().backward()
    assert torch.allclose(y.float(), eager_y.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(dx.float(), eager_x.grad.float(), rtol=1e-2, atol=1e-2)

    def visible(layer, inp):    # planted: the dequantisation in the graph without the checkpoint
        w = (layer.w8.to(torch.float32) * layer.scale).to(torch.bfloat16)
        return torch.nn.functional.linear(inp, w, layer.bias.to(torch.bfloat16))

    planted, *_ = _saved_by_compiled_training(
        lambda inp: visible(second, torch.nn.functional.gelu(visible(first, inp))), x, backend)
    assert [s for s in planted if s[0] in weights and s[1] == torch.bfloat16], planted
    monkeypatch.setattr(accel, "IN_GRAPH_DEQUANT", False)
    _, opaque_code, *_ = _saved_by_compiled_training(block, x, backend)
    assert "lora_run.fp8_linear" in opaque_code


def test_checkpointed_blocks_give_the_same_gradients():
    model = tiny_flux_with_lora()
    plain = copy.deepcopy(model)
    info = accel.apply(model, accel.PerfPlan("memory", checkpoint_blocks=3), "cpu", torch.float32)
    assert info["checkpointed"] == 3 and info["blocks"] == 4
    out_a, g_a = grads(plain)
    out_b, g_b = grads(model)
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(g_a[k], g_b[k], atol=1e-7) for k in g_a)


def test_checkpoint_indices_spread_evenly():
    assert accel.checkpoint_indices(57, 0) == []
    assert accel.checkpoint_indices(57, 57) == list(range(57))
    idx = accel.checkpoint_indices(57, 19)
    assert len(idx) == 19 and idx[0] == 0 and max(b - a for a, b in zip(idx, idx[1:])) <= 3


def test_mode_plans_fit_their_budgets():
    for family in perfmodel.SHAPES:
        for mode, budget in (("memory", 24.0), ("low-vram", 12.0)):
            plan = perfmodel.plan_mode(mode, family, 1024, 1024, 1, 32, "attention", budget_gib=budget)
            est = perfmodel.estimate_peak_gib(family, 1024, 1024, 1, 32, "attention", plan)
            blocks = perfmodel.SHAPES[family].blocks
            # fits, or is the mode's most frugal plan (memory mode checkpoints every block and never offloads;
            # a 32 B model's memory plan is for an 80 GB card, its low-vram plan for 24 GB)
            assert est <= budget or plan.offload_blocks == blocks or (mode == "memory" and plan.checkpoint_blocks
                                                                     == blocks and plan.fp8), (family, mode, est)
    speed = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention")
    assert speed.compile_mode == "reduce-overhead"          # launch-bound: CUDA graphs
    assert perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, 32, "attention").compile_mode == "default"
    auto_80 = perfmodel.choose_mode("auto", "flux.1-dev", 1024, 1024, 1, 32, "attention", 78.0, False)
    auto_24 = perfmodel.choose_mode("auto", "flux.1-dev", 1024, 1024, 1, 32, "attention", 24.0, False)
    auto_12 = perfmodel.choose_mode("auto", "flux.1-dev", 1024, 1024, 1, 32, "attention", 12.0, False)
    assert (auto_80.mode, auto_24.mode, auto_12.mode) == ("speed", "memory", "low-vram")


def test_estimates_match_the_benchmark_within_15_percent():
    """Every measured row in bench/results (except CUDA-graph rows, whose pools were not recorded) is
    re-estimated with the current memory model."""
    checked = 0
    for path in sorted(RESULTS.glob("*.json")):
        # Only the step benchmarks' files hold "rows"; the engines' results (engines-gpu-*.json) measure no plan.
        for row in json.loads(path.read_text()).get("rows", []):
            if row.get("impl") != "lora-run" or "peak_gib" not in row or "CUDA graphs" in row.get("plan", ""):
                continue
            family = row.get("family", "flux.1-dev")
            plan_text = row["plan"]
            if row.get("applied"):
                a = row["applied"]
                plan = accel.PerfPlan(row["mode"].split(":")[0], compile=True, fp8="fp8" in plan_text,
                                      checkpoint_blocks=a.get("checkpointed", 0) if "offloaded" not in a else a["blocks"],
                                      offload_blocks=a.get("offloaded", 0))
            elif plan_text.startswith(("speed", "memory", "low-vram")):     # the plan the row ran, as printed
                counts = dict((what, int(n)) for what, n in re.findall(r"(checkpointing|offloading) (\d+) blocks", plan_text))
                plan = accel.PerfPlan(plan_text.split(",")[0], compile="compiled" in plan_text, fp8="fp8" in plan_text,
                                      checkpoint_blocks=counts.get("checkpointing", 0),
                                      offload_blocks=counts.get("offloading", 0))
            else:
                plan = perfmodel.choose_mode("auto", family, row["resolution"], row["resolution"], 1, 32, "attention",
                                             78.0, False)
            est = perfmodel.estimate_peak_gib(family, row["resolution"], row["resolution"], row.get("batch", 1),
                                              row.get("rank", 32), row.get("targets", "attention"), plan)
            if "error" in row or row.get("mode", "").endswith("reduce-overhead"):
                continue
            assert abs(est / row["peak_gib"] - 1) <= 0.15, (path.name, plan_text, row["resolution"], est, row["peak_gib"])
            checked += 1
    assert checked >= 8


def test_auto_decides_fp8_itself_and_explicit_modes_honour_the_recipe():
    """`base_precision = "fp8"` in a recipe is a memory setting: `auto` on a big GPU keeps the bf16 speed plan,
    on a 24 GiB card it picks an fp8 plan; an explicit mode honours the recipe's fp8."""
    big = perfmodel.choose_mode("auto", "flux.1-dev", 512, 512, 1, 32, "all-linear", 130.0, fp8_requested=True)
    assert (big.mode, big.fp8) == ("speed", False)
    small = perfmodel.choose_mode("auto", "flux.1-dev", 512, 512, 1, 32, "all-linear", 24.0, fp8_requested=True)
    assert small.mode in ("memory", "low-vram") and small.fp8
    explicit = perfmodel.choose_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", 130.0, fp8_requested=True)
    assert (explicit.mode, explicit.fp8) == ("speed", True)


def test_cuda_graphs_setting():
    auto = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention")
    off = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention", cuda_graphs="off")
    on = perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, 32, "attention", cuda_graphs="on")
    # the fast recipe's 3 token counts: 1500 steps win the recording back (measured ~43 s each), 100 do not
    recipe = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=3, steps=1500)
    short = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=3, steps=100)
    one_shape = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=1, steps=12)
    many = perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention",
                               buckets=perfmodel.CUDA_GRAPH_MAX_BUCKETS + 1, steps=100_000)
    assert auto.compile_mode == "reduce-overhead" and off.compile_mode == "default"
    assert on.compile_mode == "reduce-overhead" and recipe.compile_mode == "reduce-overhead"
    assert short.compile_mode == "default" and one_shape.compile_mode == "reduce-overhead"
    assert many.compile_mode == "default"
    assert perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=3, steps=100,
                               cuda_graphs="on").compile_mode == "reduce-overhead"     # "on" is the user's call
    assert perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention", compile=False,
                               cuda_graphs="on").compile_mode == "default"      # graphs need compiled blocks
    step = perfmodel.plan_mode("speed", "flux.1-dev", 1024, 1024, 1, 32, "all-linear", buckets=3, steps=100,
                               cuda_graphs="step")          # whole micro-steps graphed: the blocks without trees
    assert (step.step_graphs, step.compile_mode, step.dynamic_tokens) == (True, "default", True)
    assert step.describe() == "speed, compiled + step CUDA graphs, bf16 base"
    assert not any(p.step_graphs for p in (auto, off, on, recipe, short, one_shape, many))
    assert not perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "attention", compile=False,
                                   cuda_graphs="step").step_graphs       # nothing compiled: no graphs
    assert not perfmodel.plan_mode("memory", "flux.1-dev", 1024, 1024, 1, 32, "attention", budget_gib=24.0,
                                   cuda_graphs="step").step_graphs       # recomputed blocks: speed mode only


def test_auto_replays_whole_steps_where_the_run_can():
    """`auto` graphs whole micro-steps where the run can replay them (`step_shapes` given: one process, no trained
    text encoder) and a step is launch-bound, for at most MAX_GRAPHS bucket shapes, whatever the steps (a shape
    records in about half a second, not the blocks' ~48 s); elsewhere the blocks' graphs as before."""
    from lora_run_native.stepgraph import MAX_GRAPHS

    def plan(**kw):
        args = dict(buckets=3, steps=100) | kw
        return perfmodel.plan_mode("speed", "flux.1-dev", args.pop("size", 512), args.pop("size2", 512), 1, 32,
                                   "all-linear", **args)

    fast = plan(step_shapes=5)
    assert fast.step_graphs and fast.compile_mode == "default"
    assert fast.describe() == "speed, compiled + step CUDA graphs, bf16 base"
    assert not plan().step_graphs                                   # the run cannot: the rule as before
    assert not plan(step_shapes=MAX_GRAPHS + 1).step_graphs         # too many shapes to keep graphs of
    assert plan(step_shapes=MAX_GRAPHS).step_graphs
    assert not plan(step_shapes=1, size=1024, size2=1024).step_graphs      # compute-bound: graphs do not pay
    assert not plan(step_shapes=1, cuda_graphs="off").step_graphs
    assert plan(step_shapes=1, cuda_graphs="on").compile_mode == "reduce-overhead"   # "on" is the blocks' graphs
    assert not plan(step_shapes=1, compile=False).step_graphs
    auto = perfmodel.choose_mode("auto", "flux.1-dev", 512, 512, 1, 32, "all-linear", 130.0, fp8_requested=True,
                                 buckets=3, steps=1500, step_shapes=5)
    assert auto.mode == "speed" and auto.step_graphs and not auto.fp8
    # a GPU without room for what the recording may reserve keeps the blocks' graphs (the speed plan all the same)
    estimate = perfmodel.estimate_peak_gib("flux.1-dev", 512, 512, 1, 32, "all-linear", auto)
    tight = perfmodel.choose_mode("auto", "flux.1-dev", 512, 512, 1, 32, "all-linear",
                                  estimate * 1.5 / perfmodel.PLAN_MARGIN, fp8_requested=True, buckets=3, steps=1500,
                                  step_shapes=5)
    assert tight.mode == "speed" and not tight.step_graphs and tight.compile_mode == "reduce-overhead"
    roomy = perfmodel.choose_mode("auto", "flux.1-dev", 512, 512, 1, 32, "all-linear",
                                  estimate * perfmodel.STEP_GRAPHS_HEADROOM / perfmodel.PLAN_MARGIN + 0.1,
                                  fp8_requested=True, buckets=3, steps=1500, step_shapes=5)
    assert roomy.step_graphs
    explicit = perfmodel.choose_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear",
                                     estimate * 1.5 / perfmodel.PLAN_MARGIN, fp8_requested=False, buckets=3,
                                     steps=1500, step_shapes=5)
    assert not explicit.step_graphs and explicit.compile_mode == "reduce-overhead"   # an explicit speed mode too
    chosen = perfmodel.choose_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear",
                                   estimate * 1.5 / perfmodel.PLAN_MARGIN, fp8_requested=False, buckets=3,
                                   steps=1500, step_shapes=5, cuda_graphs="step")
    assert chosen.step_graphs                                                          # "step" is the user's call
    # a family whose whole-step graphs no GPU run has shown keeps the blocks' graphs
    dit = perfmodel.plan_mode("speed", "hunyuan-dit-1.2", 512, 512, 1, 32, "attention", buckets=1, step_shapes=1)
    assert not dit.step_graphs and dit.compile_mode == "reduce-overhead"


def test_step_shapes_follow_what_the_run_can_replay():
    import attrs

    from lora_run.recipe import load_recipe
    from lora_run_native.memory import step_shapes

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "flux" / "identity-fast.toml").recipe
    assert step_shapes(recipe, 5) == 5
    assert step_shapes(recipe, 5, one_process=False) is None
    assert step_shapes(attrs.evolve(recipe, text_encoder=attrs.evolve(recipe.text_encoder, train=True)), 5) is None
    assert step_shapes(attrs.evolve(recipe, train=attrs.evolve(recipe.train, fp8_matmul=True)), 5) is None


def test_the_per_mode_estimates_name_the_speed_plan_the_run_picks():
    """`lora-run plan`'s per-mode line (``gpu_mode_estimates``) and the plan the run chooses (``gpu_plan``) agree on
    the speed plan: with `[train] gpu_memory_gib` below what whole-step graphs may reserve, both name the blocks'
    graphs; with room, both name step graphs. Control: the first case's cap is big enough for the speed plan
    itself, so only the step graphs' headroom moves it."""
    import attrs

    from lora_run.recipe import load_recipe
    from lora_run_native.memory import gpu_mode_estimates, gpu_plan

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "flux" / "identity-fast.toml").recipe

    def capped(gib):
        return attrs.evolve(recipe, train=attrs.evolve(recipe.train, gpu_memory_gib=gib))

    roomy = capped(130.0)
    assert gpu_plan(roomy)[0].step_graphs
    assert "step CUDA graphs" in gpu_mode_estimates(roomy)["speed"][0]
    estimate = gpu_plan(roomy)[1]
    tight = capped(estimate * 1.4 / perfmodel.PLAN_MARGIN)
    plan, gib = gpu_plan(tight)
    assert plan.mode == "speed" and not plan.step_graphs and gib <= tight.train.gpu_memory_gib
    described, _ = gpu_mode_estimates(tight)["speed"]
    assert described == plan.describe() and "step CUDA graphs" not in described


def test_graph_shapes_count_token_counts_not_bucket_sizes():
    """The fast recipe's five buckets on the acceptance dataset are three token counts: a bucket and its
    transpose share the compiled blocks' graphs. Control: five buckets of five areas are five shapes."""
    recipe_buckets = {(384, 512), (512, 384), (448, 576), (576, 448), (512, 512)}
    assert perfmodel.graph_shapes("flux.1-dev", recipe_buckets) == 3
    assert perfmodel.graph_shapes("flux.1-dev", {(384, 512), (448, 512), (512, 512), (576, 512), (640, 512)}) == 5


def test_plans_are_sized_for_the_model_actually_loaded(tmp_path):
    """A tiny FLUX-layout model is planned with its own size, not FLUX.1-dev's 12 B parameters."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14))
    shape = perfmodel.shape_of_model("flux.1-dev", model, lora_parameters=10_000, rank=4, preset="attention")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.blocks == 2 and shape.hidden == 64
    plan = accel.PerfPlan("speed", compile=True)
    tiny = perfmodel.estimate_peak_gib("flux.1-dev", 512, 512, 1, 4, "attention", plan, shape)
    full = perfmodel.estimate_peak_gib("flux.1-dev", 512, 512, 1, 4, "attention", plan)
    assert tiny < 1.0 < 20.0 < full
    assert perfmodel.lora_params("flux.1-dev", "attention", 4, shape) == 10_000


def test_training_calls_run_compiled_blocks_and_sampling_calls_run_eager(monkeypatch):
    """Sampling must never read CUDA-graph outputs: a block called without grad takes the eager forward."""
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append("compiled")
            return fn(*args, **kw)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    block = torch.nn.Linear(4, 4)
    accel._wrap_block(block, 0, compile=True, checkpoint=False, offloader=None, compile_mode="reduce-overhead")
    x = torch.randn(2, 4)
    block(x).sum().backward()
    assert calls == ["compiled"]
    with torch.no_grad():
        eager = block(x)
    assert calls == ["compiled"] and torch.equal(eager, block._lora_run_eager_forward(x))


def _compile_count_over_buckets(dynamic_tokens: bool, sizes=((4, 4), (4, 6), (6, 6), (4, 4))) -> list[int]:
    """Compiled graphs after each bucket shape when every block of a tiny FLUX runs through `_wrap_block`
    (a counting compiler backend; a graph compiled = one backend call)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(len(gm.graph.nodes))
        return gm.forward

    model = tiny_flux_with_lora()
    for i, block in enumerate(accel.repeated_blocks(model)):
        accel._wrap_block(block, i, compile=True, checkpoint=False, offloader=None, backend=counting_backend,
                          dynamic_tokens=dynamic_tokens)
    counts = []
    for h, w in sizes:
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None]
        g = torch.Generator().manual_seed(h * 10 + w)
        out = model(hidden_states=torch.randn(1, h * w, 64, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3), guidance=torch.ones(1),
                    return_dict=False)[0]
        out.pow(2).mean().backward()
        counts.append(len(compiled))
    torch._dynamo.reset()
    return counts


@pytest.mark.slow
def test_one_compilation_serves_every_bucket_shape():
    """Three aspect-ratio buckets: the blocks compile at the first shape and never again (the token dimension
    is symbolic). Control: with static shapes the same counter sees a recompilation per new shape."""
    counts = _compile_count_over_buckets(dynamic_tokens=True)
    assert counts[0] >= 1 and counts == [counts[0]] * 4, counts
    static = _compile_count_over_buckets(dynamic_tokens=False)
    assert static[1] > static[0] and static[2] > static[1] and static[3] == static[2], static


def test_compile_caches_live_under_the_users_cache(monkeypatch, tmp_path):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "LORA_RUN_COMPILE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = accel.compile_cache_dir()
    assert base == str(tmp_path / "lora-run" / "compile")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "lora-run" / "compile" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")      # a user's own setting wins
    accel.compile_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"



def test_compile_caches_fall_back_to_the_temporary_folder_where_home_cannot_be_written(monkeypatch, tmp_path):
    """A container's home that cannot be written (here: `~/.cache` is a file) sent inductor's first compilation into
    a PermissionError/FileExistsError; the caches go to the temporary folder instead, as torch's default does."""
    import os
    import tempfile

    for name in ("TORCHINDUCTOR_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "LORA_RUN_COMPILE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = accel.compile_cache_dir()
    assert base.startswith(tempfile.gettempdir()) and "lora-run-compile" in base, base
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(base, "inductor")

def test_shipped_recipes_memory_settings_follow_auto():
    """The shipped fast recipe sets fp8 + checkpointing (for 24 GB cards). Under `memory_mode = "auto"` the plan
    shown by `lora-run plan` trains a big GPU in bf16 without checkpointing; an explicit mode keeps the fp8."""
    import attrs

    from lora_run.recipe import load_recipe
    from lora_run_native.memory import gpu_mode_estimates

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "flux" / "identity-fast.toml", []).recipe
    assert recipe.model.base_precision == "fp8" and recipe.train.gradient_checkpointing
    assert recipe.train.memory_mode == "auto"
    speed, _gib = gpu_mode_estimates(recipe)["speed"]
    assert "bf16 base" in speed and "checkpointing" not in speed
    explicit = attrs.evolve(recipe, train=attrs.evolve(recipe.train, memory_mode="speed"))
    assert "fp8 base" in gpu_mode_estimates(explicit)["speed"][0]


def test_several_buckets_plan_one_graph_with_a_symbolic_token_dimension():
    for mode in ("speed", "memory", "low-vram"):
        assert perfmodel.plan_mode(mode, "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=5).dynamic_tokens
        assert not perfmodel.plan_mode(mode, "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=1).dynamic_tokens
    assert not perfmodel.plan_mode("speed", "flux.1-dev", 512, 512, 1, 32, "all-linear", buckets=5,
                                   compile=False).dynamic_tokens


def _resident_fp8_elements(model):
    Fp8Linear = accel.fp8_linear_class()
    return sum(m.w8.numel() for m in model.modules() if isinstance(m, Fp8Linear))


def _tracked(monkeypatch, model):
    """The fp8 weight elements held by the model's modules (what sits on the device), sampled after every
    quantisation call."""
    peak = [0]
    original = accel.store_frozen_linears_in_fp8

    def store(*args, **kwargs):
        count = original(*args, **kwargs)
        peak[0] = max(peak[0], _resident_fp8_elements(model))
        return count

    monkeypatch.setattr(accel, "store_frozen_linears_in_fp8", store)
    return peak


def test_offloaded_blocks_never_sit_on_the_device_together(monkeypatch):
    """The 8 GiB acceptance row ran out of memory because every block was quantised onto the GPU before the
    offloaded ones went back to the host (FLUX.1's 11 GiB of fp8 weights on an 8 GiB card). Now each
    offloaded block is parked in host memory as soon as it is quantised: the device holds the resident
    blocks plus at most one more."""
    model = tiny_flux_with_lora()
    reference = copy.deepcopy(model)
    accel.store_frozen_linears_in_fp8(reference, torch.bfloat16)
    total = _resident_fp8_elements(reference)
    plan = accel.PerfPlan("low-vram", fp8=True, checkpoint_blocks=4, offload_blocks=2)
    blocks = accel.repeated_blocks(reference)
    offload = accel.checkpoint_indices(len(blocks), 2)
    per_block = [_resident_fp8_elements(b) for b in blocks]
    bound = total - sum(per_block[i] for i in offload) + max(per_block)

    peak = _tracked(monkeypatch, model)
    offloader = accel.place_frozen_weights(model, plan, "cpu", torch.bfloat16)
    assert peak[0] <= bound < total
    assert sorted(offloader.host) == offload
    Fp8Linear = accel.fp8_linear_class()
    for i, (block, ref_block) in enumerate(zip(accel.repeated_blocks(model), blocks)):
        layers = [m for m in block.modules() if isinstance(m, Fp8Linear)]
        ref_layers = [m for m in ref_block.modules() if isinstance(m, Fp8Linear)]
        assert len(layers) == len(ref_layers) > 0
        if i in offload:     # an empty placeholder on the device, the exact fp8 weight on the host
            assert all(m.w8.numel() == 0 for m in layers)
            host = [cpu for _, cpu in offloader.host[i]]
            assert all(torch.equal(h.view(torch.uint8), r.w8.view(torch.uint8)) for h, r in zip(host, ref_layers))
        else:
            assert all(torch.equal(m.w8.view(torch.uint8), r.w8.view(torch.uint8)) for m, r in zip(layers, ref_layers))

    # control: the order that ran out of memory (quantise everything, then park) breaks the same bound
    control = tiny_flux_with_lora()
    peak = _tracked(monkeypatch, control)
    accel.store_frozen_linears_in_fp8(control, torch.bfloat16, device="cpu")
    parker = accel.BlockOffloader(accel.repeated_blocks(control), offload, "cpu")
    for i in offload:
        parker.park(i)
    assert peak[0] == total > bound


def test_placement_without_offload_quantises_everything_in_place():
    model = tiny_flux_with_lora()
    reference = copy.deepcopy(model)
    accel.store_frozen_linears_in_fp8(reference, torch.bfloat16)
    assert accel.place_frozen_weights(model, accel.PerfPlan("memory", fp8=True), "cpu", torch.bfloat16) is None
    assert _resident_fp8_elements(model) == _resident_fp8_elements(reference) > 0
    plain = tiny_flux_with_lora()
    assert accel.place_frozen_weights(plain, accel.PerfPlan("speed"), "cpu", torch.bfloat16) is None
    assert _resident_fp8_elements(plain) == 0
    with pytest.raises(ValueError, match="fp8"):
        accel.place_frozen_weights(tiny_flux_with_lora(), accel.PerfPlan("low-vram", offload_blocks=1), "cpu",
                                   torch.bfloat16)


def test_cuda_graph_trade_off_follows_the_measured_runs():
    """`auto`'s CUDA-graph rule uses the costs measured on one H200 (two rows of the fast recipe, same machine and
    commit, with and without graphs): the step time graphs save and the start-up they add per token count. Start-up
    = compilation + the part of the training phase that is not steady steps (where the graphs are recorded)."""
    rows = {}
    for name in ("gpu-acceptance-20261203-092015.json", "gpu-acceptance-20261203-092325.json"):
        row = json.loads((RESULTS / name).read_text())["rows"][0]
        rows[row["id"]] = row
    graphs, plain = rows["whole-flux-fast-recipe-short"], rows["whole-flux-fast-recipe-short-nographs"]

    def start_up(row):
        t = row["timing"]
        return t["compile_s"] + t["train_s"] - t["steps"] * t["step_s"]

    saved = plain["step_s"] - graphs["step_s"]
    shapes = 3                                  # the recipe's 5 buckets carry 3 token counts
    per_shape = (start_up(graphs) - start_up(plain)) / shapes
    assert perfmodel.CUDA_GRAPH_SAVED_S_PER_STEP == pytest.approx(saved, rel=0.05)
    assert perfmodel.CUDA_GRAPH_RECORD_S_PER_SHAPE == pytest.approx(per_shape, rel=0.05)
    # the decision at its boundary: 3 token counts pay off from about 870 steps; one shape always does
    breakeven = shapes * per_shape / saved
    assert perfmodel.graphs_pay_off(shapes, int(breakeven * 1.05)) and perfmodel.graphs_pay_off(shapes, 1500)
    assert not perfmodel.graphs_pay_off(shapes, int(breakeven * 0.95)) and not perfmodel.graphs_pay_off(shapes, 100)
    assert perfmodel.graphs_pay_off(1, 10)
