"""One real training step of every family, run through the orchestrator (`execute`) on the family's tiny model,
against a reference computed here independently with diffusers' own classes and the references' documented
formulas (diffusers' training examples and schedulers, sd-scripts' samplers).

The other parity tests check the adapters' methods one by one. This one checks what a training step actually
feeds and computes — the loop's glue included (the trained latents from the cache, the text encodings, the
noise and σ drawn in the step, the batch reduction) — by observing, without replacing anything:

- the latents the step trains on (``x0``) = the reference VAE encoding of the dataset images, normalised as the
  family's VAE config says (FLUX.1: (z − shift_factor)·scaling_factor; Hunyuan: z·scaling_factor; FLUX.2: 2×2
  patchified, then the VAE batch-norm statistics);
- σ / t drawn in the step = the documented sampler on the step's seeded generator (after the noise), the
  noise = N(0, 1) of the latent's shape (+ the per-channel offset);
- the noisy input and the target the loss uses = the reference objective (flow matching from the formula;
  Hunyuan-DiT from ``DDPMScheduler.add_noise`` / ``get_velocity`` on the model's own scheduler config);
- what the transformer is fed (packed tokens, position ids, timestep scale, guidance, text encodings and masks
  from the pipeline's own ``encode_prompt``);
- the logged loss = the reference model's prediction against the reference target, per-sample mean over all
  non-batch dimensions, times the reference loss weighting, averaged over the batch.

Each check also runs planted mistakes (flipped target, σ and 1 − σ swapped, a wrong shift, the timestep
×1000 off, a missing latent shift …) and must reject them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lora_run.hookspecs import hookimpl

SEED = 11
CAPTIONS = ("ohwx, red", "ohwx, blue sky")       # differ within the 16 text tokens of the tiny tokenizers

RECIPE = """
[model]
family = "{family}"
source = "{model}"
offline = true

[dataset]
path = "{dataset}"
trigger = "ohwx"
resolution = 64
bucket_min = 64
bucket_max = 64
bucket_step = 64
min_images = 1
{dataset_extra}

[lora]
rank = 4
alpha = 4.0
targets = "attention"

[optimizer]
name = "adamw"
lr = 1e-4

[scheduler]
name = "constant"

[train]
steps = 1
batch_size = 2
mixed_precision = "no"
gradient_checkpointing = false
seed = {seed}
{train}

[eval]
enabled = false

[output]
name = "step"
save_precision = "fp32"

[backend]
name = "native"

