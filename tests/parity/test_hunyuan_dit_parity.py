"""Hunyuan-DiT parity with the reference objective, written from the documented behaviour (not from code):

- schedule: the model's ``scheduler/scheduler_config.json`` — for v1.2 (Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers)
  scaled-linear β from 0.00085 to **0.018** over 1000 steps, v-prediction. β_t = (√β₀ + t/(T−1)·(√β₁ − √β₀))²,
  ᾱ_t = Π_{s≤t}(1 − β_s); without a config file, the release's documented schedule;
- x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and the target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (DDPM v-prediction), or ε where the
  scheduler config says ``prediction_type = "epsilon"`` (diffusers' default for a config without the key);
- the transformer gets the integer timestep t (0..999), not t/1000, plus both text encodings with their masks;
  of its 8 output channels (learn_sigma) the first 4 are the prediction;
- Min-SNR-γ for v-prediction: w = min(SNR, γ) / (SNR + 1), SNR = ᾱ/(1−ᾱ); for ε-prediction min(SNR, γ) / SNR;
- latents: the VAE posterior mean × 0.13025, no shift.

Every check runs against a deliberately wrong variant too (the old β_end 0.03, a flipped target, t/1000 fed
as the timestep) and must catch it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .conftest import minimal_recipe, transformer_inputs

#: the v1.2 scheduler config as published (the fields that define the schedule), written out independently
V12 = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.018,
       "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1,
       "trained_betas": None}


def recipe_for(source: Path, version: str | None = None, **train):
    return minimal_recipe("hunyuan-dit-1.2", source, train={"mixed_precision": "no", **train},
                          model={"version": version} if version else None)


def model_folder(tmp_path: Path, scheduler: dict | None = V12, style: bool = False, name: str = "m") -> Path:
    folder = tmp_path / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"use_style_cond_and_image_meta_size": style}))
    # weights beside the config (an empty safetensors file): a folder with a config alone is named by `check`
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{}      ")
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def documented_alphas_cumprod(config: dict):
    """ᾱ_t from the documented scaled-linear formula, in float64."""
    T, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    out, prod = [], 1.0
    for t in range(T):
        beta = (math.sqrt(b0) + t / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return out


def schedule_matches(alphas, config: dict) -> bool:
    ref = documented_alphas_cumprod(config)
    return len(alphas) == len(ref) and max(abs(float(a) - r) for a, r in zip(alphas, ref)) < 1e-6


def objective_matches(noisy_and_target, alphas_config: dict, prediction: str = "v_prediction") -> bool:
    import torch

    ref = documented_alphas_cumprod(alphas_config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 100.0, 500.0, 999.0])
    noisy, target = noisy_and_target(x0, eps, t)
    ok = True
    for i, step in enumerate(t.long().tolist()):
        a, s = math.sqrt(ref[step]), math.sqrt(1.0 - ref[step])
        ok &= torch.allclose(noisy[i], a * x0[i] + s * eps[i], atol=1e-5)
        ok &= torch.allclose(target[i], a * eps[i] - s * x0[i] if prediction == "v_prediction" else eps[i], atol=1e-5)
    return bool(ok)


# ------------------------------------------------------------------------------------------- schedule
def test_schedule_comes_from_the_v12_scheduler_config(tmp_path):
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path)))
    assert adapter.schedule()[1].endswith("scheduler/scheduler_config.json")
    assert schedule_matches(adapter.alphas_cumprod(), V12)
    # the sampling scheduler is the training schedule
    assert schedule_matches(adapter._scheduler().alphas_cumprod, V12)
    assert adapter._scheduler().config.prediction_type == "v_prediction"


def test_planted_mistake_the_old_constant_is_caught():
    """β_end 0.03 (v1.1's, what the adapter used to hard-code) does not pass as v1.2: at t = 500 its noise level
    is v1.2's at t ≈ 592."""
    import torch

    old = {**V12, "beta_end": 0.03}
    old_alphas = torch.tensor(documented_alphas_cumprod(old))
    assert not schedule_matches(old_alphas, V12)
    v12 = torch.tensor(documented_alphas_cumprod(V12))
    same_noise = int((v12 - old_alphas[500]).abs().argmin())
    assert 580 < same_noise < 600


def test_the_model_folder_decides_not_a_constant(tmp_path):
    """An unusual β_end in the folder is what trains (the value is read, not assumed)."""
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    odd = {**V12, "beta_end": 0.021}
    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, odd)))
    assert schedule_matches(adapter.alphas_cumprod(), odd) and not schedule_matches(adapter.alphas_cumprod(), V12)


