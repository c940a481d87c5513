"""Recipe → sd-scripts: the ``--config_file`` table, the ``--dataset_config`` table, the sample prompts
and the ``accelerate launch`` argv. Pure data; no torch, no file system writes, no sd-scripts needed.

Every mapping below is one sd-scripts really honours for the family (see docs/backend-kohya.md for the
table and the reasons behind each refusal); anything else is refused by the capability check or by
:func:`problems` with the recipe key named.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import attrs

from lora_run.schema import Recipe
from lora_run_engines import model_file_problems

FLUX = "flux.1-dev"
HUNYUAN_IMAGE = "hunyuan-image-2.1"


@attrs.frozen
class Family:
    name: str
    script: str
    network_module: str
    files: dict[str, str]                 # [model.files] key -> sd-scripts option
    file_help: dict[str, str]             # [model.files] key -> what file it is
    max_blocks_to_swap: int
    bucket_multiple: int = 32
    sample_multiple: int = 16      # sample sizes the family decodes (sd-scripts rounds down to 16 without a word)


FAMILIES: dict[str, Family] = {
    FLUX: Family(
        FLUX, "flux_train_network.py", "networks.lora_flux",
        {"transformer": "pretrained_model_name_or_path", "clip_l": "clip_l", "t5xxl": "t5xxl", "vae": "ae"},
        {"transformer": "flux1-dev.safetensors (BFL layout, from black-forest-labs/FLUX.1-dev)",
         "clip_l": "clip_l.safetensors (comfyanonymous/flux_text_encoders)",
         "t5xxl": "t5xxl_fp16.safetensors (comfyanonymous/flux_text_encoders)",
         "vae": "ae.safetensors (black-forest-labs/FLUX.1-dev)"},
        max_blocks_to_swap=35),
    HUNYUAN_IMAGE: Family(
        HUNYUAN_IMAGE, "hunyuan_image_train_network.py", "networks.lora_hunyuan_image",
        {"transformer": "pretrained_model_name_or_path", "vae": "vae", "qwen": "text_encoder", "byt5": "byt5"},
        {"transformer": "the HunyuanImage-2.1 DiT single file (hunyuanimage2.1.safetensors)",
         "vae": "the HunyuanImage-2.1 VAE single file",
         "qwen": "Qwen2.5-VL-7B in bf16 (qwen_2.5_vl_7b.safetensors)",
         "byt5": "the ByT5 glyph encoder in fp16 (byt5_small_glyphxl_fp16.safetensors)"},
        max_blocks_to_swap=37, sample_multiple=32),
}

OPTIMIZERS = {"adafactor": "Adafactor", "adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy"}
TIMESTEPS = {"uniform": "uniform", "sigmoid": "sigmoid", "shift": "shift", "flux-shift": "flux_shift",
             "logit-normal": "sigma"}
SAVE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "float"}
# network_args per target preset; a rank of 0 removes a layer. attention+mlp = every block linear except the
# modulation layers: lora_flux has per-layer-type ranks, lora_hunyuan_image only regex ranks (network_reg_dims,
# matched with re.search against names like lora_unet_double_blocks_0_img_mod_linear). "attention" alone cannot
# be expressed: the single blocks fuse q/k/v with the MLP input in one linear1 layer.
TARGET_ARGS = {
    FLUX: {"attention+mlp": ["img_mod_dim=0", "txt_mod_dim=0", "single_mod_dim=0"], "all-linear": []},
    HUNYUAN_IMAGE: {"attention+mlp": ["network_reg_dims=img_mod_lin=0,txt_mod_lin=0,modulation_lin=0"],
                    "all-linear": []},
}
#: kohya module-name fragments of the modulation layers (both families, both spellings)
MODULATION = re.compile(r"_mod_lin|modulation_lin")


@attrs.frozen
class Paths:
    """Absolute locations the generated files refer to."""

    run_dir: Path
    sd_scripts: str            # the checkout, or a placeholder for `lora-run plan` without one
    python: str
    data_dir: Path             # staged dataset view (images + captions; sd-scripts writes its caches here)

    @property
    def kohya(self) -> Path:
        return self.run_dir / "kohya"

    @property
    def output_dir(self) -> Path:
        return self.kohya / "output"

    def subset_dir(self, index: int) -> Path:
        return self.data_dir / subset_name(index)


def subset_name(index: int) -> str:
    """The staged folder of subset ``index`` (0: the subject images, n: `[[dataset.regularization]]` n - 1)."""
    return "subject" if index == 0 else f"reg{index - 1}"


@attrs.frozen
class Translation:
    family: Family
    config: dict[str, dict[str, Any]]
    dataset: dict[str, Any]
    sample_prompts: str | None
    argv: list[str]
    notes: list[str]


def text_encoder_cache(recipe: Recipe, options: Any) -> bool:
    """Whether text-encoder outputs are cached (sd-scripts forbids caching with caption dropout or TE training)."""
    if options.cache_text_encoder_outputs is not None:
        return options.cache_text_encoder_outputs
    return recipe.dataset.caption_dropout == 0 and not recipe.text_encoder.train


#: sd-scripts' prompt-file options (`line_to_prompt_dict`, matched case-insensitively against every part of a line
#: split at " --", the prompt itself included: a prompt "n blurry" is read as a negative prompt)
PROMPT_OPTIONS = re.compile(r"(?:[whfds] \d|[lg] [\d.]|(?:n|ss|cn|ctr|rcfg|fs) .)", re.IGNORECASE)


def prompt_text(prompt: str, recipe: Recipe) -> str:
    """A sample prompt as its line in the prompt file holds it: the trigger put in, on one line."""
    return " ".join(prompt.replace("{trigger}", recipe.dataset.trigger.strip()).split())


def prompt_problem(text: str) -> str | None:
    """Why sd-scripts' prompt-file reader would not read ``text`` (a :func:`prompt_text`) back as the prompt."""
    if re.search(r"(^|\s)--", text) or text.startswith("#"):
        return "contains \"--\" or starts with \"#\", which sd-scripts' prompt file reads as an option or a comment"
    if not text:
        return "is empty: sd-scripts' prompt file would read the sampling options (\"--w …\") as the prompt"
    option = PROMPT_OPTIONS.match(text)
    if option:
        return (f"starts with \"{text.split()[0]} \", which sd-scripts' prompt-file reader takes for its "
                f"\"--{text.split()[0].lower()}\" option even at the start of a line")
    return None


