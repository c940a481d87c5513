"""Issue #17: can diffusion-pipe's FLUX.1 loss become NaN at step 2 without a GPU kernel? A CPU probe.

On one H200, diffusion-pipe 8f83dbf trained lora-run's tiny random FLUX.1 folder with the config lora-run
generates and logged a finite loss at step 1 and `nan` at step 2 (fp8 and bf16 base; the recording is in
tests/diffusion_pipe/fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261202/). This runs the same training on the
CPU with as much of the engine's own code as imports without CUDA, and reports per step the loss, the gradient
norm before DeepSpeed's clipping, whether any gradient or LoRA weight is non-finite, and the learning rate:

- the config: written by lora-run's own planner (the diffusion-pipe backend) from the GPU run's command line
  (the first line of its recorded console log: recipes/flux/identity-fast.toml with its --set/--unset list;
  tests/diffusion_pipe/test_nan_probe.py checks it is the recorded flux_config.toml), then read as train.py
  reads it (`toml` → json round trip) and passed through train.py's own `set_config_defaults`;
- the model: diffusion-pipe's `models/flux.py` `FluxPipeline` (diffusers folder, transformer_dtype cast, KEEP_IN_
  HIGH_PRECISION), its `configure_adapter` (peft LoRA, alpha = rank, trainable weights cast to the adapter
  dtype), `prepare_inputs` (logit-normal σ, x_t, target), `to_layers` and `get_loss_fn`, after its
  `utils/patches.apply_patches()` (the peft dtype patch, DeepSpeed's train schedule and its gradient clipping);
- the cache: latents and text embeddings made by the pipeline's own `get_call_vae_fn` / `get_call_text_encoder_fn`
  from random images in the GPU run's two buckets (512×512 and 576×448), with captions;
- the engine: DeepSpeed's PipelineEngine (CPU accelerator, one-process gloo group) built from diffusion-pipe's
  `ManualPipelineModule` with the same ds_config keys, activation checkpointing and communication dtype as
  train.py; the optimizer from train.py's own `get_optimizer` and the lr schedule from its own statements
  (both taken from the checkout's train.py source with `ast` and executed; nothing is copied here), stepped by
  `model_engine.train_batch`, as train.py's loop does.

What differs from the GPU: the CPU kernels, and `torch.autocast('cuda', bf16)` in models/flux.py runs as CPU
autocast (`--precision autocast`, the default; CPU autocast's fp32 op list is shorter than CUDA's) or not at all
(`--precision fp32`: the base in float32, every op in float32). The ComfyUI and HunyuanVideo submodules are
replaced by empty stand-in modules (diffusion-pipe's FLUX path imports them but calls nothing in them), and
torchvision/torchaudio by stand-ins when they are not installed (only the media loader uses them).

usage: lora-run's venv, plus diffusion-pipe's other packages in a folder on PYTHONPATH, and diffusion-pipe's
source at 8f83dbf (its Python files are enough; no submodules):
    pip install --no-deps --target /tmp/dpsite diffusers==0.36.0 einops toml hjson py-cpuinfo msgpack ninja \
        multiprocess dill httpx httpcore          # and, with DS_BUILD_OPS=0 set: deepspeed==0.18.4
    git archive 8f83dbf25d03219df705570ec03e62be04bc402f | tar x -C /tmp/dp   # (or a checkout)
    DS_ACCELERATOR=cpu PYTHONPATH=/tmp/dpsite python bench/engine_dpipe_nan_cpu.py /tmp/dp --work /tmp/nanprobe \
        [--steps 24] [--base fp8|bf16] [--adapter-dtype float32|bfloat16] [--precision autocast|fp32] \
        [--lr 1e-4] [--warmup 2] [--clip 1.0] [--seed 0] [--start 0|1] [--sdpa math|flash|efficient|cudnn] \
        [--device cpu|cuda] [--json out.json]
The options change one thing each against the GPU run's config (defaults: as recorded, fp8 base). On a GPU
(`--device cuda`, not yet run) the same training with `--sdpa cudnn` against `--sdpa flash` would test the
suspected kernel directly. It prints
DeepSpeed's own step lines, one JSON line per step and a verdict line; the exit code is 0 when every loss,
gradient and LoRA weight stayed finite, 1 when one did not. The runs of 2026-12-03 are in
bench/results/engine-dpipe-nan-cpu-20261203.json and docs/backend-diffusion-pipe.md ("The step-2 NaN on the CPU").
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "diffusion_pipe" / "fixtures" / "diffusion-pipe-8f83dbf" / "gpu-h200-20261202"
BUCKETS = [(512, 512), (576, 448)]  # the GPU run's two buckets (width, height), four images each


def stand_in(name: str, **attrs) -> types.ModuleType:
    """An empty module registered under `name` (and its parents), with the given attributes."""
    parts = name.split(".")
    from importlib.machinery import ModuleSpec

    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) not in sys.modules:
            module = types.ModuleType(".".join(parts[:i]))
            module.__spec__ = ModuleSpec(module.__name__, None)  # (importlib.util.find_spec must not fail on it)
            sys.modules[module.__name__] = module
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[".".join(parts[:i])])
    module = sys.modules[name]
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def install_stand_ins() -> None:
    """What diffusion-pipe's FLUX path imports from ComfyUI/HunyuanVideo (names only; none of it is called).
    transformers and diffusers are imported first, so that they see torchvision as missing, not as a stand-in."""
    import diffusers
    import transformers
    import transformers.image_utils  # noqa: F401
    diffusers.FluxPipeline, transformers.CLIPTextModel  # noqa: B018  (their lazy imports, before the stand-ins)
    dummy = type("Dummy", (), {})
    stand_in("comfy.utils"); stand_in("comfy.sd")
    stand_in("comfy.sd1_clip", SD1Tokenizer=dummy, ClipTokenWeightEncoder=type("CTWE", (), {}),
             gen_empty_tokens=lambda *a, **k: None)
    stand_in("comfy.model_management", in_training=False, EXTRA_RESERVED_VRAM=0)
    stand_in("comfy_api.latest", InputImpl=dummy)
    stand_in("comfy.ldm.flux.layers", DoubleStreamBlock=type("DSB", (), {}), SingleStreamBlock=type("SSB", (), {}),
             apply_mod=lambda *a, **k: None)
    stand_in("comfy.ldm.flux.math", attention=lambda *a, **k: None)
    stand_in("hyvideo.text_encoder", load_text_encoder=None)
    stand_in("hyvideo.constants", PRECISION_TO_TYPE={}, TEXT_ENCODER_PATH={})
    for optional in ("torchvision", "torchaudio"):
        try:
            __import__(optional)
        except ImportError:
            stand_in(optional); stand_in(f"{optional}.transforms", Compose=lambda *a, **k: None, ToTensor=dummy)
            stand_in(f"{optional}.transforms.functional")


SDPA = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def attention_backend(name: str | None):
    """A context in which scaled_dot_product_attention may use only backend `name` (forward and backward)."""
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, SDPA[name])])


def redirect_cuda_autocast(precision: str) -> None:
    """models/flux.py decorates every layer with torch.autocast('cuda', …): run it as CPU autocast, or off."""
    import torch

    base = torch.amp.autocast_mode.autocast

    class CpuAutocast(base):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cuda":
                device_type = "cpu"
                enabled = enabled and precision == "autocast"
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    torch.autocast = CpuAutocast


def main_block_pieces(train_py: Path) -> dict[str, object]:
    """train.py's own set_config_defaults, DummyOptimizer, get_optimizer and lr-scheduler statements, as code."""
    tree = ast.parse(train_py.read_text("utf-8"))
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ("set_config_defaults", "DummyOptimizer"):
            found[node.name] = node
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.FunctionDef) and stmt.name == "get_optimizer":
                    found["get_optimizer"] = stmt
                if ast.unparse(stmt).startswith("scheduler_type = "):
                    start = i
                if ast.unparse(stmt).startswith("model_engine.lr_scheduler = lr_scheduler"):
                    found["scheduler"] = body[start:i + 1]
    missing = {"set_config_defaults", "DummyOptimizer", "get_optimizer", "scheduler"} - set(found)
    if missing:
        raise SystemExit(f"train.py at {train_py} has no {sorted(missing)}: not the pinned diffusion-pipe")
    return found


