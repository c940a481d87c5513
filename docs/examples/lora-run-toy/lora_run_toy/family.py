"""A tiny model family, `toy-flux`: a FLUX-shaped DiT small enough to train on a CPU in seconds.

A third-party family is three things: its facts (registered in ``__init__.py`` with ``register_families``),
the adapter that teaches a backend the family (here the native backend: a subclass of the FLUX.1-dev family
plugin's adapter, ``lora_run_flux.adapter``, since the architecture is the same, only tiny), and a builder
that writes a model folder to train on.
Nothing here imports torch at module level, so ``lora-run check`` and ``lora-run plugins`` stay fast.
"""
from __future__ import annotations

from pathlib import Path

from lora_run_flux.adapter import FluxAdapter

FAMILY = "toy-flux"


class ToyFluxAdapter(FluxAdapter):
    """The FLUX.1-dev family's native adapter under the toy family's name: same latents, objective and LoRA
    targets; diffusers folders only (no single-file slots) and no hub default (build one with ``build``)."""

    family = FAMILY
    default_hub_id = None
    file_keys = ()


def build(folder: str | Path, seed: int = 0) -> Path:
    """Write a random `toy-flux` model (a diffusers FluxPipeline folder, a few MB) and return its path."""
    from lora_run_flux.tiny import build_tiny_flux

    return build_tiny_flux(folder, seed=seed)
