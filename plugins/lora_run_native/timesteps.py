"""Timestep (σ) sampling, loss weighting and noise for flow-matching training.

Rectified flow: ``x_t = (1-σ)·x0 + σ·ε`` with σ ∈ (0, 1), the model predicts the velocity ``ε - x0``.

σ sampling (`train.timestep_sampling`):

- ``uniform``: σ ~ U(0, 1).
- ``sigmoid``: σ = sigmoid(s·n), n ~ N(0, 1), s = `sigmoid_scale` (sd-scripts' `sigmoid`; with s = 1 this is
  the logit-normal(0, 1) of SD3).
- ``logit-normal``: exactly diffusers' training examples (``compute_density_for_timestep_sampling("logit_normal")``)
  and sd-scripts' ``sigma`` sampling with ``--discrete_flow_shift 1`` (what the kohya backend passes; sd-scripts'
  default 3.0 shifts its table): u = sigmoid(n), n ~ N(`logit_mean`, `logit_std`) (``torch.normal``), indexes
  the unshifted 1000-step *descending* table of ``FlowMatchEulerDiscreteScheduler``: σ = (1000 − ⌊1000·u⌋) / 1000,
  so σ ∈ {0.001, …, 1} and σ ≈ 1 − u. A `logit_mean` copied from either trainer means the same thing here: a
  positive mean puts more weight on *less* noisy steps (mean 0.5 → median σ ≈ sigmoid(−0.5) ≈ 0.38).
- ``shift``: the sigmoid draw, then σ' = k·σ / (1 + (k-1)·σ) with k = `shift` (more weight on noisy steps).
- ``flux-shift``: the sigmoid draw, then the resolution-dependent shift FLUX uses at inference: μ grows
  linearly with the image token count from 0.5 at 256 tokens to 1.15 at 4096 tokens and
  σ' = e^μ / (e^μ + 1/σ - 1).

Loss weighting (`train.timestep_weighting`, SD3's schemes as diffusers' ``compute_loss_weighting_for_sd3`` and
sd-scripts define them): ``none``; ``sigma_sqrt``: w = σ⁻² (not clamped: the references do not clamp it; σ ≥ 1e-4
bounds it); ``cosmap``: w = 2 / (π·(1 - 2σ + 2σ²)).

Noise offset for flow matching (`train.noise_offset` = o > 0): ε ← ε + o·δ with δ ~ N(0, 1) drawn once
per sample and VAE latent channel (shape ``(B, C, 1, 1)``), *before* x_t and the target ``ε - x0`` are formed. A
family whose trained latent is already patchified (FLUX.2: channel 4c + 2i + j holds VAE channel c at sub-position
(i, j)) draws one δ per VAE channel and gives it to that channel's ``group`` patch channels, so the offset stays
constant over the image (a per-patch-channel δ would be a pattern repeating every 2×2 latent positions). The
model thus also learns to move the per-channel mean, which lets it render very dark or bright images.
The target stays consistent with the noisy input (unlike adding the offset to x_t only).
"""
from __future__ import annotations

import math
from typing import Any

SIGMA_EPS = 1e-4
#: Steps of the flow-matching scheduler's training table (``FlowMatchEulerDiscreteScheduler``'s default, which
#: every family's scheduler config keeps) that `logit-normal` indexes.
TABLE_STEPS = 1000


def flux_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """μ of FLUX's resolution-dependent shift (linear in the image token count)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def sample_sigmas(method: str, batch: int, generator: Any, *, sigmoid_scale: float = 1.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift: float = 3.0, image_seq_len: int = 1024, device: Any = "cpu") -> Any:
    """Per-sample σ in (0, 1), shape ``(batch,)``, float32, drawn with ``generator`` (a CPU generator; the
    result is moved to ``device`` so CPU and CUDA runs draw the same numbers)."""
    import torch

    if method == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif method == "logit-normal":
        index = logit_normal_index(batch, generator, logit_mean, logit_std)
        sigma = (TABLE_STEPS - index).float() / TABLE_STEPS            # the table's σ, bit for bit; 1.0 included
        return to_device(sigma.float(), device)
    elif method in ("sigmoid", "shift", "flux-shift"):
        sigma = torch.sigmoid(torch.randn(batch, generator=generator) * sigmoid_scale)
        if method == "shift":
            sigma = shift * sigma / (1 + (shift - 1) * sigma)
        elif method == "flux-shift":
            mu = math.exp(flux_mu(image_seq_len))
            sigma = mu / (mu + (1 / sigma.clamp_min(SIGMA_EPS) - 1))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    return to_device(sigma.clamp(SIGMA_EPS, 1 - SIGMA_EPS).float(), device)


def logit_normal_index(batch: int, generator: Any, logit_mean: float = 0.0, logit_std: float = 1.0,
                       steps: int = TABLE_STEPS) -> Any:
    """The references' `logit_normal` draw as an index into a scheduler's *descending* training table of ``steps``
    entries: ⌊steps·u⌋, u = sigmoid(N(`logit_mean`, `logit_std`)) (``torch.normal``, as diffusers' helper draws
    it), int64 in [0, steps − 1]. The flow table's entry is σ = (steps − index)/steps; a DDPM scheduler's training
    ``timesteps`` are ``steps − 1, …, 0``, so its entry is t = steps − 1 − index."""
    import torch

    u = torch.sigmoid(torch.normal(mean=float(logit_mean), std=float(logit_std), size=(batch,), generator=generator))
    return (u * steps).long().clamp(max=steps - 1)      # u = 1.0 (n > 17) would run off the table


def to_device(tensor: Any, device: Any) -> Any:
    """A host tensor to ``device`` without waiting for the GPU: on CUDA through pinned memory, non-blocking. A plain
    ``.to("cuda")`` of pageable memory synchronises the host with the GPU, which then cannot queue work ahead (the
    training step draws its noise, σ and loss weights on the host every step)."""
    if getattr(device, "type", str(device)).startswith("cuda") and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def loss_weighting(scheme: str, sigma: Any) -> Any:
    """Per-sample loss weights for flow matching."""
    import torch

    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        bot = 1 - 2 * sigma.float() + 2 * sigma.float() ** 2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigma, dtype=torch.float32)


def make_noise(shape: tuple[int, ...], generator: Any, noise_offset: float = 0.0, group: int = 1) -> Any:
    """ε ~ N(0, 1) of ``shape`` on CPU (deterministic everywhere), with the flow-matching noise offset: one δ per
    sample and VAE latent channel, shared by the ``group`` consecutive channels that hold that VAE channel (1 for
    an unpatchified latent; 4 for FLUX.2's 2×2-patchified one)."""
    import torch

    noise = torch.randn(shape, generator=generator)
    if noise_offset > 0:
        if shape[1] % group:
            raise ValueError(f"{shape[1]} latent channels are not groups of {group}")
        delta = torch.randn((shape[0], shape[1] // group, *([1] * (len(shape) - 2))), generator=generator)
        noise = noise + noise_offset * delta.repeat_interleave(group, dim=1)
    return noise
