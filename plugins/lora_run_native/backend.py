"""The `native` backend object: ``check()`` and ``plan()`` (fast, no torch) and ``run()`` (the trainer)."""
from __future__ import annotations

import importlib.util
import math
from typing import Any

import attrs

from lora_run.run import Plan
from lora_run.schema import option


@attrs.frozen(kw_only=True)
class NativeOptions:
    """`[backend.native]` (or `[backend.flux]`) options."""

    text_max_length: int | None = option(None, "Text tokens of the sequence encoder (FLUX: T5, default and "
                                         "maximum 512). Lower values train faster with short captions.", ge=8, le=4096)
    tensorboard: bool = option(True, "Write TensorBoard logs to `<run>/logs` (needs the tensorboard package).")
    progress_bar: bool = option(True, "Show a progress bar (step, loss, it/s, ETA, memory) on stderr.")
    fsdp: bool = option(False, "Several processes: shard the frozen base model over them with FSDP2 (through "
                        "accelerate) instead of a full copy per GPU; for models that do not fit one GPU. Not with "
                        "fp8 base storage, `memory_mode = \"low-vram\"` or text-encoder training "
                        "(see `lora-run docs multi-gpu`).")


#: What the native backend trains with: the `train` extra's packages it imports (import names).
TRAIN_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def missing_packages(backend: str = "native") -> str | None:
    """Why ``backend`` cannot train in this environment (the `train` extra's packages not installed, or older than
    the extra asks for), or None."""
    missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return (f"backend \"{backend}\" trains with {', '.join(missing)}, not installed here: pip install "
                "'lora-run[train]' (on a GPU machine, install the torch build for its CUDA first)")
    if old := too_old("train"):
        return (f"backend \"{backend}\" needs newer {', '.join(old)}: pip install -U 'lora-run[train]' (on a GPU "
                "machine, keep the torch build for its CUDA)")
    return None


