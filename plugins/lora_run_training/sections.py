"""The recipe tables of training proper: `[train]`, `[lora]`, `[text_encoder]`, `[optimizer]`, `[scheduler]` and
`[sample]`, and the keys of core's `[model]` and `[dataset]` that every backend reads (``register_sections``), with
the rules each table's keys must keep together. No heavy imports: `lora-run check` structures these classes to
validate a recipe."""
from __future__ import annotations

from typing import Any, Literal

from lora_run.schema import frozen, option

from . import Feature

#: the largest seed a recipe takes (`[train] seed`, and the seeds of `[sample]` and `[eval]`)
MAX_SEED = 2**32 - 1


def is_set(value: Any, _recipe: Any) -> bool:
    """A feature used when its key is set at all (a length, a save policy), whatever the value."""
    return value is not None


@frozen
class ModelKeys:
    """The keys of core's `[model]` every backend reads: where the weights come from and how they are stored."""

    source: str | None = option(None, "Hub id (`owner/name`) or a local diffusers folder. "
                                "For single-file checkpoints use `[model.files]` instead (a diffusers folder or "
                                "hub id may still supply the tokenizers and configs).", path="local")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when `source` is a hub id.")
    version: str | None = option(
        None, "Which release of the family the weights are, for a family that registers several (see Model "
        "families below; what each release changes is in the family's documentation). Unset: the model folder "
        "says. Refused for a family with one release.")
    files: dict[str, str] = option(factory=dict, doc="`[model.files]`: single-file checkpoints (as other tools "
                                   "distribute them), one file per slot; the slots are the family's own "
                                   "(see Model families below), e.g. `transformer`, `vae` and the text encoders.",
                                   path=True)
    base_precision: Literal["bf16", "fp8"] = option(
        "bf16", "Storage precision of the frozen base weights: `bf16`, or `fp8` (float8 storage, bf16 compute). In-process "
        "backends on CUDA with mixed precision: a memory setting `[train] memory_mode` decides (`auto` keeps a GPU "
        "with room in bf16; `memory` and `low-vram` always store fp8; an explicit `speed` honours `fp8`); the plan "
        "line says where it is overridden.",
        features=(Feature("fp8", "fp8 base weights", lambda precision, _: precision == "fp8"),))
    offline: bool = option(False, "Never contact the hub (also implied by the `HF_HUB_OFFLINE` environment "
                           "variable).")


@frozen
class RegularizationSet:
    """One set of generic images (prior preservation) trained alongside the subject."""

    path: str = option(doc="Folder of regularisation images.", path=True)
    caption_extension: str = option(".txt", "Caption file extension next to each image.")
    default_caption: str = option("a person", "Caption for images that have no caption file "
                                  "(playbook §6: `a person` / `a man`).")
    weight: float = option(1.0, "Loss weight of these samples relative to the subject's.", gt=0.0, le=10.0)
    repeats: int = option(1, "How many times each image appears per epoch.", ge=1, le=10000)


@frozen
class DatasetKeys:
    """The keys of core's `[dataset]` every backend and the `folder` dataset type read: the images and captions,
    the trigger, buckets and regularisation sets."""

    path: str | None = option(None, "Folder of subject images with a caption file next to each (the `folder` "
                              "type requires it; other types may take their images from `[dataset.options]`).",
                              path=True)
    caption_extension: str = option(".txt", "Caption file extension of the subject images.")
    trigger: str = option("", "Unique trigger token. Must appear in every subject caption and never in a "
                          "regularisation caption (playbook §6).")
    trigger_policy: Literal["require", "prepend", "none"] = option(
        "require", "`require`: a subject caption without the trigger is a lint error; `prepend`: add "
        "`<trigger>, ` where it is missing; `none`: no trigger rules.")
    resolution: int = option(512, "Base training resolution (square side in pixels).", ge=64, le=4096)
    bucket_min: int = option(256, "Smallest bucket side in pixels.", ge=64, le=4096)
    bucket_max: int = option(1024, "Largest bucket side in pixels.", ge=64, le=8192)
    bucket_step: int = option(64, "Bucket side step in pixels (a multiple of the family's grid, see Model "
                              "families below).", ge=8, le=512)
    repeats: int = option(1, "How many times each subject image appears per epoch.", ge=1, le=10000)
    caption_dropout: float = option(0.0, "Probability of training a sample with an empty caption.", ge=0.0,
                                    le=1.0, features=(Feature("caption_dropout", "caption dropout"),))
    min_images: int = option(15, "Lint warns below this many subject images (playbook §6: 15–30 minimum).", ge=1)
    regularization: list[RegularizationSet] = option(
        factory=list, doc="Regularisation sets (`[[dataset.regularization]]`).",
        features=(Feature("regularization", "regularisation (prior) image sets"),
                  Feature("regularization_weight", "a loss weight other than 1 on a regularisation set",
                          lambda sets, _: any(s.weight != 1.0 for s in sets))))