[backend.native]
progress_bar = false
tensorboard = false
{native}
"""


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from lora_run_flux.tiny import build_tiny_flux
    from lora_run_flux2.tiny import build_tiny_flux2
    from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit
    from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image

    from lora_run_hunyuan_dit.tiny import PUBLISHED_SCHEDULERS

    root = tmp_path_factory.mktemp("step-models")
    epsilon = {**PUBLISHED_SCHEDULERS["1.2"], "prediction_type": "epsilon"}
    return {"flux.1-dev": build_tiny_flux(root / "flux"), "hunyuan-image-2.1": build_tiny_hunyuan_image(root / "hi"),
            "hunyuan-dit-1.2": build_tiny_hunyuan_dit(root / "dit"),
            # a Hunyuan-DiT whose scheduler config says ε-prediction: the objective follows the config
            "hunyuan-dit-1.2-epsilon": build_tiny_hunyuan_dit(root / "dit-eps", scheduler=epsilon),
            "flux.2-klein": build_tiny_flux2(root / "klein", "klein"), "flux.2-dev": build_tiny_flux2(root / "dev", "dev")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 64×64 images (exactly the one bucket: no resize, no crop) with apostrophe- and quote-free captions."""
    from lora_run_devtools.testing import make_images

    folder = tmp_path_factory.mktemp("step-data") / "subject"
    make_images(folder, count=2, size=(64, 64))
    for i, caption in enumerate(CAPTIONS):
        (folder / f"img{i:03d}.txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _flux2_and_offline(monkeypatch, tmp_path_factory):
    """Offline hub; the FLUX.2 family findable in this process (as tests/flux2/conftest.py provides it)."""
    import sys

    from tests.flux2.conftest import _installed

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not _installed():
        site = tmp_path_factory.getbasetemp() / "step-flux2-site"
        info = site / "lora_run_flux2_entry-0.1.0.dist-info"
        if not info.is_dir():
            info.mkdir(parents=True)
            (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lora-run-flux2-entry\nVersion: 0.1.0\n")
            (info / "entry_points.txt").write_text("[lora_run]\nflux.2 = lora_run_flux2\n")
        monkeypatch.syspath_prepend(str(site))
    from lora_run_native import adapters

    adapters._registered.cache_clear()
    yield
    adapters._registered.cache_clear()


class Seen:
    """What one training step computed, observed through wrappers that call the real methods unchanged."""

    def __init__(self):
        self.objective: dict[str, Any] = {}
        self.fed: dict[str, Any] = {}           # what the transformer was fed by the training step (its first call)
        self.calls: list[dict[str, Any]] = []   # every call of the run, samples included
        self.losses: list[float] = []

    @hookimpl
    def step_finished(self, step, metrics):
        self.losses.append(metrics["loss"])


def train_one_step(family: str, model: Path, dataset: Path, tmp_path: Path, monkeypatch, train: str = "",
                   native: str = "", dataset_extra: str = "", replace: dict[str, str] | None = None) -> Seen:
    import inspect

    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_native.adapters import adapter_class

    seen = Seen()
    cls = adapter_class(family)
    noisy_and_target, load_transformer = cls.noisy_and_target, cls.load_transformer

    def observed_objective(self, x0, noise, t):
        noisy, target = noisy_and_target(self, x0, noise, t)
        seen.objective = {"x0": x0.detach().clone(), "noise": noise.detach().clone(), "t": t.detach().clone(),
                          "noisy": noisy.detach().clone(), "target": target.detach().clone()}
        return noisy, target

    def observed_transformer(self):
        transformer = load_transformer(self)

        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            seen.calls.append({k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in bound.items()})
            seen.fed = seen.calls[0]
        transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return transformer

    text = RECIPE
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.toml"
    path.write_text(text.format(family=family, model=model, dataset=dataset, seed=SEED, train=train, native=native,
                                dataset_extra=dataset_extra),
                    encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:          # observers of this run only (undone after it)
        patch.setattr(cls, "noisy_and_target", observed_objective)
        patch.setattr(cls, "load_transformer", observed_transformer)
        execute(load_recipe(path, []), load_plugins(extra=[seen]), output_dir=str(tmp_path / "run"), resume=False,
                overwrite=False, echo=lambda *_: None)
    assert len(seen.losses) == 1 and seen.objective and seen.fed
    return seen


# ------------------------------------------------------------------------------------------- reference
def pixels(dataset: Path, images: list[Path] | None = None):
    """The dataset images (or ``images``) as the references feed them: (3, H, W) in [-1, 1] (ToTensor,
    Normalize(0.5, 0.5))."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for path in images or [dataset / f"img{i:03d}.png" for i in range(len(CAPTIONS))]:
        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5)
    return torch.stack(out)


def close(a, b, atol=1e-5) -> bool:
    import torch

    return a is not None and b is not None and a.shape == b.shape and bool(torch.allclose(a.float(), b.float(),
                                                                                           atol=atol, rtol=1e-5))


def agrees(name: str, ours, reference, planted: dict[str, Any], atol=1e-5) -> None:
    """``ours`` equals the reference and differs from every planted mistake."""
    assert close(ours, reference, atol), f"{name}: differs from the reference"
    for what, wrong in planted.items():
        assert not close(ours, wrong, atol), f"{name}: the planted mistake '{what}' was not caught"


def batch_order(x0, per_image) -> list[int]:
    """Which dataset image each row of the trained batch is (the rows must be the reference latents)."""
    order = []
    for row in x0:
        hits = [i for i, ref in enumerate(per_image) if close(row, ref)]
        assert len(hits) == 1, "a trained latent is not the reference encoding of any dataset image"
        order.append(hits[0])
    assert sorted(order) == list(range(len(per_image)))
    return order


def step_generator():
    import torch

    from lora_run_native.train import step_seed

    return torch.Generator("cpu").manual_seed(step_seed(SEED, "noise", 0, 0))


def reference_noise(shape, generator, offset: float = 0.0, patchified: bool = False):
    """ε ~ N(0, 1); with a noise offset o, + o·N(0, 1) per sample and VAE latent channel (diffusers' examples'
    form), constant over the image. ``patchified`` (FLUX.2, whose trained latent is the 2×2-patchified one): the
    offset is drawn per VAE channel (C/4 of them), spread over the unpatchified latent and patchified as the
    pipeline does (``Flux2Pipeline._patchify_latents``)."""
    import torch

    noise = torch.randn(shape, generator=generator)
    if offset and patchified:
        from diffusers import Flux2Pipeline

        b, c, h, w = shape
        delta = torch.randn((b, c // 4, 1, 1), generator=generator).expand(b, c // 4, 2 * h, 2 * w)
        noise = noise + offset * Flux2Pipeline._patchify_latents(delta.contiguous())
    elif offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def flow_sigmas(method: str, batch: int, generator, scheduler, seq_len: int, *, scale=1.0, shift=3.0, mean=0.0,
                std=1.0, mu=None):
    """σ from the references: sd-scripts' `uniform` / `sigmoid` / `shift` / `flux_shift` (μ from the model's
    scheduler config: base/max shift at base/max sequence length, or ``mu(seq_len)`` where the family's pipeline
    computes μ otherwise; the scheduler's own exponential time shift), and for `logit-normal` diffusers' example
    (u = sigmoid(N(m, s)) indexing the unshifted descending table; the continuous 1 − u is returned second, as a
    planted mistake)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    continuous = None
    if method == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif method == "logit-normal":
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                                  generator=generator)
        # lora-run's `logit-normal` has no shift (a shift is `shift` / `flux-shift`): the table is the unshifted one,
        # which is the model's own where its scheduler shifts dynamically (FLUX.1-dev, FLUX.2: diffusers' examples)
        unshifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler.config.num_train_timesteps,
                                                    shift=1.0).sigmas
        if scheduler.config.use_dynamic_shifting:
            assert torch.equal(scheduler.sigmas, unshifted)
        continuous = 1.0 - u
        return unshifted[(u * scheduler.config.num_train_timesteps).long()], continuous
    else:
        sigma = torch.sigmoid(scale * torch.randn(batch, generator=generator))
        if method == "shift":
            sigma = shift * sigma / (1 + (shift - 1) * sigma)
        elif method == "flux-shift":
            c = scheduler.config
            mu = mu(seq_len) if mu is not None else calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len,
                                                                     c.base_shift, c.max_shift)
            sigma = scheduler.time_shift(mu, 1.0, sigma)
    return sigma.clamp(1e-4, 1 - 1e-4), continuous


def sd3_weighting(scheme: str, sigma):
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if scheme == "none":
        return torch.ones_like(sigma)
    return compute_loss_weighting_for_sd3(scheme, sigmas=sigma)


def elementwise(name: str, d, **option):
    """The loss plugins' per-element value of the difference d = prediction − target, from their documented
    formulas: ``mse`` d²; ``huber`` (classic, diffusion-pipe's ``huber_delta``) ½d² for |d| ≤ c, c(|d| − ½c)
    beyond; ``pseudo-huber`` (sd-scripts' ``--loss_type huber``, constant schedule) 2c(√(d² + c²) − c);
    ``smooth-l1`` (diffusion-pipe's ``smooth_l1_beta``) ½d²/β for |d| < β, |d| − ½β beyond."""
    import torch

    a = d.abs()
    if name == "mse":
        return d * d
    if name == "huber":
        c = option.get("c", 0.1)
        return torch.where(a <= c, 0.5 * d * d, c * (a - 0.5 * c))
    if name == "pseudo-huber":
        c = option.get("c", 0.1)
        return 2 * c * (torch.sqrt(d * d + c * c) - c)
    if name == "smooth-l1":
        beta = option.get("beta", 1.0)
        return torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)
    raise ValueError(name)


def reference_loss(pred, target, weights, loss: str = "mse", **option):
    """diffusers' examples and sd-scripts: the loss per element, its mean over the non-batch dimensions per
    sample, times the sample's weight, then the batch mean."""
    per_sample = elementwise(loss, pred.float() - target.float(), **option).reshape(target.shape[0], -1).mean(1)
    return float((weights.view(-1) * per_sample).mean())