@pytest.mark.parametrize("style, version, beta_end", [(False, None, 0.018), (True, None, 0.03),
                                                      (False, "1.2", 0.018), (True, "1.1", 0.03)])
def test_without_a_scheduler_config_the_release_default(tmp_path, style, version, beta_end):
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, None, style=style), version))
    config, where = adapter.schedule()
    assert config["beta_end"] == beta_end and "documented" in where
    assert schedule_matches(adapter.alphas_cumprod(), {**V12, "beta_end": beta_end})


def test_a_version_that_contradicts_the_model_is_refused_with_the_key(tmp_path):
    from lora_run_training import ModelSourceError
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path), "1.1"))
    with pytest.raises(ModelSourceError, match=r"\[model.version\] is \"1.1\".*0.018"):
        adapter.schedule()
    bad = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, {**V12, "prediction_type": "sample"}, name="x")))
    with pytest.raises(ModelSourceError, match="prediction_type is 'sample'.*v-prediction.*ε-prediction"):
        bad.schedule()
    # no scheduler config, but a v1.1 (style-conditioned) transformer: `lora-run check` names the key
    folder = model_folder(tmp_path, None, style=True, name="s")
    for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (folder / sub).mkdir()
    problems = HunyuanDiTAdapter(recipe_for(folder, "1.2")).check_sources()
    assert any(key == ("model", "version") and "≤ v1.1 model" in why for key, why in problems), problems


# ------------------------------------------------------------------------------- x_t, target, weights
def test_noisy_input_and_v_target(tmp_path):
    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path)))
    assert objective_matches(adapter.noisy_and_target, V12)
    # planted mistakes: a flipped target, and the objective on the old schedule
    flipped = lambda x0, eps, t: (lambda n, v: (n, -v))(*adapter.noisy_and_target(x0, eps, t))  # noqa: E731
    assert not objective_matches(flipped, V12)
    old = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, {**V12, "beta_end": 0.03}, name="old")))
    assert not objective_matches(old.noisy_and_target, V12)


@pytest.mark.parametrize("config, prediction", [({**V12, "prediction_type": "epsilon"}, "epsilon"),
                                                ({k: v for k, v in V12.items() if k != "prediction_type"}, "epsilon"),
                                                (V12, "v_prediction")])
def test_the_target_is_the_scheduler_configs_prediction_type(tmp_path, config, prediction):
    """The objective follows the model's scheduler config, as its sampler (``DDPMScheduler.step``) reads it: ε for
    ``epsilon`` (and for a config without the key: diffusers' default), v for ``v_prediction``; Min-SNR-γ takes the
    matching form. The other type's target and weights are the planted mistakes."""
    import torch
    from diffusers import DDPMScheduler

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, config), min_snr_gamma=5.0))
    assert adapter.prediction_type == prediction
    assert DDPMScheduler.from_config(adapter.schedule()[0]).config.prediction_type == prediction   # the sampler's
    other = "v_prediction" if prediction == "epsilon" else "epsilon"
    assert objective_matches(adapter.noisy_and_target, V12, prediction)
    assert not objective_matches(adapter.noisy_and_target, V12, other)
    t = torch.tensor([10.0, 300.0, 700.0, 990.0])
    ref = documented_alphas_cumprod(V12)
    snr = [ref[s] / (1 - ref[s]) for s in t.long().tolist()]
    forms = {"v_prediction": [min(x, 5.0) / (x + 1.0) for x in snr], "epsilon": [min(x, 5.0) / x for x in snr]}
    assert torch.allclose(adapter.loss_weights(t), torch.tensor(forms[prediction]), atol=1e-5)
    assert not torch.allclose(adapter.loss_weights(t), torch.tensor(forms[other]), atol=1e-3)
    assert ("ε-prediction" if prediction == "epsilon" else "v-prediction") in adapter.schedule_note()


