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


def reference_ddpm_steps(batch: int, mean: float, std: float, generator):
    """diffusers' documented recipe on Hunyuan-DiT's own (DDPM) scheduler: u from its helper, index ⌊u·T⌋ into the
    scheduler's descending training timesteps (T − 1, …, 0)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_end=0.018,
                              prediction_type="v_prediction")
    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                              generator=generator)
    return scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]


def old_ddpm_mapping(batch: int, mean: float, std: float, generator):
    """The planted mistake (what lora-run drew before): t = round(999·σ) of the flow table's σ, one step high for
    half the indices (⌊1000·u⌋ ≥ 500), t = 0 unreachable and t = 500 drawn from two indices."""
    import torch

    from lora_run_native.timesteps import sample_sigmas

    return torch.round(sample_sigmas("logit-normal", batch, generator, logit_mean=mean, logit_std=std) * 999).long()


def test_hunyuan_dit_timesteps_follow_the_same_convention(tmp_path):
    """The DDPM family draws u the same way and takes the entry of its own scheduler's table: each t is, draw for
    draw, the diffusers example's ``scheduler.timesteps[⌊T·u⌋]`` (mean 0.5 → median t ≈ 999·sigmoid(−0.5) ≈ 377);
    the old round(999·σ) mapping is caught, both draw for draw and by its distribution (t = 500 twice as likely
    as its neighbours, t = 0 never drawn)."""
    import torch

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    for mean, std in ((0.5, 1.0), (-0.3, 1.6)):
        recipe = minimal_recipe("hunyuan-dit-1.2", tmp_path,
                                train={"timestep_sampling": "logit-normal", "logit_mean": mean, "logit_std": std})
        t = HunyuanDiTAdapter(recipe).sample_timesteps(N, torch.Generator().manual_seed(5), torch.zeros(1, 4, 2, 2))
        assert t.dtype == torch.float32 and torch.equal(t, t.round())
        reference = reference_ddpm_steps(N, mean, std, torch.Generator().manual_seed(5))
        assert torch.equal(t.long(), reference)
        assert not torch.equal(old_ddpm_mapping(N, mean, std, torch.Generator().manual_seed(5)), reference)
        if mean == 0.5:
            assert float(t.median()) == pytest.approx(999 / (1 + math.exp(0.5)), abs=10)

    # distribution: at mean 0, std 0.05 (u ≈ 0.5) the two mappings differ visibly; ours is the reference's
    many = 200_000
    ours = HunyuanDiTAdapter(minimal_recipe("hunyuan-dit-1.2", tmp_path, train={
        "timestep_sampling": "logit-normal", "logit_std": 0.05})).sample_timesteps(
        many, torch.Generator().manual_seed(6), torch.zeros(1, 4, 2, 2)).long()
    counts = torch.bincount(ours, minlength=1000).double()
    ref = torch.bincount(reference_ddpm_steps(many, 0.0, 0.05, torch.Generator().manual_seed(7)), minlength=1000)
    old = torch.bincount(old_ddpm_mapping(many, 0.0, 0.05, torch.Generator().manual_seed(8)), minlength=1000)
    # near u = 0.5: steps 495..504 each ≈ 0.8 % of the draws; the old mapping gives step 500 about twice that
    window = slice(495, 505)
    assert (counts[window] - ref[window].double()).abs().max() < 6 * math.sqrt(float(ref[window].max()))
    assert (counts[window] - old[window].double()).abs().max() > 6 * math.sqrt(float(ref[window].max()))
    edge = HunyuanDiTAdapter(minimal_recipe("hunyuan-dit-1.2", tmp_path, train={
        "timestep_sampling": "logit-normal", "logit_mean": 9.0, "logit_std": 0.5})).sample_timesteps(
        1000, torch.Generator().manual_seed(9), torch.zeros(1, 4, 2, 2))
    assert float(edge.min()) == 0.0, "t = 0 (the least noisy step, u ≥ 0.999) is reachable"


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