def check_flow_step(seen: Seen, per_image, method: str, scheduler, seq_len: int, *, offset=0.0, weighting="none",
                    patchified=False, **draw):
    """x0, noise, σ, noisy input and target of a flow-matching step against the reference; returns (order, σ,
    target, weights)."""
    import torch

    ob = seen.objective
    order = batch_order(ob["x0"], per_image)
    x0 = torch.stack([per_image[i] for i in order])
    g = step_generator()
    noise = reference_noise(tuple(x0.shape), g, offset, patchified)
    planted_noise = {"no offset": reference_noise(tuple(x0.shape), step_generator())} if offset else {}
    if offset and patchified:
        planted_noise["δ per patch channel (a 2×2 pattern)"] = reference_noise(tuple(x0.shape), step_generator(),
                                                                              offset)
    agrees("noise", ob["noise"], noise, planted_noise)
    sigma, continuous = flow_sigmas(method, len(order), g, scheduler, seq_len, **draw)
    planted = {"1 - σ": 1 - sigma}
    if continuous is not None:
        planted["the continuous 1 − u (off the table)"] = continuous
    if method in ("shift", "flux-shift"):
        planted["unshifted"] = flow_sigmas("sigmoid", len(order), _after_noise(x0.shape, offset, patchified), scheduler,
                                           seq_len,
                                           scale=draw.get("scale", 1.0))[0]
    if method == "flux-shift":          # the token count of the unpacked latent instead of the packed one
        planted["μ of 4× the tokens"] = flow_sigmas(method, len(order), _after_noise(x0.shape, offset, patchified),
                                                    scheduler,
                                                    seq_len * 4, scale=draw.get("scale", 1.0), mu=draw.get("mu"))[0]
    agrees("σ", ob["t"], sigma, planted, atol=1e-7)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    agrees("noisy input", ob["noisy"], (1 - s) * x0 + s * noise, {"σ and 1 − σ swapped": s * x0 + (1 - s) * noise})
    target = noise - x0
    agrees("target", ob["target"], target, {"flipped target": x0 - noise, "ε-prediction": noise})
    weights = sd3_weighting(weighting, sigma)
    return order, sigma, target, weights


def _after_noise(shape, offset, patchified=False):
    g = step_generator()
    reference_noise(tuple(shape), g, offset, patchified)
    return g


def check_loss(seen: Seen, pred, target, weights):
    import torch

    loss = reference_loss(pred, target, weights)
    assert seen.losses[0] == pytest.approx(loss, rel=1e-4, abs=1e-7)
    assert seen.losses[0] != pytest.approx(reference_loss(pred, -target, weights), rel=1e-3)
    assert seen.losses[0] != pytest.approx(float(((pred - target) ** 2).sum() / pred.shape[0]), rel=1e-3), \
        "summed over the latent instead of averaged"
    if not torch.allclose(weights, torch.ones_like(weights)):
        assert seen.losses[0] != pytest.approx(reference_loss(pred, target, torch.ones_like(weights)), rel=1e-4)


