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
    """Why ``backend`` cannot train in this environment (the `train` extra's packages not installed), or None."""
    missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"backend \"{backend}\" trains with {', '.join(missing)}, not installed here: pip install "
            "'lora-run[train]' (on a GPU machine, install the torch build for its CUDA first)")


class NativeBackend:
    """In-process trainer: diffusers + peft + accelerate, one adapter per model family."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.recipe = ctx.recipe

    def _adapter(self) -> Any:
        from .adapters import adapter_class

        shown = self.ctx.loaded.shown if self.ctx.loaded else "recipe.toml"
        return adapter_class(self.recipe.model.family)(self.recipe, options=self.ctx.options, shown=shown)

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
                         + (" — on CUDA under memory_mode \"auto\" a memory setting the GPU plan decides (a GPU "
                            "with room keeps the base in bf16)"
                            if r.train.memory_mode == "auto" and r.train.mixed_precision != "no" else ""))
        if r.train.gradient_checkpointing and r.train.memory_mode == "auto" and r.train.mixed_precision != "no":
            notes.append("gradient_checkpointing: on CUDA under memory_mode \"auto\" the GPU plan decides how many "
                         "blocks are recomputed (none where the speed plan fits)")
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
        estimate = estimate_memory_gib(r)
        if r.train.mixed_precision != "no" and estimate is not None:
            from .memory import gpu_mode_estimates

            modes = gpu_mode_estimates(r)
            notes.append("CUDA memory modes at " + f"{r.dataset.resolution}²: " + "; ".join(
                f"{m}: {gib:.1f} GiB ({desc})" for m, (desc, gib) in modes.items())
                + (" — auto picks the fastest that fits the free GPU memory" if r.train.memory_mode == "auto" else ""))
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
