"""Recipe → diffusion-pipe: the main config, the dataset config and the launch command (no torch, no I/O).

Every key written here is one diffusion-pipe's code reads at commit :data:`keydata.SOURCE_COMMIT`
(checked by :func:`keydata.config_problems` / :func:`keydata.dataset_problems`). Recipe features that
diffusion-pipe cannot honour exactly are refused by the capability table in ``__init__`` or by
:func:`recipe_problems`, never dropped.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import attrs

from lora_run.schema import Recipe

from .options import DiffusionPipeOptions

MODEL_TYPE = {"flux.1-dev": "flux", "hunyuan-image-2.1": "hunyuan_image"}
#: the model's `pixels_round_to_multiple` (models/base.py 16, models/hunyuan_image.py 32)
PIXEL_MULTIPLE = {"flux.1-dev": 16, "hunyuan-image-2.1": 32}
DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "no": "float32"}
OPTIMIZER = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "Prodigy"}
#: blocks_to_swap n swaps n//2 double and (n - n//2)·2 + 1 single blocks; at most (blocks - 2) of each.
MAX_BLOCKS_TO_SWAP = {"flux.1-dev": 34, "hunyuan-image-2.1": 36}
#: the layers diffusion-pipe's to_layers() gives the pipeline: FLUX.1 embedding + 19 double + 38 single + output;
#: HunyuanImage-2.1 embedding + 20 double + concatenation + 40 single + output
PIPELINE_LAYERS = {"flux.1-dev": 59, "hunyuan-image-2.1": 63}
DEFAULT_CHECKPOINT_MINUTES = 30
#: diffusion-pipe (8f83dbf) seeds only its evaluation (by rank); training draws come from an unseeded generator
UNSEEDED = ("[train] seed = {seed} is not used: diffusion-pipe has no seed setting and does not seed its training "
            "(LoRA init, noise and timesteps differ from run to run)")
#: the kohya copy of a FLUX.1 save against diffusion-pipe's diffusers file, bytes (at most 1.5: see disk_writes)
KOHYA_COPY_FACTOR = 2
OPTIONS_KEY = ("backend", "options", "diffusion-pipe")

KeyPath = tuple[Any, ...]


@attrs.frozen
class Layout:
    """Where the backend's files live inside the run directory."""

    root: Path          # <run>/diffusion-pipe
    config: Path        # the main config TOML
    dataset: Path       # the dataset TOML
    output: Path        # diffusion-pipe's output_dir (it creates <UTC timestamp>/ folders in it)
    data: Path          # the staged training sets (symlinks + caption files); diffusion-pipe caches in here
    log: Path           # everything diffusion-pipe printed

    @classmethod
    def of(cls, run_dir: Path, recipe: Recipe, options: DiffusionPipeOptions | None = None,
           content: str = "") -> "Layout":
        root = Path(run_dir) / "diffusion-pipe"
        return cls(root, root / "config.toml", root / "dataset.toml", root / "output",
                   staging_root(recipe, root, options, content), root / "train.log")

    def relative(self, path: Path, run_dir: Path) -> str:
        return str(path.relative_to(run_dir))


def staging_root(recipe: Recipe, root: Path, options: DiffusionPipeOptions | None = None, content: str = "") -> Path:
    """`<run>/diffusion-pipe/data`, or with `[train] cache_dir` a folder `<cache_dir>/diffusion-pipe/dataset-<hash>`
    that later runs share, for diffusion-pipe's latent / text-embedding cache there. Its name covers everything the
    folder holds: ``content`` (`stage.content_digest`: each staged file's name, what it is made from and each caption's
    text, so the trigger, caption files and defaults), the `[dataset]` table (paths, trigger, caption extension,
    repeats, buckets, …) and the model files and precisions the cache is made with (`lora_run_engines.dataset_key`,
    which kohya's staged view is keyed by too), and whether images are copied. Recipes that stage different files
    never share a folder, so no run writes over a file another one reads."""
    if not recipe.train.cache_dir:
        return root / "data"
    from lora_run_engines import dataset_key

    return Path(recipe.train.cache_dir) / "diffusion-pipe" / dataset_key(recipe, *_cache_settings(recipe, options),
                                                                         content)


