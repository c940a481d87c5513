"""FLUX.2 parity with diffusers' FLUX.2 DreamBooth-LoRA examples (`train_dreambooth_lora_flux2.py`,
`train_dreambooth_lora_flux2_klein.py`) and pipelines, checked against their documented formulas, each with a
planted mistake the check must catch:

- latents: the VAE posterior mode z, cut into 2×2 patches channel-major (channel 4c + 2i + j holds
  z[c, 2y+i, 2x+j]) and normalised with the VAE batch norm: (x − running_mean) / sqrt(running_var + eps);
- tokens: positions row-major, image ids (0, row, col, 0), text ids (0, 0, 0, k); the prediction is unpacked
  with the same order;
- x_t = (1−σ)·x0 + σ·ε, target ε − x0, in the normalised patchified space;
- the transformer gets σ ∈ [0, 1] as `timestep` (it multiplies by 1000 itself); [dev] gets the guidance value
  (its embedding also multiplies by 1000), [klein] gets none;
- captions: the text encoder's hidden states of layers 9/18/27 (Qwen3, [klein], chat template with the user
  turn, generation prompt, thinking off) or 10/20/30 (Mistral-3, [dev], FLUX.2's system message first),
  stacked per token: (B, L, 3·hidden), padded to the maximum length.
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe

pytestmark = pytest.mark.usefixtures("flux2_registered")


def adapter_for(variant, model, **train):
    from lora_run_native.adapters import adapter_class

    recipe = minimal_recipe(f"flux.2-{variant}", model, train={"mixed_precision": "no", **train},
                            native={"text_max_length": 24})
    from lora_run_native.backend import NativeOptions

    return adapter_class(f"flux.2-{variant}")(recipe, options=NativeOptions(text_max_length=24))


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from lora_run_flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("p") / "klein", "klein")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    from lora_run_flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("p") / "dev", "dev")


# ---------------------------------------------------------------------------------------------- latents
def documented_latents(vae, pixels):
    """The formula written out with loops over the 2×2 patch offsets."""
    import torch

    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
    b, c, h, w = z.shape
    x = torch.empty(b, 4 * c, h // 2, w // 2)
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                x[:, 4 * ch + 2 * i + j] = z[:, ch, i::2, j::2]
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps) ** 0.5
    return (x - mean) / std


def test_latents_are_patchified_then_batch_normalised(klein):
    import torch

    adapter = adapter_for("klein", klein)
    adapter.load_encoders(only=("vae",))
    vae = adapter.encoders["vae"]
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = documented_latents(vae, pixels)
    ours = adapter.encode_images(pixels)
    assert ours.shape == (2, 32, 4, 3) and torch.allclose(ours, ref, atol=1e-5)
    from lora_run_flux2 import latents

    with torch.no_grad():                # planted: normalised per latent channel before patchifying (wrong stats)
        z = vae.encode(pixels).latent_dist.mode()
    wrong = latents.patchify(z) - vae.bn.running_mean.view(1, -1, 1, 1)
    assert not torch.allclose(wrong, ref, atol=1e-3)
    assert torch.allclose(latents.denormalise(ours, vae), z, atol=1e-5)


def test_batch_norm_statistics_stay_float32_under_bf16(klein):
    """The reference reads the statistics from the fp32 VAE before casting it to the training dtype."""
    import torch
    from diffusers import AutoencoderKLFlux2

    adapter = adapter_for("klein", klein)
    vae = adapter.vae_with_fp32_stats(torch.bfloat16)
    exact = AutoencoderKLFlux2.from_pretrained(klein, subfolder="vae").bn
    assert vae.dtype == torch.bfloat16 and vae.bn.running_mean.dtype == torch.float32
    assert torch.equal(vae.bn.running_var, exact.running_var)
    cast = AutoencoderKLFlux2.from_pretrained(klein, subfolder="vae", torch_dtype=torch.bfloat16).bn   # planted
    assert not torch.equal(cast.running_var.float(), exact.running_var)


def test_patchify_matches_the_pipeline_helpers():
    import torch
    from diffusers import Flux2KleinPipeline

    from lora_run_flux2 import latents

    z = torch.randn(2, 3, 6, 8)
    assert torch.equal(latents.patchify(z), Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(latents.unpatchify(latents.patchify(z)), z)
    x = torch.randn(2, 12, 3, 4)
    assert torch.equal(latents.pack(x), Flux2KleinPipeline._pack_latents(x))
    assert torch.equal(latents.image_ids(2, 3, 4), Flux2KleinPipeline._prepare_latent_ids(x))
    assert torch.equal(latents.text_ids(2, 5), Flux2KleinPipeline._prepare_text_ids(torch.zeros(2, 5, 7)))


# ------------------------------------------------------------------------------------ tokens and ids
class Echo:
    """Stands in for the transformer: records what it is fed and returns the image tokens unchanged."""

    def __init__(self):
        self.seen = {}

    def __call__(self, **kw):
        self.seen = kw
        return (kw["hidden_states"],)


def test_tokens_row_major_ids_and_unpack(klein):
    import torch

    adapter = adapter_for("klein", klein)
    noisy = torch.randn(2, 32, 3, 4)
    text = {"prompt_embeds": torch.randn(2, 5, 48)}
    echo = Echo()
    out = adapter.predict(echo, noisy, torch.tensor([0.2, 0.7]), text, 1.0)
    tokens = echo.seen["hidden_states"]
    assert tokens.shape == (2, 12, 32)
    assert torch.equal(tokens[1, 6], noisy[1, :, 1, 2])                     # token 6 = row 1, col 2
    assert echo.seen["img_ids"][0].tolist() == [[0, r, c, 0] for r in range(3) for c in range(4)]
    assert echo.seen["txt_ids"][0].tolist() == [[0, 0, 0, k] for k in range(5)]
    assert torch.equal(out, noisy)                                           # unpack inverts pack
    from lora_run_flux2 import latents

    col_major = tokens.permute(0, 2, 1).reshape(2, 32, 4, 3).transpose(2, 3)   # planted: wrong unpack order
    assert not torch.equal(col_major, noisy)
    assert torch.equal(latents.unpack(tokens, 3, 4), noisy)


# ---------------------------------------------------------------------------------- x_t and target
def test_noisy_input_and_velocity_target(klein):
    import torch

    adapter = adapter_for("klein", klein)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 32, 2, 2, generator=g), torch.randn(3, 32, 2, 2, generator=g)
    sigma = torch.tensor([0.05, 0.5, 0.95])
    s = sigma.view(-1, 1, 1, 1)

    def matches(fn):
        noisy, target = fn(x0, eps, sigma)
        return bool(torch.allclose(noisy, (1 - s) * x0 + s * eps) and torch.allclose(target, eps - x0))

    assert matches(adapter.noisy_and_target)
    assert not matches(lambda a, e, t: (lambda n, v: (n, -v))(*adapter.noisy_and_target(a, e, t)))  # planted


# ------------------------------------------------------------------------------------------ flux-shift
def shifted(u, mu: float):
    """σ = e^μ / (e^μ + 1/u − 1), the exponential time shift of FLUX's scheduler, clamped as every σ is."""
    import math

    e = math.exp(mu)
    return (e / (e + (1 / u - 1))).clamp(1e-4, 1 - 1e-4)


