"""`logit-normal` σ sampling uses the references' convention (diffusers' training examples, sd-scripts'
`sigma` sampling): u = sigmoid(N(m, s)) indexes a *descending* timestep table, so σ ≈ 1 − u (lora-run takes the
table's value itself). A `logit_mean`
copied from either trainer must mean the same here, on every backend and for every family."""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe

N = 20000


def reference_sigmas(mean: float, std: float, generator):
    """diffusers' documented recipe: u from its helper, index = ⌊u·1000⌋ into the unshifted flow-matching
    scheduler's timestep table (1000 → 1, descending), σ = that timestep / 1000."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    u = compute_density_for_timestep_sampling("logit_normal", N, logit_mean=mean, logit_std=std, generator=generator)
    index = (u * scheduler.config.num_train_timesteps).long().clamp(max=999)
    return (scheduler.timesteps[index] / scheduler.config.num_train_timesteps).to(torch.float32)


def old_convention(method, batch, generator, *, logit_mean=0.0, logit_std=1.0, **_):
    """The planted mistake: σ = sigmoid(n) (what lora-run drew before), median 0.62 for mean 0.5."""
    import torch

    return torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)


def quantiles(x):
    import torch

    return torch.quantile(x.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))


def agrees_with_reference(sampler, mean: float, std: float) -> bool:
    import torch

    ours = sampler("logit-normal", N, torch.Generator().manual_seed(1), logit_mean=mean, logit_std=std)
    ref = reference_sigmas(mean, std, torch.Generator().manual_seed(2))
    return bool(torch.allclose(quantiles(ours), quantiles(ref), atol=0.015))


@pytest.mark.parametrize("mean, std", [(0.5, 1.0), (-1.0, 0.7), (0.0, 1.0)])
def test_logit_normal_matches_the_diffusers_example(mean, std):
    from lora_run_native.timesteps import sample_sigmas

    assert agrees_with_reference(sample_sigmas, mean, std)


def test_planted_mistake_the_old_convention_is_caught():
    assert not agrees_with_reference(old_convention, 0.5, 1.0)
    assert agrees_with_reference(old_convention, 0.0, 1.0), "with mean 0 both conventions agree (symmetric)"


def test_median_and_the_exact_draw():
    """Median for mean 0.5 is sigmoid(−0.5) ≈ 0.378 (not 0.622); each σ is, bit for bit, the diffusers example's
    table value for the same generator (u from its helper, index ⌊1000·u⌋ into the unshifted table)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from lora_run_native.timesteps import sample_sigmas

    sigma = sample_sigmas("logit-normal", N, torch.Generator().manual_seed(0), logit_mean=0.5, logit_std=1.0)
    assert float(sigma.median()) == pytest.approx(1 / (1 + math.exp(0.5)), abs=0.01)
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.5, logit_std=1.3,
                                              generator=torch.Generator().manual_seed(3))
    drawn = sample_sigmas("logit-normal", 64, torch.Generator().manual_seed(3), logit_mean=0.5, logit_std=1.3)
    assert torch.equal(drawn, table[(u * 1000).long()])
    assert not torch.equal(drawn, 1 - u), "planted: the continuous 1 − u is up to one table step off"


def test_hunyuan_dit_timesteps_follow_the_same_convention(tmp_path):
    """The DDPM family draws u the same way: t = round(999·σ), so mean 0.5 → median t ≈ 377."""
    import torch

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    recipe = minimal_recipe("hunyuan-dit-1.2", tmp_path, train={"timestep_sampling": "logit-normal", "logit_mean": 0.5})
    t = HunyuanDiTAdapter(recipe).sample_timesteps(N, torch.Generator().manual_seed(0), torch.zeros(1, 4, 2, 2))
    assert float(t.median()) == pytest.approx(999 / (1 + math.exp(0.5)), abs=10)


def test_kohya_translation_means_the_same_sigmas(tmp_path):
    """sd-scripts' `sigma` sampling maps u to σ ≈ 1 − u (the diffusers mapping): given the translated keys,
    its median σ equals ours, so the mean passes through unchanged (it used to be negated)."""
    from lora_run_kohya.translate import _timesteps

    recipe = minimal_recipe("flux.1-dev", tmp_path, train={"timestep_sampling": "logit-normal", "logit_mean": 0.5,
                                                           "logit_std": 1.2})
    keys = _timesteps(recipe)
    assert keys["timestep_sampling"] == "sigma" and keys["weighting_scheme"] == "logit_normal"
    assert keys["discrete_flow_shift"] == 1.0 and keys["logit_std"] == 1.2
    sd_scripts_median = 1 - 1 / (1 + math.exp(-keys["logit_mean"]))     # σ ≈ 1 − sigmoid(m) at the median
    ours_median = 1 - 1 / (1 + math.exp(-0.5))
    assert sd_scripts_median == pytest.approx(ours_median)
