"""LoRA file formats shared by the backends: kohya (sd-scripts / ComfyUI) ↔ diffusers (peft) conversions.

A library, not a plugin: it registers nothing. One module per model family:

- :mod:`lora_run_formats.flux` — FLUX.1 (BFL's fused layers ↔ diffusers' split layers, exact both ways).

torch is imported inside the functions that need it, so importing this package is cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """``"kohya"`` (``*.lora_down.weight`` keys), ``"diffusers"`` (``*.lora_A.weight``) or ``"unknown"``."""
    keys = list(state_dict)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return "unknown"


def load_lora(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a ``.safetensors`` LoRA: (tensors, metadata strings)."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata


def save_lora(path: str | Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a ``.safetensors`` LoRA atomically (a temp file renamed on success); tensors made contiguous."""
    from safetensors.torch import save_file

    from lora_run.rundir import atomic_path

    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path
