"""The σ (or t) each family's adapter samples, for every `[train] timestep_sampling` value and its parameters,
against the *documented density* — a statistical test, independent of how the draw is coded.

The other parity tests compare draws one by one with a reference on the same generator; this one checks the
distribution itself with a one-sample Kolmogorov–Smirnov test against the closed-form CDF of each documented
sampler (written here from the formulas, not from lora-run's code; Φ is the standard normal CDF, logit(σ) =
ln(σ / (1 − σ))):

- ``uniform``: F(σ) = σ;
- ``sigmoid`` (σ = sigmoid(s·n)): F(σ) = Φ(logit(σ) / s);
- ``shift`` (σ' = kσ / (1 + (k−1)σ) of the sigmoid draw): logit(σ') = logit(σ) + ln k, so F(σ') = Φ((logit(σ') − ln k) / s);
- ``flux-shift`` (σ' = e^μ / (e^μ + 1/σ − 1)): logit(σ') = logit(σ) + μ, F(σ') = Φ((logit(σ') − μ) / s), with μ on
  the line through 0.5 at 256 and 1.15 at 4096 *image tokens of the bucket* (FLUX.1: the packed 2×2 patches
  (h/2)·(w/2) of the (h, w) latent; FLUX.2: the h·w positions of its already patchified latent);
- ``logit-normal`` (σ ≈ 1 − u, u = sigmoid(N(m, s)), on the 1/1000 grid): F(σ) = Φ((logit(σ) + m) / s);
- Hunyuan-DiT's integer t: ``uniform`` over 0…999; ``logit-normal`` t = 999 − ⌊1000u⌋.

Every family is sampled at several buckets (non-square ones too), so a resolution-dependent shift must use each
bucket's own token count. Each comparison also runs planted mistakes (the unpacked token count, the unshifted
draw, the logit-normal sign flipped, the scale ignored …) and the test requires the KS test to reject them.
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe

N = 20_000
#: KS critical value at α = 10⁻⁴ for N samples (√(ln(2/α)/2) / √N ≈ 2.23/√N)
CRITICAL = math.sqrt(math.log(2 / 1e-4) / 2) / math.sqrt(N)
#: `logit-normal` σ lies on the table's grid (k/1000, 1 − u rounded up to it): the samples are spread uniformly
#: over the grid cell below each point (``ungrid``), which makes the distribution continuous with the documented
#: CDF at every grid point and its linear interpolation between them; this allows for that interpolation
GRID = 5e-4


def ungrid(values, step: float = 1e-3):
    """Grid values v (v = x rounded *up* to the grid) spread uniformly over (v − step, v] (a fixed generator)."""
    import torch

    return values.double() - step * torch.rand(values.shape, generator=torch.Generator().manual_seed(17),
                                               dtype=torch.float64)


def phi(x):
    import torch

    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def logit(s):
    import torch

    s = s.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(s) - torch.log1p(-s)


def mu_line(tokens: int) -> float:
    """FLUX's documented μ: linear from 0.5 at 256 image tokens to 1.15 at 4096."""
    return 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)


def documented_cdf(method: str, *, scale=1.0, shift=3.0, mean=0.0, std=1.0, tokens=1024):
    """F(σ) of the documented sampler."""
    if method == "uniform":
        return lambda s: s.double()
    if method == "sigmoid":
        return lambda s: phi(logit(s) / scale)
    if method == "shift":
        return lambda s: phi((logit(s) - math.log(shift)) / scale)
    if method == "flux-shift":
        return lambda s: phi((logit(s) - mu_line(tokens)) / scale)
    if method == "logit-normal":
        return lambda s: phi((logit(s) + mean) / std)
    raise ValueError(method)


def ks_statistic(samples, cdf) -> float:
    """sup |F_N − F| of the one-sample KS test."""
    import torch

    x, _ = torch.sort(samples.double().flatten())
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def fits(samples, cdf, slack: float = 0.0) -> bool:
    return ks_statistic(samples, cdf) < CRITICAL + slack


# --------------------------------------------------------------------------------------------- adapters


def adapter(family: str, tmp_path, **train):
    from lora_run_native.adapters import adapter_class

    return adapter_class(family)(minimal_recipe(family, tmp_path, train={"mixed_precision": "no", **train}))