def prompt_number(value: float) -> str:
    """``value`` as sd-scripts' prompt-file reader reads it back: digits and a point only (it matches
    ``[\\d.]+``, so `1e-05`, as ``{:g}`` writes 0.00001, would be read as 1), the shortest exact form, no trailing
    ``.0``."""
    from decimal import Decimal

    text = format(Decimal(repr(float(value))), "f")
    return text[:-2] if text.endswith(".0") else text


def sample_lines(recipe: Recipe) -> list[str]:
    """One sd-scripts prompt-file line per prompt × seed (FLUX: `--g` embedded guidance; HunyuanImage: `--l`)."""
    s = recipe.sample
    flag = "--g" if recipe.model.family == FLUX else "--l"
    lines = []
    for prompt in s.prompts:
        text = prompt_text(prompt, recipe)
        for seed in s.seeds:
            lines.append(f"{text} --w {s.width} --h {s.height} --d {seed} --s {s.steps} "
                         f"{flag} {prompt_number(s.guidance)}")
    return lines


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None (``lora_run_formats``' one header check)."""
    from lora_run_formats import safetensors_problem as problem

    return problem(path)


def problems(recipe: Recipe, options: Any) -> list[tuple[tuple, str]]:
    """What sd-scripts cannot do with this recipe beyond the capability features (key path, message)."""
    out: list[tuple[tuple, str]] = []
    fam = FAMILIES.get(recipe.model.family)
    if fam is None:
        return out
    d, t = recipe.dataset, recipe.train
    files = recipe.model.files
    missing = [k for k in fam.files if not files.get(k)]
    if missing:
        src = f" ([model] source = \"{recipe.model.source}\" is a hub id or diffusers folder, which sd-scripts " \
              "cannot load)" if recipe.model.source else ""
        need = "; ".join(f"{k} = {fam.file_help[k]}" for k in missing)
        keys = ", ".join(missing)
        out.append((("model", "files"), f"{keys} {'is' if len(missing) == 1 else 'are'} required by the kohya "
                    f"backend: sd-scripts loads single-file checkpoints only{src}. Set {need}"))
    complete: dict[str, str] = {}
    for key in fam.files:
        value = files.get(key)
        if value and (not os.path.lexists(value) or os.path.isdir(value)):
            what = "is a folder, not a single file" if os.path.isdir(value) else "does not exist"
            out.append((("model", "files", key), f"{value} {what} (expected {fam.file_help[key]})"))
        elif value and str(value).endswith(".safetensors") and (bad := safetensors_problem(Path(value))):
            # a FIFO, a device, a link loop, a damaged file: sd-scripts would only say `SafetensorError: …
            # InvalidHeaderLength`, minutes later
            out.append((("model", "files", key), f"{value} is not a readable safetensors file ({bad}); "
                        f"expected {fam.file_help[key]}"))
        elif value:
            complete[key] = value
    # what each file is (another component's, family's or model size's: `ae.safetensors` as HunyuanImage's VAE),
    # the native backend's check: sd-scripts would find it only after loading, with a size mismatch or a KeyError
    out += model_file_problems(recipe, complete)
    for key in ("bucket_step",):
        if d.bucket_step % fam.bucket_multiple:
            out.append((("dataset", key), f"sd-scripts requires bucket_reso_steps to be a multiple of "
                        f"{fam.bucket_multiple} for {fam.name}; got {d.bucket_step}"))
    for key in ("bucket_min", "bucket_max"):
        value = getattr(d, key)
        if d.bucket_step and value % d.bucket_step:
            out.append((("dataset", key), f"must be a multiple of dataset.bucket_step ({d.bucket_step}) for "
                        f"sd-scripts (it would round it silently); got {value}"))
    weights = sorted({r.weight for r in d.regularization})
    if len(weights) > 1:
        out.append((("dataset", "regularization"), f"sets use different weights ({', '.join(map(str, weights))}); "
                    "sd-scripts has one --prior_loss_weight for all regularisation images"))
    if recipe.text_encoder.train:
        if recipe.text_encoder.train_fraction < 1.0:
            out.append((("text_encoder", "train_fraction"), f"is {recipe.text_encoder.train_fraction}; sd-scripts' "
                        "network trainer cannot stop the text-encoder LoRA early: set train_fraction = 1.0 (train it "
                        "throughout) or use the native backend"))
        if recipe.text_encoder.rank not in (None, recipe.lora.rank):
            out.append((("text_encoder", "rank"), "sd-scripts trains the text-encoder LoRA with the same rank as "
                        f"the transformer ([lora] rank = {recipe.lora.rank})"))
        if options.cache_text_encoder_outputs:
            out.append((("backend", "kohya", "cache_text_encoder_outputs"), "cannot be true while the text "
                        "encoder is trained"))
    if d.caption_dropout > 0 and options.cache_text_encoder_outputs:
        out.append((("backend", "kohya", "cache_text_encoder_outputs"), "cannot be true with dataset.caption_dropout "
                    "> 0: sd-scripts refuses caption dropout on cached text-encoder outputs"))
    if fam.name == FLUX and recipe.model.base_precision == "fp8" and t.mixed_precision == "no":
        out.append((("model", "base_precision"), "\"fp8\" becomes sd-scripts' --fp8_base, which asserts mixed "
                    "precision (train_network.py: \"fp8_base requires mixed precision='fp16' or 'bf16'\"); set "
                    "train.mixed_precision = \"bf16\" or base_precision = \"bf16\""))
    if recipe.lora.init != "default":
        out.append((("lora", "init"), "sd-scripts always initialises LoRA down with Kaiming-uniform and up with "
                    "zeros (= \"default\")"))
    if recipe.scheduler.name == "constant" and recipe.scheduler.warmup_steps:
        out.append((("scheduler", "warmup_steps"), "is set but the scheduler is \"constant\" (no warmup); use "
                    "\"constant_with_warmup\""))
    if t.memory_mode != "auto":
        out.append((("train", "memory_mode"), "is a native-backend setting; with kohya use [backend.kohya] "
                    "blocks_to_swap, [model] base_precision = \"fp8\" and train.gradient_checkpointing"))
    if t.attention != "auto":
        out.append((("train", "attention"), "is a native-backend setting; sd-scripts picks its own attention "
                    "(--sdpa / --xformers)"))
    if t.compile == "on":
        out.append((("train", "compile"), "sd-scripts' LoRA trainers do not compile the transformer blocks"))
    if t.save_every_steps and t.save_every_epochs:
        out.append((("train", "save_every_epochs"), "sd-scripts saves either every N steps or every N epochs "
                    "(epochs win); give one of them"))
    if recipe.sample.every_steps is not None:
        if any(s != 1.0 for s in recipe.sample.strengths):
            out.append((("sample", "strengths"), "sd-scripts samples with the LoRA at strength 1.0 only"))
        for key in ("width", "height"):
            value = getattr(recipe.sample, key)
            if value % fam.sample_multiple:
                out.append((("sample", key), f"must be a multiple of {fam.sample_multiple} for {fam.name}, got "
                            f"{value}: sd-scripts would sample at {max(64, value - value % 16)} without a word (it rounds "
                            "sample sizes down to a multiple of 16)"))
        for i, line in enumerate(recipe.sample.prompts):
            why = prompt_problem(prompt_text(line, recipe))
            if why:
                out.append((("sample", "prompts", i), why))
    if options.blocks_to_swap is not None:
        if options.blocks_to_swap > fam.max_blocks_to_swap:
            out.append((("backend", "kohya", "blocks_to_swap"), f"sd-scripts swaps at most "
                        f"{fam.max_blocks_to_swap} blocks for {fam.name}; got {options.blocks_to_swap}"))
        if options.cpu_offload_checkpointing and options.blocks_to_swap:
            out.append((("backend", "kohya", "cpu_offload_checkpointing"), "sd-scripts refuses it together "
                        "with blocks_to_swap"))
    if options.cpu_offload_checkpointing and not t.gradient_checkpointing:
        out.append((("backend", "kohya", "cpu_offload_checkpointing"), "needs train.gradient_checkpointing = true"))
    return out


def _lr_args(recipe: Recipe, processes: int = 1) -> dict[str, Any]:
    """The scheduler options. sd-scripts (`get_scheduler_fix`) builds the schedule over max_train_steps × processes
    scheduler steps, because accelerate steps a prepared scheduler once per process at every optimizer step, but
    takes an integer lr_warmup_steps as it is: with N processes the warmup would end after warmup_steps / N optimizer
    steps. lora-run's warmup counts optimizer steps, so it is written × processes."""
    s, lr = recipe.scheduler, recipe.optimizer.lr
    out: dict[str, Any] = {}
    name, ratio = s.name, s.min_lr_ratio
    if name in ("cosine", "linear") and ratio >= 1.0:
        name = "constant_with_warmup"      # decaying to the peak LR is a constant LR
    if name == "constant":
        out["lr_scheduler"] = "constant"
        return out
    if name == "cosine" and ratio > 0:
        out["lr_scheduler"] = "cosine_with_min_lr"
        out["lr_scheduler_min_lr_ratio"] = float(ratio)
    elif name == "linear" and ratio > 0:
        out["lr_scheduler"] = "polynomial"          # power 1 to lr_end = linear to the floor
        out["lr_scheduler_power"] = 1.0
        out["lr_scheduler_args"] = [f"lr_end={lr * ratio!r}"]
    else:
        out["lr_scheduler"] = name
    out["lr_warmup_steps"] = int(s.warmup_steps) * int(processes)
    return out


#: sd-scripts' decaying schedules as the transformers functions it calls (transformers.optimization)
SCHEDULE_FUNCTIONS = {"cosine": "get_cosine_schedule_with_warmup", "linear": "get_linear_schedule_with_warmup",
                      "cosine_with_min_lr": "get_cosine_with_min_lr_schedule_with_warmup",
                      "polynomial": "get_polynomial_decay_schedule_with_warmup"}


def resume_schedule_args(recipe: Recipe, options: Any) -> list[str]:
    """Command-line options that keep a decaying LR schedule on its course when a step-based run resumes with
    ``--max_train_steps <steps left>`` (`KohyaBackend._resume_segment`). sd-scripts builds the schedule from
    max_train_steps before ``--resume`` restores its state, and a LambdaLR's state holds the step count but not the
    totals (transformers' schedules are partials, whose arguments are not saved): a cosine over the steps left, at
    the restored step, fell to ~0 and climbed back to the peak. ``--lr_scheduler_type`` names the same transformers
    function with the run's own totals in ``--lr_scheduler_args`` (sd-scripts calls it with the optimizer and
    those; ``--lr_warmup_steps 0``: that path refuses any other). Empty for the constant schedules, whose shape has
    no total."""
    config = _lr_args(recipe, options.num_processes)
    name = config["lr_scheduler"]
    if name not in SCHEDULE_FUNCTIONS or recipe.train.steps is None:
        return []
    processes = int(options.num_processes)
    args = [f"num_warmup_steps={config['lr_warmup_steps']}",
            f"num_training_steps={int(recipe.train.steps) * processes}"]
    if name == "cosine_with_min_lr":   # sd-scripts passes num_cycles = lr_scheduler_num_cycles / 2
        cycles = (options.extra_args or {}).get("lr_scheduler_num_cycles", 1)
        args += [f"num_cycles={cycles / 2!r}", f"min_lr_rate={config['lr_scheduler_min_lr_ratio']!r}"]
    elif name == "polynomial":
        args += [f"power={config['lr_scheduler_power']!r}", *config["lr_scheduler_args"]]
    return ["--lr_scheduler_type", f"transformers.optimization.{SCHEDULE_FUNCTIONS[name]}",
            "--lr_scheduler_args", *args, "--lr_warmup_steps", "0"]


def _optimizer(recipe: Recipe, processes: int = 1) -> dict[str, Any]:
    o = recipe.optimizer
    args = [f"weight_decay={float(o.weight_decay)!r}"]
    if o.name == "adafactor":
        args = ["relative_step=False", "scale_parameter=False", "warmup_init=False", *args]
    else:
        args += [f"betas=({float(o.betas[0])!r},{float(o.betas[1])!r})", f"eps={float(o.eps)!r}"]
    return {"optimizer_type": OPTIMIZERS[o.name], "optimizer_args": args, "learning_rate": float(o.lr),
            "max_grad_norm": float(o.max_grad_norm), **_lr_args(recipe, processes)}


def _timesteps(recipe: Recipe) -> dict[str, Any]:
    t = recipe.train
    out: dict[str, Any] = {"timestep_sampling": TIMESTEPS[t.timestep_sampling]}
    if t.timestep_sampling in ("sigmoid", "shift", "flux-shift"):
        out["sigmoid_scale"] = float(t.sigmoid_scale)
    if t.timestep_sampling == "shift":
        out["discrete_flow_shift"] = float(t.shift)
    if t.timestep_sampling == "logit-normal":
        # sd-scripts' "sigma" path: u = sigmoid(N(mean, std)) indexes the scheduler's *descending* timesteps,
        # so σ ≈ 1 − u — the convention lora-run's logit-normal uses too, so the mean passes through unchanged;
        # a shift of 1.0 keeps the schedule unshifted.
        out.update(weighting_scheme="logit_normal", logit_mean=float(t.logit_mean), logit_std=float(t.logit_std),
                   discrete_flow_shift=1.0)
    return out


def _loss(recipe: Recipe) -> dict[str, Any]:
    if recipe.train.loss == "pseudo-huber":
        c = recipe.train.loss_options.get("c", 0.1)
        return {"loss_type": "huber", "huber_c": float(c), "huber_scale": 1.0, "huber_schedule": "constant"}
    return {"loss_type": "l2"}


def buckets(recipe: Recipe) -> list[tuple[int, int]]:
    """sd-scripts' bucket grid for the recipe (library/model_util.py `make_bucket_resolutions`, as the dataset file's
    resolution, min/max_bucket_reso and bucket_reso_steps give it): the square of side `resolution` rounded down to
    `bucket_step`, and for each width from `bucket_min` to `bucket_max` in `bucket_step` the tallest height up to
    `bucket_max` whose area stays within resolution², when it is at least `bucket_min`; both orientations; sorted."""
    d = recipe.dataset
    area, step = d.resolution * d.resolution, d.bucket_step
    side = d.resolution // step * step
    found = {(side, side)}
    for width in range(d.bucket_min, d.bucket_max + 1, step):
        height = min(d.bucket_max, area // width // step * step)
        if height >= d.bucket_min:
            found |= {(width, height), (height, width)}
    return sorted(found)


def bucket_of(grid: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The bucket sd-scripts puts a `width` × `height` image in (`BucketManager.select_bucket` without
    bucket_no_upscale): its own size when that is a bucket, else the nearest aspect ratio (w / h, not its log; the
    first of the sorted grid on a tie, as numpy's argmin). It is then scaled to cover the bucket and cropped."""
    if (width, height) in grid:
        return (width, height)
    errors = [abs(w / h - width / height) for w, h in grid]
    return grid[errors.index(min(errors))]


def steps_per_epoch(recipe: Recipe, subject_images: int, reg_images: int, processes: int = 1) -> int:
    """sd-scripts' optimizer steps per epoch: subject × repeats, regularisation images balanced to the same count, in
    batches shared by the ``processes`` (`accelerate launch --num_processes`) and accumulated (train_network.py:
    ceil(batches / processes / gradient_accumulation_steps))."""
    d, t = recipe.dataset, recipe.train
    samples = subject_images * d.repeats
    if reg_images and d.regularization:
        samples *= 2
    batches = math.ceil(samples / t.batch_size) if samples else 0
    return math.ceil(batches / max(1, processes) / t.gradient_accumulation) if batches else 0


def translate(recipe: Recipe, options: Any, paths: Paths, *, version: str = "", recipe_path: str = "") -> Translation:
    fam = FAMILIES[recipe.model.family]
    d, t, lora = recipe.dataset, recipe.train, recipe.lora
    notes: list[str] = []
    te_cache = text_encoder_cache(recipe, options)

    model: dict[str, Any] = {}
    for key, opt in fam.files.items():
        value = recipe.model.files.get(key)
        model[opt] = value or f"<[model.files] {key}>"
    if fam.name == FLUX:
        model["model_type"] = "flux"
    model["mixed_precision"] = t.mixed_precision
    model["save_precision"] = SAVE_PRECISION[recipe.output.save_precision]
    if recipe.model.base_precision == "fp8":
        if fam.name == FLUX:
            model["fp8_base_unet" if recipe.text_encoder.train else "fp8_base"] = True
        else:
            model["fp8_scaled"] = True
    model["gradient_checkpointing"] = bool(t.gradient_checkpointing)
    if options.cpu_offload_checkpointing:
        model["cpu_offload_checkpointing"] = True
    if options.blocks_to_swap:
        model["blocks_to_swap"] = int(options.blocks_to_swap)
    if options.cache_latents:
        model.update(cache_latents=True, cache_latents_to_disk=True)
    if te_cache:
        model.update(cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True)
    if options.tokenizer_cache_dir:
        model["tokenizer_cache_dir"] = options.tokenizer_cache_dir
    model["max_data_loader_n_workers"] = int(t.num_workers)
    if t.num_workers:
        model["persistent_data_loader_workers"] = True
    model["seed"] = int(t.seed)

    network: dict[str, Any] = {"network_module": fam.network_module, "network_dim": int(lora.rank),
                               "network_alpha": float(lora.alpha)}
    args = list(TARGET_ARGS[fam.name].get(lora.targets, []))
    if args:
        network["network_args"] = args
    if fam.name == FLUX:
        if recipe.text_encoder.train:
            network["text_encoder_lr"] = [float(recipe.optimizer.lr * recipe.text_encoder.lr_ratio)]
        else:
            network["network_train_unet_only"] = True
    else:
        network["network_train_unet_only"] = True

    training: dict[str, Any] = {}
    if t.steps is not None:
        training["max_train_steps"] = int(t.steps)
    else:
        training["max_train_epochs"] = int(t.epochs)
    training["gradient_accumulation_steps"] = int(t.gradient_accumulation)
    if fam.name == FLUX:
        training["guidance_scale"] = float(t.guidance)
    training["model_prediction_type"] = "raw"
    training.update(_timesteps(recipe))
    training.update(_loss(recipe))
    if d.regularization:
        training["prior_loss_weight"] = float(d.regularization[0].weight)

    saving: dict[str, Any] = {"output_dir": str(paths.output_dir), "output_name": recipe.output.name,
                              "save_model_as": "safetensors", "save_state": True, "save_state_on_train_end": True,
                              "metadata_title": recipe.output.name,
                              "training_comment": f"lora-run {version} {recipe_path}".strip()}
    if d.trigger.strip():
        saving["metadata_trigger_phrase"] = d.trigger.strip()
    if t.save_every_steps:
        saving["save_every_n_steps"] = int(t.save_every_steps)
        saving["save_last_n_steps"] = int((t.keep_last - 1) * t.save_every_steps)
        saving["save_last_n_steps_state"] = int((t.keep_last - 1) * t.save_every_steps)
    if t.save_every_epochs:
        saving["save_every_n_epochs"] = int(t.save_every_epochs)
        saving["save_last_n_epochs"] = int(t.keep_last)
        saving["save_last_n_epochs_state"] = int(t.keep_last)

    config: dict[str, dict[str, Any]] = {"model": model, "network": network,
                                         "optimizer": _optimizer(recipe, options.num_processes),
                                         "training": training, "saving": saving}
    sample_text = None
    if recipe.sample.every_steps is not None:
        sample_text = "\n".join(sample_lines(recipe)) + "\n"
        config["sampling"] = {"sample_prompts": str(paths.kohya / "sample_prompts.txt"),
                              "sample_every_n_steps": int(recipe.sample.every_steps)}
    if options.tensorboard:
        config["logging"] = {"log_with": "tensorboard", "logging_dir": str(paths.kohya / "logs")}
    if options.extra_args:
        config["extra"] = dict(options.extra_args)

    # No bucket_no_upscale: with it sd-scripts ignores min/max_bucket_reso (it says so in a warning) and sizes each
    # image's bucket from the image, so a wide photo trained past bucket_max. Without it the buckets are the grid
    # below (`buckets`), which is the native backend's; `upscale_note` names the images it scales up.
    general: dict[str, Any] = {"caption_extension": ".txt", "enable_bucket": True, "resolution": int(d.resolution),
                               "min_bucket_reso": int(d.bucket_min), "max_bucket_reso": int(d.bucket_max),
                               "bucket_reso_steps": int(d.bucket_step), "batch_size": int(t.batch_size)}
    subsets = [{"image_dir": str(paths.subset_dir(0)), "num_repeats": int(d.repeats), "is_reg": False}]
    for n, reg in enumerate(d.regularization):
        subsets.append({"image_dir": str(paths.subset_dir(n + 1)), "num_repeats": int(reg.repeats), "is_reg": True})
    if d.caption_dropout > 0:       # every sample, the regularisation images' too, as lora-run trains it
        for subset in subsets:
            subset["caption_dropout_rate"] = float(d.caption_dropout)
    dataset = {"general": general, "datasets": [{"subsets": subsets}]}

    argv = [paths.python, "-m", "accelerate.commands.launch",
            "--num_cpu_threads_per_process", str(options.num_cpu_threads_per_process),
            "--mixed_precision", t.mixed_precision, "--num_processes", str(options.num_processes),
            "--num_machines", "1", "--dynamo_backend", "no",
            *(["--multi_gpu"] if options.num_processes > 1 else []),
            f"{paths.sd_scripts}/{fam.script}",
            "--config_file", str(paths.kohya / "config.toml"),
            "--dataset_config", str(paths.kohya / "dataset.toml")]

    if d.regularization:
        notes.append("sd-scripts balances regularisation images to the subject count: each epoch it uses as many "
                     "regularisation samples as subject samples (subject images × repeats), cycling or leaving "
                     "some out; [dataset.regularization] repeats is only the starting count")
    if not te_cache and not recipe.text_encoder.train and d.caption_dropout > 0:
        notes.append("text-encoder outputs are not cached (sd-scripts forbids caching with caption dropout): the "
                     "text encoders stay loaded and run every step")
    if recipe.model.source:
        notes.append(f"[model] source {recipe.model.source} not used: sd-scripts loads the [model.files] single files "
                     "(and downloads its tokenizers itself)")
    if recipe.model.revision:
        notes.append("[model] revision not used: sd-scripts loads local single files")
    if t.gpu_memory_gib is not None:
        notes.append(f"[train] gpu_memory_gib = {t.gpu_memory_gib:g} not used: an in-process backends' setting; "
                     "sd-scripts plans no memory budget (use [backend.kohya] blocks_to_swap, fp8, checkpointing)")
    if t.cuda_graphs != "auto":
        notes.append(f"[train] cuda_graphs = \"{t.cuda_graphs}\" not used: a native-backend speed setting")
    every = recipe.sample.every_steps
    if every is not None and (t.steps is None or t.steps % every):
        last = f" (the last at step {t.steps // every * every} of {t.steps})" if t.steps is not None else ""
        notes.append(f"sd-scripts samples at the multiples of sample.every_steps = {every} only, not also at the end "
                     f"of training as the native backend does{last}")
    if t.epochs is not None:
        notes.append("steps are estimated from the image counts; sd-scripts batches per bucket, so an epoch can "
                     "have a few more batches than estimated")
    return Translation(fam, config, dataset, sample_text, argv, notes)


def disk_writes(recipe: Recipe, config: dict[str, dict[str, Any]], steps: int, epochs: int) -> tuple[Any, int] | None:
    """(what sd-scripts and lora-run will write for this generated ``config``, how many saves sd-scripts keeps), for
    the disk-space check before launch; None when the family declares no shape. sd-scripts (48d368f) saves a LoRA
    at every multiple of save_every_n_steps up to the last step, or every save_every_n_epochs epochs before the
    last; with save_state each save has a state folder (fp32 weights, optimizer state); it writes a save, then
    deletes the one save_last_n_steps (epochs) back, so it keeps save_last_n_steps / save_every_n_steps + 1 (or
    save_last_n_epochs) of each. The end adds the final LoRA, its state (save_state_on_train_end) and lora-run's
    copies in [output] formats."""
    from lora_run.files import human_size
    from lora_run_engines.disk import lora_file_bytes, lora_parameters, multiples, state_bytes
    from lora_run_rundir.space import Writes

    params = lora_parameters(recipe)
    if params is None:
        return None
    saving = config["saving"]
    lora = lora_file_bytes(params, recipe.output.save_precision)
    state = state_bytes(params, recipe.optimizer.name)
    if "save_every_n_epochs" in saving:
        saves = multiples(saving["save_every_n_epochs"], max(0, epochs - 1))
        kept = saving["save_last_n_epochs"]
    else:
        every = saving.get("save_every_n_steps")
        saves = multiples(every, steps)
        kept = saving["save_last_n_steps"] // every + 1 if every else 1
    one = lora + (state if saving.get("save_state") else 0)
    copies = len([f for f in recipe.output.formats if f != "comfyui" or recipe.model.family != FLUX])
    final = one + (state if saving.get("save_state_on_train_end") and not saving.get("save_state") else 0) \
        + copies * lora
    others = []
    if "sampling" in config:
        s = recipe.sample
        images = multiples(config["sampling"]["sample_every_n_steps"], steps) * len(sample_lines(recipe))
        others.append((f"{images} sample image(s)", images * s.width * s.height * 3))    # PNG: at most raw pixels
    state_is = f" and its state of {human_size(state)}" if saving.get("save_state") else ""
    return Writes("sd-scripts", saves, one, f"a LoRA of {human_size(lora)}{state_is}", final,
                  f"the final LoRA, its state and lora-run's {copies} cop{'y' if copies == 1 else 'ies'}",
                  tuple(others)), kept


#: dataset parameters sd-scripts refuses while text-encoder outputs are cached (`is_text_encoder_output_cacheable`:
#: the trainers assert it at start), and those it refuses while latents are cached (the image would change per epoch)
TE_CACHE_FORBIDS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "token_warmup_step")
LATENT_CACHE_FORBIDS = ("color_aug", "random_crop")


def option_conflicts(tr: Translation, extra: dict[str, Any], recipe: Recipe) -> list[tuple[tuple, str]]:
    """Combinations sd-scripts asserts against (or warns and drops) that a ``[backend.kohya] extra_args`` option makes
    with the options lora-run generates. Each option is valid on its own (``spec.check_config``), so only the
    effective options show them: sd-scripts reads a dataset parameter the generated dataset file does not set from its
    command-line options (subset → dataset → general → option), so `shuffle_caption = true` in `extra_args` reaches
    every subset. Only conflicts an `extra_args` key takes part in are reported here (the recipe-level ones are
    :func:`problems`'), each at that key."""
    if not extra:
        return []
    fam = tr.family
    merged = {k: v for table in tr.config.values() for k, v in table.items()}
    general = tr.dataset.get("general") or {}
    subsets = [s for d in tr.dataset.get("datasets") or [] for s in d.get("subsets") or []] or [{}]

    def effective(name: str) -> tuple[Any, bool]:
        """The value sd-scripts uses for a dataset parameter (the first subset that sets it wins the report) and
        whether it comes from `extra_args`."""
        for table in (*subsets, general):
            if table.get(name):
                return table[name], False
        return merged.get(name), name in extra

    def where(name: str) -> tuple:
        return ("backend", "kohya", "extra_args", name)

    out: list[tuple[tuple, str]] = []
    te_keys = [k for k in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk") if merged.get(k)]
    if te_keys:
        te_from_extra = all(k in extra for k in te_keys)
        for name in TE_CACHE_FORBIDS:
            value, from_extra = effective(name)
            if value and (from_extra or te_from_extra):
                blame = name if from_extra else te_keys[0]
                out.append((where(blame), f"sd-scripts refuses `{name}` ({value!r}) while text-encoder outputs are "
                            f"cached (`{te_keys[0]}`): its trainers assert at start that none of "
                            f"{', '.join(TE_CACHE_FORBIDS)} is used then"
                            + ("; [backend.kohya] cache_text_encoder_outputs = false turns the cache off"
                               if from_extra else "")))
        if recipe.text_encoder.train and te_from_extra:
            out.append((where(te_keys[0]), "sd-scripts cannot train the text-encoder LoRA from cached text-encoder "
                        "outputs (text_encoder.train = true)"))
    latent_keys = [k for k in ("cache_latents", "cache_latents_to_disk") if merged.get(k)]
    if latent_keys:
        for name in LATENT_CACHE_FORBIDS:
            value, from_extra = effective(name)
            if value and (from_extra or all(k in extra for k in latent_keys)):
                out.append((where(name if from_extra else latent_keys[0]), f"sd-scripts refuses `{name}` while "
                            f"latents are cached (`{latent_keys[0]}`: it asserts at start); set [backend.kohya] "
                            "cache_latents = false to use it"))
    swap, offload = merged.get("blocks_to_swap"), merged.get("cpu_offload_checkpointing")
    if "blocks_to_swap" in extra and isinstance(swap, int) and swap > fam.max_blocks_to_swap:
        out.append((where("blocks_to_swap"), f"sd-scripts swaps at most {fam.max_blocks_to_swap} blocks for "
                    f"{fam.name}; got {swap}"))
    if swap and offload and ("blocks_to_swap" in extra or "cpu_offload_checkpointing" in extra):
        blame = "cpu_offload_checkpointing" if "cpu_offload_checkpointing" in extra else "blocks_to_swap"
        out.append((where(blame), "sd-scripts refuses blocks_to_swap together with cpu_offload_checkpointing "
                    "(it asserts at start)"))
    if offload and "cpu_offload_checkpointing" in extra and not merged.get("gradient_checkpointing"):
        out.append((where("cpu_offload_checkpointing"), "needs train.gradient_checkpointing = true"))
    if extra.get("lr_warmup_steps") and merged.get("lr_scheduler") == "constant":
        out.append((where("lr_warmup_steps"), "sd-scripts' `constant` schedule takes no warmup (it raises \"constant "
                    "does not require `num_warmup_steps`\"); set scheduler.name = \"constant_with_warmup\" and "
                    "scheduler.warmup_steps"))
    if extra.get("fused_backward_pass"):
        out.append((where("fused_backward_pass"), f"sd-scripts' LoRA trainers ({fam.script} on train_network.py) never "
                    "fuse the backward pass, only its full fine-tuning scripts do: the option would change nothing "
                    "with Adafactor and stop the run with any other optimizer or with gradient accumulation (its "
                    "optimizer set-up asserts both)"))
    if fam.name != FLUX:
        for name in ("fp8_base", "fp8_base_unet"):
            if extra.get(name):
                out.append((where(name), f"sd-scripts' {fam.script} does not support --{name} (it warns so, and drops it "
                            "when --fp8_scaled is on); [model] base_precision = \"fp8\" sets --fp8_scaled"))
    return out