def run_code(nodes, namespace: dict) -> dict:
    nodes = nodes if isinstance(nodes, list) else [nodes]
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "<diffusion-pipe train.py>", "exec"), namespace)
    return namespace


def make_dataset(folder: Path, seed: int = 0) -> Path:
    """8 random-noise images with captions, four per GPU-run bucket."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(8):
        w, h = BUCKETS[i % 2]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"ohwx, a photo number {i}")
    return folder


def recorded_command(base: str, data: Path, flux: Path) -> tuple[Path, list[str], list[str]]:
    """The recipe, --set and --unset list of the GPU run (the first line of its recorded console log), with this
    machine's dataset and model folder for `<data>` and `<models>/…`; the checkout and launcher are left out
    (they are not part of the configs)."""
    import shlex

    words = shlex.split((RECORDED / f"flux_{base}_console.log").read_text("utf-8").splitlines()[0].lstrip("$ "))
    recipe = ROOT / words[words.index("lora_run.cli") + 1].replace("<lora-run>/", "")
    sets, unsets = [], []
    for flag, value in zip(words, words[1:]):
        if flag == "--unset":
            unsets.append(value)
        elif flag == "--set" and not value.startswith(("backend.diffusion-pipe.path=",
                                                        "backend.diffusion-pipe.deepspeed=")):
            sets.append(value.replace("<data>", str(data)).replace("<models>/flux-diffusers-reduced", str(flux)))
    return recipe, sets, unsets


def generated_config(run_dir: Path, flux: Path, data: Path, base: str) -> tuple[str, str]:
    """lora-run's own diffusion-pipe configs (main, dataset) for the GPU run's command line (`base`: fp8 or bf16)."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import make_backend, validate
    from lora_run_rundir import RunDir

    recipe, sets, unsets = recorded_command(base, data, flux)
    plugins = load_plugins()
    prepared = validate(load_recipe(recipe, sets, unsets), plugins)
    plan = make_backend(prepared, plugins, run_dir=RunDir(run_dir)).plan()
    return plan.files["diffusion-pipe/config.toml"], plan.files["diffusion-pipe/dataset.toml"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="diffusion-pipe checkout (or git archive) at 8f83dbf")
    p.add_argument("--work", type=Path, default=Path("/tmp/dpipe-nan-probe"))
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--base", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default=None,
                   help="override [adapter] dtype (lora-run writes float32)")
    p.add_argument("--lr", type=float, default=None, help="override [optimizer] lr")
    p.add_argument("--warmup", type=int, default=None, help="override warmup_steps")
    p.add_argument("--clip", type=float, default=None, help="override gradient_clipping")
    p.add_argument("--precision", choices=["autocast", "fp32"], default="autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0,
                   help="index of the first cached image (1: the 576×448 bucket first)")
    p.add_argument("--sdpa", choices=sorted(SDPA), default=None,
                   help="allow only this scaled_dot_product_attention backend in every step (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the same probe on one GPU (models/flux.py's CUDA autocast as written, NCCL); untested")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and a.precision != "autocast":
        p.error("--precision fp32 is for the CPU (on a GPU, models/flux.py's autocast runs as written)")

    if a.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1")):
        os.environ.setdefault(key, value)
    import toml
    import torch

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    flux = work / "flux-diffusers-reduced"
    if not (flux / "model_index.json").is_file():
        from lora_run_flux.tiny import build_tiny_flux
        build_tiny_flux(flux)
    data = make_dataset(work / "data" / "subject")
    main_text, dataset_text = generated_config(work / "run", flux, data, a.base)
    (work / "config.toml").write_text(main_text)
    (work / "dataset.toml").write_text(dataset_text)

    source = a.source.resolve()
    os.chdir(source)
    sys.path.insert(0, str(source))
    install_stand_ins()
    if a.device == "cpu":
        redirect_cuda_autocast(a.precision)
    pieces = main_block_pieces(source / "train.py")

    from utils import common
    config = json.loads(json.dumps(toml.loads(main_text)))   # as train.py reads it
    if a.adapter_dtype:
        config["adapter"]["dtype"] = a.adapter_dtype
    if a.lr is not None:
        config["optimizer"]["lr"] = a.lr
    if a.warmup is not None:
        config["warmup_steps"] = a.warmup
    if a.clip is not None:
        config["gradient_clipping"] = a.clip
    if a.precision == "fp32":
        config["model"]["dtype"] = "float32"
    ns = run_code([pieces["set_config_defaults"]], {"DTYPE_MAP": common.DTYPE_MAP})
    ns["set_config_defaults"](config)
    common.AUTOCAST_DTYPE = config["model"]["dtype"]

    import deepspeed
    deepspeed.utils.set_log_level_from_string("info")  # as train.py does: its optimizer and step=N lines
    from utils.patches import apply_patches
    apply_patches()
    if a.device == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="gloo" if a.device == "cpu" else "nccl")
    torch.manual_seed(a.seed)

    from models import flux as dp_flux
    model = dp_flux.FluxPipeline(config)
    if a.precision == "fp32":  # no autocast to upcast fp8 weights in F.linear: hold the fp8-rounded values in fp32
        for q in model.transformer.parameters():
            if q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                q.data = q.data.to(torch.float32)

    # cache, as utils/dataset.py's caching pass does: the VAE and both text encoders of the pipeline
    from PIL import Image
    import numpy as np
    vae_fn = model.get_call_vae_fn(model.vae)
    clip_fn = model.get_call_text_encoder_fn(model.text_encoder)
    t5_fn = model.get_call_text_encoder_fn(model.text_encoder_2)
    items = []
    with torch.no_grad():
        for image in sorted(data.glob("*.png")):
            pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
            caption = [image.with_suffix(".txt").read_text()]
            item = {"latents": vae_fn(pixels.unsqueeze(0))["latents"]}
            item.update(clip_fn(caption, [False]))
            item.update(t5_fn(caption, [False]))
            item["mask"] = None
            items.append(item)

    model.load_diffusion_model()
    model.configure_adapter(config["adapter"])
    layers = model.to_layers()
    from functools import partial

    from utils.pipeline import ManualPipelineModule
    pipeline_model = ManualPipelineModule(
        layers=layers, num_stages=config.get("pipeline_stages", 1),
        partition_method=config.get("partition_method", "parameters"),
        manual_partition_split=config.get("partition_split", [len(layers) / config.get("pipeline_stages", 1)]),
        loss_fn=model.get_loss_fn(), dynamic_shape=True,
        **({"activation_checkpoint_interval": 1, "checkpointable_layers": model.checkpointable_layers,
            "activation_checkpoint_func": partial(torch.utils.checkpoint.checkpoint,
                                                  use_reentrant=config["reentrant_activation_checkpointing"])}
           if config["activation_checkpointing"] else {}))
    model.pipeline_model = pipeline_model
    parameters_to_train = [q for q in pipeline_model.parameters() if q.requires_grad]
    ds_config = {"train_micro_batch_size_per_gpu": config.get("micro_batch_size_per_gpu", 1),
                 "gradient_accumulation_steps": config.get("gradient_accumulation_steps", 1),
                 "gradient_clipping": config.get("gradient_clipping", 1.0),
                 "steps_per_print": config.get("steps_per_print", 1)}
    model_engine, _, _, _ = deepspeed.initialize(model=pipeline_model, config=ds_config)
    model_engine._support_torch_style_backward = True
    global_batch_size = model_engine.train_micro_batch_size_per_gpu() * model_engine.gradient_accumulation_steps()

    import inspect
    opt_ns = run_code(pieces["DummyOptimizer"], {"torch": torch, "defaultdict": __import__("collections").defaultdict})
    opt_ns.update(config=config, global_batch_size=global_batch_size, inspect=inspect, deepspeed=deepspeed,
                  torch=torch, model=model, pipeline_model=pipeline_model)
    run_code(pieces["get_optimizer"], opt_ns)
    model_engine._configure_optimizer(opt_ns["get_optimizer"], parameters_to_train)
    optimizer = model_engine.optimizer
    model_engine.communication_data_type = (config["lora"]["dtype"] if "lora" in config
                                            else config["model"]["dtype"])  # as train.py sets it
    sched_ns = {"config": config, "torch": torch, "optimizer": optimizer, "model_engine": model_engine,
                "steps_per_epoch": 4}  # (read only by the linear and cosine schedules)
    run_code(pieces["scheduler"], sched_ns)

    # observe the step: the gradient before DeepSpeed's clipping, after it, and the weights after AdamW
    record: dict[str, float | bool] = {}
    clip = type(model_engine).clip_fp32_gradients

    def observed_clip(self):
        grads = [q.grad for q in parameters_to_train if q.grad is not None]
        record["grad_max_abs"] = max(float(g.detach().abs().max()) for g in grads)
        record["grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        record["grad_finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
        return clip(self)
    type(model_engine).clip_fp32_gradients = observed_clip
    step_fn = optimizer.step

    def observed_step(*args, **kwargs):
        record["lr_used"] = optimizer.param_groups[0]["lr"]
        out = step_fn(*args, **kwargs)
        record["weights_finite"] = all(bool(torch.isfinite(q).all()) for q in parameters_to_train)
        record["max_abs_lora_B"] = max(float(q.detach().abs().max()) for q in parameters_to_train
                                       if "lora_B" in getattr(q, "original_name", ""))
        return out
    optimizer.step = observed_step

    # train.py's loop: one micro-batch per step (batch size 1, no accumulation); utils/dataset.py's split_batch
    # turns the None mask into an empty tensor; the buckets take turns, as the GPU run's two buckets may
    rows, ok = [], True
    for step in range(1, a.steps + 1):
        item = items[(a.start + step - 1) % len(items)]
        batch = {k: (v if v is None else v.detach().clone()) for k, v in item.items()}
        features, (target, mask) = model.prepare_inputs(batch)
        micro = (tuple(features), (target, torch.tensor([]) if mask is None else mask))
        record.clear()
        model_engine.reset_activation_shape()
        with attention_backend(a.sdpa):
            loss = model_engine.train_batch(iter([micro])).item()
        row = {"step": step, "latent_hw": list(item["latents"].shape[-2:]), "loss": loss, **record,
               "lr_after": optimizer.param_groups[0]["lr"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not (math.isfinite(loss) and row.get("grad_finite", True) and row.get("weights_finite", True)):
            ok = False
            break
    verdict = {"finite": ok, "steps": len(rows), "base": a.base, "precision": a.precision,
               "device": a.device, "sdpa": a.sdpa or "default", "adapter_dtype": str(config["adapter"]["dtype"]),
               "lr": config["optimizer"]["lr"],
               "warmup_steps": config["warmup_steps"], "gradient_clipping": ds_config["gradient_clipping"],
               "base_weight_dtypes": sorted({str(q.dtype) for q in pipeline_model.parameters()
                                             if not q.requires_grad}),
               "lora_weight_dtypes": sorted({str(q.dtype) for q in parameters_to_train}),
               "optimizer": type(optimizer).__name__, "optimizer_defaults": {
                   k: (list(v) if isinstance(v, tuple) else v) for k, v in optimizer.defaults.items()
                   if isinstance(v, (int, float, bool, tuple, list, type(None)))},
               "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "diffusers": __import__("diffusers").__version__, "peft": __import__("peft").__version__}
    print("[verdict] " + json.dumps(verdict), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"verdict": verdict, "steps": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