@frozen
class TrainSection:
    """Steps, batch, precision, objective and checkpoint policy."""

    steps: int | None = option(None, "Optimizer steps to train. Give `steps` or `epochs`, not both.", ge=1,
                               le=10_000_000,
                               features=(Feature("steps", "training length in steps", is_set),))
    epochs: int | None = option(None, "Epochs to train (steps are derived from the dataset size).", ge=1,
                                le=100_000,
                                features=(Feature("epochs", "training length in epochs", is_set),))
    batch_size: int = option(1, "Samples per step (per device).", ge=1, le=1024)
    gradient_accumulation: int = option(1, "Micro-batches accumulated per optimizer step.", ge=1, le=1024)
    gpus: int = option(1, "Data-parallel processes on this machine (one per GPU). The global batch is batch_size "
                       "× gpus × gradient_accumulation; `steps` count optimizer steps at that batch. `lora-run "
                       "RECIPE --gpus N` overrides it; under `torchrun` / `accelerate launch` the launcher's process count "
                       "is used. Without CUDA, N > 1 runs N CPU processes (gloo; for testing).", ge=1, le=64,
                       features=(Feature("multi_gpu", "data-parallel training on several GPUs",
                                         lambda n, _: n > 1),))
    mixed_precision: Literal["bf16", "fp16", "no"] = option("bf16", "Compute precision (`no` = float32; "
                                                            "use it on CPU).")
    gradient_checkpointing: bool = option(True, "Recompute activations in backward to save memory. In-process "
                                          "backends on CUDA with mixed precision: a memory setting the "
                                          "`memory_mode` plan decides (speed: no block; memory: as many as the "
                                          "budget needs; low-vram: every block); the plan line says where it is "
                                          "overridden.")
    memory_mode: Literal["auto", "speed", "memory", "low-vram"] = option(
        "auto", "In-process backends on CUDA: `speed` (compiled blocks, no checkpointing), `memory` (fp8 storage, "
        "as many checkpointed blocks as the budget needs), `low-vram` (fp8 storage, every block checkpointed, as many "
        "blocks streamed from host memory as needed), `auto` (the fastest that fits the free GPU memory or "
        "`gpu_memory_gib`; `base_precision` and `gradient_checkpointing` are then decided by the plan). `lora-run "
        "plan` prints the plan within `gpu_memory_gib` (without it, from how much memory `auto` picks each mode) "
        "and why. A plan over `gpu_memory_gib` stops the run before caching (exit 2; `check` reports it), naming "
        "what fits; an explicit mode over the free memory without `gpu_memory_gib` trains with a warning.")
    gpu_memory_gib: float | None = option(
        None, "In-process backends on CUDA: the most GPU memory (GiB) this run may use on each GPU (each process of "
        "a multi-GPU run) — caching, training and samples. `auto` plans within it and the CUDA allocator is capped a "
        "quarter GiB below it (its cache included, the reserved peak stays inside), so a shared GPU or a smaller "
        "card's budget is honoured; a plan must fit 95% of that. A recipe whose plan does not fit (for `auto`: its "
        "smallest) is refused by `check`, `plan` and the run before caching (exit 2; a model whose weights are "
        "not the family's full size: once it has loaded), with what would fit (batch, resolution, rank, budget); "
        "so is a cap the autoencoder and text encoders do not fit while caching. Default: the GPU's free memory.", gt=0.0, le=4096.0)
    cuda_graphs: Literal["auto", "on", "off", "step"] = option(
        "auto", "Speed mode: replay steps as CUDA graphs. `step`: each whole micro-step (forward, loss and "
        "backward) as one CUDA graph per bucket shape, recorded in about half a second each (one process; steps "
        "that train the text encoder run eagerly; a step that cannot be recorded runs eagerly, and the run log "
        "says why). `on`: every compiled block's forward and backward as its own graph (CUDA-graph trees, about "
        "48 s of recording per token count). `auto`: when a step has at most 2048 tokens, `step` for a single "
        "process with the text encoder frozen, no float8 matmuls and at most 8 bucket shapes on a family whose "
        "whole-step graphs a GPU run has measured (FLUX.1-dev so far), else `on` for at most 8 token counts when "
        "the steps win its recording back; `off`: no graphs.")
    fp8_matmul: bool = option(
        False, "Opt-in speed: the frozen base's forward and input-gradient matmuls run in float8 (e4m3 with "
        "row-wise scales, `torch._scaled_mm`; CUDA GPUs of compute capability 8.9 or newer, an older one stops "
        "the run; the CPU runs torch's slow reference, for tests), the base stored in fp8. "
        "It changes the numbers more than `[model] base_precision = \"fp8\"` (each layer's input and gradient are "
        "rounded to e4m3 too): the LoRA-gradient error against bf16 is in `lora-run docs performance`. The LoRA itself "
        "trains in bf16/fp32 as before.",
        features=(Feature("fp8_matmul", "float8 matmuls of the frozen base", lambda on, _: on),))
    attention: Literal["auto", "fa4", "sdpa"] = option(
        "auto", "Attention kernel on CUDA: `auto` runs FlashAttention-4 (`pip install 'lora-run[hopper]'`) on "
        "SM90/SM100 GPUs when it imports and passes a start-up check against SDPA, where it was measured to pay "
        "(head size 128: FLUX, HunyuanImage-2.1; at least 3072 tokens per call or CUDA graphs), else SDPA flash "
        "(FlashAttention-2); `fa4` runs it wherever it can and stops the run when it cannot; `sdpa` always uses "
        "SDPA. The run's plan line says which kernel runs and why.")
    seed: int = option(42, "Seed for noise, timesteps, data order and LoRA init.", ge=0, le=MAX_SEED)
    loss: str = option("mse", "Loss plugin: `mse`, `huber`, `pseudo-huber`, `smooth-l1` (`lora-run plugins`).")
    loss_options: dict[str, Any] = option(factory=dict, doc="Options of the chosen loss (for example "
                                          "`{ c = 0.1 }` for huber); checked by the loss plugin.", keys="loss")
    timestep_sampling: str = option(
        "sigmoid", "How σ/t is drawn: `uniform`, `sigmoid` (sigmoid of scaled normal), `logit-normal` (mean/std), "
        "`shift` (sigmoid then a fixed shift), or a sampler a family registers (see Model families below).")
    sigmoid_scale: float = option(1.0, "Scale of the normal draw before the sigmoid.", gt=0.0, le=100.0)
    logit_mean: float = option(0.0, "Mean m for `logit-normal`: u = sigmoid(N(m, std)) picks σ from the unshifted "
                               "1000-step table, σ = (1000 − ⌊1000·u⌋)/1000 ≈ 1 − u, as diffusers' examples and "
                               "sd-scripts draw it (a positive mean trains more on less noisy steps; values copy "
                               "between trainers unchanged).")
    logit_std: float = option(1.0, "Std for `logit-normal`.", gt=0.0, le=100.0)
    shift: float = option(3.0, "Shift for `shift` sampling: σ' = sσ / (1 + (s−1)σ).", gt=0.0, le=100.0)
    timestep_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none", "Flow-matching loss weighting per sample (SD3 schemes).",
        features=(Feature("timestep_weighting", "a flow-matching loss weighting", lambda w, _: w != "none"),))
    min_snr_gamma: float | None = option(None, "Min-SNR-γ loss weighting; only meaningful for DDPM families.",
                                         gt=0.0, le=100.0,
                                         features=(Feature("min_snr_gamma", "Min-SNR-γ weighting", is_set),))
    guidance: float = option(1.0, "Guidance-embedding value during training, for a family with a distilled "
                             "guidance input (1.0 for such a LoRA).", ge=0.0, le=100.0,
                             features=(Feature("guidance", "a guidance-embedding value other than 1.0 (a "
                                               "distilled guidance input)", lambda g, _: g != 1.0),))
    noise_offset: float = option(0.0, "Noise offset. For flow matching: a per-channel constant "
                                 "`noise_offset·N(0,1)` is added to ε before x_t and the target are formed.",
                                 ge=0.0, le=1.0,
                                 features=(Feature("noise_offset", "noise offset"),))
    save_every_steps: int | None = option(
        None, "Save a checkpoint (LoRA + resumable state) every N steps.", ge=1,
        features=(Feature("save_every_steps", "checkpoints every N steps", is_set),))
    save_every_epochs: int | None = option(
        None, "Save a checkpoint every N epochs.", ge=1,
        features=(Feature("save_every_epochs", "checkpoints every N epochs", is_set),))
    keep_last: int = option(3, "How many checkpoints to keep (older ones are deleted; the final LoRA is "
                            "always kept).", ge=1, le=10000)
    cache_dir: str | None = option(None, "Latent / text-embedding cache folder (and the engines' staged datasets), "
                                   "shared by runs; default `<output>/cache`. lora-run writes and replaces files "
                                   "there, so it must be a new or empty folder or a cache lora-run made (its "
                                   "`lora-run-cache.json`, or only lora-run's cache entries); anything else is "
                                   "refused.", path=True)
    num_workers: int = option(0, "Data-loader worker processes.", ge=0, le=64)
    compile: Literal["auto", "on", "off"] = option("auto", "Regional `torch.compile` of the repeated blocks "
                                                   "(`auto`: on CUDA in speed/memory mode).")


