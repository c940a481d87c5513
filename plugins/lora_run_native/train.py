"""The native training loop, shared by every model family (the family specifics live in the adapter).

Order of work: buckets and epoch plan → latent and text caches (encoders loaded only for misses, unloaded
before training) → ``prepare_transformer`` (dtype, fp8 storage, gradient checkpointing, LoRA) → optional
text-encoder LoRA → optimizer and LR schedule → resume → steps → final LoRA files.

Determinism: every optimizer step reseeds python/numpy/torch from (seed, step) and draws noise and σ from a
CPU generator seeded by (seed, step, micro-batch); the data order is a pure function of (seed, epoch). So
a run resumed from a checkpoint continues exactly as the uninterrupted run would have (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from lora_run.errors import BackendError, DatasetError, OutputError, RecipeError, TrainingInterrupted
from lora_run.files import shown
from lora_run.recipe import resume_command, to_dict
from lora_run_folder.images import ImageProblem, open_rgb
from lora_run_folder.lint import file_key
from lora_run_rundir.provenance import digest_soon
from lora_run_training import NonFiniteLoss
from lora_run_training.sections import loss_options

from . import checkpoint as ckpt
from .cache import Cache, entry_key, fits_shapes, latent_geometry, odd_latents, odd_texts, text_hash
from .data import EpochPlanner, choose_bucket, image_to_tensor, make_buckets, prepare_image
from .outputs import lora_files_bytes, lora_state_dict, run_metadata, trainable_parameters, write_loras
from .perfmodel import allocator_cap_gib

MASK64 = (1 << 63) - 1


def step_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed derived from the run seed and step/micro-batch numbers (stable across runs)."""
    import hashlib

    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & MASK64


def reseed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- transformer
def prepare_transformer(adapter: Any, transformer: Any, recipe: Any, device: Any,
                        bucket_sizes: set[tuple[int, int]] | None = None, echo: Any = None,
                        sharded: bool = False, one_process: bool = True) -> Any:
    """The one place the transformer is set up for training: storage dtype (fp8 via diffusers' layerwise
    casting), gradient checkpointing, device placement and LoRA injection (seeded). Returns the transformer
    with only the LoRA parameters trainable, in fp32.

    On CUDA with mixed precision, `train.memory_mode` picks a speed / memory / low-vram plan (accel.py,
    perfmodel.py) for the largest bucket; that plan decides compile, fp8 storage, checkpointing, offload.
    """
    import torch

    compute = adapter.compute_dtype
    transformer.requires_grad_(False)
    transformer.to(dtype=compute)
    if torch.device(device).type == "cuda" and recipe.train.mixed_precision != "no":
        return _prepare_cuda(adapter, transformer, recipe, device, bucket_sizes, echo or print, sharded, one_process)
    if recipe.model.base_precision == "fp8" and not recipe.train.fp8_matmul:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    if recipe.train.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(transformer)
    transformer.to(device)
    targets = adapter.lora_target_modules(transformer, recipe.lora.targets, recipe.lora.modules)
    torch.manual_seed(step_seed(recipe.train.seed, "lora-init"))
    adapter.inject_lora(transformer, targets, rank=recipe.lora.rank, alpha=recipe.lora.alpha,
                        dropout=recipe.lora.dropout, init=recipe.lora.init)
    for name, p in transformer.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.to(device=device, dtype=torch.float32)
            p.requires_grad_(True)
    if recipe.train.fp8_matmul:        # the frozen base stored in fp8, its matmuls float8 (the LoRA's stay)
        check_fp8_matmuls(device)
        from . import accel

        accel.store_frozen_linears_in_fp8(transformer, compute, device=device)
        accel.use_fp8_matmuls(transformer)
    transformer.train()
    return transformer


def gpu_budget_gib(recipe: Any, device: Any) -> tuple[float, str]:
    """The GPU memory this run may still use (GiB) and where that figure comes from: the free memory, capped
    by ``[train] gpu_memory_gib`` (less what this process already holds)."""
    import torch

    free_bytes, _total = torch.cuda.mem_get_info(device)
    free = free_bytes / 2**30
    cap = recipe.train.gpu_memory_gib
    if cap is None:
        return free, f"{free:.1f} GiB free"
    held = torch.cuda.memory_reserved(device) / 2**30
    return min(free, allocator_cap_gib(cap) - held), f"[train.gpu_memory_gib] = {cap:g} GiB"


def cap_gpu_memory(recipe: Any, device: Any) -> None:
    """Cap this process's CUDA allocator at ``[train] gpu_memory_gib`` (a smaller card, a shared GPU): an
    allocation past it fails as it would on a card of that size, in caching, training and sampling alike."""
    import torch

    cap = recipe.train.gpu_memory_gib
    if cap is None or torch.device(device).type != "cuda":
        return
    # Under a cap, fragmentation is what runs out first: the acceptance run at 12 GiB (1024², low-vram) died
    # with 8.0 GiB allocated and 4.0 GiB reserved but unused. Expandable segments let the allocator grow
    # and reuse one mapping instead (it must be chosen before this process's first CUDA allocation).
    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # torch >= 2.10 names the setter torch._C._accelerator_setAllocatorSettings (the old name warns)
        setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
                  or getattr(torch.cuda.memory, "_set_allocator_settings", None))
        try:
            if setter is not None:
                setter("expandable_segments:True")
        except Exception:  # noqa: BLE001 - an allocator without the setting keeps its default
            pass
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_cap_gib(cap) / total), index)


def _prepare_cuda(adapter: Any, transformer: Any, recipe: Any, device: Any,
                  bucket_sizes: set[tuple[int, int]] | None, echo: Any, sharded: bool = False,
                  one_process: bool = True) -> Any:
    """CUDA: LoRA first (on the host), then the memory_mode plan for the model actually loaded: fp8 storage
    before the move to the GPU, then compile / checkpointing / offload of the repeated blocks. A plan whose
    estimate exceeds the memory this run may use stops here, before any training (exit 2). Under FSDP
    (`sharded`) the base is sharded instead: no fp8 storage, offload or compiled blocks, and the estimate
    (of one unsharded replica) is shown but not enforced."""
    import torch

    from . import accel, memory, perfmodel
    from .memory import step_shapes

    r = recipe
    sizes = bucket_sizes or {(r.dataset.resolution, r.dataset.resolution)}
    height, width = max(sizes, key=lambda s: s[0] * s[1])
    targets = adapter.lora_target_modules(transformer, r.lora.targets, r.lora.modules)
    torch.manual_seed(step_seed(r.train.seed, "lora-init"))
    adapter.inject_lora(transformer, targets, rank=r.lora.rank, alpha=r.lora.alpha, dropout=r.lora.dropout,
                        init=r.lora.init)
    lora_count = 0
    for name, p in transformer.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.to(dtype=torch.float32)
            p.requires_grad_(True)
            lora_count += p.numel()
    shape = perfmodel.shape_of_model(r.model.family, transformer, lora_count, r.lora.rank, r.lora.targets)
    # the compiled blocks see (batch, tokens, width): buckets with one token count (a bucket and its transpose)
    # share their graphs, so the plan counts token counts, not bucket sizes
    graph_shapes = perfmodel.graph_shapes(r.model.family, sizes, shape)
    available, source = gpu_budget_gib(r, device)
    plan = perfmodel.choose_mode(r.train.memory_mode, r.model.family, height, width, r.train.batch_size, r.lora.rank,
                                 r.lora.targets, available, fp8_requested=r.model.base_precision == "fp8",
                                 compile=r.train.compile != "off", buckets=graph_shapes, shape=shape,
                                 cuda_graphs=r.train.cuda_graphs, dropout=r.lora.dropout, steps=r.train.steps,
                                 fp8_matmul=r.train.fp8_matmul,
                                 step_shapes=step_shapes(r, len(sizes), one_process and not sharded))
    if sharded:        # FSDP shards the frozen base itself: no fp8 storage, offload or compiled blocks under it
        plan = attrs.evolve(plan, fp8=False, fp8_matmul=False, offload_blocks=0, compile=False)
        if r.train.fp8_matmul:
            echo("warning: [train.fp8_matmul] is not used under FSDP (the sharded base stays bf16)")
    if plan.fp8_matmul:        # after FSDP's say: a sharded run on an older GPU goes ahead in bf16
        check_fp8_matmuls(device)
    estimate = perfmodel.estimate_peak_gib(r.model.family, height, width, r.train.batch_size, r.lora.rank,
                                           r.lora.targets, plan, shape, dropout=r.lora.dropout)
    if not perfmodel.fits(estimate, available) and not sharded:
        # an explicit mode on the free memory (no cap) is the user's call: it trains, warned (the model errs either way)
        stops = r.train.gpu_memory_gib is not None or r.train.memory_mode == "auto"
        message = memory.refusal(r, plan, estimate, available, source, shape, (height, width),
                                 perfmodel.STOPPED if stops else perfmodel.WARNED)
        if stops:
            raise RecipeError(message)
        echo("warning: " + message)
    # layer by layer on the GPU, offloaded blocks straight back to pinned host memory: the bf16 model never sits
    # on the GPU whole, nor do the offloaded blocks' fp8 weights (an 8 GiB card holds neither)
    offloader = accel.place_frozen_weights(transformer, plan, device, adapter.compute_dtype)
    accel.configure_cuda()
    kernel = choose_attention(transformer, r, device, tokens=perfmodel.tokens(r.model.family, height, width, shape)
                              * r.train.batch_size,
                              graphs=plan.compile and (plan.compile_mode == "reduce-overhead" or plan.step_graphs))
    accel.apply(transformer, plan, device, adapter.compute_dtype, offloader=offloader)
    reasons = (["the fastest plan that fits"] if r.train.memory_mode == "auto" else []) + perfmodel.setting_notes(
        plan, r.model.base_precision == "fp8", r.train.gradient_checkpointing)
    if (plan.mode == "speed" and plan.compile and plan.compile_mode != "reduce-overhead" and not plan.step_graphs
            and r.train.cuda_graphs == "auto" and not perfmodel.graphs_pay_off(graph_shapes, r.train.steps)):
        reasons.append(f"no CUDA graphs: recording them for {graph_shapes} token counts of the buckets (about "
                       f"{perfmodel.CUDA_GRAPH_RECORD_S_PER_SHAPE * graph_shapes:.0f} s) would outlast what "
                       f"{r.train.steps} steps win back")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    echo(f"GPU plan ({r.train.memory_mode}): {plan.describe()}{why}; {kernel.describe()}; estimated peak "
         f"{estimate:.1f} GiB of {available:.1f} GiB available ({source}), largest bucket {width}x{height}")
    transformer._lora_run_plan = {"plan": plan.describe(), "estimate_gib": round(estimate, 2),
                                  "available_gib": round(available, 2), "budget": source,
                                  "attention": kernel.kernel, "attention_reason": kernel.reason}
    transformer.train()
    return transformer


