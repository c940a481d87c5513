"""Shared pieces of the two Hunyuan adapters: loading diffusers components from ``[model] source``.

A Hunyuan family is loaded from ``[model] source``: a hub id (cached copies only while offline) or a local
diffusers folder with the pipeline's component folders. Errors name the recipe key and the component.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import ModelAdapter, first_line, is_local_source  # noqa: F401 - first_line re-exported

#: Reasons shared by both Hunyuan families (the `native` backend keeps one reason per feature, so each text
#: names every family that refuses the feature).
SHARED_REASONS = {
    "guidance": "train.guidance feeds FLUX.1-dev's distilled guidance embedding; HunyuanImage-2.1 (base) and "
                "Hunyuan-DiT v1.2 have no guidance-embedding input — leave it at 1.0",
    "timestep_sampling:flux-shift": "flux-shift is FLUX.1-dev's resolution-dependent shift (μ from 256 to 4096 "
                                    "image tokens, as its scheduler uses at inference); HunyuanImage-2.1 samples "
                                    "with a fixed shift (use timestep_sampling = \"shift\" with train.shift) and "
                                    "Hunyuan-DiT v1.2 is a DDPM model without any shift",
    "text_encoder_training": "the native backend trains a text-encoder LoRA only on FLUX.1-dev's CLIP-L; the "
                             "Hunyuan families keep their text encoders frozen (their outputs are cached)",
}


class SourceLoader(ModelAdapter):
    """Component loading from a diffusers source (subclasses set ``SUBFOLDER`` and ``WHAT``)."""

    SUBFOLDER: dict[str, str] = {}
    WHAT: dict[str, str] = {}
    TOKENIZER_SUBFOLDER: dict[str, str] = {}

    def encode_images(self, pixels: Any) -> Any:
        """Both Hunyuan VAEs: the latent mean times the VAE's scaling factor (no shift, unlike FLUX)."""
        import torch

        vae = self.encoders["vae"]
        with torch.no_grad():
            z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return (z * vae.config.scaling_factor).float()

    def check_sources(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().check_sources()
        m = self.recipe.model
        if m.source is None:
            problems.append((("model", "source"), f"is required for {self.family}: a hub id or a local diffusers "
                             "folder with the pipeline's components"))
        elif is_local_source(m.source) and os.path.isdir(m.source):
            src = Path(m.source)
            for key, sub in {**self.SUBFOLDER, **self.TOKENIZER_SUBFOLDER}.items():
                if m.files.get(key) is None and not os.path.isdir(src / sub):
                    problems.append((("model", "source"), f"{src} has no {sub}/ folder ({self.WHAT.get(key, key)}); "
                                     f"it is not a {self.family} diffusers folder"))
        return problems

    def from_source(self, cls: Any, key: str, subfolder: str | None = None, **kw: Any) -> Any:
        sub = subfolder or self.SUBFOLDER.get(key) or self.TOKENIZER_SUBFOLDER[key]
        return self.load_from_source(cls, sub, self.WHAT.get(key, key), **kw,
                                     missing=("model.source", f"is required for {self.family}"))

    def frozen(self, module: Any) -> Any:
        module.requires_grad_(False)
        module.eval()
        return module


def real_tokenizer(tok: Any, minimum: int = 10) -> bool:
    """transformers 5 returns an *empty* tokenizer for a repo whose files are missing offline."""
    return len(tok) > len(set(tok.all_special_tokens)) + minimum