def test_min_snr_weights(tmp_path):
    import torch

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path), min_snr_gamma=5.0))
    t = torch.tensor([10.0, 300.0, 700.0, 990.0])
    ref = documented_alphas_cumprod(V12)
    expected = []
    for step in t.long().tolist():
        snr = ref[step] / (1 - ref[step])
        expected.append(min(snr, 5.0) / (snr + 1.0))
    assert torch.allclose(adapter.loss_weights(t), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    eps_weights = torch.tensor([min(r / (1 - r), 5.0) / (r / (1 - r)) for r in (ref[s] for s in t.long().tolist())])
    assert not torch.allclose(adapter.loss_weights(t), eps_weights, atol=1e-3), "ε-prediction's weight differs"


# ------------------------------------------------------------------------------ what the model is fed
def tiny_transformer(style: bool = False):
    import torch
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    return HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, hidden_size=32,
                             num_layers=2, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32,
                             cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=77, text_len_t5=256,
                             sample_size=16, use_style_cond_and_image_meta_size=style).eval()


def text_inputs(b: int):
    import torch

    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(b, 77, dtype=torch.long)
    mask[:, :6] = 1
    mask5 = torch.zeros(b, 256, dtype=torch.long)
    mask5[:, :9] = 1
    return {"prompt_embeds": torch.randn(b, 77, 32, generator=g), "prompt_attention_mask": mask,
            "prompt_embeds_2": torch.randn(b, 256, 32, generator=g), "prompt_attention_mask_2": mask5}


def timestep_is_the_integer_step(predict, transformer) -> bool:
    import torch

    t = torch.tensor([17.0, 640.0])
    seen, _ = transformer_inputs(predict, transformer, torch.randn(2, 4, 8, 8), t, text_inputs(2))
    return bool(torch.equal(seen["timestep"].float(), t))


def test_the_transformer_gets_t_text_masks_and_gives_v(tmp_path):
    import torch

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path)))
    model = tiny_transformer()
    assert timestep_is_the_integer_step(adapter.predict, model)
    scaled = lambda tr, x, t, text, g: adapter.predict(tr, x, t / 1000.0, text, g)  # noqa: E731  planted
    assert not timestep_is_the_integer_step(scaled, model)
    text = text_inputs(2)
    noisy = torch.randn(2, 4, 8, 8)
    seen, out = transformer_inputs(adapter.predict, model, noisy, torch.tensor([5.0, 6.0]), text)
    assert torch.equal(seen["text_embedding_mask"], text["prompt_attention_mask"])
    assert torch.equal(seen["text_embedding_mask_t5"], text["prompt_attention_mask_2"])
    assert torch.equal(seen["encoder_hidden_states_t5"], text["prompt_embeds_2"])
    assert seen.get("image_meta_size") is None and seen.get("style") is None          # v1.2: no size / style input
    with torch.no_grad():
        full = model(noisy, torch.tensor([5.0, 6.0]), encoder_hidden_states=text["prompt_embeds"],
                     text_embedding_mask=text["prompt_attention_mask"],
                     encoder_hidden_states_t5=text["prompt_embeds_2"],
                     text_embedding_mask_t5=text["prompt_attention_mask_2"],
                     image_rotary_emb=adapter.rotary_embedding(model, 8, 8, "cpu"), return_dict=False)[0]
    assert full.shape[1] == 8 and torch.allclose(out, full[:, :4], atol=1e-6), "the v half of learn_sigma"


def test_v11_gets_size_and_style_conditioning(tmp_path):
    import torch

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path, None, style=True), "1.1"))
    seen, out = transformer_inputs(adapter.predict, tiny_transformer(style=True), torch.randn(2, 4, 8, 12),
                           torch.tensor([3.0, 9.0]), text_inputs(2))
    assert seen["image_meta_size"].tolist() == [[64.0, 96.0, 64.0, 96.0, 0.0, 0.0]] * 2
    assert seen["style"].tolist() == [0, 0] and out.shape == (2, 4, 8, 12)


def test_latents_are_the_posterior_mean_times_the_scaling_factor(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    adapter = HunyuanDiTAdapter(recipe_for(model_folder(tmp_path)))
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), latent_channels=4, norm_num_groups=32,
                        scaling_factor=0.13025).eval()
    adapter.encoders["vae"] = vae
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    assert torch.allclose(adapter.encode_images(pixels), mean * 0.13025, atol=1e-6)
