"""Planted mistakes in the *code*: each case replaces one piece of the real training step — for that one run —
with a classic objective mistake (a flipped target, σ and 1 − σ swapped, the timestep ×1000 or ÷1000, a
missing shift, a missing latent normalisation, the wrong DDPM schedule, ε instead of v, the ε form of Min-SNR,
a loss formula off by its factor) and the family's training-step check from ``test_training_step.py`` must
reject that run, for the stated reason.

``test_training_step.py`` shows that the unmodified step passes these checks; this file shows that they see
what the trainer computes (its real code path, observed through the orchestrator) and not a copy of it: a
check that only compared a reference with itself would pass every case here.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .test_training_step import (FLUX2_TEXT_LENGTH, _flux2_and_offline, check_flux1, check_flux2,  # noqa: F401
                                 check_hunyuan_dit, check_hunyuan_image, check_loss, check_loss_and_weights, dataset,
                                 models, subject_and_regularization, train_one_step, train_with_regularization)

pytestmark = pytest.mark.usefixtures("_flux2_and_offline")


# ---------------------------------------------------------------------------------------------- mistakes
def flipped_target(cls, patch):
    real = cls.noisy_and_target
    patch.setattr(cls, "noisy_and_target", lambda self, x0, eps, t: (lambda n, v: (n, -v))(*real(self, x0, eps, t)))


def sigma_swapped_in_x_t(cls, patch):
    real = cls.noisy_and_target
    patch.setattr(cls, "noisy_and_target", lambda self, x0, eps, t: (real(self, x0, eps, 1 - t)[0],
                                                                     real(self, x0, eps, t)[1]))


def epsilon_target(cls, patch):
    real = cls.noisy_and_target
    patch.setattr(cls, "noisy_and_target", lambda self, x0, eps, t: (real(self, x0, eps, t)[0], eps))


def timestep_scaled(factor: float):
    def plant(cls, patch):
        real = cls.predict
        patch.setattr(cls, "predict", lambda self, tr, noisy, t, text, g: real(self, tr, noisy, t * factor, text, g))
    return plant


def guidance_times_1000(cls, patch):
    real = cls.predict
    patch.setattr(cls, "predict", lambda self, tr, noisy, t, text, g: real(self, tr, noisy, t, text, g * 1000.0))


def shift_left_out(cls, patch):
    from lora_run_native import timesteps

    real = timesteps.sample_sigmas
    patch.setattr(timesteps, "sample_sigmas",
                  lambda method, *a, **kw: real("sigmoid" if method in ("shift", "flux-shift") else method, *a, **kw))


def unpacked_token_count(cls, patch):
    patch.setattr(cls, "image_seq_len", lambda self, latents: int(latents.shape[-1] * latents.shape[-2]))


def flux_latent_shift_left_out(cls, patch):
    real = cls.encode_images

    def encode(self, pixels):
        vae = self.encoders["vae"]
        return real(self, pixels) + vae.config.shift_factor * vae.config.scaling_factor
    patch.setattr(cls, "encode_images", encode)


def scaling_factor_left_out(cls, patch):
    real = cls.encode_images
    patch.setattr(cls, "encode_images", lambda self, px: real(self, px) / self.encoders["vae"].config.scaling_factor)


def flux2_batch_norm_left_out(cls, patch):
    from lora_run_flux2 import latents

    patch.setattr(latents, "normalise", lambda z, vae: latents.patchify(z))


def noise_offset_per_patch_channel(cls, patch):
    """FLUX.2's noise offset drawn per patchified channel (one δ for each VAE channel's 4 sub-positions)."""
    patch.setattr(cls, "noise_offset_group", 1)


def v11_schedule(cls, patch):
    real = cls.schedule

    def schedule(self):
        config, where = real(self)
        return {**config, "beta_end": 0.03}, where
    patch.setattr(cls, "schedule", schedule)


def min_snr_epsilon_form(cls, patch):
    import torch

    def weights(self, t):
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        snr = ac / (1.0 - ac)
        return (torch.clamp(snr, max=float(self.recipe.train.min_snr_gamma)) / snr).float()
    patch.setattr(cls, "loss_weights", weights)


def v_target_whatever_the_config(cls, patch):
    """The target before the objective followed the scheduler config: v, also for an ε-prediction model."""
    real = cls.noisy_and_target

    def noisy_and_target(self, x0, eps, t):
        noisy, _ = real(self, x0, eps, t)
        a, s = self._coefficients(t, x0.dim())
        return noisy, a * eps - s * x0
    patch.setattr(cls, "noisy_and_target", noisy_and_target)


def min_snr_v_form(cls, patch):
    import torch

    def weights(self, t):
        ac = self.alphas_cumprod().to(t.device)[t.long()]
        snr = ac / (1.0 - ac)
        return (torch.clamp(snr, max=float(self.recipe.train.min_snr_gamma)) / (snr + 1.0)).float()
    patch.setattr(cls, "loss_weights", weights)


def pseudo_huber_without_its_2c(cls, patch):
    import lora_run_losses

    def factory(options=None):
        c = (options or lora_run_losses.HuberOptions()).c

        def loss(prediction, target, **_info):
            import torch

            diff = prediction.float() - target.float()
            return (torch.sqrt(diff * diff + c * c) - c).flatten(1).mean(1)     # sd-scripts' smooth_l1 shape
        return loss
    patch.setattr(lora_run_losses, "pseudo_huber", factory)


def regularization_weight_ignored(cls, patch):
    from lora_run_native import data

    real = data.Sample

    def sample(index, bucket, caption, weight, is_reg):
        return real(index, bucket, caption, 1.0, is_reg)
    patch.setattr(data, "Sample", sample)


# ------------------------------------------------------------------------------------------------- cases
def _flux1(method, extra, draw):
    def check(seen, models, dataset):
        pred, target, weights, _ = check_flux1(seen, models["flux.1-dev"], dataset, method, extra, draw)
        check_loss(seen, pred, target, weights)
    return ("flux.1-dev", f'timestep_sampling = "{method}"\n{extra}', "text_max_length = 16", check)


def _hunyuan_image(method, extra, draw):
    return ("hunyuan-image-2.1", f'timestep_sampling = "{method}"\n{extra}', "",
            lambda seen, models, dataset: check_hunyuan_image(seen, models["hunyuan-image-2.1"], dataset, method,
                                                              draw))


def _hunyuan_dit(method, extra, model="hunyuan-dit-1.2"):
    return ("hunyuan-dit-1.2", f'timestep_sampling = "{method}"\n{extra}', "",
            lambda seen, models, dataset: check_hunyuan_dit(seen, models[model], dataset, method, extra), model)


def _flux2_klein(method, extra):
    return ("flux.2-klein", f'timestep_sampling = "{method}"\n{extra}',
            f"text_max_length = {FLUX2_TEXT_LENGTH['klein']}",
            lambda seen, models, dataset: check_flux2(seen, models["flux.2-klein"], dataset, "klein", method, extra,
                                                      {}))


FLUX1_SHIFT = _flux1("shift", "shift = 3.1582", {"shift": 3.1582})
FLUX1_FLUX_SHIFT = _flux1("flux-shift", "", {})
HUNYUAN_IMAGE = _hunyuan_image("shift", "shift = 5.0", {"shift": 5.0})
HUNYUAN_DIT = _hunyuan_dit("uniform", "min_snr_gamma = 5.0")
HUNYUAN_DIT_EPSILON = _hunyuan_dit("uniform", "min_snr_gamma = 5.0", model="hunyuan-dit-1.2-epsilon")
FLUX2_KLEIN = _flux2_klein("sigmoid", "")
FLUX2_KLEIN_OFFSET = _flux2_klein("shift", "noise_offset = 0.1\nshift = 3.0")

#: (case, mistake, the check's message that must reject it; None: check_loss's bare assertion)
PLANTED: list[tuple[str, tuple, Callable[..., None], str | None]] = [
    ("flux1 flipped target", FLUX1_SHIFT, flipped_target, "target: differs"),
    ("flux1 σ and 1−σ swapped in x_t", FLUX1_SHIFT, sigma_swapped_in_x_t, "noisy input: differs"),
    ("flux1 timestep ×1000", FLUX1_SHIFT, timestep_scaled(1000.0), "timestep: differs"),
    ("flux1 guidance ×1000", FLUX1_SHIFT, guidance_times_1000, "guidance: differs"),
    ("flux1 shift left out", FLUX1_SHIFT, shift_left_out, "σ: differs"),
    ("flux1 flux-shift μ of the unpacked tokens", FLUX1_FLUX_SHIFT, unpacked_token_count, "σ: differs"),
    ("flux1 latent shift_factor left out", FLUX1_SHIFT, flux_latent_shift_left_out, "not the reference encoding"),
    ("hunyuan-image σ fed instead of σ·1000", HUNYUAN_IMAGE, timestep_scaled(1 / 1000.0), "timestep: differs"),
    ("hunyuan-image scaling factor left out", HUNYUAN_IMAGE, scaling_factor_left_out, "not the reference encoding"),
    ("hunyuan-image shift left out", HUNYUAN_IMAGE, shift_left_out, "σ: differs"),
    ("hunyuan-image flipped target", HUNYUAN_IMAGE, flipped_target, "target: differs"),
    ("hunyuan-dit ε target instead of v", HUNYUAN_DIT, epsilon_target, "v target: differs"),
    ("hunyuan-dit v1.1's β_end 0.03", HUNYUAN_DIT, v11_schedule, "noisy input: differs"),
    ("hunyuan-dit t/1000 fed", HUNYUAN_DIT, timestep_scaled(1 / 1000.0), "timestep fed: differs"),
    ("hunyuan-dit scaling factor left out", HUNYUAN_DIT, scaling_factor_left_out, "not the reference encoding"),
    ("hunyuan-dit Min-SNR in its ε form", HUNYUAN_DIT, min_snr_epsilon_form, None),
    ("hunyuan-dit ε model trained on v", HUNYUAN_DIT_EPSILON, v_target_whatever_the_config, "ε target: differs"),
    ("hunyuan-dit ε model, Min-SNR in its v form", HUNYUAN_DIT_EPSILON, min_snr_v_form,
     "Min-SNR in the other prediction type's form"),
    ("flux2 batch norm left out", FLUX2_KLEIN, flux2_batch_norm_left_out, "not the reference encoding"),
    ("flux2 timestep ×1000", FLUX2_KLEIN, timestep_scaled(1000.0), "timestep: differs"),
    ("flux2 flipped target", FLUX2_KLEIN, flipped_target, "target: differs"),
    ("flux2 noise offset per patch channel", FLUX2_KLEIN_OFFSET, noise_offset_per_patch_channel, "noise: differs"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, mistake, message", [pytest.param(c, m, msg, id=name) for name, c, m, msg in PLANTED])
def test_a_mistake_planted_in_the_training_step_is_caught(case, mistake, message, models, dataset, tmp_path,
                                                          monkeypatch):
    from lora_run_native.adapters import adapter_class

    family, train, native, check, *model = case         # the model folder: the family's, or the one named
    with pytest.MonkeyPatch.context() as patch:
        mistake(adapter_class(family), patch)
        seen = train_one_step(family, models[model[0] if model else family], dataset, tmp_path, monkeypatch,
                              train=train, native=native)
    with pytest.raises(AssertionError, match=message):
        check(seen, models, dataset)


@pytest.mark.slow
@pytest.mark.parametrize("loss, option, mistake, message", [
    pytest.param("pseudo-huber", {"c": 0.3}, pseudo_huber_without_its_2c, "loss: differs", id="pseudo-huber w/o 2c"),
    pytest.param("mse", {}, regularization_weight_ignored, "loss: differs", id="regularisation weight ignored"),
])
def test_a_loss_mistake_planted_in_the_training_step_is_caught(loss, option, mistake, message, models,
                                                               subject_and_regularization, tmp_path, monkeypatch):
    from lora_run_native.adapters import adapter_class

    with pytest.MonkeyPatch.context() as patch:
        mistake(adapter_class("flux.1-dev"), patch)
        seen = train_with_regularization(loss, option, models, subject_and_regularization, tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match=message):
        check_loss_and_weights(seen, models, subject_and_regularization, loss, option)


def test_the_planted_cases_cover_every_family():
    families = {case[0] for _, case, _, _ in PLANTED}
    assert families == {"flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2", "flux.2-klein"}
