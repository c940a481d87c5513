"""The recipe schema: frozen attrs classes, one section per TOML table.

Every field carries its documentation next to it (``doc``); ``docs/recipe-reference.md`` is generated
from these docs (``python -m lora_run_devtools.docgen``) and a test fails when the page is stale. Range limits
live in the field metadata (``ge``/``gt``/``le``) and are checked with all other problems at once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, NamedTuple

import attrs

def is_used(value: Any, _recipe: Any) -> bool:
    return bool(value)


class Feature(NamedTuple):
    """A recipe feature some backend may not honour: ``used(value, recipe)`` says whether a recipe uses it
    (default: the field's value is truthy). A backend lists the features it honours per family in its
    ``capabilities``; the ``training`` plugin (``lora_run_training.capabilities``) refuses the others, naming
    the field's key."""

    name: str
    doc: str
    used: Callable[[Any, Any], bool] = is_used
    key: tuple[str, ...] = ()     # filled in from the field that carries it (lora_run_training.capabilities)


def is_set(value: Any, _recipe: Any) -> bool:
    return value is not None


def option(default: Any = attrs.NOTHING, doc: str = "", *, factory: Any = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, path: bool | tuple[str, ...] = False,
           features: tuple[Feature, ...] = (), choice_features: str = "") -> Any:
    """An attrs field with its documentation, limits and features in the metadata. ``path``: the value is a
    path, made absolute against the recipe file's folder (a table: every value, or the keys ``path`` names).
    ``features``: the features a recipe uses through this field; ``choice_features="optimizer"``: one feature
    per value of a choice field, ``optimizer:<value>``."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "path": path, "features": features,
                "choice_features": choice_features}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


frozen = attrs.frozen(kw_only=True)


@frozen
class ModelSection:
    """Which base model to train on and where its weights come from."""

    family: str | None = option(None, "Model family: a registered family (`lora-run plugins` lists them; see "
                                "Model families below). Unset: the installed family registered as the default "
                                "(or the only one installed).")
    source: str | None = option(None, "Hub id (`owner/name`) or a local diffusers folder. "
                                "For single-file checkpoints use `[model.files]` instead (a diffusers folder or "
                                "hub id may still supply the tokenizers and configs).")
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
        "bf16", "Storage precision of the frozen base weights: `bf16`, or `fp8` (float8 storage, bf16 compute).",
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
class DatasetSection:
    """The subject's images and captions, buckets and regularisation sets."""

    type: str = option("folder", "Dataset plugin (`lora-run plugins` lists them).")
    path: str | None = option(None, "Folder of subject images with a caption file next to each (the `folder` "
                              "type requires it; other types may take their images from `[dataset.options]`).",
                              path=True)
    options: dict[str, Any] = option(factory=dict, doc="`[dataset.options]`: options of the dataset type, "
                                     "checked by the options class that type registered.")
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
                       "--gpus N` overrides it; under `torchrun` / `accelerate launch` the launcher's process count "
                       "is used. Without CUDA, N > 1 runs N CPU processes (gloo; for testing).", ge=1, le=64,
                       features=(Feature("multi_gpu", "data-parallel training on several GPUs",
                                         lambda n, _: n > 1),))
    mixed_precision: Literal["bf16", "fp16", "no"] = option("bf16", "Compute precision (`no` = float32; "
                                                            "use it on CPU).")
    gradient_checkpointing: bool = option(True, "Recompute activations in backward to save memory.")
    memory_mode: Literal["auto", "speed", "memory", "low-vram"] = option(
        "auto", "In-process backends on CUDA: `speed` (compiled blocks, no checkpointing), `memory` (selective "
        "checkpointing), `low-vram` (fp8 storage + block offload), `auto` (pick from free GPU memory; "
        "`base_precision` and `gradient_checkpointing` are then decided by the plan).")
    gpu_memory_gib: float | None = option(
        None, "In-process backends on CUDA: the most GPU memory (GiB) this run may use — caching, training and "
        "samples. `auto` plans within it and the CUDA allocator is capped to it, so a shared GPU or a smaller "
        "card's budget is honoured; a run whose smallest plan does not fit stops before training (exit 2). "
        "Default: the GPU's free memory.", gt=0.0, le=4096.0)
    cuda_graphs: Literal["auto", "on", "off"] = option(
        "auto", "Speed mode: replay the compiled blocks as CUDA graphs (`auto`: when a step has at most 2048 "
        "tokens, the buckets have at most 8 token counts and, with several, the steps win back recording each).")
    attention: Literal["auto", "fa4", "sdpa"] = option(
        "auto", "Attention kernel on CUDA: `auto` runs FlashAttention-4 (`pip install 'lora-run[hopper]'`) on "
        "SM90/SM100 GPUs when it imports and passes a start-up check against SDPA, else SDPA flash "
        "(FlashAttention-2); `fa4` stops the run when FlashAttention-4 cannot run; `sdpa` always uses SDPA. "
        "The run's plan line says which kernel runs and why.")
    seed: int = option(42, "Seed for noise, timesteps, data order and LoRA init.", ge=0, le=2**32 - 1)
    loss: str = option("mse", "Loss plugin: `mse`, `huber`, `pseudo-huber`, `smooth-l1` (`lora-run plugins`).")
    loss_options: dict[str, Any] = option(factory=dict, doc="Options of the chosen loss (for example "
                                          "`{ c = 0.1 }` for huber); checked by the loss plugin.")
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
    cache_dir: str | None = option(None, "Latent / text-embedding cache folder; default `<output>/cache`.",
                                   path=True)
    num_workers: int = option(0, "Data-loader worker processes.", ge=0, le=64)
    compile: Literal["auto", "on", "off"] = option("auto", "Regional `torch.compile` of the repeated blocks "
                                                   "(`auto`: on CUDA in speed/memory mode).")