def draw(ad, latent_shape, seed: int = 0):
    """N draws of the adapter's sampler for latents of ``latent_shape`` (one bucket), in batches of 500 as a
    run draws them, each batch from its own generator."""
    import torch

    latents = torch.zeros(1, *latent_shape)
    return torch.cat([ad.sample_timesteps(500, torch.Generator().manual_seed(seed * 1000 + i), latents)
                      for i in range(N // 500)])


#: (family, latent (C, h, w) of a bucket, image tokens of that bucket as the family's transformer sees them)
BUCKETS = [
    ("flux.1-dev", (16, 64, 64), 32 * 32),            # 512²
    ("flux.1-dev", (16, 128, 96), 64 * 48),           # 768 × 1024
    ("flux.1-dev", (16, 40, 168), 20 * 84),           # 1344 × 320, far from square
    ("flux.2-klein", (128, 32, 32), 32 * 32),         # 512² (the VAE's 8× and the 2×2 patches: 16 px a token)
    ("flux.2-klein", (128, 64, 48), 64 * 48),         # 768 × 1024
    ("hunyuan-image-2.1", (64, 32, 32), 32 * 32),     # 1024² (32× VAE, patch 1)
    ("hunyuan-image-2.1", (64, 48, 24), 48 * 24),
]

METHODS = [
    ("uniform", {}, {}),
    ("sigmoid", {"sigmoid_scale": 1.0}, {"scale": 1.0}),
    ("sigmoid", {"sigmoid_scale": 1.7}, {"scale": 1.7}),
    ("shift", {"shift": 3.1582}, {"shift": 3.1582}),
    ("shift", {"shift": 5.0, "sigmoid_scale": 0.8}, {"shift": 5.0, "scale": 0.8}),
    ("logit-normal", {"logit_mean": 0.0, "logit_std": 1.0}, {"mean": 0.0, "std": 1.0}),
    ("logit-normal", {"logit_mean": 0.7, "logit_std": 1.3}, {"mean": 0.7, "std": 1.3}),
    ("logit-normal", {"logit_mean": -1.0, "logit_std": 0.6}, {"mean": -1.0, "std": 0.6}),
    ("flux-shift", {}, {}),
    ("flux-shift", {"sigmoid_scale": 1.4}, {"scale": 1.4}),
]


def planted(method: str, p: dict, tokens: int, family: str) -> dict[str, object]:
    """Classic mistakes for this sampler, each a documented CDF of the *wrong* density."""
    wrong: dict[str, object] = {}
    if method == "sigmoid" and p.get("scale", 1.0) != 1.0:
        wrong["sigmoid_scale ignored"] = documented_cdf("sigmoid")
    if method == "shift":
        wrong["shift left out"] = documented_cdf("sigmoid", scale=p.get("scale", 1.0))
        wrong["shift 1/k (σ and 1 − σ swapped)"] = documented_cdf("shift", scale=p.get("scale", 1.0),
                                                                  shift=1 / p["shift"])
    if method == "logit-normal" and p["mean"] != 0.0:
        wrong["the mean's sign flipped (σ = sigmoid(n))"] = documented_cdf("logit-normal", mean=-p["mean"],
                                                                           std=p["std"])
    if method == "logit-normal" and p["std"] != 1.0:
        wrong["logit_std ignored"] = documented_cdf("logit-normal", mean=p["mean"])
    if method == "flux-shift":
        scale = p.get("scale", 1.0)
        wrong["shift left out"] = documented_cdf("sigmoid", scale=scale)
        wrong["μ of the token count × 4 (FLUX.1's unpacked latent)"] = documented_cdf("flux-shift", scale=scale,
                                                                                     tokens=tokens * 4)
        wrong["μ of the token count ÷ 4 (FLUX.2's patchified latent unpatchified the wrong way)"] = \
            documented_cdf("flux-shift", scale=scale, tokens=tokens // 4)
        wrong["μ of a fixed 1024 tokens (one bucket's shift for all)"] = documented_cdf("flux-shift", scale=scale,
                                                                                        tokens=1024)
    return wrong


CASES = [pytest.param(family, shape, tokens, method, train, p, id=f"{family}-{shape[1]}x{shape[2]}-{method}-{i}")
         for family, shape, tokens in BUCKETS for i, (method, train, p) in enumerate(METHODS)
         if not (method == "flux-shift" and family == "hunyuan-image-2.1")]       # refused there


@pytest.mark.usefixtures("flux2_registered")
@pytest.mark.parametrize("family, shape, tokens, method, train, p", CASES)
def test_sigma_follows_the_documented_density(family, shape, tokens, method, train, p, tmp_path):
    import torch

    sigma = draw(adapter(family, tmp_path, timestep_sampling=method, **train), shape)
    assert sigma.shape == (N,) and bool(((sigma > 0) & (sigma <= 1)).all())
    slack = 0.0
    if method == "logit-normal":        # the table's values, k/1000
        assert torch.allclose(sigma * 1000, (sigma * 1000).round(), atol=1e-3)
        sigma, slack = ungrid(sigma), GRID
    cdf = documented_cdf(method, tokens=tokens, **p)
    assert fits(sigma, cdf, slack), f"KS {ks_statistic(sigma, cdf):.4f} ≥ {CRITICAL + slack:.4f}"
    for what, wrong in planted(method, p, tokens, family).items():
        if what.startswith("μ of a fixed 1024") and tokens == 1024:
            continue
        assert not fits(sigma, wrong, slack), f"the planted mistake '{what}' was not caught"


def test_the_planted_mistakes_are_rejected_by_their_own_samples():
    """The test is not blind: samples *of* each planted density fit their own CDF and fail the documented one."""
    import torch

    g = torch.Generator().manual_seed(3)
    n = torch.randn(N, generator=g, dtype=torch.float64)
    cases = {  # name: (samples of the mistake, documented cdf)
        "unshifted flux-shift": (torch.sigmoid(n), documented_cdf("flux-shift", tokens=4096)),
        "flux-shift at 4× the tokens": (torch.sigmoid(n + mu_line(4 * 1024)), documented_cdf("flux-shift", tokens=1024)),
        "logit-normal sign": (torch.sigmoid(n + 0.7), documented_cdf("logit-normal", mean=0.7)),
        "shift 3 for 5": (torch.sigmoid(n + math.log(3)), documented_cdf("shift", shift=5.0)),
    }
    for name, (samples, cdf) in cases.items():
        assert not fits(samples, cdf), name
    assert fits(torch.sigmoid(n + math.log(5)), documented_cdf("shift", shift=5.0))


# ------------------------------------------------------------------------------------------ Hunyuan-DiT
@pytest.mark.parametrize("train, expected", [
    ({"timestep_sampling": "uniform"}, "uniform"),
    ({"timestep_sampling": "logit-normal", "logit_mean": 0.5, "logit_std": 1.2}, "logit-normal"),
    ({"timestep_sampling": "logit-normal", "logit_mean": -0.8, "logit_std": 0.7}, "logit-normal"),
])
def test_hunyuan_dit_steps_follow_the_documented_density(train, expected, tmp_path):
    """Integer t over 0…999: uniform (each step 1/1000), or t = 999 − ⌊1000u⌋ with u = sigmoid(N(m, s)):
    P(t ≤ k) = P(u > 1 − (k + 1)/1000) = Φ((logit((k + 1)/1000) + m)/s) — compared by KS on t + 1 ∈ 1…1000 over
    1000 (whose CDF at the grid points is exactly that)."""
    import torch

    ad = adapter("hunyuan-dit-1.2", tmp_path, **train)
    t = draw(ad, (4, 8, 8))
    assert bool((t == t.round()).all()) and float(t.min()) >= 0 and float(t.max()) <= 999
    if expected == "uniform":
        counts = torch.bincount(t.long(), minlength=1000).double()
        chi2 = float(((counts - N / 1000) ** 2 / (N / 1000)).sum())
        assert chi2 < 1000 + 5 * math.sqrt(2 * 1000), chi2          # χ² with 999 degrees of freedom
        return
    m, s = train["logit_mean"], train["logit_std"]
    grid = ungrid((t + 1) / 1000)
    assert fits(grid, documented_cdf("logit-normal", mean=m, std=s), GRID)
    # planted: the mean's sign flipped (more noise for a positive mean), and t read as the table index
    assert not fits(grid, documented_cdf("logit-normal", mean=-m, std=s), GRID)
    assert not fits(ungrid(1 - t / 1000), documented_cdf("logit-normal", mean=m, std=s), GRID)


def test_hunyuan_dit_sigmoid_steps_follow_the_documented_density(tmp_path):
    """`sigmoid` on the DDPM family: u = sigmoid(s·n) drawn as σ is for flow models, t = round(999·u), so
    P(t ≤ k) = P(u < (k + ½)/999) = Φ(logit((k + ½)/999) / s); each t spread uniformly over its cell
    ((t − ½)/999, (t + ½)/999] makes that a continuous CDF to test by KS. Planted: the scale ignored."""
    import torch

    t = draw(adapter("hunyuan-dit-1.2", tmp_path, timestep_sampling="sigmoid", sigmoid_scale=1.6), (4, 8, 8))
    assert bool((t == t.round()).all()) and float(t.min()) >= 0 and float(t.max()) <= 999
    spread = ungrid((t + 0.5) / 999, step=1 / 999)
    assert fits(spread, documented_cdf("sigmoid", scale=1.6), GRID)
    assert not fits(spread, documented_cdf("sigmoid", scale=1.0), GRID)
    assert float(torch.quantile(t, 0.5)) == pytest.approx(499.5, abs=12)