@pytest.mark.parametrize("h, w", [(32, 32), (48, 48), (64, 64), (64, 68), (80, 80)])  # 512² … 1280² buckets
def test_flux_shift_is_flux2s_own_step_independent_mu(klein, h, w):
    """`flux-shift` draws u = sigmoid(N(0, 1)) and shifts it with μ of FLUX.2's own schedule for the bucket's
    token count (h·w packed tokens): diffusers' ``compute_empirical_mu`` (BFL's ``flux2/sampling.py``) at 200 steps,
    its step-independent line a2·tokens + b2 — the μ FLUX.2 samples with at every step count above 4300 tokens.
    That line is FLUX.1-dev's (0.5 at 256 tokens, 1.15 at 4096: a2, b2 are its slope and intercept to 8 digits),
    and it is musubi-tuner's FLUX.2 trainer's `flux2_shift` formula. Planted mistakes: μ of the 50-, 28- and
    4-step schedules (FLUX.2 shifts further with fewer steps below 4300 tokens), the token count of the
    unpatchified latent (4×) and a quarter of it."""
    import torch
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    adapter = adapter_for("klein", klein, timestep_sampling="flux-shift")
    n, tokens = 2048, h * w
    sigma = adapter.sample_timesteps(n, torch.Generator().manual_seed(7), torch.zeros(1, 128, h, w))
    u = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(7)))
    assert torch.allclose(sigma, shifted(u, compute_empirical_mu(tokens, 200)), atol=2e-6, rtol=0)
    slope = (1.15 - 0.5) / (4096 - 256)                  # musubi-tuner: get_lin_function(y1=0.5, y2=1.15)(h * w)
    k = math.exp(slope * tokens + (0.5 - slope * 256))
    assert torch.allclose(sigma, (u * k / (1 + (k - 1) * u)).clamp(1e-4, 1 - 1e-4), atol=1e-6, rtol=0)
    planted = {"4× the tokens": shifted(u, compute_empirical_mu(4 * tokens, 200)),
               "a quarter of the tokens": shifted(u, compute_empirical_mu(tokens // 4, 200))}
    if tokens <= 4300:
        planted.update({f"μ of the {steps}-step schedule": shifted(u, compute_empirical_mu(tokens, steps))
                        for steps in (50, 28, 4)})
    else:                                                # FLUX.2's own μ no longer depends on the steps here
        assert {compute_empirical_mu(tokens, steps) for steps in (4, 28, 50, 200)} == \
            {compute_empirical_mu(tokens, 200)}
    for what, wrong in planted.items():
        assert not torch.allclose(sigma, wrong, atol=1e-3, rtol=0), f"planted mistake not caught: {what}"


def test_flux2_mu_numbers_in_the_docs():
    """The μ values docs/flux2.md quotes, from diffusers' FLUX.2 pipelines."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as klein_mu

    assert all(klein_mu(t, s) == compute_empirical_mu(t, s) for t in (256, 4096, 6400) for s in (4, 50, 200))
    assert round(compute_empirical_mu(4096, 200), 4) == 1.15 and round(compute_empirical_mu(256, 200), 4) == 0.5
    assert round(compute_empirical_mu(4096, 50), 2) == 2.02 and round(compute_empirical_mu(4096, 28), 2) == 2.15
    assert round(compute_empirical_mu(4096, 4), 2) == 2.29 and round(compute_empirical_mu(1024, 50), 2) == 1.70
    assert round(compute_empirical_mu(4300, 50), 2) == 2.04 and round(compute_empirical_mu(4301, 50), 2) == 1.18
    assert max(abs(compute_empirical_mu(t, 200) - (0.5 + (t - 256) * 0.65 / 3840)) for t in range(16, 16385)) < 1.4e-5


# ------------------------------------------------------------------------------ timestep and guidance
def fed(adapter, model, variant, guidance):
    import torch

    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.predict(model, torch.randn(2, 32, 2, 3), torch.tensor([0.25, 0.75]),
                        {"prompt_embeds": torch.randn(2, 4, 48)}, guidance)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_sigma_and_guidance_fed_as_the_reference_does(variant, request):
    import torch

    adapter = adapter_for(variant, request.getfixturevalue(variant), guidance=3.5 if variant == "dev" else 1.0)
    model = adapter.load_transformer()
    seen = fed(adapter, model, variant, adapter.recipe.train.guidance)
    assert torch.equal(seen["timestep"], torch.tensor([0.25, 0.75]))
    if variant == "dev":
        assert model.config.guidance_embeds and torch.equal(seen["guidance"], torch.full((2,), 3.5))
        planted = fed(adapter, model, variant, 3.5 * 1000)        # planted: guidance pre-scaled by 1000
        assert not torch.equal(planted["guidance"], torch.full((2,), 3.5))
    else:
        assert not model.config.guidance_embeds and seen["guidance"] is None
    adapter.guidance_embeds = variant != "dev"                    # planted: the other variant's rule
    wrong = fed(adapter, model, variant, 3.5)
    assert (wrong["guidance"] is None) == (variant == "dev")


# -------------------------------------------------------------------------------------------- captions
def documented_text(encoder, tok, captions, layers, system, length):
    import torch

    rows = []
    for caption in captions:
        if system is None:
            text = tok.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
        else:
            text = tok.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": system}]},
                                            {"role": "user", "content": [{"type": "text", "text": caption}]}],
                                           tokenize=False, add_generation_prompt=False)
        enc = tok(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt",
                  add_special_tokens=False if system is not None else True)
        with torch.no_grad():
            hidden = encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             output_hidden_states=True, use_cache=False).hidden_states
        rows.append(torch.cat([hidden[k] for k in layers], dim=-1))
    return torch.cat(rows)


@pytest.mark.parametrize("variant, layers", [("klein", (9, 18, 27)), ("dev", (10, 20, 30))])
def test_caption_is_stacked_hidden_states(variant, layers, request):
    import torch
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    adapter = adapter_for(variant, request.getfixturevalue(variant))
    adapter.load_encoders(only=(adapter.te,))
    encoder, tok = adapter.encoders[adapter.te], adapter.tokenizers[adapter.te]
    captions = ["ohwx, a person", "a dog"]
    ours = adapter.encode_captions(captions)["prompt_embeds"]
    system = SYSTEM_MESSAGE if variant == "dev" else None
    ref = documented_text(encoder, tok, captions, layers, system, 24)
    assert ours.shape == (2, 24, 48) and torch.allclose(ours, ref, atol=1e-5)
    shifted = documented_text(encoder, tok, captions, tuple(k - 1 for k in layers), system, 24)   # planted
    assert not torch.allclose(ours, shifted, atol=1e-3)