@frozen
class OutputSection:
    """Where the run directory goes and what is written."""

    dir: str = option("runs/{name}", "Run directory; `{name}` is replaced by `name`.", path=True)
    name: str = option("identity-lora", "Base name of the LoRA files: a plain file name (no folder part, no "
                       "`..`, no leading dot or control characters, at most 160 bytes).")
    formats: list[str] | None = option(
        None, "LoRA file formats to write, by the names the families register (see Model families below). "
        "Unset: the family's default formats. A format a family or backend does not write is skipped with a note "
        "in `lora-run plan`. Which file for which tool: docs/lora-formats.md.")
    save_precision: Literal["bf16", "fp16", "fp32"] = option("bf16", "Precision of the saved LoRA tensors.")


@frozen
class BackendSection:
    """Which backend executes the recipe, and the options of each backend."""

    name: str | None = option(None, "Backend plugin (`lora-run plugins` lists them and the families each trains); "
                              "unset: the backend registered as the default among those that train the family. "
                       "`backend = \"NAME\"` at the top level is shorthand for `[backend] name = \"NAME\"`.")
    options: dict[str, dict[str, Any]] = option(factory=dict, doc="`[backend.<name>]` tables, checked by the "
                                                "backend's own options class.")


@frozen
class Recipe:
    """A whole recipe."""

    extends: str | None = option(None, "Another recipe this one builds on (a path relative to this file); "
                                 "keys here override it.")
    description: str = option("", "What the recipe is for, in a sentence; the evaluation report shows it at "
                              "the top (`lora-run recipes` shows the file's first comment line).")
    model: ModelSection = option(factory=ModelSection, doc="`[model]`")
    dataset: DatasetSection = option(doc="`[dataset]`")
    train: TrainSection = option(factory=TrainSection, doc="`[train]`")
    output: OutputSection = option(factory=OutputSection, doc="`[output]`")
    backend: BackendSection = option(factory=BackendSection, doc="`[backend]`")


_RECIPE_CLASSES: dict[tuple[tuple[str, type], ...], type[Recipe]] = {}


def recipe_class(sections: Iterable[tuple[str, type]] = ()) -> type[Recipe]:
    """:class:`Recipe` with the tables plugins register (``register_sections``) as further sections, e.g.
    ``recipe.eval`` for the evaluator plugin's ``[eval]``. One class per set of tables, so that recipes
    loaded with the same plugins compare equal."""
    key = tuple(sorted(sections, key=lambda item: item[0]))
    if not key:
        return Recipe
    if key not in _RECIPE_CLASSES:
        fields = {name: option(factory=cls, doc=f"`[{name}]`") for name, cls in key}
        cls = attrs.make_class("Recipe", fields, bases=(Recipe,), frozen=True, kw_only=True, slots=True)
        cls.__module__, cls.__annotations__ = __name__, {name: section for name, section in key}
        _RECIPE_CLASSES[key] = cls
    return _RECIPE_CLASSES[key]
