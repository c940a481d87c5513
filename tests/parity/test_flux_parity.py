"""FLUX.1-dev parity with the references (diffusers' FLUX LoRA example / FluxPipeline, sd-scripts'
flux_train_network), checked against their documented formulas, each with a planted mistake it must catch:

- latents: (z − shift_factor) · scaling_factor (FLUX: 0.1159 / 0.3611), z = the VAE posterior *mean* (a
  documented choice: the references draw a sample; docs/native-backend.md says why we keep the mean);
- σ draws: `sigmoid` = sigmoid(s·N(0,1)) (sd-scripts' sigmoid), `shift` = k·σ/(1+(k−1)·σ), `flux-shift` =
  e^μ/(e^μ + 1/σ − 1) with μ linear in the token count from 0.5 (256) to 1.15 (4096);
- x_t = (1−σ)·x0 + σ·ε, target ε − x0 (the Euler step x + (σ_next − σ)·v);
- the transformer gets σ ∈ [0, 1] as `timestep` (it multiplies by 1000 itself), the guidance value, 2×2-packed
  latents with (0, row, col) image ids and zero text ids, the T5 sequence and the CLIP pooled vector;
- SD3 loss weightings: sigma_sqrt = σ⁻², cosmap = 2/(π(1 − 2σ + 2σ²)).
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe


def adapter_for(tmp_path, **train):
    from lora_run_flux.adapter import FluxAdapter

    return FluxAdapter(minimal_recipe("flux.1-dev", tmp_path, train={"mixed_precision": "no", **train}))


# ---------------------------------------------------------------------------------------------- latents
def tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 32), latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
                         shift_factor=0.1159).eval()


def latents_match(encode, vae) -> bool:
    import torch

    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    return bool(torch.allclose(encode(pixels), (mean - 0.1159) * 0.3611, atol=1e-6))


def test_latents_shift_then_scale(tmp_path):
    adapter = adapter_for(tmp_path)
    vae = tiny_vae()
    adapter.encoders["vae"] = vae
    assert latents_match(adapter.encode_images, vae)
    unshifted = lambda px: adapter.encode_images(px) + 0.1159 * 0.3611  # noqa: E731  planted: no shift
    assert not latents_match(unshifted, vae)


# ------------------------------------------------------------------------------------------ σ draws
def documented_sigmas(method, n, *, scale=1.0, shift=3.0, seq=1024):
    """σ from the documented formulas, on the same CPU generator draw."""
    import torch

    u = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(9)) * scale)
    if method == "shift":
        u = shift * u / (1 + (shift - 1) * u)
    elif method == "flux-shift":
        mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
        u = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return u.clamp(1e-4, 1 - 1e-4)


@pytest.mark.parametrize("method, kw", [("sigmoid", {"sigmoid_scale": 1.3}), ("shift", {"shift": 3.1582}),
                                        ("flux-shift", {})])
def test_sigma_draws(tmp_path, method, kw):
    import torch

    adapter = adapter_for(tmp_path, timestep_sampling=method, **kw)
    latents = torch.zeros(8, 16, 64, 64)                 # 32 × 32 packed tokens = 1024
    drawn = adapter.sample_timesteps(8, torch.Generator().manual_seed(9), latents)
    ref = documented_sigmas(method, 8, scale=kw.get("sigmoid_scale", 1.0), shift=kw.get("shift", 3.0), seq=1024)
    assert torch.allclose(drawn, ref, atol=1e-6)
    if method == "flux-shift":          # planted: the token count of the unpacked latent (4096) is the wrong μ
        assert not torch.allclose(drawn, documented_sigmas(method, 8, seq=4096), atol=1e-3)


# --------------------------------------------------------------------------------- x_t and target
def objective_matches(noisy_and_target) -> bool:
    import torch

    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.05, 0.5, 0.95])
    noisy, target = noisy_and_target(x0, eps, sigma)
    s = sigma.view(-1, 1, 1, 1)
    return bool(torch.allclose(noisy, (1 - s) * x0 + s * eps, atol=1e-6)
                and torch.allclose(target, eps - x0, atol=1e-6))


def test_noisy_input_and_velocity_target(tmp_path):
    adapter = adapter_for(tmp_path)
    assert objective_matches(adapter.noisy_and_target)
    flipped = lambda x0, eps, t: (lambda n, v: (n, -v))(*adapter.noisy_and_target(x0, eps, t))  # noqa: E731
    assert not objective_matches(flipped)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting(tmp_path, scheme):
    import torch

    adapter = adapter_for(tmp_path, timestep_weighting=scheme)
    sigma = torch.tensor([0.1, 0.4, 0.8])
    expected = {"none": torch.ones(3), "sigma_sqrt": sigma ** -2,
                "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}[scheme]
    assert torch.allclose(adapter.loss_weights(sigma), expected, atol=1e-5)


# ------------------------------------------------------------------------------ what the model is fed
def tiny_transformer():
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def fed(predict, model, noisy, sigma, text, guidance):
    seen = {}

    def hook(module, args, kwargs):
        seen.update({k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in kwargs.items()})
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = predict(model, noisy, sigma, text, guidance)
    finally:
        handle.remove()
    return seen, out


def sigma_is_fed_as_sigma(predict, model) -> bool:
    import torch

    sigma = torch.tensor([0.25, 0.75])
    text = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 24)}
    seen, _ = fed(predict, model, torch.randn(2, 16, 4, 6), sigma, text, 1.0)
    return bool(torch.equal(seen["timestep"], sigma))


def test_the_transformer_gets_sigma_packed_latents_ids_and_guidance(tmp_path):
    import torch

    adapter = adapter_for(tmp_path, guidance=1.0)
    model = tiny_transformer()
    assert sigma_is_fed_as_sigma(adapter.predict, model)
    times_1000 = lambda m, x, t, text, g: adapter.predict(m, x, t * 1000.0, text, g)  # noqa: E731  planted
    assert not sigma_is_fed_as_sigma(times_1000, model)

    noisy = torch.randn(2, 16, 4, 6)
    text = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 24)}
    seen, out = fed(adapter.predict, model, noisy, torch.tensor([0.3, 0.6]), text, 1.0)
    assert torch.equal(seen["guidance"], torch.ones(2))
    packed = seen["hidden_states"]                      # (B, h/2·w/2, C·4): channel-major 2×2 patches
    assert packed.shape == (2, 6, 64)
    assert torch.equal(packed[0, 0], noisy[0, :, 0:2, 0:2].reshape(-1))
    assert torch.equal(packed[1, 5], noisy[1, :, 2:4, 4:6].reshape(-1))
    ids = seen["img_ids"]
    assert ids.tolist() == [[0, r, c] for r in range(2) for c in range(3)]
    assert torch.equal(seen["txt_ids"], torch.zeros(5, 3))
    assert torch.equal(seen["encoder_hidden_states"], text["prompt_embeds"])
    assert torch.equal(seen["pooled_projections"], text["pooled_prompt_embeds"])
    assert out.shape == noisy.shape