def check_fp8_matmuls(device: Any) -> None:
    """`[train] fp8_matmul` needs float8 GEMMs: a CUDA GPU of compute capability 8.9 (Ada) or newer, or the CPU
    (torch's reference GEMM, for tests); anything else stops the run before training (exit 2)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RecipeError(f"[train.fp8_matmul] float8 matmuls need a GPU of compute capability 8.9 or newer (Ada, "
                          f"Hopper, Blackwell); this {name} has {torch.cuda.get_device_capability(device)}; nothing "
                          "was trained. Set it to false")
    if device.type not in ("cuda", "cpu"):
        raise RecipeError(f"[train.fp8_matmul] float8 matmuls run on CUDA GPUs (and the CPU), not on "
                          f"\"{device.type}\"; nothing was trained. Set it to false")


def choose_attention(transformer: Any, recipe: Any, device: Any, tokens: int | None = None,
                     graphs: bool = False) -> Any:
    """The attention kernel of this run (attention.py): FlashAttention-4 where it runs and passes its start-up
    check, else SDPA flash. `[train] attention = "fa4"` stops the run (exit 2) when FA4 cannot run."""
    from .attention import setup

    choice = setup(transformer, recipe.train.attention, device, tokens=tokens, graphs=graphs)
    if recipe.train.attention == "fa4" and choice.kernel != "fa4":
        raise RecipeError(f"[train.attention] \"fa4\": FlashAttention-4 cannot run here: {choice.reason}; nothing "
                          "was trained. Use \"auto\" (falls back to SDPA) or \"sdpa\"")
    return choice


def make_optimizer(recipe: Any, groups: list[dict[str, Any]], on_cuda: bool) -> Any:
    o = recipe.optimizer
    if o.name == "adafactor":      # transformers' update rule, grouped kernels (optim.py)
        from .optim import make_adafactor

        return make_adafactor(groups, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        import torch

        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 **({"fused": True} if on_cuda else {}))
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RecipeError("[optimizer.name] \"adamw8bit\" needs the bitsandbytes package (pip install "
                              "bitsandbytes); or use \"adamw\" / \"adafactor\"") from None
        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise RecipeError("[optimizer.name] \"prodigy\" needs the prodigyopt package (pip install prodigyopt); "
                          "or use \"adamw\" / \"adafactor\"") from None
    return Prodigy(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_lambda(recipe: Any, total_steps: int) -> Any:
    s = recipe.scheduler
    warm, floor = s.warmup_steps, s.min_lr_ratio

    def factor(step: int) -> float:
        if s.name == "constant":
            return 1.0
        if step < warm:
            return step / max(1, warm)
        if s.name == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if s.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)
    return factor


# ------------------------------------------------------------------------------------------ setup state
@attrs.define
class RunEnv:
    """`Trainer.setup_environment`: where the run executes."""

    accelerator: Any
    device: Any
    world: int                      # data-parallel processes (1 without a launcher)
    timing: dict[str, Any]          # the manifest's artifacts.timing, filled phase by phase
    phase: float                    # perf_counter at the start of the current phase


@attrs.define
class DataState:
    """`Trainer.setup_data`: what is trained on, and for how long."""

    adapter: Any                    # the family adapter (encoders, transformer loading, objective)
    buckets_of: list[tuple[int, int]]
    planner: EpochPlanner
    total: int                      # optimizer steps
    te_train: bool
    te_stop: int                    # the text-encoder LoRA trains for steps < te_stop
    latents: dict[int, Any]         # item index → cached latent
    texts: dict[str, dict[str, Any]]    # caption → cached text encodings


@attrs.define
class ModelState:
    """`Trainer.setup_model`: the networks being trained."""

    transformer: Any
    te_module: Any | None
    te_params: dict[str, Any]


@attrs.define
class OptimState:
    """`Trainer.setup_optimization`: how the LoRA is updated."""

    optimizer: Any
    scheduler: Any
    forward: Any                    # the transformer, or its data-parallel wrapper
    params: dict[str, Any]          # the transformer's LoRA parameters (after any wrap)
    loss_fn: Any
    ckpt_root: Path


@attrs.define
class LoopState:
    """Everything the training loop, checkpoints, samples and the finish read."""

    adapter: Any
    transformer: Any
    forward: Any
    te_module: Any | None
    params: dict[str, Any]
    te_params: dict[str, Any]
    optimizer: Any
    scheduler: Any
    planner: EpochPlanner
    latents: dict[int, Any]
    texts: dict[str, dict[str, Any]]
    loss_fn: Any
    accelerator: Any
    total: int
    te_stop: int
    ckpt_root: Path
    counts: dict[str, Any]
    epoch_cache: tuple[int, list] = (-1, [])
    losses: list[float] = attrs.Factory(list)
    step_graphs: Any = None         # `StepGraphs` when `[train] cuda_graphs = "step"` applies


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One native training run (``NativeBackend.run`` creates and runs it)."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        process = getattr(ctx, "process", None)
        self.main = process is None or process.main     # rank 0 (or the only process) writes
        self.recipe = ctx.recipe
        self.options = ctx.options
        self.run_dir = ctx.run_dir
        self.shown = ctx.loaded.shown if ctx.loaded else "recipe.toml"
        self.echo = ctx.echo
        self.stop_requested = False
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if ctx.resume and hasattr(self.run_dir, "read_manifest"):  # the LoRA's `training_started_at`: the run's start
            first = self.run_dir.read_manifest().get("started_at")
            if isinstance(first, str) and first:
                self.started_at = first
        self.last_checkpoint: Path | None = None
        self.first_loss: float | None = None        # step 1's loss (a resumed run: from its checkpoint)
        self.step_times: list[tuple[Any, float]] = []     # (batch shape, seconds) of each optimizer step
        self.sample_rounds: list[float] = []        # seconds of each sample round
        self.checkpoint_seconds = 0.0              # the training thread's time on checkpoints (copies, waits)
        self.checkpoint_write_seconds = 0.0        # the checkpoints' writes, on their own thread
        self.checkpoint_writing: tuple[Any, Any, Path] | None = None    # (ckpt.Writing, its folder scope, root)
        self.round_marks: list[int] = []            # how many steps had run at each sample or checkpoint round

    # ---------------------------------------------------------------------------------------- setup
    def _accelerator(self) -> Any:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available

        mp = self.recipe.train.mixed_precision
        if mp == "fp16" and not torch.cuda.is_available():
            raise RecipeError(f"{self.shown}: [train.mixed_precision] \"fp16\" needs a CUDA GPU; use \"bf16\" or "
                              "\"no\" on CPU")
        trackers = "tensorboard" if (getattr(self.options, "tensorboard", True) and is_tensorboard_available()
                                     and self.main) else None
        extra: dict[str, Any] = {"gradient_accumulation_steps": self.recipe.train.gradient_accumulation}
        if getattr(getattr(self.ctx, "process", None), "launched", False):
            import os

            local, count = os.environ.get("LOCAL_RANK", "0").strip() or "0", torch.cuda.device_count()
            if not local.isdigit():      # a launcher's variable set by hand: bad input, not a crash of int()
                raise RecipeError(f"LOCAL_RANK={local!r} in the environment is not a process number (set by a "
                                  "launcher?)")
            local = int(local)
            if torch.cuda.is_available() and local >= count:
                raise RecipeError(f"{self.shown}: this process is local rank {local} but the machine has {count} CUDA "
                                  f"device(s): start at most {count} process(es) per machine (torchrun "
                                  "--nproc-per-node, accelerate launch --num_processes)")
            from .distributed import accelerator_options

            extra = accelerator_options(self.recipe, self.options)
        acc = Accelerator(mixed_precision=mp, log_with=trackers, project_dir=str(self.run_dir.file("logs")),
                          cpu=not torch.cuda.is_available(), **extra)
        if trackers:
            acc.init_trackers("native", config={"rank": self.recipe.lora.rank, "lr": self.recipe.optimizer.lr,
                                                "seed": self.recipe.train.seed, "family": self.recipe.model.family})
        elif getattr(self.options, "tensorboard", True) and self.main:
            self.echo("note: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
        self.has_trackers = bool(trackers)
        return acc

    def _buckets(self, adapter: Any) -> tuple[list[Any], list[tuple[int, int]], list[str]]:
        """The items, the bucket and the SHA-256 of each; an image that changed (or went) since the lint is
        refused, naming it (the run trains on the bytes the lint checked and the manifest's dataset hash records)."""
        d = self.recipe.dataset
        buckets = make_buckets(d.resolution, d.bucket_min, d.bucket_max, d.bucket_step, adapter.pixel_multiple)
        linted = self.ctx.lint.files if self.ctx.lint else {}
        items, chosen, digests = [], [], []
        for item in self.ctx.items:
            opened = self._open_image(item, linted.get(file_key(item), {}).get("image"))
            items.append(item)
            digests.append(opened.sha256)
            chosen.append(choose_bucket(opened.image.size, buckets, max(d.bucket_step, adapter.pixel_multiple)))
        if not any(not i.is_reg for i in items):
            raise BackendError(f"{self.shown}: [dataset] no usable subject image")
        return items, chosen, digests

    @staticmethod
    def _open_image(item: Any, sha256: str | None) -> Any:
        try:
            return open_rgb(item.image, expect_sha256=sha256)
        except ImageProblem as exc:
            raise DatasetError(f"{shown(item.image)}: {exc} (the dataset changed after its lint; check it and run "
                               "again)") from None

    def total_steps(self, planner: EpochPlanner) -> int:
        t = self.recipe.train
        if t.steps is not None:
            return t.steps
        return math.ceil(t.epochs * planner.batches_per_epoch / t.gradient_accumulation)

    def sample_prompts(self) -> list[str]:
        trigger = self.recipe.dataset.trigger
        return [p.replace("{trigger}", trigger) for p in self.recipe.sample.prompts]

    # -------------------------------------------------------------------------------------- caching
    def build_caches(self, adapter: Any, items: list[Any], buckets_of: list[tuple[int, int]], digests: list[str],
                     captions: set[str], te_live: bool) -> tuple[dict[int, Any], dict[str, dict[str, Any]]]:
        """Latents per item and text encodings per caption, from the cache or encoded (then stored). A cached
        entry must hold what a fresh encode would: the dtypes the adapter declares (latents float32,
        ``text_dtype``) and, for text, the shapes the family declares (``text_shapes``: known before any encoder loads,
        so a cache rewritten whole to one other shape is rebuilt in a run that encodes nothing) and those of this
        run's fresh encodes (else of most of its entries)."""
        import torch

        root = Path(self.recipe.train.cache_dir) if self.recipe.train.cache_dir else self.run_dir.file("cache")
        latent_cache, text_cache = Cache(root, "latents"), Cache(root, "text")
        latent_id = adapter.encoder_identity("latents")
        cached_encoders = tuple(e for e in adapter.text_encoders if not (te_live and e == adapter.trainable_text_encoder))
        text_id = adapter.encoder_identity("text") + "|" + ",".join(cached_encoders)
        text_dtypes = {k: adapter.text_dtype(k) for e in cached_encoders for k in adapter.text_keys(e)}
        text_shapes = self._text_shapes(adapter, cached_encoders)
        latents: dict[int, Any] = {}
        texts: dict[str, dict[str, Any]] = {}
        todo_images, todo_text = [], []
        hit_keys: dict[int, str] = {}
        for i, (item, bucket) in enumerate(zip(items, buckets_of)):
            key = entry_key("latents", digests[i], latent_id, f"{bucket[0]}x{bucket[1]}")
            found = latent_cache.load(key, {"latent": torch.float32}, source=f"{item.image}|{bucket[0]}x{bucket[1]}",
                                      check=lambda t, b=bucket: None if latent_geometry(t["latent"], b) else "shape")
            if found is None:
                todo_images.append((i, key))
            else:
                latents[i], hit_keys[i] = found["latent"], key
        for i in odd_latents(latents, buckets_of):     # shaped unlike the run's other latents: rebuilt
            latent_cache.discard(hit_keys[i])
            del latents[i]
            todo_images.append((i, hit_keys[i]))
        text_hits: dict[str, str] = {}
        for caption in sorted(captions):
            key = entry_key("text", text_hash(caption), text_id)
            found = text_cache.load(key, text_dtypes)
            if found is None:
                todo_text.append((caption, key))
            else:
                texts[caption], text_hits[caption] = found, key
        for caption in odd_texts(texts, expected=text_shapes):   # shaped unlike a fresh encode: rebuilt
            text_cache.discard(text_hits[caption])
            del texts[caption]
            todo_text.append((caption, text_hits.pop(caption)))
        if (todo_images or todo_text) and not self.main:
            raise BackendError(f"rank {self.parallel.rank} does not find {len(todo_images)} latent(s) and "
                               f"{len(todo_text)} caption(s) that rank 0 cached in {root}: on several machines the "
                               "run folder ([output.dir]) and [train.cache_dir] must be on a filesystem every "
                               "machine shares (see `lora-run docs multi-gpu`)")
        if todo_images or todo_text:
            self.echo(f"caching: {len(todo_images)} latent(s), {len(todo_text)} caption(s) to encode")
        keep = (adapter.trainable_text_encoder,) if te_live else ()
        # One model on the device at a time (the VAE, then each text encoder): the peak of caching is the
        # largest encoder (T5-XXL: 9.5 GB in bf16), not their sum, so caching fits where training fits.
        with torch.no_grad():
            if todo_images or (self.recipe.sample.every_steps and (self.main or self.parallel.fsdp)):
                adapter.load_encoders(only=("vae",))
                for i, key in todo_images:
                    image = prepare_image(self._open_image(items[i], digests[i]).image, buckets_of[i])
                    z = adapter.encode_images(image_to_tensor(image)[None])[0].to("cpu", torch.float32)
                    if not bool(torch.isfinite(z).all()):      # never cached, never trained on
                        raise adapter.nonfinite_encoding("vae", shown(items[i].image))
                    latent_cache.store(key, {"latent": z}, source=f"{items[i].image}|{buckets_of[i][0]}x{buckets_of[i][1]}")
                    latents[i] = z
                adapter.unload_encoders(keep=keep)
            fresh = self._encode_texts(adapter, cached_encoders, todo_text, keep, text_shapes)
            if fresh:       # the reference: entries shaped otherwise are foreign, however many agree
                redo = [(caption, text_hits.pop(caption))
                        for caption in odd_texts(texts, next(iter(fresh.values())), text_shapes)]
                for caption, key in redo:
                    text_cache.discard(key)
                    del texts[caption]
                fresh.update(self._encode_texts(adapter, cached_encoders, redo, keep, text_shapes))
                todo_text += redo
            for caption, key in todo_text:
                text_cache.store(key, fresh[caption], source=None)
                texts[caption] = fresh[caption]
        if te_live:
            adapter.load_encoders(only=(adapter.trainable_text_encoder,))
        latent_cache.flush()
        text_cache.flush()
        self.cache_stats = {"latents": latent_cache.stats.text(), "text": text_cache.stats.text()}
        self.echo(f"cache: latents {latent_cache.stats.text()}; text {text_cache.stats.text()}")
        self.run_dir.log(f"cache: latents {latent_cache.stats.text()}; text {text_cache.stats.text()}")
        self.ctx.artifacts["cache"] = {"dir": str(root), "latents": attrs.asdict(latent_cache.stats),
                                       "text": attrs.asdict(text_cache.stats)}
        return latents, texts

    @staticmethod
    def _text_shapes(adapter: Any, encoders: tuple[str, ...]) -> dict[str, tuple[int | None, ...]] | None:
        """What ``adapter.text_shapes`` declares of the tensors ``encoders`` give one caption (None: nothing known);
        a declaration naming a tensor ``text_keys`` does not is the adapter's error."""
        declared: dict[str, tuple[int | None, ...]] = {}
        for encoder in encoders:
            shapes = adapter.text_shapes(encoder) or {}
            for key, shape in shapes.items():
                shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
                if key not in adapter.text_keys(encoder) or not isinstance(shape, tuple) or not all(
                        d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape):
                    raise BackendError(f"the {adapter.family} adapter declares {key!r}: {shape!r} for the {encoder} "
                                       "text encoder, not a shape of one of its text_keys (ModelAdapter.text_shapes)")
                declared[key] = shape
        return declared or None

    @staticmethod
    def _encode_texts(adapter: Any, encoders: tuple[str, ...], todo: list[tuple[str, str]],
                      keep: tuple[str, ...], shapes: dict[str, tuple[int | None, ...]] | None = None
                      ) -> dict[str, dict[str, Any]]:
        """The text tensors of each caption of ``todo`` (caption, key) as the cache stores them (on the CPU, in
        ``adapter.text_dtype``), encoded one encoder at a time: each loaded, then unloaded unless in ``keep``. A
        tensor of another shape than ``shapes`` declares (``adapter.text_shapes``) is the adapter's error: the cache
        would rebuild it on every run."""
        import torch

        out: dict[str, dict[str, Any]] = {caption: {} for caption, _ in todo}
        for encoder in (encoders if todo else ()):
            adapter.load_encoders(only=(encoder,))
            for caption, _key in todo:
                enc = adapter.encode_captions([caption], encoders=(encoder,))
                if not all(bool(torch.isfinite(v).all()) for v in enc.values() if v.is_floating_point()):
                    raise adapter.nonfinite_encoding(encoder, f"the caption {caption[:60]!r}")
                for key, value in enc.items():
                    dtype = adapter.text_dtype(key)
                    if value.is_floating_point() != dtype.is_floating_point:
                        raise BackendError(f"the {adapter.family} adapter encodes {key!r} as {value.dtype}, not as "
                                           f"the {dtype} it declares (ModelAdapter.text_masks)")
                    out[caption][key] = value[0].detach().to("cpu", dtype)
                wrong = fits_shapes({k: v[0] for k, v in enc.items()}, shapes)
                if wrong is not None:
                    raise BackendError(f"the {adapter.family} adapter encodes the caption {caption[:60]!r} with the "
                                       f"{encoder} text encoder to shapes it does not declare: {wrong} "
                                       "(ModelAdapter.text_shapes)")
            adapter.unload_encoders(keep=keep)
        return out

    # ---------------------------------------------------------------------------------------- signals
    def _install_signals(self) -> dict[int, Any]:
        first: list[float] = []

        def request_stop(signum: int, _frame: Any) -> None:
            # several processes: a terminal's Ctrl-C reaches every rank and the launcher forwards it once more
            # within moments; that is still the same request
            if self.stop_requested and not (self.parallel.active and time.time() - first[0] < 10):
                raise KeyboardInterrupt
            if self.stop_requested:
                return
            first.append(time.time())
            self.stop_requested = True
            self.echo("\nstopping after this step; saving a resumable state (press Ctrl-C again to abort)")

        previous = {}
        hangup = getattr(signal, "SIGHUP", None)      # a closed terminal or SSH session; left alone under `nohup`
        for sig in (signal.SIGINT, signal.SIGTERM, *([hangup] if hangup and signal.getsignal(hangup) is not
                                                    signal.SIG_IGN else [])):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return previous

    # ------------------------------------------------------------------------------------------- run
    # The run is a fixed sequence of named setup steps, each returning typed state for the next (the shape of
    # torchtune's recipe classes): environment → data (buckets, plan, caches) → model (transformer, optional
    # text-encoder LoRA) → optimization (optimizer, schedule, data-parallel wrap, loss) → resume → loop → finish.
    def run(self) -> None:
        from . import accel
        from .adapters.base import libraries_quieted

        # the trackers' logs and the run folder's cache are written from here to the end: what appears in them is
        # ours; and the process-wide settings (torch's, the libraries' logging) are the run's own until it ends
        with self.run_dir.writing("logs", "cache"), accel.torch_settings(tf32=False), libraries_quieted():
            self._run()

    def _run(self) -> None:
        env = self.setup_environment()
        data = self.setup_data(env)
        model = self.setup_model(env, data)
        opt = self.setup_optimization(env, data, model)
        start = self.restore(data, model, opt)
        self.check_disk_space(data, model, opt, start)
        env.timing["load_s"] = round(time.perf_counter() - env.phase, 2)
        state = LoopState(adapter=data.adapter, transformer=model.transformer, forward=opt.forward,
                          te_module=model.te_module, params=opt.params, te_params=model.te_params,
                          optimizer=opt.optimizer, scheduler=opt.scheduler, planner=data.planner, latents=data.latents,
                          texts=data.texts, loss_fn=opt.loss_fn, accelerator=env.accelerator, total=data.total,
                          te_stop=data.te_stop, ckpt_root=opt.ckpt_root,
                          counts=dict(self.ctx.lint.counts if self.ctx.lint else {}))
        if getattr(state.transformer, "_lora_run_step_graphs", False) and not self.parallel.active:
            from .stepgraph import StepGraphs

            state.step_graphs = StepGraphs(lambda inputs, step: self._step_body(state, inputs, step),
                                           notify=lambda line: (self.echo(line), self.run_dir.log(line)),
                                           expected=len(set(data.buckets_of)))
        self.train(env, state, start)
        if state.step_graphs is not None:
            env.timing["step_graphs"] = state.step_graphs.describe()
            env.timing["step_graphs_record_s"] = round(state.step_graphs.record_s, 2)
        phase = time.perf_counter()
        self._finish(state)
        self.parallel.close()
        env.timing["finish_s"] = round(time.perf_counter() - phase, 2)
        if env.device.type == "cuda":
            import torch

            env.timing["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2)
            env.timing["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(env.device) / 2**30, 2)

    def setup_environment(self) -> RunEnv:
        """The accelerator (device, mixed precision, trackers), the GPU memory cap and the process group."""
        from .distributed import Parallel

        accelerator = self._accelerator()
        device = accelerator.device
        cap_gpu_memory(self.recipe, device)
        timing = self.ctx.artifacts.setdefault("timing", {})
        phase = time.perf_counter()
        self.parallel = Parallel(accelerator, fsdp=getattr(self.options, "fsdp", False))
        world = self.parallel.world if self.parallel.active else 1
        if self.parallel.active:
            self.echo(f"processes: {self.parallel.describe()}")
            self.run_dir.update_manifest(processes={"world_size": world, "backend": accelerator.state.backend,
                                                    "sharding": "fsdp2" if self.parallel.fsdp else "ddp"})
        return RunEnv(accelerator=accelerator, device=device, world=world, timing=timing, phase=phase)

    def setup_data(self, env: RunEnv) -> DataState:
        """The family adapter, buckets and the epoch plan, then the latent and text caches (encoders loaded only
        for misses; rank 0 encodes, the other ranks read)."""
        from .adapters import adapter_class

        r = self.recipe
        adapter = adapter_class(r.model.family)(r, device=env.device, options=self.options, shown=self.shown)
        items, buckets_of, digests = self._buckets(adapter)
        planner = EpochPlanner(items, r.dataset, buckets_of, seed=r.train.seed, batch_size=r.train.batch_size * env.world)
        total = self.total_steps(planner)
        te_train = bool(r.text_encoder.train and adapter.trainable_text_encoder)
        te_stop = math.ceil(total * r.text_encoder.train_fraction) if te_train else 0
        captions = planner.all_captions() | set(self.sample_prompts())
        if not self.main:
            self.parallel.barrier()       # rank 0 encodes and writes the caches; the others then read them
        try:
            latents, texts = self.build_caches(adapter, items, buckets_of, digests, captions, te_train)
        except Exception as exc:   # the encoders did not fit the run's memory cap: the cap is the recipe's
            cap = r.train.gpu_memory_gib
            if cap is None or type(exc).__name__ != "OutOfMemoryError":
                raise
            raise RecipeError(f"[train.gpu_memory_gib] = {cap:g} GiB: caching the dataset (the autoencoder and text "
                              f"encoders on the GPU) ran out of GPU memory under it; nothing was trained. Raise it "
                              f"(lora-run plan shows what each plan needs)") from None
        if self.main:
            self.parallel.barrier()
        env.timing["cache_s"] = round(time.perf_counter() - env.phase, 2)
        env.phase = time.perf_counter()
        return DataState(adapter=adapter, buckets_of=buckets_of, planner=planner, total=total, te_train=te_train,
                         te_stop=te_stop, latents=latents, texts=texts)

    def setup_model(self, env: RunEnv, data: DataState) -> ModelState:
        """The transformer prepared for training (GPU plan, attention kernel, LoRA), the optional text-encoder
        LoRA, and the caches staged on the GPU when they are small."""
        import torch

        r = self.recipe
        adapter = data.adapter
        transformer = adapter.load_transformer()
        transformer = prepare_transformer(adapter, transformer, r, env.device, bucket_sizes=set(data.buckets_of),
                                          echo=self.echo, sharded=self.parallel.fsdp,
                                          one_process=not self.parallel.active)
        te_module = None
        if data.te_train:
            te_module = adapter.text_encoder_module()
            te_rank = r.text_encoder.rank or r.lora.rank
            torch.manual_seed(step_seed(r.train.seed, "te-lora-init"))
            adapter.inject_lora(te_module, adapter.text_encoder_targets(te_module), rank=te_rank,
                                alpha=r.lora.alpha * te_rank / r.lora.rank, dropout=r.lora.dropout, init=r.lora.init)
            for name, p in te_module.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
            te_module.train()
        if getattr(transformer, "_lora_run_plan", None):
            self.ctx.artifacts["gpu_plan"] = transformer._lora_run_plan
        stage_caches(data.latents, data.texts, env.device)
        return ModelState(transformer=transformer, te_module=te_module,
                          te_params=trainable_parameters(te_module) if te_module is not None else {})

    def setup_optimization(self, env: RunEnv, data: DataState, model: ModelState) -> OptimState:
        """Optimizer and LR schedule over the LoRA parameters, the data-parallel wrap, the loss plugin."""
        import torch

        r = self.recipe
        params = trainable_parameters(model.transformer)
        groups = [{"params": list(params.values()), "lr": r.optimizer.lr}]
        if model.te_params:
            groups.append({"params": list(model.te_params.values()), "lr": r.optimizer.lr * r.text_encoder.lr_ratio})
        optimizer = make_optimizer(r, groups, env.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(r, data.total))
        if self.parallel.active:      # DDP (or FSDP2) through the accelerator; parameters may be replaced
            forward, optimizer = self.parallel.wrap(model.transformer, model.te_module, optimizer, data.te_train)
            params = trainable_parameters(model.transformer)
        else:
            forward = model.transformer
            optimizer = env.accelerator.prepare_optimizer(optimizer, device_placement=False)   # fp16 loss scaling
        loss_reg = self.ctx.plugins.get("loss", r.train.loss, "train.loss")
        loss_opts = loss_options(r, self.ctx.plugins)
        loss_fn = loss_reg.factory(loss_opts) if loss_opts is not None else loss_reg.factory()
        return OptimState(optimizer=optimizer, scheduler=scheduler, forward=forward, params=params, loss_fn=loss_fn,
                          ckpt_root=self.run_dir.file("checkpoints"))

    def restore(self, data: DataState, model: ModelState, opt: OptimState) -> int:
        """`--resume`: the newest intact checkpoint's LoRA, optimizer, schedule and RNG; the step to start at."""
        if not self.ctx.resume:
            return 0
        with self.run_dir.writing("checkpoints"):    # a damaged one is moved aside there under a new name
            found, saved = ckpt.newest_intact(opt.ckpt_root, warn=self.echo, move_damaged=self.main)
        if found is None or saved is None:
            self.echo("resume: no complete checkpoint yet; starting from step 0")
            return 0
        all_named = {**{f"transformer.{k}": v for k, v in opt.params.items()},
                     **{f"text_encoder.{k}": v for k, v in model.te_params.items()}}
        # a checkpoint that records no recipe (an older version's) is checked here against the model it is loaded
        # into (``check_resume`` compared the recorded recipe before anything was written)
        differ = sorted(set(all_named) ^ set(saved["trainable"])) or sorted(
            k for k, p in all_named.items() if tuple(p.shape) != tuple(saved["trainable"][k].shape))
        if differ:
            raise OutputError(f"{shown(found)}: cannot resume: the checkpoint's LoRA does not match this recipe's "
                              f"LoRA (its rank, targets or model differ, first at {differ[0]}); only steps/epochs, "
                              "save policy, [sample] and [eval] may change on resume")
        try:
            known = set().union(*(g for g in opt.optimizer.param_groups))   # a newer torch may add settings
            unknown = set().union(*(g for g in saved["optimizer"]["param_groups"])) - known
            if unknown:                                                     # another optimizer's
                raise ValueError(f"its optimizer has settings this one has not: {', '.join(sorted(unknown))}")
            for k, p in all_named.items():
                self.parallel.load_trainable(p, saved["trainable"][k])
            self.parallel.load_optimizer_state(opt.optimizer, saved["optimizer"])
            opt.scheduler.load_state_dict(saved["scheduler"])
            ckpt.restore_rng(saved["rng_tensors"], saved["state"]["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise OutputError(f"{shown(found)}: cannot resume: the checkpoint's optimizer, schedule or generator state "
                              f"does not fit this recipe's ({type(exc).__name__}: {exc}); only steps/epochs, save "
                              "policy, [sample] and [eval] may change on resume") from None
        start = int(saved["state"]["step"])
        first = saved["state"].get("loss_first")        # the run's first loss (none in an older checkpoint)
        self.first_loss = float(first) if isinstance(first, (int, float)) and not isinstance(first, bool) else None
        self._record_checkpoints(opt.ckpt_root)         # those moved aside as damaged are no longer listed
        if start > data.total:       # `check_resume` refuses this first where the checkpoint records its epoch length
            from . import shorter_than_checkpoint

            key = "train.steps" if self.recipe.train.steps is not None else "train.epochs"
            raise RecipeError(shorter_than_checkpoint(self.shown, found, start, data.total, key))
        self.last_checkpoint = found
        self.echo(f"resumed from {found} (step {start} of {data.total})")
        self.run_dir.log(f"resumed from {found.name}")
        return start

    def check_disk_space(self, data: DataState, model: ModelState, opt: OptimState, start: int) -> None:
        """Before the first step: what the run will still write (its checkpoints, at most `keep_last` + 1 of them
        at once, the final LoRA and the samples) against the free space of the run folder's file system. A run
        that cannot finish is refused now (exit 2), not after its last step."""
        from lora_run_rundir.space import Writes, check_free_space

        r = self.recipe
        if not (self.main or self.parallel.fsdp):     # rank 0 writes; under FSDP every rank takes part in the gathers
            return
        t_sd, te_sd = self._lora_dicts(model.transformer, model.te_module)
        if not self.main:
            return
        shapes = [tuple(p.shape) for p in (*opt.params.values(), *model.te_params.values())]
        final = lora_files_bytes(data.adapter, t_sd, te_sd, recipe=r)
        due = sum(self._checkpoint_due(n, data.total, data.planner) for n in range(start + 1, data.total))
        rounds = (sum(self._sample_due(n, data.total) for n in range(start + 1, data.total))
                  + bool(r.sample.every_steps))                     # and the final round (`_finish`)
        images = rounds * len(self.sample_prompts()) * len(r.sample.seeds) * len(r.sample.strengths)
        samples = ((f"{images} sample image(s)", images * r.sample.width * r.sample.height * 3),) if images else ()
        writes = Writes("native", due, ckpt.checkpoint_bytes(final, shapes, r.optimizer.name),  # PNG ≤ raw pixels
                        "the LoRA files, the fp32 LoRA and the optimizer state", final, "the final LoRA", samples)
        check_free_space(self.run_dir.path, writes, r.train.keep_last)

    def train(self, env: RunEnv, state: LoopState, start: int) -> None:
        """The training loop with signal handling; its wall time is split into steps, compilation, samples and
        checkpoints in the manifest's timing."""
        previous = self._install_signals()
        phase = time.perf_counter()
        try:
            self._loop(state, start)
        finally:
            # the steps this start trained (from its checkpoint to the last step it finished), for `invocations`
            self.ctx.artifacts["steps_this_start"] = [start, start + len(self.step_times)]
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.has_trackers:     # not end_training(): it also ends the process group _finish may need
                for tracker in env.accelerator.trackers:
                    tracker.finish()
            self._record_step_times(env.timing, time.perf_counter() - phase)

    def _mark_round(self) -> None:
        if not self.round_marks or self.round_marks[-1] != len(self.step_times):
            self.round_marks.append(len(self.step_times))

    def _record_step_times(self, timing: dict[str, Any], loop_s: float) -> None:
        """Split the loop's wall time: steady step time (median), compilation (the first step of each
        shape beyond that median), warm-up (every step beyond that median: compilation and the CUDA-graph
        recording of the steps after the first of each shape), samples and checkpoints (timed where they run)."""
        import statistics

        steps = self.step_times
        samples_s, ckpt_s = sum(self.sample_rounds), self.checkpoint_seconds
        timing.update(loop_s=round(loop_s, 2), samples_s=round(samples_s, 2), checkpoints_s=round(ckpt_s, 2),
                      checkpoint_writes_s=round(self.checkpoint_write_seconds, 2), steps=len(steps))
        if not steps:
            return
        seen: set[Any] = set()
        first, rest = [], []
        early: dict[str, list[float]] = {}     # the first three steps of each shape: compilation, recording
        firsts = set()                         # the indices of each shape's first step
        for index, (shape, seconds) in enumerate(steps):
            if shape in seen:
                rest.append(seconds)
            else:
                first.append(seconds)
                firsts.add(index)
                seen.add(shape)
            times = early.setdefault(_shape_name(shape), [])
            if len(times) < 3:
                times.append(round(seconds, 3))
        median = statistics.median(rest) if rest else statistics.median(first)
        train_s = sum(x for _, x in steps)
        # the steady step between rounds (samples, checkpoints), to see whether a round slows the steps after it
        bounds = [0, *(m for m in self.round_marks if 0 < m < len(steps)), len(steps)]
        windows = []
        for lo, hi in zip(bounds, bounds[1:]):
            steady = [seconds for index, (_, seconds) in enumerate(steps[lo:hi], lo) if index not in firsts]
            if steady:
                windows.append(round(statistics.median(steady), 4))
        timing.update(step_s=round(median, 4), compile_s=round(sum(max(0.0, f - median) for f in first), 2),
                      warmup_s=round(max(0.0, train_s - len(steps) * median), 2), train_s=round(train_s, 2),
                      shapes=len(seen), first_steps_s=early, sample_rounds_s=[round(x, 2) for x in self.sample_rounds],
                      step_s_between_rounds=windows, **_compiler_seconds())

    # ------------------------------------------------------------------------------------------ loop
    def _batch(self, state: LoopState, index: int) -> list[Any]:
        bpe = state.planner.batches_per_epoch
        epoch, position = divmod(index, bpe)
        if state.epoch_cache[0] != epoch:
            state.epoch_cache = (epoch, state.planner.epoch(epoch))
        return state.epoch_cache[1][position]

    def _loop(self, state: LoopState, start: int) -> None:
        from tqdm.auto import tqdm

        r = self.recipe
        acc = state.accelerator
        device = acc.device
        accum = r.train.gradient_accumulation
        rank = self.parallel.rank
        show = getattr(self.options, "progress_bar", True) and self.main
        bar = tqdm(total=state.total, initial=start, disable=not show, file=sys.stderr, dynamic_ncols=True,
                   unit="step", desc="training", mininterval=0.1 if sys.stderr.isatty() else 5.0)
        loss_ema, finished = None, time.perf_counter()
        t0, done = time.time(), 0

        def finish(step: int, loss_sum: Any, shape: Any, started: float, lr: float,
                   step_loss: float | None = None) -> None:
            """A queued step's loss read (one process: the host waits for that step's kernels here), checked and
            reported with ``lr``, the scheduler's after that step (taken when it was queued: the next step's
            scheduler step may have run since); the step's time runs to this point from its start or the previous
            step's end."""
            nonlocal loss_ema, finished, done
            if step_loss is None:
                step_loss = float(loss_sum)
                if not math.isfinite(step_loss):
                    self._non_finite(step_loss, step, state)
            now = time.perf_counter()
            self.step_times.append((shape, now - max(started, finished)))
            done, finished, number = done + 1, now, step + 1
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
            elapsed = time.time() - t0
            metrics = {"loss": step_loss, "loss_avg": loss_ema, "lr": lr,
                       "it_per_s": done / elapsed if elapsed > 0 else 0.0, "memory_gib": _memory_gib(device),
                       "epoch": (number * accum) // state.planner.batches_per_epoch}
            state.losses.append(step_loss)
            if number == 1:
                self.first_loss = step_loss
            if self.has_trackers:
                acc.log({"train/loss": step_loss, "train/lr": metrics["lr"]}, step=number)
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{metrics['lr']:.2e}", mem=f"{metrics['memory_gib']:.1f}G",
                            refresh=False)
            bar.update(1)
            if number % 10 == 0 or number == state.total:
                self.run_dir.log(f"step {number}/{state.total} loss {step_loss:.5f} lr {metrics['lr']:.3e}")
            self.ctx.hook.step_finished(run=self.ctx, step=number, metrics=metrics)

        pending: tuple | None = None     # one process: the step queued last, its loss not read yet
        try:
            for step in range(start, state.total):
                step_started = time.perf_counter()
                # python/numpy/torch's own generators (LoRA dropout's masks): one stream per rank, as one process
                # draws another mask for each sample of its batch (rank 0 keeps the one-process stream)
                reseed(step_seed(r.train.seed, "step", step, *(("rank", rank) if rank else ())))
                te_active = state.te_module is not None and step < state.te_stop
                if state.te_module is not None and not te_active and state.te_module.training:
                    for p in state.te_params.values():
                        p.requires_grad_(False)
                        p.grad = None
                    state.te_module.eval()
                loss_sum: Any = None      # the step's loss stays on the device until the step is queued
                shape: Any = None
                sync_model = getattr(state.forward, "_wrapped", state.forward)
                for micro in range(accum):
                    batch = self._batch(state, step * accum + micro)
                    shape = shape or (len(batch), tuple(state.latents[batch[0].index].shape))
                    with acc.accumulate(sync_model):       # gradients reduced on the last micro-batch only
                        value = self._micro_step(state, batch, step, micro, te_active, accum)
                    loss_sum = value if loss_sum is None else loss_sum + value
                if accum > 1:       # the step's loss is the mean over its micro-batches, as its gradient is (the
                    loss_sum = loss_sum / accum     # accelerator divides each micro-batch's backward by `accum`)
                params = [p for p in state.params.values()] + [p for p in state.te_params.values() if p.requires_grad]
                stop_now = self.stop_requested   # read once: a signal arriving later counts for the next step
                if self.parallel.active:      # every rank: the global batch's loss and one stop decision
                    step_loss, stop_now = self.parallel.agree(float(loss_sum), stop_now)
                    if not math.isfinite(step_loss):
                        self._non_finite(step_loss, step, state)
                if r.optimizer.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, r.optimizer.max_grad_norm)
                state.optimizer.step()
                state.scheduler.step()
                state.optimizer.zero_grad(set_to_none=state.step_graphs is None)   # a graph adds into the same .grad
                number, lr = step + 1, state.scheduler.get_last_lr()[0]
                if self.parallel.active:
                    finish(step, loss_sum, shape, step_started, lr, step_loss)
                else:
                    # The previous step's loss is read now, with this step's kernels already queued: the host
                    # waits for the previous step only, and the GPU is not left idle while the host prepares the
                    # next one. A non-finite loss stops the run there, before anything of it is written: a step
                    # that writes (a checkpoint, samples, the end, a stop) has its own loss read first, so the
                    # LoRA in memory, one step further, is discarded and the last checkpoint kept.
                    if pending is not None:
                        finish(*pending)
                    pending = (step, loss_sum, shape, step_started, lr)
                    stop_now = self.stop_requested   # one process: a stop requested during this step counts now
                checkpoint_due = self._checkpoint_due(number, state.total, state.planner) or (
                    stop_now and number < state.total)
                sample_due = self._sample_due(number, state.total)
                if pending is not None and (checkpoint_due or sample_due or stop_now or number == state.total):
                    finish(*pending)
                    pending = None
                self._checkpoint_written(wait=False)      # one written meanwhile: recorded, `checkpoint_saved`
                if checkpoint_due:
                    self._save_checkpoint(state, number)
                if sample_due:
                    self._samples(state, number)
                if stop_now and number < state.total:   # every rank stops at the same, agreed step
                    # ... and leaves once rank 0 has saved it: a launcher stops the other processes as soon as one
                    # exits (torchrun: SIGTERM, then SIGKILL), which would cut rank 0's checkpoint short
                    self._checkpoint_written(wait=True)
                    self.parallel.barrier()
                    raise TrainingInterrupted(
                        f"interrupted at step {number}/{state.total}; a resumable state is in {self.last_checkpoint}; "
                        f"resume with: {resume_command(self.ctx.loaded, self.run_dir.path)}")
            self._checkpoint_written(wait=True)
        except KeyboardInterrupt:
            self._checkpoint_written(wait=True)       # the one being written holds a good state: kept and named
            raise TrainingInterrupted(
                "aborted" + (f"; the last checkpoint is {self.last_checkpoint}; resume with: "
                             f"{resume_command(self.ctx.loaded, self.run_dir.path)}" if self.last_checkpoint else
                             " before the first checkpoint")) from None
        finally:
            bar.close()
            if self.checkpoint_writing is not None:     # the loop failed: the write in flight still ends as a whole
                in_flight = self.checkpoint_writing[0].step
                try:
                    self._checkpoint_written(wait=True)
                except Exception as exc:  # noqa: BLE001 - the loop's own error is the one reported
                    self.run_dir.log(f"checkpoint step-{in_flight:06d} not written: {exc}")

    def _micro_step(self, state: LoopState, batch: list[Any], step: int, micro: int, te_active: bool,
                    accum: int) -> Any:
        import torch

        from .timesteps import make_noise, to_device

        r = self.recipe
        acc = state.accelerator
        device = acc.device
        adapter = state.adapter
        if self.parallel.active:
            return self._shard_step(state, batch, step, micro, te_active, accum)
        x0 = torch.stack([state.latents[s.index] for s in batch]).to(device)
        text = {k: torch.stack([state.texts[s.caption][k] for s in batch]).to(device)
                for k in state.texts[batch[0].caption]}
        if state.te_module is not None:
            with torch.set_grad_enabled(te_active):
                live = adapter.encode_captions([s.caption for s in batch], encoders=(adapter.trainable_text_encoder,))
            text.update({k: v.to(device) for k, v in live.items()})
        generator = torch.Generator("cpu").manual_seed(step_seed(r.train.seed, "noise", step, micro))
        noise = to_device(make_noise(tuple(x0.shape), generator, r.train.noise_offset, adapter.noise_offset_group),
                          device)
        t = adapter.sample_timesteps(len(batch), generator, x0)
        return self._forward_backward(state, batch, x0, noise, t, text, step, te_active, accum, len(batch))

    def _shard_step(self, state: LoopState, batch: list[Any], step: int, micro: int, te_active: bool,
                    accum: int) -> Any:
        """A data-parallel micro-step: noise and σ for the whole global batch (as one process draws them),
        this rank's slice of it, loss = Σ(own samples) / global batch × processes (DDP/FSDP average the
        ranks' gradients). An empty slice (a short last batch) trains one sample with weight 0."""
        import torch

        from .timesteps import make_noise

        r = self.recipe
        device = state.accelerator.device
        adapter = state.adapter
        x0 = torch.stack([state.latents[s.index] for s in batch])
        generator = torch.Generator("cpu").manual_seed(step_seed(r.train.seed, "noise", step, micro))
        noise = make_noise(tuple(x0.shape), generator, r.train.noise_offset, adapter.noise_offset_group)
        t = adapter.sample_timesteps(len(batch), generator, x0)
        lo, hi = self.parallel.shard(len(batch), r.train.batch_size)
        scale = 1.0
        if lo >= hi:                     # every rank must take part in the gradient reduction
            lo, hi, scale = 0, 1, 0.0
        mine = batch[lo:hi]
        text = {k: torch.stack([state.texts[s.caption][k] for s in mine]).to(device)
                for k in state.texts[mine[0].caption]}
        if state.te_module is not None:
            with torch.set_grad_enabled(te_active):
                live = adapter.encode_captions([s.caption for s in mine], encoders=(adapter.trainable_text_encoder,))
            text.update({k: v.to(device) for k, v in live.items()})
        return self._forward_backward(state, mine, x0[lo:hi].to(device), noise[lo:hi].to(device),
                                      t[lo:hi].to(device), text, step, te_active, accum, len(batch), scale)

    def _forward_backward(self, state: LoopState, batch: list[Any], x0: Any, noise: Any, t: Any,
                          text: dict[str, Any], step: int, te_active: bool, accum: int, global_size: int,
                          scale: float = 1.0) -> Any:
        """Forward and backward of one micro-batch; returns its loss as a detached device scalar (no sync)."""
        import torch

        from .timesteps import to_device

        adapter = state.adapter
        noisy, target = adapter.noisy_and_target(x0, noise, t)
        weights = adapter.loss_weights(t).to(noisy.device) * to_device(
            torch.tensor([s.weight for s in batch], dtype=torch.float32), noisy.device)
        inputs = {"noisy": noisy, "target": target, "t": t, "weights": weights,
                  **{f"text.{k}": v for k, v in text.items()}}
        if self.parallel.active:
            return self._step_body(state, inputs, step, share=(global_size, scale))
        if state.step_graphs is not None and not te_active:
            return state.step_graphs(inputs, step)
        return self._step_body(state, inputs, step)

    def _step_body(self, state: LoopState, inputs: dict[str, Any], step: Any,
                   share: tuple[int, float] | None = None) -> Any:
        """A micro-step on the device: the prediction, the weighted loss and its backward; returns the loss as a
        detached device scalar. Nothing in it reads the host, so `StepGraphs` can replay it. ``share``: (the global
        batch, this rank's scale) of a data-parallel step, whose loss is this rank's share of the global one."""
        from .accel import mark_step_begin

        acc, adapter = state.accelerator, state.adapter
        text = {k[5:]: v for k, v in inputs.items() if k.startswith("text.")}
        mark_step_begin(state.transformer)
        with acc.autocast():
            pred = adapter.predict(state.forward, inputs["noisy"], inputs["t"], text, self.recipe.train.guidance)
        per_sample = state.loss_fn(pred.float(), inputs["target"].float(), timesteps=inputs["t"], step=step)
        weighted = per_sample * inputs["weights"]
        if share is None:
            loss = weighted.mean()
            acc.backward(loss)              # the accelerator divides by the accumulation steps
            return loss.detach()
        global_size, scale = share
        part = weighted.sum() / global_size                       # this rank's share of the global loss
        acc.backward(part * (self.parallel.world * scale))       # every rank, always: DDP/FSDP average
        return part.detach() * scale

    def _non_finite(self, value: float, step: int, state: LoopState) -> None:
        self._checkpoint_written(wait=True)      # the one being written holds a good state: kept and named below
        r = self.recipe
        damaged = state.adapter.damaged_weights("transformer", state.transformer)
        if damaged is not None:     # no learning rate helps: the model file is what is wrong
            self.run_dir.log(str(damaged))
            raise damaged
        kept = f"the last good checkpoint is kept: {self.last_checkpoint}" if self.last_checkpoint \
            else "no checkpoint had been saved yet"
        message = (f"the loss became {value} at step {step + 1}; training stopped and no LoRA was written for this "
                   f"step ({kept}). Playbook §9 (NaNs): lower the learning rate ([optimizer.lr] is {r.optimizer.lr}) "
                   f"and use bf16 ([train.mixed_precision] is \"{r.train.mixed_precision}\"; fp16 overflows)")
        self.run_dir.log(message)
        raise NonFiniteLoss(f"{self.shown}: {message}")

    # ---------------------------------------------------------------------------------- checkpoints
    def _checkpoint_due(self, number: int, total: int, planner: EpochPlanner) -> bool:
        t = self.recipe.train
        if t.save_every_steps and number % t.save_every_steps == 0 and number < total:
            return True
        if t.save_every_epochs and number < total:
            bpe, accum = planner.batches_per_epoch, t.gradient_accumulation
            before, after = ((number - 1) * accum) // bpe, (number * accum) // bpe
            return after > before and after % t.save_every_epochs == 0
        return False

    def _sample_due(self, number: int, total: int) -> bool:
        every = self.recipe.sample.every_steps
        return bool(every) and number % every == 0 and number < total

    def _lora_dicts(self, transformer: Any, te_module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.parallel.fsdp:         # whole tensors from the shards: the same files whatever the sharding
            return self.parallel.lora_state_dict(transformer), {}
        return lora_state_dict(transformer), lora_state_dict(te_module)

    def _save_checkpoint(self, state: LoopState, number: int) -> None:
        """Checkpoint ``number``: its state is copied to the CPU here (every rank takes part in FSDP's gathers) and
        written on a thread of its own (``ckpt.Writing``) while the next steps and sample rounds run; one write at a
        time. ``_checkpoint_written`` takes it up once it ended: the record, pruning, the log line and
        ``checkpoint_saved`` happen on this thread, after the checkpoint is on disk."""
        self._checkpoint_written(wait=True)            # the one before it first: saved, recorded and pruned in order
        if not self.main:       # the folder rank 0 writes: what this rank's messages name (an interrupted run's)
            self.last_checkpoint = ckpt.checkpoint_dir(state.ckpt_root, number)
        if not (self.main or self.parallel.fsdp):
            return
        started = time.perf_counter()
        trainable = self.parallel.trainable_full(           # under FSDP every rank takes part in the gathers
            {**{f"transformer.{k}": p for k, p in state.params.items()},
             **{f"text_encoder.{k}": p for k, p in state.te_params.items()}})
        optimizer_state = self.parallel.optimizer_state(state.optimizer)
        t_sd, te_sd = self._lora_dicts(state.transformer, state.te_module)
        if not self.main:
            return
        # copies the steps after this one cannot change, and the generators' states of this step
        trainable, optimizer_state = ckpt.cpu_copy(trainable), ckpt.cpu_copy(optimizer_state)
        scheduler_state, rng = ckpt.cpu_copy(state.scheduler.state_dict()), ckpt.capture_rng()
        meta = run_metadata(self.recipe, step=number, counts=state.counts, started_at=self.started_at)
        name, adapter, recipe, root = self.recipe.output.name, state.adapter, self.recipe, state.ckpt_root

        def loras(folder: Path) -> dict[str, Path]:
            return write_loras(adapter, folder, name, t_sd, te_sd, recipe=recipe, metadata=meta,
                               suffix=f"-step{number:06d}")

        epoch = (number * self.recipe.train.gradient_accumulation) // state.planner.batches_per_epoch
        info = {"epoch": epoch, "position": (number * self.recipe.train.gradient_accumulation) %
                state.planner.batches_per_epoch, "total_steps": state.total, "family": self.recipe.model.family,
                "batches_per_epoch": state.planner.batches_per_epoch,     # an epochs-based run's length on resume
                "loss_first": self.first_loss,
                "recipe": ckpt.trained_with(to_dict(self.recipe))}    # `--resume` refuses it for another recipe
        # the run folder records the two paths this write makes as being written until it is taken up: what appears
        # there is the run's (nothing that was there before), and nothing a user adds elsewhere meanwhile
        top = self.run_dir.path
        scope = contextlib.ExitStack()
        scope.enter_context(self.run_dir.writing(*(p.relative_to(top).as_posix() for p in (
            ckpt.checkpoint_dir(root, number), ckpt.temp_dir(root, number)))))
        self.checkpoint_writing = (ckpt.Writing(number, lambda: ckpt.save(
            root, number, trainable=trainable, optimizer=_StateOf(optimizer_state), scheduler=_StateOf(scheduler_state),
            info=info, write_loras=loras, rng=rng)), scope, root)
        self.checkpoint_seconds += time.perf_counter() - started
        self._mark_round()

    def _checkpoint_written(self, wait: bool) -> None:
        """Take up the checkpoint being written once it ended (``wait``: wait for it): a failed write raises here,
        on the training thread (a full disk's message names the file)."""
        if self.checkpoint_writing is None or not (wait or self.checkpoint_writing[0].done()):
            return
        writing, scope, root = self.checkpoint_writing
        self.checkpoint_writing = None
        started = time.perf_counter()
        try:
            with scope:
                path = writing.wait()
        finally:
            self.checkpoint_seconds += time.perf_counter() - started        # the training thread's wait only
            self.checkpoint_write_seconds += writing.seconds
        self.last_checkpoint = path
        removed = ckpt.prune(root, self.recipe.train.keep_last)
        self._record_checkpoints(root)
        self.run_dir.log(f"checkpoint {path.name}" + (f" (removed {', '.join(p.name for p in removed)})" if removed else ""))
        self.ctx.hook.checkpoint_saved(run=self.ctx, step=writing.step, path=path)

    def _record_checkpoints(self, root: Path) -> None:
        """The manifest's ``artifacts.checkpoints``: the checkpoints in the run folder now (after every save, so a
        killed run's record holds them; on resume, less those moved aside as damaged)."""
        if not self.main:
            return
        kept = []
        for step, folder in ckpt.complete_checkpoints(root):
            loras = ckpt.recorded_loras(folder)
            kept.append({"step": step, "dir": str(folder),
                         **{f"lora_{fmt}": str(folder / rel) for fmt, rel in loras.items()}})
        self.ctx.artifacts["checkpoints"] = kept
        self.run_dir.update_manifest(artifacts={"checkpoints": kept})   # which ones lora-run wrote, before any kill

    # -------------------------------------------------------------------------------------- samples
    def _samples(self, state: LoopState, number: int) -> list[str]:
        with self.run_dir.writing("samples"):
            return self._sample_round(state, number)

    def _sample_round(self, state: LoopState, number: int) -> list[str]:
        import torch

        from lora_run_rundir import atomic_write_bytes

        from .generate import batch_groups, max_batch
        from .graphed import graphed_forward

        r = self.recipe
        adapter = state.adapter
        if adapter.sample_vae is None or not (self.main or self.parallel.fsdp):   # FSDP: every rank samples
            return []
        acc = state.accelerator
        device = acc.device
        transformer = state.transformer
        was_training = transformer.training
        transformer.eval()
        adapter.sample_vae.to(device)
        pipe = adapter.sampling_pipeline(transformer)
        folder = self.run_dir.file("samples", f"step-{number:06d}")
        written = []
        rng_state = torch.get_rng_state()
        started = time.perf_counter()
        streamed = getattr(transformer, "_lora_run_offloader", None) is not None     # blocks streamed from the host
        limit = max_batch(r.sample.width, r.sample.height, "group-offload" if streamed else "whole")
        # a CUDA graph's pool keeps the forward's activations for the round: only where memory is not short
        graphed = (device.type == "cuda" and not streamed and not self.parallel.active
                   and getattr(transformer, "_lora_run_mode", None) == "speed")
        try:
            with torch.no_grad(), acc.autocast(), graphed_forward(pipe.transformer, enabled=graphed) as graphs:
                prompts = self.sample_prompts()
                texts = []                         # each prompt's encoding, a batch of 1 (the cache's, or live)
                for prompt in prompts:
                    text = {k: v[None] for k, v in state.texts[prompt].items()}
                    if state.te_module is not None:
                        text.update(adapter.encode_captions([prompt], encoders=(adapter.trainable_text_encoder,)))
                    texts.append(text)
                # the images of one strength in as few pipeline calls as the limit allows, the prompts mixed, each
                # image with its prompt's row of text (generate.py's grouping); written under the same names
                jobs = [{"prompt": n, "seed": seed, "strength": strength, "steps": r.sample.steps,
                         "guidance": r.sample.guidance, "width": r.sample.width, "height": r.sample.height}
                        for n in range(len(prompts)) for strength in r.sample.strengths for seed in r.sample.seeds]
                paths = {}
                for group in batch_groups(jobs, lambda w, h: limit):
                    batch = [jobs[i] for i in group]
                    text = {k: torch.cat([texts[job["prompt"]][k] for job in batch]) for k in texts[batch[0]["prompt"]]}
                    images = adapter.generate_batch(pipe, prompt=None, seeds=[job["seed"] for job in batch],
                                                    steps=r.sample.steps, guidance=r.sample.guidance,
                                                    width=r.sample.width, height=r.sample.height,
                                                    lora_scale=batch[0]["strength"], text=text)
                    for job, image in zip(batch, images):
                        key = (job["prompt"], job["seed"], job["strength"])
                        paths[key] = folder / f"p{key[0]:02d}-seed{key[1]}-x{key[2]:g}.png"
                        if self.main:
                            atomic_write_bytes(paths[key], _png_bytes(image))
                if self.main:
                    written = [str(paths[n, seed, strength]) for n in range(len(prompts))
                               for seed in r.sample.seeds for strength in r.sample.strengths]
        finally:
            torch.set_rng_state(rng_state)
            adapter.sample_vae.to("cpu")
            if was_training:
                transformer.train()
            self.sample_rounds.append(time.perf_counter() - started)
            self._mark_round()
        # the first round, and the round whose recording failed (later rounds run eagerly without trying: no calls)
        if graphed and self.main and (len(self.sample_rounds) == 1 or graphs.failed and graphs.calls):
            self.run_dir.log(f"samples: the transformer's {graphs.describe()}")
        if not self.main:
            return []
        self.ctx.artifacts.setdefault("samples", []).extend(written)
        self.run_dir.log(f"samples for step {number}: {len(written)} image(s) in {folder}")
        self.ctx.hook.samples_written(run=self.ctx, step=number, paths=written)
        return written

    # ---------------------------------------------------------------------------------------- finish
    def _finish(self, state: LoopState) -> None:
        r = self.recipe
        if not (self.main or self.parallel.fsdp):
            return
        # the LoRA first: slow or failed final samples never lose it (under FSDP every rank gathers; rank 0 writes)
        t_sd, te_sd = self._lora_dicts(state.transformer, state.te_module)
        if self.main:
            meta = run_metadata(r, step=state.total, counts=state.counts, started_at=self.started_at)
            written = write_loras(state.adapter, self.run_dir.path, r.output.name, t_sd, te_sd, recipe=r,
                                  metadata=meta, claim=self.run_dir.claim)
            for fmt, path in written.items():
                self.ctx.artifacts[f"lora_{fmt}"] = str(path)
            digest_soon(written.values())      # for the manifest's record, while the samples and evaluation run
            self.run_dir.log("LoRA written: " + ", ".join(f"{k} {v}" for k, v in written.items()))
        if r.sample.every_steps:
            self._samples(state, state.total)     # under FSDP every rank takes part
        if not self.main:
            return
        if self.first_loss is not None:       # a run resumed from an older checkpoint does not know it
            self.ctx.artifacts["loss_first"] = self.first_loss
        if state.losses:
            self.ctx.artifacts["loss_last"] = state.losses[-1]
        self.ctx.artifacts["steps"] = state.total


def _shape_name(shape: Any) -> str:
    """``(batch, (C, H, W))`` as ``"1x16x64x64"``: a step shape as a JSON key."""
    if isinstance(shape, tuple) and len(shape) == 2 and isinstance(shape[1], tuple):
        return "x".join(str(x) for x in (shape[0], *shape[1]))
    return str(shape)


def _compiler_seconds() -> dict[str, Any]:
    """Where this process's compile time went, from what torch records (empty when nothing was compiled):
    ``dynamo_s``, tracing and compiling or loading graphs from the caches (TorchDynamo's compile calls, which
    include the backend's); ``backend_s``, the part in the backend (inductor: code generation, or loading from
    its caches); ``cache_load_s``, inductor's cache loads; plus, with FlashAttention-4,
    ``attention_first_calls_s``, the host time of its kernels' first calls (their JIT compilation)."""
    import sys

    out: dict[str, Any] = {}
    utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(utils, "compilation_time_metrics", None) or {}
    for key, name in (("_compile.compile_inner", "dynamo_s"), ("OutputGraph.call_user_compiler", "backend_s"),
                      ("AOTAutogradCache.inductor_load", "cache_load_s")):
        if metrics.get(key):
            out[name] = round(sum(metrics[key]), 2)
    from .attention import FIRST_CALLS

    if FIRST_CALLS:
        out["attention_first_calls_s"] = round(sum(FIRST_CALLS.values()), 2)
    return out


class _StateOf:
    """An optimizer stand-in for ``checkpoint.save``: its (whole-tensor) state dict."""

    def __init__(self, state_dict: dict[str, Any]):
        self._sd = state_dict

    def state_dict(self) -> dict[str, Any]:
        return self._sd



def release_gpu() -> None:
    """Free what training held on the GPU: compiled graphs (and their CUDA-graph memory pools) and the
    model they reference, so that evaluation (or the next run in this process) starts from an empty card."""
    import gc

    import torch

    if not torch.cuda.is_available():
        return
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort: an older torch without reset still frees below
        pass
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _memory_gib(device: Any) -> float:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    except Exception:  # noqa: BLE001
        return 0.0


STAGE_ON_GPU_BYTES = 512 * 2**20


def stage_caches(latents: dict[int, Any], texts: dict[str, dict[str, Any]], device: Any,
                 limit: int = STAGE_ON_GPU_BYTES) -> bool:
    """Move the cached latents and text embeddings to the GPU once, before training, when together they take
    at most `limit` bytes (an identity dataset: ~20 images, ~100 MB); otherwise each step copies its batch.
    Returns whether they were moved."""
    if getattr(device, "type", str(device)) != "cuda":
        return False
    tensors = list(latents.values()) + [t for entry in texts.values() for t in entry.values()]
    if sum(t.numel() * t.element_size() for t in tensors) > limit:
        return False
    for key, value in latents.items():
        latents[key] = value.to(device, non_blocking=True)
    for entry in texts.values():
        for key, value in entry.items():
            entry[key] = value.to(device, non_blocking=True)
    return True


def _png_bytes(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
