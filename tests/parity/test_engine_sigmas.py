"""The kohya and diffusion-pipe backends ask their engines for the σ density the native backend trains with, for
every family and `timestep_sampling` value the backend accepts — or the backend refuses the value.

Each engine's sampler is written here from its source (not from lora-run's code), fed the keys lora-run's
translation writes (and the engine's own defaults for keys it leaves out), and drawn on a latent of the family's
shape; the native adapter's draws on the same latent must have the same distribution (two-sample
Kolmogorov–Smirnov test):

- sd-scripts 48d368f, ``library/flux_train_utils.py`` ``get_noisy_model_input_and_timesteps`` (both
  ``flux_train_network.py`` and ``hunyuan_image_train_network.py`` call it): ``uniform`` σ = U(0, 1);
  ``sigmoid`` σ = sigmoid(s·n); ``shift`` that σ, then kσ/(1 + (k−1)σ), k = ``discrete_flow_shift``; ``flux_shift``
  that σ, then e^μ/(e^μ + 1/σ − 1) with μ linear from 0.5 at 256 to 1.15 at 4096 over ``(h // 2)·(w // 2)`` of the
  latent; ``sigma``: u = sigmoid(N(``logit_mean``, ``logit_std``)) (``weighting_scheme = "logit_normal"``), else
  U(0, 1), indexing the descending 1000-step table shifted by ``discrete_flow_shift``;
- diffusion-pipe 8f83dbf, ``models/flux.py`` / ``models/hunyuan_image.py`` ``prepare_inputs``:
  ``timestep_sample_method`` ``uniform`` t = U(0, 1), ``logit_normal`` t = sigmoid(``sigmoid_scale``·N(0, 1)); then
  ``shift`` (kt/(1 + (k−1)t)) if set, else ``flux_shift`` with μ of ``(h // 2)·(w // 2)`` as above.

Planted mistakes the comparison must catch: the engine's ``flux_shift`` on HunyuanImage-2.1's patch-1 latent
(a quarter of its tokens: why both backends refuse it there), the `sigma` table left at sd-scripts' default shift,
the logit-normal mean negated, a requested shift left at the engine's default, diffusion-pipe's scale ignored.
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe

N = 20_000
#: two-sample KS critical value at α = 10⁻⁴ for two samples of N: √(ln(2/α)/2)·√(2/N)
CRITICAL = math.sqrt(math.log(2 / 1e-4) / 2) * math.sqrt(2 / N)
#: a draw on the 1/1000 table against a continuous one: the CDFs differ by at most the density × 0.001
GRID = 2e-3

#: family → (latent (C, h, w) of a 768 × 512 px bucket, sd-scripts script)
FAMILIES = {"flux.1-dev": ((16, 64, 96), "flux_train_network.py"),
            "hunyuan-image-2.1": ((64, 16, 24), "hunyuan_image_train_network.py")}

METHODS = [
    ("uniform", {}),
    ("sigmoid", {"sigmoid_scale": 1.6}),
    ("shift", {"shift": 4.0, "sigmoid_scale": 0.9}),     # the default of neither engine (3.0 FLUX, 5.0 HunyuanImage)
    ("flux-shift", {"sigmoid_scale": 1.2}),
    ("logit-normal", {"logit_mean": 0.6, "logit_std": 1.3}),
    ("logit-normal", {"logit_mean": 0.0, "logit_std": 0.7}),
]


def mu(tokens: int) -> float:
    return 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)


def flux_time_shift(m: float, t):
    return math.exp(m) / (math.exp(m) + (1 / t - 1))


def sd_scripts_sigmas(keys: dict, script: str, latent, generator):
    """σ of sd-scripts' sampler for the config keys ``keys`` (sd-scripts' defaults for the others)."""
    import torch

    from lora_run_kohya import spec

    defaults = {k: v.get("default") for k, v in spec.options(script).items()}
    get = lambda name: keys.get(name, defaults[name])  # noqa: E731
    _, h, w = latent
    method = get("timestep_sampling")
    if method == "uniform":
        return torch.rand(N, generator=generator, dtype=torch.float64)
    if method in ("sigmoid", "shift", "flux_shift"):
        sigma = torch.sigmoid(get("sigmoid_scale") * torch.randn(N, generator=generator, dtype=torch.float64))
        if method == "shift":
            k = get("discrete_flow_shift")
            sigma = k * sigma / (1 + (k - 1) * sigma)
        elif method == "flux_shift":
            sigma = flux_time_shift(mu((h // 2) * (w // 2)), sigma)
        return sigma
    assert method == "sigma"
    if get("weighting_scheme") == "logit_normal":
        u = torch.sigmoid(torch.normal(float(get("logit_mean")), float(get("logit_std")), (N,), generator=generator,
                                       dtype=torch.float64))
    else:
        u = torch.rand(N, generator=generator, dtype=torch.float64)
    k = get("discrete_flow_shift")
    table = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000          # 1.0, 0.999, …, 0.001
    table = k * table / (1 + (k - 1) * table)
    return table[(u * 1000).long().clamp(max=999)]


def diffusion_pipe_sigmas(keys: dict, latent, generator):
    """t of diffusion-pipe's ``prepare_inputs`` for the model-table keys ``keys``."""
    import torch

    _, h, w = latent
    if keys.get("timestep_sample_method", "logit_normal") == "uniform":
        t = torch.rand(N, generator=generator, dtype=torch.float64)
    else:
        t = torch.sigmoid(keys.get("sigmoid_scale", 1.0) * torch.randn(N, generator=generator, dtype=torch.float64))
    if keys.get("shift"):
        k = keys["shift"]
        t = k * t / (1 + (k - 1) * t)
    elif keys.get("flux_shift", False):
        t = flux_time_shift(mu((h // 2) * (w // 2)), t)
    return t


def ks2(a, b) -> float:
    """sup |F_a − F_b| of two samples."""
    import torch

    a, b = torch.sort(a.double().flatten())[0], torch.sort(b.double().flatten())[0]
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def same(a, b) -> bool:
    return ks2(a, b) < CRITICAL + GRID


def native_sigmas(family: str, latent, train: dict, tmp_path):
    import torch

    from lora_run_native.adapters import adapter_class

    adapter = adapter_class(family)(minimal_recipe(family, tmp_path, train={"mixed_precision": "no", **train}))
    latents = torch.zeros(1, *latent)
    return torch.cat([adapter.sample_timesteps(500, torch.Generator().manual_seed(100 + i), latents)
                      for i in range(N // 500)])


def engines():
    from lora_run_diffusion_pipe import CAPABILITIES as DP
    from lora_run_diffusion_pipe.translate import recipe_problems, timestep_keys
    from lora_run_kohya import CAPABILITIES as KOHYA
    from lora_run_kohya.translate import _timesteps

    return {"kohya": (KOHYA, lambda recipe: _timesteps(recipe), lambda recipe: []),
            "diffusion-pipe": (DP, timestep_keys, lambda recipe: [k for k, _ in recipe_problems(recipe, None)
                                                                  if k[0] == "train"])}


def engine_sigmas(engine: str, keys: dict, family: str, generator):
    latent, script = FAMILIES[family]
    if engine == "kohya":
        return sd_scripts_sigmas(keys, script, latent, generator)
    return diffusion_pipe_sigmas(keys, latent, generator)


CASES = [pytest.param(engine, family, method, train, id=f"{engine}-{family}-{method}-{i}")
         for engine in ("kohya", "diffusion-pipe") for family in FAMILIES
         for i, (method, train) in enumerate(METHODS)]


@pytest.mark.parametrize("engine, family, method, train", CASES)
def test_an_accepted_sampling_is_the_native_density(engine, family, method, train, tmp_path):
    """Accepted (capability and no problem with a `[train]` key): the engine's σ has the native density."""
    import torch

    capabilities, translate, problems = engines()[engine]
    recipe = minimal_recipe(family, tmp_path, train={"timestep_sampling": method, **train})
    if f"timestep_sampling:{method}" not in capabilities[family] or problems(recipe):
        assert method == "flux-shift" and family == "hunyuan-image-2.1" or \
            engine == "diffusion-pipe" and method == "logit-normal" and train["logit_mean"] != 0.0, \
            f"{engine} refuses {method} for {family}"
        return
    latent, _ = FAMILIES[family]
    ours = native_sigmas(family, latent, {"timestep_sampling": method, **train}, tmp_path)
    theirs = engine_sigmas(engine, translate(recipe), family, torch.Generator().manual_seed(7))
    assert same(ours, theirs), f"KS {ks2(ours, theirs):.4f}"


def test_the_comparison_catches_the_planted_mistakes(tmp_path):
    """Each planted translation mistake gives an engine density the native one rejects."""
    import torch

    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    flux, hunyuan = FAMILIES["flux.1-dev"][0], FAMILIES["hunyuan-image-2.1"][0]
    # logit-normal: the table left at sd-scripts' default shift 3; the mean negated
    train = {"timestep_sampling": "logit-normal", "logit_mean": 0.6, "logit_std": 1.3}
    ours = native_sigmas("flux.1-dev", flux, train, tmp_path)
    right = {"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "logit_mean": 0.6, "logit_std": 1.3,
             "discrete_flow_shift": 1.0}
    assert same(ours, sd_scripts_sigmas(right, "flux_train_network.py", flux, g()))
    assert not same(ours, sd_scripts_sigmas({**right, "discrete_flow_shift": 3.0}, "flux_train_network.py", flux,
                                            g()))
    assert not same(ours, sd_scripts_sigmas({**right, "logit_mean": -0.6}, "flux_train_network.py", flux, g()))
    # shift: the requested k left at the engine's default (sd-scripts: 5.0 for HunyuanImage)
    train = {"timestep_sampling": "shift", "shift": 4.0}
    ours = native_sigmas("hunyuan-image-2.1", hunyuan, train, tmp_path)
    keys = {"timestep_sampling": "shift", "sigmoid_scale": 1.0}
    assert same(ours, sd_scripts_sigmas({**keys, "discrete_flow_shift": 4.0}, "hunyuan_image_train_network.py",
                                        hunyuan, g()))
    assert not same(ours, sd_scripts_sigmas(keys, "hunyuan_image_train_network.py", hunyuan, g()))
    # diffusion-pipe: logit_std not passed as sigmoid_scale
    train = {"timestep_sampling": "logit-normal", "logit_std": 0.7}
    ours = native_sigmas("flux.1-dev", flux, train, tmp_path)
    assert same(ours, diffusion_pipe_sigmas({"sigmoid_scale": 0.7}, flux, g()))
    assert not same(ours, diffusion_pipe_sigmas({}, flux, g()))


def test_flux_shift_on_hunyuan_image_is_a_quarter_of_the_tokens_so_both_engines_refuse_it():
    """Both engines take μ from (h // 2)·(w // 2): FLUX.1's packed tokens, but a quarter of HunyuanImage-2.1's
    (patch 1). lora-run's documented flux-shift takes μ from the tokens the transformer sees (h·w there), so the
    engines' draw is another density — and neither backend may accept the value for HunyuanImage."""
    import torch

    (_, h, w) = FAMILIES["hunyuan-image-2.1"][0]
    documented = flux_time_shift(mu(h * w), torch.sigmoid(torch.randn(N, generator=torch.Generator().manual_seed(3),
                                                                       dtype=torch.float64)))
    latent = FAMILIES["hunyuan-image-2.1"][0]
    assert not same(documented, sd_scripts_sigmas({"timestep_sampling": "flux_shift"}, "hunyuan_image_train_network.py",
                                                  latent, torch.Generator().manual_seed(7)))
    assert not same(documented, diffusion_pipe_sigmas({"flux_shift": True}, latent, torch.Generator().manual_seed(7)))
    for engine, (capabilities, _, _) in engines().items():
        assert "timestep_sampling:flux-shift" not in capabilities["hunyuan-image-2.1"], engine
        assert "timestep_sampling:flux-shift" in capabilities["flux.1-dev"], engine
    # on FLUX.1's latent (h // 2)·(w // 2) *is* the token count: the same μ as lora-run's
    (_, h, w) = FAMILIES["flux.1-dev"][0]
    documented = flux_time_shift(mu((h // 2) * (w // 2)), torch.sigmoid(
        torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)))
    assert same(documented, sd_scripts_sigmas({"timestep_sampling": "flux_shift"}, "flux_train_network.py",
                                              FAMILIES["flux.1-dev"][0], torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_engines_train_the_raw_velocity_without_loss_weights(family, tmp_path):
    """sd-scripts' `model_prediction_type` defaults to `sigma_scaled` for FLUX.1 (x0 target, `weighting_scheme`
    weights): the translation always asks for `raw` (target ε − x0), and `weighting_scheme` is written only with
    `sigma` sampling, where `raw` applies no weights. diffusion-pipe's target is ε − x0 unweighted."""
    from lora_run_kohya import KohyaOptions
    from lora_run_kohya.translate import Paths, translate

    for method, train in METHODS:
        if method == "flux-shift" and family == "hunyuan-image-2.1":
            continue                                            # refused (above)
        recipe = minimal_recipe(family, tmp_path, train={"timestep_sampling": method, **train})
        config = translate(recipe, KohyaOptions(), Paths(tmp_path, "<sd-scripts>", "python", tmp_path)).config
        flat = {k: v for table in config.values() for k, v in table.items()}
        assert flat["model_prediction_type"] == "raw"
        assert ("weighting_scheme" in flat) == (flat["timestep_sampling"] == "sigma")