@frozen
class LoraSection:
    """The adapter: rank, alpha, dropout and which layers it wraps."""

    rank: int = option(32, "LoRA rank (dim).", ge=1, le=1024)
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / rank.", gt=0.0, le=4096.0,
                          features=(Feature("lora_alpha", "a LoRA alpha different from the rank",
                                            lambda alpha, r: alpha != r.lora.rank),))
    dropout: float = option(0.0, "Dropout on the LoRA input.", ge=0.0, le=0.9,
                            features=(Feature("lora_dropout", "LoRA dropout"),))
    targets: Literal["attention", "attention+mlp", "all-linear"] = option(
        "attention", "Target preset: `attention` (q/k/v/out of every block), `attention+mlp`, or `all-linear` "
        "(every linear of the repeated blocks, modulation included).",
        choice_features="targets")
    modules: list[str] = option(factory=list, doc="Explicit module names or regular expressions; when given, "
                                "they replace the preset.",
                                features=(Feature("lora_modules", "explicit LoRA module names"),))
    init: Literal["default", "gaussian"] = option("default", "LoRA init: `default` (Kaiming A, zero B) or "
                                                  "`gaussian`.")


@frozen
class TextEncoderSection:
    """Text-encoder LoRA policy (playbook §5)."""

    train: bool = option(False, "Train a LoRA on the family's trainable text encoder. Off by default: a unique "
                         "trigger and fewer than ~15 images do not need it.",
                         features=(Feature("text_encoder_training", "a text-encoder LoRA"),))
    lr_ratio: float = option(0.4, "Text-encoder LR as a fraction of the transformer LR (playbook: 0.3–0.5).",
                             gt=0.0, le=1.0)
    train_fraction: float = option(0.5, "Fraction of the steps after which the text encoder is frozen "
                                   "(playbook: ≤ 0.5).", gt=0.0, le=1.0)
    rank: int | None = option(None, "Text-encoder LoRA rank; defaults to `[lora.rank]`.", ge=1, le=1024)