def _cache_settings(recipe: Recipe, options: DiffusionPipeOptions | None) -> tuple[Any, ...]:
    m = recipe.model
    return (m.files, m.base_precision, recipe.train.mixed_precision,
            bool(options.copy_images) if options is not None else False)


def staging_key(recipe: Recipe, options: DiffusionPipeOptions | None = None) -> str:
    """The staging folder's key without the staged content (`lora_run_engines.stage.MARKER`): the folders of one
    recipe's dataset table, model and settings, whatever was staged in them."""
    from lora_run_engines import dataset_key

    return dataset_key(recipe, *_cache_settings(recipe, options))


def set_names(recipe: Recipe) -> list[str]:
    """Staged folder names: `subject`, then `reg-0`, `reg-1`, … (order of `[[dataset.regularization]]`)."""
    return ["subject", *(f"reg-{i}" for i in range(len(recipe.dataset.regularization)))]


def bucket_sizes(recipe: Recipe) -> list[list[int]]:
    """Our bucket grid as [width, height] pairs: sides from bucket_min to bucket_max in bucket_step, area at
    most resolution², both orientations. diffusion-pipe uses them as aspect ratios and scales each to the
    area resolution² (rounded to its 16/32-pixel grid)."""
    d = recipe.dataset
    area = d.resolution * d.resolution
    pairs: set[tuple[int, int]] = set()
    for w in range(d.bucket_min, d.bucket_max + 1, d.bucket_step):
        h = min(d.bucket_max, (area // w) // d.bucket_step * d.bucket_step)
        if h >= d.bucket_min:
            pairs.add((w, h))
            pairs.add((h, w))
    return [list(p) for p in sorted(pairs, key=lambda p: (p[0] / p[1], p[0]))]


def global_batch(recipe: Recipe, options: DiffusionPipeOptions) -> int:
    return recipe.train.batch_size * recipe.train.gradient_accumulation * (options.num_gpus // options.pipeline_stages)


def aspect_ratios(recipe: Recipe) -> list[float]:
    """diffusion-pipe's aspect buckets for our `ar_buckets`: each [w, h] as w / h rounded to 3 digits, deduplicated
    and sorted (utils/dataset.py `_process_user_provided_ars`, `dedup_and_sort`)."""
    return sorted({round(w / h, 3) for w, h in bucket_sizes(recipe)})


def bucket_of(ratios: list[float], width: int, height: int) -> int:
    """The aspect bucket diffusion-pipe puts a `width` × `height` image in: the nearest ratio in log space, the first
    on a tie (`_find_closest_ar_bucket`: np.argmin over |log(w/h) - log(ar)|)."""
    log_ar = math.log(width / height)
    diffs = [abs(log_ar - math.log(r)) for r in ratios]
    return diffs.index(min(diffs))


def size_of(recipe: Recipe, width: int, height: int) -> tuple[int, int]:
    """The size diffusion-pipe trains a `width` × `height` image at: its aspect bucket (`bucket_of`) at the area
    resolution², each side rounded to the nearest multiple of the model's pixel grid (utils/dataset.py
    `ARBucketDataset.cache_latents`); the image is scaled to cover it (up or down) and centre-cropped."""
    ratios = aspect_ratios(recipe)
    return size_at(recipe, ratios[bucket_of(ratios, width, height)])


def size_at(recipe: Recipe, ratio: float) -> tuple[int, int]:
    """diffusion-pipe's training size for an aspect bucket of ``ratio``: the area resolution², each side rounded to
    the nearest multiple of the model's pixel grid. It keeps the area, so the extreme aspect buckets of our grid
    (whose area is smaller) come out with a long side past dataset.bucket_max."""
    area, multiple = recipe.dataset.resolution ** 2, PIXEL_MULTIPLE[recipe.model.family]
    w = math.sqrt(area * ratio)
    return int(round(w / multiple) * multiple), int(round(area / w / multiple) * multiple)


def bucket_note(recipe: Recipe) -> str:
    """The plan's note on the aspect buckets: how many, the sizes diffusion-pipe trains them at, and the sides past
    dataset.bucket_min / bucket_max (diffusion-pipe has no side limits, only the area)."""
    d = recipe.dataset
    sizes = [size_at(recipe, ratio) for ratio in aspect_ratios(recipe)]
    sides = [side for size in sizes for side in size]
    past = [f"{w}×{h}" for w, h in sizes if not all(d.bucket_min <= side <= d.bucket_max for side in (w, h))]
    grid = PIXEL_MULTIPLE[recipe.model.family]
    return (f"aspect buckets: {len(sizes)} from dataset.bucket_min/max/step; diffusion-pipe trains each at the area "
            f"of {d.resolution}² (sides {min(sides)} to {max(sides)}, rounded to its {grid}-pixel grid) and scales "
            "every image to cover its bucket, up or down (images below bucket_min are left out by the dataset lint)"
            + (f"; {', '.join(past)} go past bucket_min/bucket_max = {d.bucket_min}/{d.bucket_max}, which "
               "diffusion-pipe cannot bound (it keeps the area): narrow them to keep every side inside"
               if past else ""))


def steps_per_epoch(recipe: Recipe, options: DiffusionPipeOptions, examples: int,
                    buckets: list[int] | None = None) -> int:
    """diffusion-pipe's steps per epoch. With `buckets` (the examples, images × repeats, of each aspect bucket over
    all sets, `bucket_of`) it is exact: every bucket keeps only whole global batches (`ConcatenatedBatchedDataset.
    _make_divisible_by`), so it is the sum of examples // global batch, and 0 means diffusion-pipe stops with
    "Processed dataset was empty". Without, an estimate from `examples` alone (at least 1)."""
    per_step = max(1, global_batch(recipe, options))
    if buckets is not None:
        return sum(n // per_step for n in buckets)
    return max(1, examples // per_step)


def training_length(recipe: Recipe, options: DiffusionPipeOptions, examples: int,
                    buckets: list[int] | None = None) -> tuple[int, int | None, int]:
    """(epochs, max_steps, planned steps). A `steps` recipe sets `max_steps` and an epoch count that cannot end
    the run first (each epoch has at least one step)."""
    t = recipe.train
    if t.steps is not None:
        return t.steps, t.steps, t.steps
    assert t.epochs is not None
    return t.epochs, None, t.epochs * steps_per_epoch(recipe, options, examples, buckets)


def batch_key(recipe: Recipe, options: DiffusionPipeOptions) -> KeyPath:
    """The recipe key that makes the global batch larger than 1 (for a refusal that names it)."""
    t = recipe.train
    if t.batch_size > 1:
        return ("train", "batch_size")
    if t.gradient_accumulation > 1:
        return ("train", "gradient_accumulation")
    return ("train", "gpus")


def empty_dataset_problem(recipe: Recipe, options: DiffusionPipeOptions,
                          buckets: list[int] | None) -> tuple[KeyPath, str] | None:
    """diffusion-pipe keeps, per aspect bucket, only whole global batches and raises "Processed dataset was empty"
    when no bucket holds one (utils/dataset.py `PipelineDataLoader`): refused here, naming the batch key."""
    if not buckets or steps_per_epoch(recipe, options, 0, buckets) > 0:
        return None
    gbs = global_batch(recipe, options)
    return (batch_key(recipe, options), f"the global batch is {gbs} (batch_size × gradient_accumulation × "
            f"data-parallel GPUs) but no aspect bucket holds that many examples (largest: {max(buckets)}; "
            f"{sum(buckets)} in {sum(1 for n in buckets if n)} bucket(s)): diffusion-pipe drops, per bucket, what "
            "does not fill a whole global batch and would stop with \"Processed dataset was empty\"; lower the "
            "batch, or raise dataset.repeats")


def activation_checkpointing(recipe: Recipe, options: DiffusionPipeOptions) -> bool | str:
    mode = options.activation_checkpointing
    if mode == "recipe":
        return bool(recipe.train.gradient_checkpointing)
    return {"on": True, "off": False, "unsloth": "unsloth"}[mode]


def timestep_keys(recipe: Recipe) -> dict[str, Any]:
    t = recipe.train
    if t.timestep_sampling == "uniform":
        return {"timestep_sample_method": "uniform"}
    keys: dict[str, Any] = {"timestep_sample_method": "logit_normal"}
    keys["sigmoid_scale"] = float(t.logit_std if t.timestep_sampling == "logit-normal" else t.sigmoid_scale)
    if t.timestep_sampling == "shift":
        keys["shift"] = float(t.shift)
    elif t.timestep_sampling == "flux-shift":
        keys["flux_shift"] = True
    return keys


def model_table(recipe: Recipe) -> dict[str, Any]:
    m, t = recipe.model, recipe.train
    table: dict[str, Any] = {"type": MODEL_TYPE[m.family], "dtype": DTYPE[t.mixed_precision]}
    if m.family == "flux.1-dev":
        table["diffusers_path"] = m.source or ""
        if m.files.get("transformer"):
            table["transformer_path"] = m.files.get("transformer")
        table["guidance"] = float(t.guidance)
    else:
        table.update(transformer_path=m.files.get("transformer") or "", vae_path=m.files.get("vae") or "",
                     text_encoder_path=m.files.get("qwen") or "", byt5_path=m.files.get("byt5") or "")
    if m.base_precision == "fp8":
        table["transformer_dtype"] = "float8"
    table.update(timestep_keys(recipe))
    return table


def build_config(recipe: Recipe, options: DiffusionPipeOptions, layout: Layout, *, examples: int,
                 loss_options: Any = None) -> dict[str, Any]:
    """The main config as a dict (written with tomli-w)."""
    t, o, s = recipe.train, recipe.optimizer, recipe.scheduler
    epochs, max_steps, _ = training_length(recipe, options, examples)
    config: dict[str, Any] = {
        "output_dir": str(layout.output),
        "dataset": str(layout.dataset),
        "epochs": epochs,
    }
    if max_steps is not None:
        config["max_steps"] = max_steps
    config.update({
        "micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "pipeline_stages": options.pipeline_stages,
        "gradient_clipping": float(o.max_grad_norm),
        "lr_scheduler": "constant",
        "warmup_steps": s.warmup_steps if s.name == "constant_with_warmup" else 0,
    })
    if t.save_every_epochs is not None:
        config["save_every_n_epochs"] = t.save_every_epochs
    if t.save_every_steps is not None:
        config["save_every_n_steps"] = t.save_every_steps
    if t.save_every_epochs is None and t.save_every_steps is None:
        # diffusion-pipe insists on a save cadence; the final LoRA is always saved, so ask for it only at the end
        if max_steps is not None:
            config["save_every_n_steps"] = max_steps
        else:
            config["save_every_n_epochs"] = epochs
    if options.checkpoint_every_minutes is not None:
        config["checkpoint_every_n_minutes"] = options.checkpoint_every_minutes
    elif t.save_every_epochs is not None:
        config["checkpoint_every_n_epochs"] = t.save_every_epochs
    else:
        config["checkpoint_every_n_minutes"] = DEFAULT_CHECKPOINT_MINUTES
    config["activation_checkpointing"] = activation_checkpointing(recipe, options)
    if options.reentrant_activation_checkpointing:
        config["reentrant_activation_checkpointing"] = True
    if options.partition_split:
        config["partition_method"] = "manual"
        config["partition_split"] = list(options.partition_split)
    else:
        config["partition_method"] = "parameters"
    if options.blocks_to_swap:
        config["blocks_to_swap"] = options.blocks_to_swap
    config.update({
        "save_dtype": DTYPE[recipe.output.save_precision],
        "caching_batch_size": options.caching_batch_size,
        "steps_per_print": 1,
        "logging_steps": 1,
        "eval_before_first_step": False,
        "compile": t.compile == "on",
    })
    if recipe.dataset.caption_dropout > 0:
        config["uncond_fraction"] = float(recipe.dataset.caption_dropout)
    if t.loss == "huber":
        config["huber_delta"] = float(getattr(loss_options, "c", 0.1))
    elif t.loss == "smooth-l1":
        config["smooth_l1_beta"] = float(getattr(loss_options, "beta", 1.0))
    config["model"] = model_table(recipe)
    adapter: dict[str, Any] = {"type": "lora", "rank": recipe.lora.rank, "dtype": "float32"}
    if recipe.lora.dropout > 0:
        adapter["dropout"] = float(recipe.lora.dropout)
    config["adapter"] = adapter
    config["optimizer"] = {"type": OPTIMIZER.get(o.name, o.name), "lr": float(o.lr),
                           "betas": [float(b) for b in o.betas], "weight_decay": float(o.weight_decay),
                           "eps": float(o.eps)}
    return config


def build_dataset(recipe: Recipe, layout: Layout, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """The dataset config as a dict: one [[directory]] per staged set (captions always written, so
    `skip_empty_caption = false` drops nothing; aspect buckets from our bucket grid). A regularisation set
    with no usable image (`counts`) is left out: diffusion-pipe fails on an empty directory."""
    d = recipe.dataset
    directories = [{"path": str(layout.data / "subject"), "num_repeats": d.repeats}]
    for i, reg in enumerate(d.regularization):
        if counts is not None and not counts.get(f"reg-{i}"):
            continue
        directories.append({"path": str(layout.data / f"reg-{i}"), "num_repeats": reg.repeats})
    return {
        "resolutions": [d.resolution],
        "enable_ar_bucket": True,
        "ar_buckets": bucket_sizes(recipe),
        "frame_buckets": [1],
        "skip_empty_caption": False,
        "directory": directories,
    }


def launch_argv(launcher: str, config: Path, options: DiffusionPipeOptions,
                resume_from: str | None = None) -> list[str]:
    """`deepspeed --num_gpus=N [--master_port=P] train.py --deepspeed --config FILE [...]` (run from the checkout)."""
    argv = [launcher, f"--num_gpus={options.num_gpus}"]
    if options.master_port is not None:
        argv.append(f"--master_port={options.master_port}")
    argv += ["train.py", "--deepspeed", "--config", str(config)]
    if resume_from is not None:
        argv += ["--resume_from_checkpoint", resume_from]
    if options.master_port is not None:       # train.py sets MASTER_PORT from its own flag (default 29500)
        argv += ["--master_port", str(options.master_port)]
    return argv


def child_env(options: DiffusionPipeOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    # torch (2.9 and newer, cuDNN 9.15+) puts cuDNN's attention first on Hopper/Blackwell data-centre GPUs.
    # Inside diffusers' FLUX blocks its backward crashed our native backend on an H200 (torch 2.11), and it is
    # the suspected cause of diffusion-pipe's step-2 NaN there: the same training on the CPU stays finite
    # (bench/engine_dpipe_nan_cpu.py), so the NaN comes from a device kernel. These variables move it behind
    # FlashAttention in the engine's processes (the newer and the older name); a value the user exported wins.
    env.setdefault("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    env.setdefault("TORCH_CUDNN_SDPA_PREFERRED", "0")
    if options.nccl_p2p_disable:
        env["NCCL_P2P_DISABLE"] = "1"
    if options.nccl_ib_disable:
        env["NCCL_IB_DISABLE"] = "1"
    if options.expandable_segments:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def recipe_problems(recipe: Recipe, options: DiffusionPipeOptions | None) -> list[tuple[KeyPath, str]]:
    """Values diffusion-pipe cannot honour that the feature table does not cover (each names its key)."""
    out: list[tuple[KeyPath, str]] = []
    m, t = recipe.model, recipe.train
    if m.family == "flux.1-dev":
        if not m.source:
            out.append((("model", "source"), "diffusion-pipe needs the FLUX.1-dev diffusers folder (its "
                        "`diffusers_path`: the VAE, CLIP-L and T5 are loaded from it even when "
                        "[model.files] transformer is given); set [model] source to that folder"))
        elif not os.path.isabs(m.source):
            out.append((("model", "source"), f"\"{m.source}\" looks like a hub id; diffusion-pipe needs a local "
                        "diffusers folder (download it first, e.g. `huggingface-cli download "
                        f"{m.source} --local-dir ...`) and set [model] source to that path"))
    elif m.family == "hunyuan-image-2.1":
        for name, what in (("transformer", "hunyuanimage2.1.safetensors"), ("vae", "hunyuan_image_2.1_vae_fp16"
                           ".safetensors"), ("qwen", "qwen_2.5_vl_7b.safetensors"),
                           ("byt5", "byt5_small_glyphxl_fp16.safetensors")):
            if not m.files.get(name):
                out.append((("model", "files", name), f"diffusion-pipe loads HunyuanImage-2.1 from the four "
                            f"ComfyUI files; set [model.files] {name} (e.g. {what})"))
    if t.timestep_sampling == "logit-normal" and t.logit_mean != 0.0:
        out.append((("train", "logit_mean"), "diffusion-pipe's logit-normal sampling has mean 0 (only the "
                    "scale is configurable, as sigmoid_scale); set logit_mean = 0"))
    if recipe.scheduler.name == "constant" and recipe.scheduler.warmup_steps > 0:
        out.append((("scheduler", "warmup_steps"), "the `constant` schedule has no warmup; use "
                    "scheduler.name = \"constant_with_warmup\" or set warmup_steps = 0"))
    if recipe.lora.init != "default":
        out.append((("lora", "init"), "diffusion-pipe always uses peft's default LoRA init (Kaiming A, zero "
                    "B); set lora.init = \"default\""))
    if options is None:
        return out
    key = OPTIONS_KEY
    if options.num_gpus % options.pipeline_stages:
        out.append(((*key, "pipeline_stages"), f"must divide num_gpus ({options.num_gpus}); got "
                    f"{options.pipeline_stages}"))
    if options.blocks_to_swap:
        if options.pipeline_stages != 1:
            out.append(((*key, "blocks_to_swap"), "block swapping needs pipeline_stages = 1"))
        limit = MAX_BLOCKS_TO_SWAP.get(m.family)
        if limit is not None and options.blocks_to_swap > limit:
            out.append(((*key, "blocks_to_swap"), f"at most {limit} for {m.family} (diffusion-pipe keeps two "
                        f"double and two single blocks on the GPU); got {options.blocks_to_swap}"))
    split = options.partition_split
    if split:
        if len(split) != options.pipeline_stages - 1:
            out.append(((*key, "partition_split"), f"needs pipeline_stages - 1 = {options.pipeline_stages - 1} "
                        f"numbers, got {len(split)}"))
        elif any(b <= a for a, b in zip(split, split[1:])) or split[0] < 1:
            out.append(((*key, "partition_split"), f"must be increasing layer indices >= 1, got {split}"))
        elif m.family in PIPELINE_LAYERS and split[-1] >= PIPELINE_LAYERS[m.family]:
            out.append(((*key, "partition_split"), f"{m.family} has {PIPELINE_LAYERS[m.family]} pipeline layers "
                        f"(indices 0 to {PIPELINE_LAYERS[m.family] - 1}), so every index must be at most "
                        f"{PIPELINE_LAYERS[m.family] - 1}, leaving the last stage a layer; got {split}"))
    return out


def notes(recipe: Recipe, options: DiffusionPipeOptions, layout: Layout, examples: int,
          counts: dict[str, int] | None = None, buckets: list[int] | None = None) -> list[str]:
    """What a user should know about this translation (shown by `lora-run plan`)."""
    r, t = recipe, recipe.train
    out = [
        f"training images are staged in {layout.data} (symbolic links to your files plus the training "
        "captions, trigger policy applied); diffusion-pipe writes its latent and text-embedding cache under "
        f"{layout.data}/<set>/cache/{MODEL_TYPE[r.model.family]}/, never into your dataset folders",
        f"LoRA alpha = rank = {r.lora.rank} (diffusion-pipe forces it), on every Linear of the transformer "
        "blocks (targets = \"all-linear\"); the adapter trains in float32 and is saved as "
        f"{DTYPE[r.output.save_precision]}",
        bucket_note(r),
        UNSEEDED.format(seed=t.seed),
    ]
    if t.steps is not None:
        out.append(f"max_steps = {t.steps} ends the run; epochs = {t.steps} is only an upper bound")
    else:
        if buckets:
            gbs = global_batch(r, options)
            kept = sum(n // gbs * gbs for n in buckets)
            out.append(f"{sum(buckets)} examples per epoch in {sum(1 for n in buckets if n)} aspect bucket(s) → "
                       f"{steps_per_epoch(r, options, examples, buckets)} steps at a global batch of {gbs}"
                       + (f" (diffusion-pipe drops {sum(buckets) - kept} per epoch: in each bucket what does not "
                          "fill a whole global batch)" if kept < sum(buckets) else ""))
        else:
            out.append(f"{examples} examples per epoch ≈ {steps_per_epoch(r, options, examples)} steps at a global "
                       f"batch of {global_batch(r, options)} (an estimate: diffusion-pipe drops, per aspect bucket, "
                       "what does not fill a whole global batch)")
    for i, reg in enumerate(r.dataset.regularization):
        if counts is not None and not counts.get(f"reg-{i}"):
            out.append(f"[[dataset.regularization]] {i} ({reg.path}) has no usable image and is left out")
    if global_batch(r, options) > 1:
        out.append(f"global batch {global_batch(r, options)}: buckets holding fewer images than that are "
                   "dropped by diffusion-pipe; with a small dataset keep batch_size = 1")
    if t.mixed_precision == "fp16":
        out.append("[train] mixed_precision = \"fp16\" → [model] dtype = \"float16\" without loss scaling: diffusion-pipe "
                   "never enables DeepSpeed's fp16 mode (train.py builds its DeepSpeed config without an fp16 "
                   "section), so small float16 gradients underflow to zero, unlike the native backend's scaled fp16; "
                   "use \"bf16\"")
    if r.dataset.caption_dropout > 0:
        out.append(f"caption_dropout → uncond_fraction = {r.dataset.caption_dropout}: an undocumented diffusion-pipe "
                   "key (read by train.py at the pinned commit) that swaps in the cached empty-caption embedding")
    if r.model.family == "flux.1-dev":
        ignored = [n for n in ("vae", "clip_l", "t5xxl") if r.model.files.get(n)]
        if ignored:
            out.append(f"[model.files] {', '.join(ignored)} not used: diffusion-pipe loads the VAE and text "
                       f"encoders from the diffusers folder {r.model.source}")
    elif r.model.source:
        out.append(f"[model] source {r.model.source} not used: diffusion-pipe reads the ComfyUI files only")
    if r.model.revision:
        out.append("[model] revision not used: diffusion-pipe reads local files")
    if t.num_workers:
        out.append("[train] num_workers not used: diffusion-pipe sizes its own data loading")
    if t.memory_mode != "auto":
        out.append("[train] memory_mode is a native-backend setting; here use [backend.diffusion-pipe] "
                   "blocks_to_swap / activation_checkpointing / pipeline_stages")
    if t.attention != "auto":
        out.append("[train] attention is a native-backend setting; diffusion-pipe uses the model's own attention")
    if t.gpu_memory_gib is not None:
        out.append(f"[train] gpu_memory_gib = {t.gpu_memory_gib:g} not used: an in-process backends' setting; "
                   "diffusion-pipe plans no memory budget (use [backend.diffusion-pipe] blocks_to_swap / "
                   "pipeline_stages)")
    if t.cuda_graphs != "auto":
        out.append(f"[train] cuda_graphs = \"{t.cuda_graphs}\" not used: a native-backend speed setting")
    if t.compile == "auto":
        out.append("[train] compile = \"auto\" → compile = false (diffusion-pipe's torch.compile is not tested on "
                   "every model; set compile = \"on\" to use it)")
    checkpoint = (f"every {options.checkpoint_every_minutes} minutes" if options.checkpoint_every_minutes else
                  f"every {t.save_every_epochs} epoch(s)" if t.save_every_epochs else
                  f"every {DEFAULT_CHECKPOINT_MINUTES} minutes")
    out.append(f"resumable DeepSpeed state is written {checkpoint} and at the end (`--resume` needs one); "
               "Ctrl-C asks diffusion-pipe to write one and stop")
    if options.num_gpus > 1:
        out.append(f"{options.num_gpus} GPUs: {options.pipeline_stages} pipeline stage(s) × "
                   f"{options.num_gpus // options.pipeline_stages} data-parallel copies")
    if "comfyui" in r.output.formats and r.model.family == "flux.1-dev":
        out.append("output format comfyui skipped: ComfyUI loads FLUX.1's kohya and diffusers files directly")
    return out


def expected_outputs(recipe: Recipe, run_dir: Path) -> list[str]:
    name = recipe.output.name
    files = []
    if "kohya" in recipe.output.formats:
        files.append(str(Path(run_dir) / f"{name}.safetensors"))
    if "diffusers" in recipe.output.formats:
        files.append(str(Path(run_dir) / f"{name}.diffusers.safetensors"))
    if "comfyui" in recipe.output.formats and recipe.model.family != "flux.1-dev":
        files.append(str(Path(run_dir) / f"{name}.comfyui.safetensors"))
    return files


def disk_writes(recipe: Recipe, config: dict[str, Any], parameters: int, epochs: int) -> Any:
    """What diffusion-pipe and lora-run will write for this generated ``config`` (``parameters``: the LoRA's;
    ``epochs``: the epochs it runs), for the disk-space check before launch. diffusion-pipe (8f83dbf) saves a
    LoRA folder at every save_every_n_steps (epochs) and always one at the end; lora-run converts each into
    ``checkpoints/<name>/`` in [output] formats and keeps [train] keep_last of both, and writes the final LoRA
    into the run folder. DeepSpeed checkpoints (fp32 LoRA weights and the optimizer state) come every
    checkpoint_every_n_epochs and at the end; with checkpoint_every_n_minutes their number depends on the time,
    so as many as lora-run keeps at once are counted."""
    from lora_run.files import human_size
    from lora_run_engines.disk import lora_file_bytes, multiples, state_bytes
    from lora_run_rundir.space import Writes

    keep = recipe.train.keep_last
    lora = lora_file_bytes(parameters, recipe.output.save_precision)
    flux = recipe.model.family == "flux.1-dev"
    formats = [f for f in recipe.output.formats if f != "comfyui" or not flux]
    copies = len(formats)
    # a FLUX kohya copy stacks q, k, v (and the single blocks' MLP input) into sd-scripts' fused layers with
    # block-diagonal up weights: 1.5 times the diffusers file at full size (1.46 on the recorded GPU run)
    converted = sum(KOHYA_COPY_FACTOR * lora if f == "kohya" and flux else lora for f in formats)

    def with_final(every: int, total: int) -> int:
        return multiples(every, total) + (1 if total % every else 0)

    if "save_every_n_steps" in config:
        saves = with_final(config["save_every_n_steps"], config.get("max_steps") or epochs)
    else:
        saves = with_final(config["save_every_n_epochs"], epochs)
    checkpoints = (with_final(config["checkpoint_every_n_epochs"], epochs) if "checkpoint_every_n_epochs" in config
                   else keep + 1)
    state = state_bytes(parameters, recipe.optimizer.name)
    others = ((f"{min(checkpoints, keep + 1)} DeepSpeed checkpoint(s) of {human_size(state)} at once (fp32 LoRA "
               "weights and optimizer state)", min(checkpoints, keep + 1) * state),)
    return Writes("diffusion-pipe", saves, lora + converted,
                  f"diffusion-pipe's LoRA of {human_size(lora)} and lora-run's {copies} converted cop"
                  f"{'y' if copies == 1 else 'ies'}", converted, "the final LoRA in [output] formats", others)
