"""The recipe tables of training proper: `[lora]`, `[text_encoder]`, `[optimizer]`, `[scheduler]` and `[sample]`
(``register_sections``), with the rules each table's keys must keep together. No heavy imports: `lora-run check`
structures these classes to validate a recipe."""
from __future__ import annotations

from typing import Any, Literal

from lora_run.schema import Feature, frozen, is_set, option


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
    seeds: list[int] = option(factory=lambda: [1], doc="Seeds, one image per prompt × seed × strength.")
    strengths: list[float] = option(factory=lambda: [1.0], doc="LoRA strengths.")
    every_steps: int | None = option(None, "Sample every N steps (and at the end).", ge=1,
                                     features=(Feature("sampling", "sample images during training", is_set),))
    steps: int = option(20, "Inference steps.", ge=1, le=1000)
    guidance: float = option(3.5, "Inference guidance scale.", ge=0.0, le=100.0)
    width: int = option(512, "Sample width in pixels.", ge=64, le=4096)
    height: int = option(512, "Sample height in pixels.", ge=64, le=4096)


def check_lora(recipe: Any, _plugins: Any, problems: Any) -> None:
    lora = recipe.lora
    if lora.alpha > 16 * lora.rank:
        problems.add(("lora", "alpha"), f"is {lora.alpha} for rank {lora.rank}: a scale alpha/rank above 16 "
                     "is almost certainly a typo")


def check_optimizer(recipe: Any, _plugins: Any, problems: Any) -> None:
    if len(recipe.optimizer.betas) != 2:
        problems.add(("optimizer", "betas"), f"expected two numbers, got {len(recipe.optimizer.betas)}")


def check_sample(recipe: Any, _plugins: Any, problems: Any) -> None:
    for key in ("prompts", "seeds", "strengths"):
        if recipe.sample.every_steps and not getattr(recipe.sample, key):
            problems.add(("sample", key), "must not be empty when sample.every_steps is set")


#: (table name, attrs class, the table's rules or None, what `lora-run plugins` says of it), in recipe order.
SECTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("lora", LoraSection, check_lora, "the LoRA adapter: rank, alpha, dropout, targets"),
    ("text_encoder", TextEncoderSection, None, "the text-encoder LoRA policy"),
    ("optimizer", OptimizerSection, check_optimizer, "the optimizer and its hyper-parameters"),
    ("scheduler", SchedulerSection, None, "the learning-rate schedule"),
    ("sample", SampleSection, check_sample, "images generated during training"),
)