@frozen
class OptimizerSection:
    """Optimizer and its hyper-parameters."""

    name: Literal["adafactor", "adamw", "adamw8bit", "prodigy"] = option(
        "adafactor", "`adafactor` (relative_step=False, scale_parameter=False), `adamw` (fused on CUDA), "
        "`adamw8bit` (needs bitsandbytes), `prodigy` (needs prodigyopt).",
        choice_features="optimizer")
    lr: float = option(1e-4, "Transformer LoRA learning rate.", gt=0.0, le=1.0)
    weight_decay: float = option(0.0, "Decoupled weight decay.", ge=0.0, le=1.0)
    betas: list[float] = option(factory=lambda: [0.9, 0.999], doc="Adam betas (two numbers).")
    eps: float = option(1e-8, "Adam epsilon.", gt=0.0, le=1.0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0.0)


@frozen
class SchedulerSection:
    """Learning-rate schedule."""

    name: Literal["constant", "constant_with_warmup", "cosine", "linear"] = option(
        "constant_with_warmup", "Schedule: `constant`, `constant_with_warmup`, `cosine` (with warmup) or "
        "`linear` (with warmup).",
        choice_features="scheduler")
    warmup_steps: int = option(0, "Linear warmup steps.", ge=0)
    min_lr_ratio: float = option(0.0, "Cosine/linear: final LR as a fraction of the peak.", ge=0.0, le=1.0)


