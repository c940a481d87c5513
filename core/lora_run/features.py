"""Recipe features a backend may or may not honour, and the capability check.

A backend registers ``capabilities={family: {feature, ...}}``. A recipe that uses a feature the chosen
backend does not list for the chosen family is refused, naming the key and the backends that can.
We never silently ignore a setting (some external trainers do).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import attrs

from .schema import Recipe


@attrs.frozen
class Feature:
    name: str
    key: tuple[str, ...]
    used: Callable[[Recipe], bool]
    doc: str


def _choice(section: str, field: str) -> list[Feature]:
    """One feature per value of a choice field: `optimizer:prodigy`, `scheduler:cosine`."""
    import typing

    from . import schema

    cls = {"optimizer": schema.OptimizerSection,
           "scheduler": schema.SchedulerSection, "lora": schema.LoraSection}[section]
    values = typing.get_args(typing.get_type_hints(cls)[field])
    prefix = section if field == "name" else field
    return [Feature(f"{prefix}:{v}", (section, field),
                    (lambda r, s=section, f=field, v=v: getattr(getattr(r, s), f) == v),
                    f"`{section}.{field} = \"{v}\"`") for v in values]


FEATURES: list[Feature] = [
    Feature("text_encoder_training", ("text_encoder", "train"), lambda r: r.text_encoder.train,
            "a text-encoder LoRA"),
    Feature("regularization", ("dataset", "regularization"), lambda r: bool(r.dataset.regularization),
            "regularisation (prior) image sets"),
    Feature("regularization_weight", ("dataset", "regularization"),
            lambda r: any(s.weight != 1.0 for s in r.dataset.regularization), "a loss weight other than 1 on a "
            "regularisation set"),
    Feature("caption_dropout", ("dataset", "caption_dropout"), lambda r: r.dataset.caption_dropout > 0,
            "caption dropout"),
    Feature("noise_offset", ("train", "noise_offset"), lambda r: r.train.noise_offset > 0, "noise offset"),
    Feature("min_snr_gamma", ("train", "min_snr_gamma"), lambda r: r.train.min_snr_gamma is not None,
            "Min-SNR-γ weighting"),
    Feature("guidance", ("train", "guidance"), lambda r: r.train.guidance != 1.0,
            "a guidance-embedding value other than 1.0 (a distilled guidance input)"),
    Feature("timestep_weighting", ("train", "timestep_weighting"), lambda r: r.train.timestep_weighting != "none",
            "a flow-matching loss weighting"),
    Feature("lora_dropout", ("lora", "dropout"), lambda r: r.lora.dropout > 0, "LoRA dropout"),
    Feature("lora_alpha", ("lora", "alpha"), lambda r: r.lora.alpha != r.lora.rank,
            "a LoRA alpha different from the rank"),
    Feature("lora_modules", ("lora", "modules"), lambda r: bool(r.lora.modules), "explicit LoRA module names"),
    Feature("fp8", ("model", "base_precision"), lambda r: r.model.base_precision == "fp8", "fp8 base weights"),
    Feature("sampling", ("sample", "every_steps"), lambda r: r.sample.every_steps is not None,
            "sample images during training"),
    Feature("save_every_epochs", ("train", "save_every_epochs"), lambda r: r.train.save_every_epochs is not None,
            "checkpoints every N epochs"),
    Feature("save_every_steps", ("train", "save_every_steps"), lambda r: r.train.save_every_steps is not None,
            "checkpoints every N steps"),
    Feature("epochs", ("train", "epochs"), lambda r: r.train.epochs is not None, "training length in epochs"),
    Feature("steps", ("train", "steps"), lambda r: r.train.steps is not None, "training length in steps"),
    Feature("multi_gpu", ("train", "gpus"), lambda r: r.train.gpus > 1, "data-parallel training on several GPUs"),
    *_choice("lora", "targets"),
    *_choice("optimizer", "name"),
    *_choice("scheduler", "name"),
]
# losses and σ samplers are plugin names, not a fixed choice: `loss:<name>`, `timestep_sampling:<name>`


def used_features(recipe: Recipe) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(feature name, recipe key) for every feature the recipe uses."""
    for feature in FEATURES:
        if feature.used(recipe):
            yield feature.name, feature.key
    yield f"loss:{recipe.train.loss}", ("train", "loss")
    yield f"timestep_sampling:{recipe.train.timestep_sampling}", ("train", "timestep_sampling")


ANY_LOSS = "loss:*"


def honours(capabilities: frozenset[str] | set[str], name: str) -> bool:
    """Whether a capability set covers a feature; ``loss:*`` covers every registered loss (a kind, not a list)."""
    return name in capabilities or (name.startswith("loss:") and ANY_LOSS in capabilities)


def doc_of(name: str) -> str:
    for feature in FEATURES:
        if feature.name == name:
            return feature.doc
    if name.startswith("loss:"):
        return f"the `{name[5:]}` loss"
    if name.startswith("timestep_sampling:"):
        return f"`train.timestep_sampling = \"{name[18:]}\"`"
    return name


def capability_problems(recipe: Recipe, backend: str, registry: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Problems for features the backend does not honour for the recipe's family. The backends that can are
    listed once each: a registration with ``alias_of`` (another name for a listed backend) is left out."""
    family = recipe.model.family
    reg = registry[backend]
    out: list[tuple[tuple, str]] = []
    registry = {n: r for n, r in registry.items() if r.alias_of not in registry}
    if family not in reg.capabilities:
        able = sorted(n for n, r in registry.items() if family in r.capabilities)
        why = reg.family_notes.get(family, "")
        out.append((("model", "family"), f"backend \"{backend}\" does not train {family}"
                    + (f" ({why})" if why else "") + f"; backends that do: {', '.join(able) or 'none installed'}"))
        return out
    honoured = reg.capabilities[family]
    reasons = reg.reasons.get(family) if isinstance(reg.reasons.get(family), dict) else reg.reasons
    for name, key in used_features(recipe):
        if honours(honoured, name):
            continue
        able = sorted(n for n, r in registry.items() if honours(r.capabilities.get(family, frozenset()), name))
        why = reasons.get(name, "")
        out.append((key, f"backend \"{backend}\" cannot honour {doc_of(name)} for {family}"
                    + (f" ({why})" if why else "")
                    + f"; backends that can: {', '.join(able) if able else 'none installed'}"))
    return out
