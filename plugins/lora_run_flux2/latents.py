"""FLUX.2 latent layout: 2×2 patchify, batch-norm normalisation, token packing and position ids.

What diffusers' FLUX.2 training examples and pipelines do (``train_dreambooth_lora_flux2*.py``,
``Flux2Pipeline`` / ``Flux2KleinPipeline``), written from their documented formulas:

* the VAE latent (32 channels, 8× down) is the posterior *mode*; it is cut into 2×2 patches, channel-major:
  ``(B, C, H, W) → (B, 4C, H/2, W/2)`` with channel ``4c + 2i + j`` holding ``z[c, 2y+i, 2x+j]``;
* the patchified latent is normalised with the VAE's batch-norm running statistics:
  ``(x − running_mean) / sqrt(running_var + batch_norm_eps)``; the noise, x_t and the target live in
  this space;
* tokens are the ``H/2 · W/2`` positions in row-major order, ``(B, 4C, h, w) → (B, h·w, 4C)``;
* image position ids are ``(t=0, row, col, l=0)``, text ids ``(0, 0, 0, k)`` for token ``k``.

torch is imported inside the functions.
"""
from __future__ import annotations

from typing import Any


def patchify(z: Any) -> Any:
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2×2 patch becomes 4 channels per latent channel."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Any) -> Any:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def bn_stats(vae: Any) -> tuple[Any, Any]:
    """(mean, std) of the VAE's batch norm over the patchified channels, shaped (1, 4C, 1, 1)."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def normalise(z: Any, vae: Any) -> Any:
    """VAE latent (mode) → the normalised patchified latent the transformer is trained on."""
    x = patchify(z)
    mean, std = bn_stats(vae)
    return (x - mean.to(x.device, x.dtype)) / std.to(x.device, x.dtype)


def denormalise(x: Any, vae: Any) -> Any:
    """Inverse of :func:`normalise` (what the pipelines do before decoding)."""
    mean, std = bn_stats(vae)
    return unpatchify(x * std.to(x.device, x.dtype) + mean.to(x.device, x.dtype))


def pack(x: Any) -> Any:
    """(B, C, h, w) → (B, h·w, C), row-major positions."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Any, h: int, w: int) -> Any:
    """(B, h·w, C) in row-major order → (B, C, h, w)."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(batch: int, h: int, w: int, device: Any = None) -> Any:
    """(B, h·w, 4) position ids (0, row, col, 0), row-major."""
    import torch

    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zero = torch.zeros_like(rows)
    return torch.stack([zero, rows, cols, zero], dim=-1).unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: Any = None) -> Any:
    """(B, L, 4) position ids (0, 0, 0, k)."""
    import torch

    k = torch.arange(length, device=device)
    zero = torch.zeros_like(k)
    return torch.stack([zero, zero, zero, k], dim=-1).unsqueeze(0).expand(batch, -1, -1)