@frozen
class SampleSection:
    """Images generated during training to watch progress."""

    prompts: list[str] = option(factory=list, doc="Prompts; `{trigger}` is replaced by the trigger token.")
    seeds: list[int] = option(factory=lambda: [1], doc="Seeds, one image per prompt × seed × strength.", ge=0,
                              le=MAX_SEED)
    strengths: list[float] = option(factory=lambda: [1.0], doc="LoRA strengths (0: the model without the LoRA).",
                                    ge=0.0)
    every_steps: int | None = option(None, "Sample every N steps (and at the end).", ge=1,
                                     features=(Feature("sampling", "sample images during training", is_set),))
    steps: int = option(20, "Inference steps.", ge=1, le=1000)
    guidance: float = option(3.5, "Inference guidance scale.", ge=0.0, le=100.0)
    width: int = option(512, "Sample width in pixels.", ge=64, le=4096)
    height: int = option(512, "Sample height in pixels.", ge=64, le=4096)


def check_train(recipe: Any, plugins: Any, problems: Any) -> None:
    """One training length; the loss is a registered one, its options structured with its options class."""
    from lora_run.run import structure_options

    t = recipe.train
    if (t.steps is None) == (t.epochs is None):
        problems.add(("train",), "give exactly one of `steps` or `epochs`"
                     + (f" (got steps={t.steps}, epochs={t.epochs})" if t.steps and t.epochs else ""))
    loss = plugins.find("loss", t.loss, ("train", "loss"), problems)
    if loss is not None:
        structure_options(loss, t.loss_options, ("train", "loss_options"), problems)


def loss_options(recipe: Any, plugins: Any) -> Any:
    """`[train] loss_options` structured with the options class `[train] loss` registered (None for a loss without
    one), for the backends that make the loss; raises what ``check_train`` reports."""
    from lora_run.run import structure_options

    where = ("train", "loss_options")
    return structure_options(plugins.get("loss", recipe.train.loss, ".".join(where)), recipe.train.loss_options, where)


def check_lora(recipe: Any, _plugins: Any, problems: Any) -> None:
    lora = recipe.lora
    if lora.alpha > 16 * lora.rank:
        problems.add(("lora", "alpha"), f"is {lora.alpha} for rank {lora.rank}: a scale alpha/rank above 16 "
                     "is almost certainly a typo")


def check_optimizer(recipe: Any, _plugins: Any, problems: Any) -> None:
    if len(recipe.optimizer.betas) != 2:
        problems.add(("optimizer", "betas"), f"expected two numbers, got {len(recipe.optimizer.betas)}")


def check_grid(problems: Any, table: str, strengths: list[float], seeds: list[int]) -> None:
    """The rule of an image grid (prompt × strength × seed, `[sample]`'s and `[eval]`'s) beyond each value's range
    (the fields' bounds): each value once. An image's file is named by its strength (``{:g}``) and its seed, so a
    value given twice, or two strengths that print alike, would overwrite an image (and the evaluation would score
    it as its own carbon copy)."""
    for key, values, names in (("strengths", strengths, [f"{v:g}" for v in strengths]),
                               ("seeds", seeds, [str(v) for v in seeds])):
        twice = [v for v, name in zip(values, names) if names.count(name) > 1]
        if twice:
            problems.add((table, key), f"{', '.join(map(str, twice))} name the same images: give each value once")


def check_sample(recipe: Any, _plugins: Any, problems: Any) -> None:
    for key in ("prompts", "seeds", "strengths"):
        if recipe.sample.every_steps and not getattr(recipe.sample, key):
            problems.add(("sample", key), "must not be empty when sample.every_steps is set")
    check_grid(problems, "sample", recipe.sample.strengths, recipe.sample.seeds)


#: (table name, attrs class, the table's rules or None, what `lora-run plugins` says of it), in recipe order.
SECTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("model", ModelKeys, None, "keys of [model]: the weights' source, files and precision"),
    ("dataset", DatasetKeys, None, "keys of [dataset]: images, captions, trigger, buckets, regularisation sets"),
    ("train", TrainSection, check_train, "steps, batch, precision, objective, checkpoints"),
    ("lora", LoraSection, check_lora, "the LoRA adapter: rank, alpha, dropout, targets"),
    ("text_encoder", TextEncoderSection, None, "the text-encoder LoRA policy"),
    ("optimizer", OptimizerSection, check_optimizer, "the optimizer and its hyper-parameters"),
    ("scheduler", SchedulerSection, None, "the learning-rate schedule"),
    ("sample", SampleSection, check_sample, "images generated during training"),
)