# -------------------------------------------------------------------------------------------- FLUX.1-dev
FLUX_CASES = [
    ("uniform", "", {}),
    ("sigmoid", "sigmoid_scale = 1.3", {"scale": 1.3}),
    ("logit-normal", "logit_mean = 0.5\nlogit_std = 1.2", {"mean": 0.5, "std": 1.2}),
    ("shift", "shift = 3.1582", {"shift": 3.1582}),
    ("flux-shift", "noise_offset = 0.1\ntimestep_weighting = \"cosmap\"", {}),
    ("sigmoid", "timestep_weighting = \"sigma_sqrt\"\nguidance = 3.5", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, draw", FLUX_CASES)
def test_flux1_training_step(method, extra, draw, models, dataset, tmp_path, monkeypatch):
    seen = train_one_step("flux.1-dev", models["flux.1-dev"], dataset, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "{method}"\n{extra}', native="text_max_length = 16")
    pred, target, weights, _order = check_flux1(seen, models["flux.1-dev"], dataset, method, extra, draw)
    check_loss(seen, pred, target, weights)


def check_flux1(seen: Seen, folder: Path, dataset: Path, method: str, extra: str, draw: dict[str, Any], *,
                images: list[Path] | None = None, captions: tuple[str, ...] = CAPTIONS):
    """Every input of a FLUX.1 step against the reference; returns the reference prediction, target, loss
    weighting and which image (of ``images``, the dataset's by default) each row is."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    train = _toml(extra)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(pixels(dataset, images)).latent_dist.mode()
    per_image = list((z - vae.config.shift_factor) * vae.config.scaling_factor)
    assert not close(seen.objective["x0"][0], (z[0] * vae.config.scaling_factor)), "planted: the shift left out"
    assert not close(seen.objective["x0"][0], (z[0] - vae.config.scaling_factor) * vae.config.shift_factor)

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    b, c, h, w = seen.objective["x0"].shape
    order, sigma, target, weights = check_flow_step(seen, per_image, method, scheduler, (h // 2) * (w // 2),
                                                    offset=train.get("noise_offset", 0.0),
                                                    weighting=train.get("timestep_weighting", "none"), **draw)
    noisy = seen.objective["noisy"]

    pipe = FluxPipeline.from_pretrained(folder)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=[captions[i] for i in order], prompt_2=None,
                                                      device="cpu", max_sequence_length=16)
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    guidance = torch.full((b,), train.get("guidance", 1.0))
    fed = seen.fed
    agrees("packed latents", fed["hidden_states"], packed, {"unpacked order": noisy.flatten(2).transpose(1, 2)
                                                            .reshape(b, -1, c * 4)})
    agrees("timestep", fed["timestep"], sigma, {"σ·1000": sigma * 1000, "1 − σ": 1 - sigma}, atol=1e-6)
    agrees("guidance", fed["guidance"], guidance, {"guidance·1000": guidance * 1000}, atol=1e-6)
    agrees("img_ids", fed["img_ids"], img_ids, {"row/col swapped": img_ids[:, [0, 2, 1]]} if h != w else {})
    agrees("txt_ids", fed["txt_ids"], text_ids, {})
    agrees("T5 sequence", fed["encoder_hidden_states"], embeds, {"other caption order": embeds.flip(0)})
    agrees("CLIP pooled", fed["pooled_projections"], pooled, {"other caption order": pooled.flip(0)})

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    with torch.no_grad():
        out = transformer(hidden_states=packed, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)
    return pred, target, weights, order


# ------------------------------------------------------------ loss plugins and the regularisation weight
REG_CAPTIONS = ("ohwx, red", "a person, blue sky")    # the subject's caption, the regularisation image's
REG_WEIGHT = 0.5


@pytest.fixture(scope="module")
def subject_and_regularization(tmp_path_factory) -> tuple[Path, Path]:
    """One 64×64 subject image and one regularisation image (a different picture): with batch size 2 the one
    step trains exactly one of each."""
    from lora_run_devtools.testing import make_images

    root = tmp_path_factory.mktemp("step-reg")
    subject, reg = root / "subject", root / "reg"
    made = make_images(root / "made", count=2, size=(64, 64), captions=False)
    subject.mkdir()
    reg.mkdir()
    made[0].rename(subject / "img000.png")
    made[1].rename(reg / "reg000.png")
    (subject / "img000.txt").write_text(REG_CAPTIONS[0], encoding="utf-8")
    (reg / "reg000.txt").write_text(REG_CAPTIONS[1], encoding="utf-8")
    return subject, reg


LOSS_CASES = [("mse", {}), ("huber", {"c": 0.3}), ("pseudo-huber", {"c": 0.3}), ("smooth-l1", {"beta": 0.5})]
#: For each loss, the formula of another loss (or a lookalike) that the check must tell apart from it.
LOSS_LOOKALIKES = {
    "mse": [("huber", {"c": 1e9}, "½·mse (classic Huber with a huge c)")],
    "huber": [("pseudo-huber", None, "pseudo-Huber instead of Huber"), ("smooth-l1", "beta", "smooth-L1 with β = c")],
    "pseudo-huber": [("huber", None, "classic Huber instead of pseudo-Huber"),
                     ("mse", {}, "plain mse")],
    "smooth-l1": [("huber", "c", "Huber with c = β (β times smaller beyond β)"), ("mse", {}, "plain mse")],
}


def train_with_regularization(loss: str, option: dict[str, Any], models, subject_and_regularization, tmp_path,
                              monkeypatch) -> Seen:
    subject, reg = subject_and_regularization
    options = ", ".join(f"{k} = {v}" for k, v in option.items())
    return train_one_step("flux.1-dev", models["flux.1-dev"], subject, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "sigmoid"\nloss = "{loss}"\nloss_options = {{ {options} }}',
                          native="text_max_length = 16",
                          dataset_extra=f'[[dataset.regularization]]\npath = "{reg}"\nweight = {REG_WEIGHT}')


def check_loss_and_weights(seen: Seen, models, subject_and_regularization, loss: str, option: dict[str, Any]) -> None:
    """The step's inputs against the reference (one subject and one regularisation image), then its logged loss
    against the loss formula, the regularisation weight of the regularisation sample and the batch mean."""
    import torch

    subject, reg = subject_and_regularization
    pred, target, _ones, order = check_flux1(seen, models["flux.1-dev"], subject, "sigmoid", "", {},
                                             images=[subject / "img000.png", reg / "reg000.png"],
                                             captions=REG_CAPTIONS)
    weights = torch.tensor([1.0 if i == 0 else REG_WEIGHT for i in order])
    right = reference_loss(pred, target, weights, loss, **option)
    assert seen.losses[0] == pytest.approx(right, rel=1e-4, abs=1e-7), "loss: differs from the reference"
    wrong = {"the regularisation weight ignored": reference_loss(pred, target, torch.ones(2), loss, **option),
             "normalised by the weights' sum": reference_loss(pred, target, weights, loss, **option) * 2 /
             float(weights.sum()),
             "summed over the batch": 2 * right,
             "the flipped target": reference_loss(pred, -target, weights, loss, **option)}
    for other, other_option, what in LOSS_LOOKALIKES[loss]:
        if isinstance(other_option, str):               # the same number under the other loss's option name
            other_option = {other_option: next(iter(option.values()))}
        wrong[what] = reference_loss(pred, target, weights, other, **(option if other_option is None else other_option))
    for what, value in wrong.items():
        assert seen.losses[0] != pytest.approx(value, rel=1e-3), f"the planted mistake '{what}' was not caught"


@pytest.mark.slow
@pytest.mark.parametrize("loss, option", LOSS_CASES)
def test_loss_plugins_and_regularization_weight_in_a_step(loss, option, models, subject_and_regularization,
                                                          tmp_path, monkeypatch):
    """Each loss plugin's value in a real step (FLUX.1) equals its documented formula, per sample averaged over
    the latent, the regularisation sample weighted by its set's `weight`, then averaged over the batch
    (sd-scripts' `loss * loss_weights`, `.mean()`; diffusers' examples reduce the same way)."""
    seen = train_with_regularization(loss, option, models, subject_and_regularization, tmp_path, monkeypatch)
    check_loss_and_weights(seen, models, subject_and_regularization, loss, option)


def test_loss_plugins_are_their_documented_formulas():
    """The plugins alone, on differences in both regimes (|d| below and above c / β), against the formulas
    written here; each also differs from its lookalikes."""
    import torch

    from lora_run_losses import HuberOptions, SmoothL1Options, huber, mse, pseudo_huber, smooth_l1

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    d = pred - target
    assert bool((d.abs() < 0.3).any()) and bool((d.abs() > 0.5).any())
    plugins = {"mse": mse(), "huber": huber(HuberOptions(c=0.3)), "pseudo-huber": pseudo_huber(HuberOptions(c=0.3)),
               "smooth-l1": smooth_l1(SmoothL1Options(beta=0.5))}
    for name, option in LOSS_CASES:
        ours = plugins[name](pred, target)
        assert ours.shape == (3,)
        reference = elementwise(name, d, **option).flatten(1).mean(1)
        assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(ours, elementwise(name, d, **option).flatten(1).sum(1), rtol=1e-3), \
            f"{name}: summed instead of averaged"
        for other, other_option, what in LOSS_LOOKALIKES[name]:
            if isinstance(other_option, str):
                other_option = {other_option: next(iter(option.values()))}
            lookalike = elementwise(other, d, **(option if other_option is None else other_option)).flatten(1).mean(1)
            assert not torch.allclose(ours, lookalike, rtol=1e-3), f"{name}: {what}"


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


# ------------------------------------------------------------------------------------ HunyuanImage-2.1
@pytest.mark.slow
@pytest.mark.parametrize("method, extra, draw", [("shift", "shift = 5.0", {"shift": 5.0}), ("uniform", "", {}),
                                                 ("logit-normal", "logit_mean = -0.4", {"mean": -0.4})])
def test_hunyuan_image_training_step(method, extra, draw, models, dataset, tmp_path, monkeypatch):
    seen = train_one_step("hunyuan-image-2.1", models["hunyuan-image-2.1"], dataset, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "{method}"\n{extra}')
    check_hunyuan_image(seen, models["hunyuan-image-2.1"], dataset, method, draw)


def check_hunyuan_image(seen: Seen, folder: Path, dataset: Path, method: str, draw: dict[str, Any]) -> None:
    import torch
    from diffusers import (AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageTransformer2DModel)

    vae = AutoencoderKLHunyuanImage.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(pixels(dataset)).latent_dist.mode()
    per_image = list(z * vae.config.scaling_factor)
    assert not close(seen.objective["x0"][0], z[0]), "planted: the scaling factor left out"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    b, c, h, w = seen.objective["x0"].shape
    order, sigma, target, weights = check_flow_step(seen, per_image, method, scheduler, h * w, **draw)
    noisy = seen.objective["noisy"]

    pipe = HunyuanImagePipeline.from_pretrained(folder)
    with torch.no_grad():
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt([CAPTIONS[i] for i in order], device="cpu", batch_size=b)
    fed = seen.fed
    agrees("latents (unpacked)", fed["hidden_states"], noisy, {})
    agrees("timestep", fed["timestep"], sigma * 1000, {"σ": sigma, "(1 − σ)·1000": (1 - sigma) * 1000}, atol=1e-3)
    assert fed.get("guidance") is None
    agrees("Qwen sequence", fed["encoder_hidden_states"], embeds, {"other caption order": embeds.flip(0)})
    assert torch.equal(fed["encoder_attention_mask"].long(), mask.long())
    agrees("ByT5 glyph encoding", fed["encoder_hidden_states_2"], embeds_2, {})
    assert torch.equal(fed["encoder_attention_mask_2"].long(), mask_2.long())

    transformer = HunyuanImageTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    with torch.no_grad():
        pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                           encoder_attention_mask=mask, encoder_hidden_states_2=embeds_2,
                           encoder_attention_mask_2=mask_2, return_dict=False)[0]
    check_loss(seen, pred, target, weights)


# ------------------------------------------------------------------------------------- Hunyuan-DiT v1.2
@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("uniform", ""), ("uniform", "min_snr_gamma = 5.0\nnoise_offset = 0.05"),
                                           ("logit-normal", "logit_mean = 0.5")])
def test_hunyuan_dit_training_step(method, extra, models, dataset, tmp_path, monkeypatch):
    seen = train_one_step("hunyuan-dit-1.2", models["hunyuan-dit-1.2"], dataset, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "{method}"\n{extra}')
    check_hunyuan_dit(seen, models["hunyuan-dit-1.2"], dataset, method, extra)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("uniform", "min_snr_gamma = 5.0"),
                                           ("logit-normal", "logit_mean = 0.5\nnoise_offset = 0.05")])
def test_hunyuan_dit_epsilon_model_training_step(method, extra, models, dataset, tmp_path, monkeypatch):
    """A Hunyuan-DiT whose scheduler config says ``prediction_type = "epsilon"`` trains the ε target (and Min-SNR's
    ε form), as its sampler reads it: the objective is the model's scheduler config's."""
    seen = train_one_step("hunyuan-dit-1.2", models["hunyuan-dit-1.2-epsilon"], dataset, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "{method}"\n{extra}')
    check_hunyuan_dit(seen, models["hunyuan-dit-1.2-epsilon"], dataset, method, extra)


def check_hunyuan_dit(seen: Seen, folder: Path, dataset: Path, method: str, extra: str) -> None:
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, HunyuanDiT2DModel,
                           HunyuanDiTPipeline)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

    train = _toml(extra)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(pixels(dataset)).latent_dist.mode()
    per_image = list(z * vae.config.scaling_factor)
    ob = seen.objective
    order = batch_order(ob["x0"], per_image)
    x0 = torch.stack([per_image[i] for i in order])
    b = len(order)

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    prediction = scheduler.config.prediction_type          # the target follows the model's scheduler config
    assert prediction in ("v_prediction", "epsilon")
    g = step_generator()
    offset = train.get("noise_offset", 0.0)
    noise = reference_noise(tuple(x0.shape), g, offset)
    agrees("noise", ob["noise"], noise, {})
    T = scheduler.config.num_train_timesteps
    planted_t = {}
    if method == "uniform":             # diffusers' DDPM training examples
        t = torch.randint(0, T, (b,), generator=g)
    else:                               # diffusers' example: u indexes the scheduler's descending training table
        u = compute_density_for_timestep_sampling("logit_normal", b, logit_mean=train["logit_mean"],
                                                  logit_std=1.0, generator=g)
        t = scheduler.timesteps[(u * T).long()]
        sigma = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas[(u * 1000).long()]
        planted_t["round(999·σ) of the flow table (the old mapping)"] = torch.round(sigma * (T - 1))
    agrees("t", ob["t"], t.float(), {"t/1000": t.float() / 1000, "T − 1 − t": (T - 1 - t).float(), **planted_t},
           atol=1e-6)
    noisy = scheduler.add_noise(x0, noise, t)
    velocity = scheduler.get_velocity(x0, noise, t)
    other = DDPMScheduler.from_config({**scheduler.config, "beta_end": 0.03})      # v1.1's schedule
    agrees("noisy input", ob["noisy"], noisy, {"v1.1 schedule": other.add_noise(x0, noise, t)})
    if prediction == "v_prediction":
        target = velocity
        agrees("v target", ob["target"], target, {"ε target": noise, "flipped v": -target,
                                                 "v1.1 schedule": other.get_velocity(x0, noise, t)})
    else:
        target = noise
        agrees("ε target", ob["target"], target, {"v target (the config's ε ignored)": velocity, "flipped ε": -noise,
                                                 "ε − x0 (the flow target)": noise - x0})

    pipe = HunyuanDiTPipeline.from_pretrained(folder)
    captions = [CAPTIONS[i] for i in order]
    with torch.no_grad():
        embeds, _, mask, _ = pipe.encode_prompt(captions, device="cpu", dtype=torch.float32,
                                                do_classifier_free_guidance=False, text_encoder_index=0)
        embeds_5, _, mask_5, _ = pipe.encode_prompt(captions, device="cpu", dtype=torch.float32,
                                                    do_classifier_free_guidance=False, text_encoder_index=1)
    fed = seen.fed
    agrees("timestep fed", fed["timestep"], t.float(), {"t/1000": t.float() / 1000}, atol=1e-6)
    agrees("BERT sequence", fed["encoder_hidden_states"], embeds, {"other caption order": embeds.flip(0)})
    agrees("mT5 sequence", fed["encoder_hidden_states_t5"], embeds_5, {"other caption order": embeds_5.flip(0)})
    assert torch.equal(fed["text_embedding_mask"].long(), mask.long())
    assert torch.equal(fed["text_embedding_mask_t5"].long(), mask_5.long())

    transformer = HunyuanDiT2DModel.from_pretrained(folder, subfolder="transformer").eval()
    patch = transformer.config.patch_size
    grid = (noisy.shape[-2] // patch, noisy.shape[-1] // patch)
    rope = get_2d_rotary_pos_embed(transformer.inner_dim // transformer.num_heads,
                                   get_resize_crop_region_for_grid(grid, 512 // 8 // patch), grid, output_type="pt")
    agrees("rotary cos", fed["image_rotary_emb"][0], rope[0], {})
    with torch.no_grad():
        out = transformer(noisy, t.float(), encoder_hidden_states=embeds, text_embedding_mask=mask,
                          encoder_hidden_states_t5=embeds_5, text_embedding_mask_t5=mask_5, image_rotary_emb=rope,
                          return_dict=False)[0]
    pred, _variance = out.chunk(2, dim=1)
    weights = torch.ones(b)
    if "min_snr_gamma" in train:        # diffusers' examples (and sd-scripts): ÷ (SNR + 1) for v, ÷ SNR for ε
        snr = compute_snr(scheduler, t)
        clipped = torch.stack([snr, train["min_snr_gamma"] * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        v_weights, eps_weights = clipped / (snr + 1), clipped / snr
        weights, wrong = (v_weights, eps_weights) if prediction == "v_prediction" else (eps_weights, v_weights)
        assert seen.losses[0] != pytest.approx(reference_loss(pred, target, wrong), rel=1e-4), \
            "Min-SNR in the other prediction type's form"
    check_loss(seen, pred, target, weights)


# ---------------------------------------------------------------------------------------- FLUX.2 variants
#: text tokens: the tiny byte-level tokenizers spend ~48 on [klein]'s chat template, ~250 on [dev]'s system message
FLUX2_TEXT_LENGTH = {"klein": 64, "dev": 512}


@pytest.mark.slow
@pytest.mark.parametrize("variant, method, extra, draw", [
    ("klein", "sigmoid", "", {}),
    ("klein", "uniform", "timestep_weighting = \"cosmap\"", {}),
    ("dev", "logit-normal", "logit_mean = 0.3\nguidance = 4.0", {"mean": 0.3}),
    ("dev", "flux-shift", "", {}),
    ("klein", "shift", "noise_offset = 0.1\nshift = 3.0", {"shift": 3.0}),
])
def test_flux2_training_step(variant, method, extra, draw, models, dataset, tmp_path, monkeypatch):
    family = f"flux.2-{variant}"
    seen = train_one_step(family, models[family], dataset, tmp_path, monkeypatch,
                          train=f'timestep_sampling = "{method}"\n{extra}',
                          native=f"text_max_length = {FLUX2_TEXT_LENGTH[variant]}")
    check_flux2(seen, models[family], dataset, variant, method, extra, draw)


def check_flux2(seen: Seen, folder: Path, dataset: Path, variant: str, method: str, extra: str,
                draw: dict[str, Any]) -> None:
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                           Flux2Transformer2DModel)
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    length = FLUX2_TEXT_LENGTH[variant]
    train = _toml(extra)
    pipeline_class = Flux2KleinPipeline if variant == "klein" else Flux2Pipeline
    vae = AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(pixels(dataset)).latent_dist.mode()
    patches = pipeline_class._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    per_image = list((patches - mean) / std)
    assert not close(seen.objective["x0"][0], patches[0]), "planted: the batch-norm normalisation left out"

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    b, c, h, w = seen.objective["x0"].shape
    # FLUX.2's pipelines ignore the scheduler config's base/max shift: μ = compute_empirical_mu(tokens, steps);
    # `flux-shift` is its step-independent line, the 200-step one (docs/flux2.md)
    flux2_mu = lambda tokens: compute_empirical_mu(tokens, 200)  # noqa: E731
    order, sigma, target, weights = check_flow_step(seen, per_image, method, scheduler, h * w,
                                                    weighting=train.get("timestep_weighting", "none"), mu=flux2_mu,
                                                    offset=train.get("noise_offset", 0.0), patchified=True, **draw)
    if method == "flux-shift":          # planted: μ of the pipelines' default 50-step schedule
        at_50 = flow_sigmas(method, b, _after_noise((b, c, h, w), 0.0), scheduler, h * w,
                            mu=lambda tokens: compute_empirical_mu(tokens, 50))[0]
        agrees("σ", seen.objective["t"], sigma, {"μ of the 50-step schedule": at_50}, atol=1e-7)
    noisy = seen.objective["noisy"]

    pipe = pipeline_class.from_pretrained(folder)
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt([CAPTIONS[i] for i in order], device="cpu", max_sequence_length=length)
    tokens = pipeline_class._pack_latents(noisy)
    img_ids = pipeline_class._prepare_latent_ids(noisy)
    fed = seen.fed
    agrees("tokens", fed["hidden_states"], tokens, {})
    agrees("timestep", fed["timestep"], sigma, {"σ·1000": sigma * 1000}, atol=1e-6)
    assert torch.equal(fed["img_ids"].long(), img_ids.long()) and torch.equal(fed["txt_ids"].long(), text_ids.long())
    agrees("text", fed["encoder_hidden_states"], embeds, {"other caption order": embeds.flip(0)})
    transformer = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    if transformer.config.guidance_embeds:          # diffusers' example: --guidance_scale per sample
        guidance = torch.full((b,), train.get("guidance", 1.0))
        agrees("guidance", fed["guidance"], guidance, {"guidance·1000": guidance * 1000}, atol=1e-6)
    else:
        guidance = None
        assert fed["guidance"] is None
    assert (variant == "dev") == (guidance is not None)
    with torch.no_grad():
        out = transformer(hidden_states=tokens, timestep=sigma, guidance=guidance, encoder_hidden_states=embeds,
                          txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    pred = pipeline_class._unpack_latents_with_ids(out[:, :tokens.shape[1]], img_ids)
    check_loss(seen, pred, target, weights)


# ------------------------------------------------------------------------------------- caption dropout
def empty_caption_encoding(family: str, folder: Path, b: int) -> dict[str, Any]:
    """What the family's diffusers pipeline encodes for the empty prompt (its unconditional input), by the
    transformer's argument names."""
    import torch
    from diffusers import FluxPipeline, Flux2KleinPipeline, HunyuanDiTPipeline, HunyuanImagePipeline

    empty = [""] * b
    with torch.no_grad():
        if family == "flux.1-dev":
            embeds, pooled, _ = FluxPipeline.from_pretrained(folder).encode_prompt(
                prompt=empty, prompt_2=None, device="cpu", max_sequence_length=16)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if family == "hunyuan-image-2.1":
            embeds, mask, embeds_2, mask_2 = HunyuanImagePipeline.from_pretrained(folder).encode_prompt(
                empty, device="cpu", batch_size=b)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "encoder_hidden_states_2": embeds_2, "encoder_attention_mask_2": mask_2}
        if family == "hunyuan-dit-1.2":
            pipe = HunyuanDiTPipeline.from_pretrained(folder)
            out = {}
            for index, (e, m) in enumerate((("encoder_hidden_states", "text_embedding_mask"),
                                             ("encoder_hidden_states_t5", "text_embedding_mask_t5"))):
                embeds, _, mask, _ = pipe.encode_prompt(empty, device="cpu", dtype=torch.float32,
                                                        do_classifier_free_guidance=False, text_encoder_index=index)
                out[e], out[m] = embeds, mask
            return out
        embeds, _ = Flux2KleinPipeline.from_pretrained(folder).encode_prompt(
            empty, device="cpu", max_sequence_length=FLUX2_TEXT_LENGTH["klein"])
        return {"encoder_hidden_states": embeds}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2", "flux.2-klein"])
def test_caption_dropout_trains_the_pipelines_empty_prompt_encoding(family, models, dataset, tmp_path, monkeypatch):
    """A dropped caption is the empty string through the same encoders: the unconditional input the family's
    pipeline builds for classifier-free guidance (sd-scripts' caption_dropout_rate does the same)."""
    native = {"flux.1-dev": "text_max_length = 16",
              "flux.2-klein": f"text_max_length = {FLUX2_TEXT_LENGTH['klein']}"}.get(family, "")
    dropped = train_one_step(family, models[family], dataset, tmp_path / "dropped", monkeypatch,
                             dataset_extra="caption_dropout = 1.0", native=native)
    kept = train_one_step(family, models[family], dataset, tmp_path / "kept", monkeypatch, native=native)
    for name, reference in empty_caption_encoding(family, models[family], 2).items():
        if name.endswith("mask") or "_mask_" in name:
            assert dropped.fed[name].long().tolist() == reference.long().tolist(), name
        elif name == "encoder_hidden_states_2":      # no quoted text in either caption: zeros both ways
            agrees(name, dropped.fed[name], reference, {})
        else:
            agrees(name, dropped.fed[name], reference, {"the caption kept": kept.fed[name]})


# ------------------------------------------------------------------------------------------ loss weights
def test_sd3_loss_weighting_is_the_references_unclamped():
    """`timestep_weighting` = diffusers' ``compute_loss_weighting_for_sd3`` (sd-scripts' copy is the same) at
    every σ, the smallest included: σ⁻² is not clamped there (the old 1e4 clamp is the planted mistake)."""
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from lora_run_native.timesteps import loss_weighting

    sigma = torch.tensor([1e-4, 0.002, 0.009, 0.3, 0.75, 1 - 1e-4])
    for scheme in ("sigma_sqrt", "cosmap"):
        assert torch.allclose(loss_weighting(scheme, sigma), compute_loss_weighting_for_sd3(scheme, sigmas=sigma),
                              rtol=1e-6)
    assert torch.equal(loss_weighting("none", sigma), torch.ones(6))
    clamped = (sigma ** -2.0).clamp(max=1e4)
    assert not torch.allclose(clamped, compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=sigma), rtol=1e-6)


def test_planted_reference_mistakes_change_the_loss():
    """The loss check is not blind: on the same prediction, the flipped target and the ε target give losses
    the check tells apart (relative difference far above its 1e-4 tolerance)."""
    import torch

    g = torch.Generator().manual_seed(0)
    pred, x0, eps = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    ones = torch.ones(2)
    right = reference_loss(pred, eps - x0, ones)
    assert not math.isclose(right, reference_loss(pred, x0 - eps, ones), rel_tol=1e-3)
    assert not math.isclose(right, reference_loss(pred, eps, ones), rel_tol=1e-3)


# ------------------------------------------------------------------- flux-shift: each bucket's own token count
MULTI_BUCKET = {"resolution = 64\nbucket_min = 64\nbucket_max = 64\nbucket_step = 64":
                "resolution = 96\nbucket_min = 64\nbucket_max = 128\nbucket_step = 32",
                "steps = 1\nbatch_size = 2": "steps = 4\nbatch_size = 1"}


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory) -> Path:
    """A square 64×64 image and a wide 128×64 one: buckets (64, 64) and (128, 64) (no resize, no crop)."""
    from lora_run_devtools.testing import make_images

    folder = tmp_path_factory.mktemp("step-buckets") / "subject"
    make_images(folder, count=1, size=(64, 64), prefix="sq")
    make_images(folder, count=1, size=(128, 64), prefix="wide")
    return folder