def too_old(extra: str, distribution: str = "lora-run") -> list[str]:
    """The packages of ``distribution``'s ``extra`` that are installed at a version it does not accept, as
    "diffusers 0.35.2 (lora-run asks for >=0.37)"; pip keeps an installed release that an older lora-run accepted,
    and `--no-deps` installs ignore the bounds."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    try:
        wanted = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:     # run from a source tree that was never installed: nothing to compare
        return []
    old = []
    for text in wanted:
        try:
            req = Requirement(text)
            if req.marker is None or not req.marker.evaluate({"extra": extra}):
                continue
            have = metadata.version(req.name)
        except (InvalidRequirement, metadata.PackageNotFoundError):
            continue       # not installed: `missing_packages` names what the backend imports
        if not req.specifier.contains(have, prereleases=True):
            old.append(f"{req.name} {have} ({distribution} asks for {req.specifier})")
    return old


class NativeBackend:
    """In-process trainer: diffusers + peft + accelerate, one adapter per model family."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.recipe = ctx.recipe

    def _adapter(self) -> Any:
        from .adapters import adapter_class

        return adapter_class(self.recipe.model.family)(self.recipe, options=self.ctx.options, shown=self._shown())

    # ---------------------------------------------------------------------------------------------- check
    def check(self) -> list[tuple[tuple, str]]:
        r = self.recipe
        problems = list(self._adapter().check_sources())
        if (why := missing_packages(r.backend.name or "native")) is not None:
            problems.insert(0, (("backend", "name"), why))
        for name, package in (("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")):
            if r.optimizer.name == name and importlib.util.find_spec(package) is None:
                problems.append((("optimizer", "name"), f"\"{name}\" needs the {package} package (pip install "
                                 f"{package}); or use \"adamw\" / \"adafactor\""))
        multiple = self._adapter().pixel_multiple
        for key in ("width", "height"):
            value = getattr(r.sample, key)
            if r.sample.every_steps and value % multiple:
                problems.append((("sample", key), f"must be a multiple of {multiple} for {r.model.family}, got {value}"))
        if getattr(self.ctx.options, "fsdp", False):
            for key, bad, why in ((("model", "base_precision"), r.model.base_precision == "fp8", "fp8 base storage"),
                                  (("train", "memory_mode"), r.train.memory_mode == "low-vram", "block offload"),
                                  (("text_encoder", "train"), r.text_encoder.train, "text-encoder training")):
                if bad:
                    problems.append((key, f"{why} cannot be combined with [backend.{r.backend.name}] fsdp = true; "
                                     "turn one of them off"))
        from .perfmodel import SHAPES, refusal_key

        if r.train.mixed_precision != "no" and r.train.gpu_memory_gib is not None and r.model.family in SHAPES:
            _shape, size_note, _plan, _gib, refusal = self._gpu_plan()
            if refusal is not None and size_note is None:     # shown at its key: the message without its "[key] "
                key = refusal_key(r.train.memory_mode, r.train.gpu_memory_gib)
                problems.append((key, refusal.removeprefix(f"[{'.'.join(key)}] ")))
        import re

        for n, pattern in enumerate(r.lora.modules):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append((("lora", "modules", n), f"{pattern!r} is not a valid regular expression ({exc})"))
        return problems

    # ----------------------------------------------------------------------------------------------- plan
    def _planned_steps(self) -> tuple[int, dict[str, Any]]:
        """Steps (exact for `steps`; for `epochs` computed from the dataset's buckets, no torch)."""
        from lora_run_folder.images import ImageProblem, open_rgb

        from .data import EpochPlanner, choose_bucket, make_buckets

        r = self.recipe
        details: dict[str, Any] = {}
        items = self.ctx.items
        if not items and r.train.steps is None:       # `lora-run plan` does not lint; epochs need the images
            from lora_run.run import lint

            try:
                items = lint(r, self.ctx.plugins).usable
            except Exception:  # noqa: BLE001 - the plan still shows what it can
                items = []
        if not items:
            return (r.train.steps or 0), details
        adapter_cls = type(self._adapter())
        d = r.dataset
        buckets = make_buckets(d.resolution, d.bucket_min, d.bucket_max, d.bucket_step, adapter_cls.pixel_multiple)
        chosen = []
        for item in items:
            try:
                size = open_rgb(item.image).image.size
            except ImageProblem:
                continue
            chosen.append(choose_bucket(size, buckets, max(d.bucket_step, adapter_cls.pixel_multiple)))
        usable = items[:len(chosen)]
        planner = EpochPlanner(usable, d, chosen, seed=r.train.seed, batch_size=r.train.batch_size * r.train.gpus)
        counts: dict[str, int] = {}
        for b in chosen:
            counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + 1
        details["buckets"] = counts
        details["batches_per_epoch"] = planner.batches_per_epoch
        steps = r.train.steps or math.ceil((r.train.epochs or 1) * planner.batches_per_epoch / r.train.gradient_accumulation)
        details["epochs"] = round(steps * r.train.gradient_accumulation / max(1, planner.batches_per_epoch), 2)
        return steps, details

    def plan(self) -> Plan:
        from .memory import estimate_memory_gib

        r = self.recipe
        adapter = self._adapter()
        steps, details = self._planned_steps()
        run_dir = self.ctx.run_dir
        base = str(run_dir.path) if run_dir else "<run>"
        outputs = [f"{base}/{adapter.output_name(fmt, r.output.name)}" for fmt in r.output.formats
                   if fmt in adapter.lora_formats]
        notes = [f"{r.model.family} via diffusers + peft + accelerate; objective: "
                 + ("rectified flow (x_t = (1-σ)·x0 + σ·ε, target ε - x0)" if adapter.objective == "flow"
                    else "DDPM" + (f" ({adapter.schedule_note()})" if hasattr(adapter, "schedule_note") else ""))]
        if r.model.base_precision == "fp8":
            notes.append("base weights stored in float8 (e4m3), computed in "
                         + {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}[r.train.mixed_precision]
                         + (" — on CUDA a memory setting the GPU plan decides (below)"
                            if r.train.mixed_precision != "no" else ""))
        if r.train.noise_offset > 0:
            notes.append(f"noise offset {r.train.noise_offset}: ε += offset·N(0,1) per sample and latent channel, before "
                         "x_t and the target are formed")
        if r.text_encoder.train:
            te_steps = math.ceil(steps * r.text_encoder.train_fraction)
            notes.append(f"CLIP-L text-encoder LoRA trained for the first {te_steps} steps at "
                         f"{r.text_encoder.lr_ratio}× the LR, then frozen (playbook §5)")
        for fmt in r.output.formats:
            if fmt not in adapter.lora_formats:
                notes.append(f"output format {fmt} is not available for {r.model.family}; skipped"
                             + (f" ({adapter.format_notes[fmt]})" if fmt in adapter.format_notes else ""))
        notes.extend(adapter.lora_format_notes())
        notes.append("latents and text embeddings are cached in "
                     + (r.train.cache_dir or f"{base}/cache") + "; encoders leave memory before training")
        planned = adapter.planning_shape()
        estimate = estimate_memory_gib(r, planned[0])
        if r.train.mixed_precision != "no" and estimate is not None:
            notes.extend(self._gpu_plan_notes(planned))
            notes.append({"auto": "attention (CUDA): FlashAttention-4 on SM90/SM100 GPUs when flash-attn-4 is "
                                  "installed and passes its start-up check, else SDPA flash; the run prints which",
                          "fa4": "attention (CUDA): FlashAttention-4 required (SM90/SM100, flash-attn-4 installed)",
                          "sdpa": "attention (CUDA): SDPA flash (FlashAttention-2)"}[r.train.attention])
        if r.train.gpus > 1:
            sharding = "FSDP2 shards the frozen base" if getattr(self.ctx.options, "fsdp", False) else \
                "DDP, a full base per process"
            notes.append(f"data-parallel on {r.train.gpus} processes (torchrun; one per GPU, gloo CPU processes "
                         f"without CUDA; {sharding}): global batch "
                         f"{r.train.batch_size * r.train.gpus * r.train.gradient_accumulation} = "
                         f"{r.train.batch_size} per device × {r.train.gpus} × {r.train.gradient_accumulation} "
                         "accumulation; rank 0 writes checkpoints, samples, logs and the LoRA")
        details["timestep_sampling"] = r.train.timestep_sampling
        details["lora_targets"] = r.lora.modules or r.lora.targets
        return Plan(backend=r.backend.name, family=r.model.family, steps=steps, outputs=outputs,
                    memory_estimate_gib=None if estimate is None else round(estimate, 1), memory_mode=r.train.memory_mode,
                    notes=notes, details=details)

    def _gpu_plan(self, planned: tuple[Any, str | None] | None = None
                  ) -> tuple[Any, str | None, Any, float, str | None]:
        """The CUDA plan the run will choose at the base resolution (no bucket exceeds its area): (memory-model shape,
        why it may not be the run's model or None, PerfPlan, estimate GiB, the refusal where it cannot fit `[train]
        gpu_memory_gib` or None). The run stops on that refusal before anything is cached (`check` reports it); it
        is a note instead where the model's size is not known to be the one estimated (``planning_shape``) and
        under FSDP (one unsharded replica's estimate, not enforced). Without a cap the GPU decides, at run time."""
        from . import perfmodel
        from .memory import gpu_plan, plan_budget_gib
        from .memory import refusal as memory_refusal

        r = self.recipe
        shape, size_note = planned or self._adapter().planning_shape()
        plan, estimate = gpu_plan(r, shape)
        available, cap = plan_budget_gib(r), r.train.gpu_memory_gib
        refusal = None
        if not perfmodel.fits(estimate, available) and not getattr(self.ctx.options, "fsdp", False):
            refusal = memory_refusal(r, plan, estimate, available, f"[train.gpu_memory_gib] = {cap:g} GiB", shape,
                                     (r.dataset.resolution, r.dataset.resolution), perfmodel.WILL_STOP)
        return shape, size_note, plan, estimate, refusal

    def _gpu_plan_notes(self, planned: tuple[Any, str | None]) -> list[str]:
        """The CUDA plan the run will choose (memory_mode within `[train] gpu_memory_gib`), its estimate and why;
        RecipeError where it cannot fit (``_gpu_plan``)."""
        from lora_run.errors import RecipeError

        from . import perfmodel
        from .memory import gpu_mode_estimates

        r, res = self.recipe, self.recipe.dataset.resolution
        shape, size_note, plan, estimate, refusal = self._gpu_plan(planned)
        cap, mode = r.train.gpu_memory_gib, r.train.memory_mode
        within = "" if cap is None else f" within [train] gpu_memory_gib = {cap:g} GiB"
        notes = [f"CUDA memory modes at {res}x{res}{within}: " + "; ".join(
            f"{m}: {gib:.1f} GiB ({desc})" for m, (desc, gib) in gpu_mode_estimates(r, shape).items())]
        if mode == "auto" and cap is None:
            t = perfmodel.mode_thresholds(r.model.family, res, res, r.train.batch_size, r.lora.rank, r.lora.targets,
                                          shape, r.lora.dropout, r.train.fp8_matmul, r.train.compile != "off")
            notes.append(f"GPU plan (auto): the fastest that fits the memory the run may use (the GPU's free memory, "
                         f"or [train] gpu_memory_gib): speed from {t['speed']:.1f} GiB, memory mode from "
                         f"{t['memory']:.1f} GiB, low-vram from {t['low-vram']:.1f} GiB; with less the run stops "
                         "before training (exit 2)")
        else:
            fastest = "the fastest that fits" if refusal is None else "none fits: the smallest"
            reasons = ([fastest] if mode == "auto" else []) + perfmodel.setting_notes(
                plan, r.model.base_precision == "fp8", r.train.gradient_checkpointing)
            if cap is None and mode != "speed":
                reasons.append(f"sized for {perfmodel.default_budget_gib(mode, shape):g} GiB: the run sizes it to the "
                               "GPU's free memory")
            notes.append(f"GPU plan ({mode}{within}): {plan.describe()}, estimated {estimate:.1f} GiB"
                         + (f" ({'; '.join(reasons)})" if reasons else ""))
        if refusal is not None and size_note is None:
            raise RecipeError(f"{self._shown()}: {refusal}")
        if refusal is not None:
            notes.append(refusal.replace(perfmodel.WILL_STOP, f"not refused here: {size_note}"))
        elif size_note is not None:
            notes.append(f"memory estimates: {size_note}")
        if r.train.gpus > 1:
            notes.append("memory: every figure is per GPU; [train] gpu_memory_gib is each process's budget"
                         + (" (under FSDP the estimates are of one unsharded replica and are not enforced)"
                            if getattr(self.ctx.options, "fsdp", False) else ""))
        return notes

    def _shown(self) -> str:
        return self.ctx.loaded.shown if self.ctx.loaded else "recipe.toml"

    # ------------------------------------------------------------------------------------------------ run
    def run_processes(self, ctx: Any, output_dir: str | None, overwrite: bool) -> Any:
        """Runs of several processes (handed over by ``processes.take_part``): ``gpus = N`` without a launcher
        starts this run as N processes through torchrun's Python entry; a rank other than 0 trains without writing."""
        from .processes import follow, launch_all

        return follow(ctx, output_dir) if ctx.process.launched else launch_all(ctx, output_dir, overwrite)

    def run(self) -> None:
        from .train import Trainer, release_gpu

        try:
            Trainer(self.ctx).run()
        finally:
            release_gpu()     # evaluation loads its own pipeline: the training model must be gone first
