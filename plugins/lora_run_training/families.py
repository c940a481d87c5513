"""What the families' registrations say about a recipe (``check_recipe``): the bucket grid, `[model] version` and the
`[model.files]` slots of the chosen family, the weights to train on, and the σ samplers and LoRA formats the
families register."""
from __future__ import annotations

from typing import Any, Iterable

from lora_run.recipe import did_you_mean

#: σ samplers every family takes; a family registers its own extra ones (`register_families(samplers=...)`).
TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "logit-normal", "shift")


def _known_name(value: str, known: Iterable[str], what: str) -> str | None:
    """None when ``value`` is one of ``known``, else the message (with "did you mean")."""
    known = sorted(set(known))
    if value in known:
        return None
    hint = did_you_mean(value, known, '"')
    return f"unknown {what} \"{value}\"{hint}; installed: {', '.join(known) or 'none'}"


def family_problems(recipe: Any, family: Any, plugins: Any) -> list[tuple[tuple, str]]:
    """What the family's registration says about the recipe: bucket grid, release, `[model.files]` slots."""
    d, name, out = recipe.dataset, family.name, []
    for key in ("resolution", "bucket_min", "bucket_max", "bucket_step"):
        if getattr(d, key) % family.pixel_multiple:
            out.append((("dataset", key), f"must be a multiple of {family.pixel_multiple} for {name}, got "
                        f"{getattr(d, key)}"))
    version = recipe.model.version
    if version is not None and version not in family.versions:
        several = [n for n, r in plugins.registry["family"].items() if r.versions]
        out.append((("model", "version"), f"{name} has no release {version!r} to choose (" + (
            f"it has {', '.join(repr(v) for v in family.versions)})" if family.versions
            else "remove the key; only " + (", ".join(several) or "no installed family") + " has several)")))
    for slot, value in recipe.model.files.items():
        if value is not None and slot not in family.file_slots:
            hint = did_you_mean(slot, family.file_slots)
            out.append((("model", "files", slot), f"is not a file {name} takes{hint}; its [model.files] slots: "
                        f"{', '.join(family.file_slots)}" if family.file_slots else f"single files are not read "
                        f"for {name}; give [model.source] (a hub id or a diffusers folder)"))
    return out


def source_problems(recipe: Any) -> list[tuple[tuple, str]]:
    """Weights to train on: `[model] source`, or the transformer file in `[model.files]`."""
    if recipe.model.source is None and recipe.model.files.get("transformer") is None:
        return [(("model", "source"), "is required unless [model.files] names the transformer file")]
    return []


def name_problems(recipe: Any, plugins: Any) -> list[tuple[tuple, str]]:
    """The σ sampler and the LoRA formats, against what the installed families register."""
    families, out = plugins.registry["family"], []
    sampling = _known_name(recipe.train.timestep_sampling,
                           [*TIMESTEP_SAMPLINGS, *(s for f in families.values() for s in f.samplers)],
                           "timestep sampling")
    if sampling:
        out.append((("train", "timestep_sampling"), sampling))
    if recipe.output.formats is None and recipe.model.family in families:
        out.append((("output", "formats"), f"is not set and family {recipe.model.family} registers no LoRA "
                    "formats; name the formats to write"))
    for n, fmt in enumerate(recipe.output.formats or ()):
        message = _known_name(fmt, (f for reg in families.values() for f in reg.lora_formats), "LoRA format")
        if message:
            out.append((("output", "formats", n), message))
    return out