def train_steps(family: str, model: Path, dataset: Path, tmp_path: Path, train: str, native: str = "",
                replace: dict[str, str] | None = None, seen: Seen | None = None) -> list:
    """A multi-step run on `MULTI_BUCKET`'s buckets (batch 1; or the recipe changed by ``replace``); returns each
    micro-step's x0, σ, target, the transformer's image tokens and inputs, observed through wrappers that call the
    real methods unchanged (``seen`` collects the logged losses)."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_native.adapters import adapter_class

    cls = adapter_class(family)
    noisy_and_target, predict = cls.noisy_and_target, cls.predict
    calls: list[dict[str, Any]] = []

    def observed_objective(self, x0, noise, t):
        noisy, target = noisy_and_target(self, x0, noise, t)
        calls.append({"x0": x0.detach().clone(), "t": t.detach().clone(), "target": target.detach().clone()})
        return noisy, target

    def observed_predict(self, transformer, noisy, t, text, guidance):
        def hook(module, args, kwargs):
            calls[-1]["tokens"] = int(kwargs["hidden_states"].shape[1])
            calls[-1]["img_ids"] = int(kwargs["img_ids"].shape[-2])
            calls[-1]["fed"] = {k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in kwargs.items()}
        handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return predict(self, transformer, noisy, t, text, guidance)
        finally:
            handle.remove()

    text = RECIPE
    for old, new in (replace or MULTI_BUCKET).items():
        assert old in text
        text = text.replace(old, new)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.toml"
    path.write_text(text.format(family=family, model=model, dataset=dataset, seed=SEED, train=train, native=native,
                                dataset_extra=""), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, "noisy_and_target", observed_objective)
        patch.setattr(cls, "predict", observed_predict)
        execute(load_recipe(path, []), load_plugins(extra=[seen] if seen else []), output_dir=str(tmp_path / "run"),
                resume=False, overwrite=False, echo=lambda *_: None)
    return calls


def flux_shift_reference(step: int, shape, tokens: int):
    """sd-scripts' `flux_shift` on the step's generator (after its noise): σ = e^μ / (e^μ + 1/u − 1),
    u = sigmoid(N(0, 1)), μ = 0.5 + (tokens − 256)·(1.15 − 0.5)/(4096 − 256)."""
    import torch

    from lora_run_native.train import step_seed

    g = torch.Generator("cpu").manual_seed(step_seed(SEED, "noise", step, 0))
    torch.randn(tuple(shape), generator=g)
    u = torch.sigmoid(torch.randn(shape[0], generator=g))
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    return (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).clamp(1e-4, 1 - 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family, native", [("flux.1-dev", "text_max_length = 16"),
                                            ("flux.2-klein", f"text_max_length = {FLUX2_TEXT_LENGTH['klein']}")])
def test_flux_shift_uses_each_buckets_token_count(family, native, models, two_buckets, tmp_path, monkeypatch):
    """A run over two buckets (64×64 and 128×64 px) draws each step's σ with the μ of *that* step's bucket: the
    image tokens the transformer is fed (FLUX.1: the packed (h/2)·(w/2) of the (h, w) latent; FLUX.2: the h·w
    positions of its patchified latent). Planted: the μ of the other bucket, and of the unpacked latent (FLUX.1)."""
    calls = train_steps(family, models[family], two_buckets, tmp_path, 'timestep_sampling = "flux-shift"', native)
    assert len(calls) == 4
    token_counts = set()
    for step, call in enumerate(calls):
        b, c, h, w = call["x0"].shape
        tokens = (h // 2) * (w // 2) if family == "flux.1-dev" else h * w
        assert call["tokens"] == call["img_ids"] == tokens, "the documented count is what the transformer sees"
        token_counts.add(tokens)
        reference = flux_shift_reference(step, (b, c, h, w), tokens)
        other = 32 if tokens == 16 else 16                        # the other bucket's count (64² ↔ 128×64 px)
        agrees(f"σ of step {step + 1}", call["t"], reference,
               {"μ of the other bucket": flux_shift_reference(step, (b, c, h, w), other),
                **({"μ of the unpacked latent": flux_shift_reference(step, (b, c, h, w), h * w)}
                   if family == "flux.1-dev" else {})}, atol=1e-7)
    assert token_counts == {16, 32}, "both buckets were trained"


# ------------------------------------------------------------------------ gradient accumulation: the step's loss
@pytest.mark.slow
def test_a_steps_loss_is_the_mean_over_its_accumulated_micro_batches(models, dataset, tmp_path, monkeypatch):
    """With `gradient_accumulation = 2` (batch 1) one optimizer step is two micro-batches, and its gradient is that
    of their mean loss (the accelerator divides each backward by 2, as diffusers' examples and sd-scripts do). The
    step's logged loss is that mean — each micro-batch's loss computed here with a freshly loaded transformer on
    what it was fed, against the step's target. Planted: their sum (what was logged before)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    seen = Seen()
    replace = {"steps = 1\nbatch_size = 2": "steps = 1\nbatch_size = 1\ngradient_accumulation = 2"}
    calls = train_steps("flux.1-dev", models["flux.1-dev"], dataset, tmp_path, "", "text_max_length = 16",
                        replace=replace, seen=seen)
    assert len(calls) == 2 and len(seen.losses) == 1
    transformer = FluxTransformer2DModel.from_pretrained(models["flux.1-dev"], subfolder="transformer").eval()
    micro = []
    for call in calls:              # step 1: the LoRA's B is still 0, so both micro-batches see the base model
        fed = call["fed"]
        b, c, h, w = call["target"].shape
        with torch.no_grad():
            out = transformer(**{k: fed[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                     "timestep", "img_ids", "txt_ids", "guidance")},
                              return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
        micro.append(reference_loss(pred, call["target"], torch.ones(b)))
    assert seen.losses[0] == pytest.approx(sum(micro) / 2, rel=1e-4, abs=1e-7)
    assert seen.losses[0] != pytest.approx(sum(micro), rel=1e-2), "planted: the micro-batches' sum"
