"""Non-square buckets: what a training step and the samples drawn during training feed the transformer, for every
family, against the family's diffusers pipeline on the same image, prompt and size — height and width never
swapped.

A square bucket (the other step tests' 64×64) cannot tell height from width: a transposed latent, image ids with
row and column swapped, Hunyuan-DiT's rotary grid or v1.1's image-size conditioning given as (width, height) all
look right there. Here the dataset is two 128×64 (wide) or 64×128 (tall) images, exactly one bucket (no resize,
no crop), and each check also runs the height/width swap as a planted mistake it must catch:

- the training step, through the orchestrator, checked in full by ``test_training_step``'s per-family checks (the
  latents of the VAE on the images read as (3, H, W), σ, noise, x_t, target, packed tokens, ids, text, loss),
  plus the transposes those checks cannot see on a square bucket;
- the samples of that run, drawn at the bucket's size (``[sample] width/height``): the first transformer call of
  the sampler gets the seeded starting noise of that size (``(C, H/f, W/f)``; FLUX's packed row-major, with the
  pipeline's ids for (H/f, W/f), which the planted swap must not match), the timestep of σ = 1 on the scale training feeds it (FLUX.1/FLUX.2: σ,
  HunyuanImage-2.1: σ·1000, Hunyuan-DiT: the scheduler's first step), the prompt's cached encoding equal to the
  pipeline's own, and the image written is width × height.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .test_training_step import (CAPTIONS, FLUX2_TEXT_LENGTH, _flux2_and_offline, agrees, check_flux1,  # noqa: F401
                                 check_flux2, check_hunyuan_dit, check_hunyuan_image, check_loss, train_one_step)

BUCKETS = {"resolution = 64\nbucket_min = 64\nbucket_max = 64\nbucket_step = 64":
           "resolution = 96\nbucket_min = 64\nbucket_max = 128\nbucket_step = 64"}
SAMPLE_SEED = 5
SIZES = {"wide": (128, 64), "tall": (64, 128)}          # (width, height) in pixels


def sample_table(width: int, height: int) -> str:
    """One sample round at the end of the one-step run: one prompt, one seed, two steps, at the bucket's size;
    guidance 1 (no classifier-free guidance: one transformer call per step on every family)."""
    return (f'[sample]\nprompts = ["{CAPTIONS[0]}"]\nevery_steps = 1\nsteps = 2\nseeds = [{SAMPLE_SEED}]\n'
            f"guidance = 1.0\nwidth = {width}\nheight = {height}\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from lora_run_flux.tiny import build_tiny_flux
    from lora_run_flux2.tiny import build_tiny_flux2
    from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit
    from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image

    root = tmp_path_factory.mktemp("nonsquare-models")
    return {"flux.1-dev": build_tiny_flux(root / "flux"), "hunyuan-image-2.1": build_tiny_hunyuan_image(root / "hi"),
            "hunyuan-dit-1.2": build_tiny_hunyuan_dit(root / "dit"),
            "hunyuan-dit-1.1": build_tiny_hunyuan_dit(root / "dit11", version="1.1"),
            "flux.2-klein": build_tiny_flux2(root / "klein", "klein"), "flux.2-dev": build_tiny_flux2(root / "dev", "dev")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two wide (128×64) and two tall (64×128) images, named and captioned as the step tests' dataset."""
    from lora_run_devtools.testing import make_images

    out = {}
    for name, size in SIZES.items():
        folder = tmp_path_factory.mktemp(f"nonsquare-{name}") / "subject"
        make_images(folder, count=2, size=size)
        for i, caption in enumerate(CAPTIONS):
            (folder / f"img{i:03d}.txt").write_text(caption, encoding="utf-8")
        out[name] = folder
    return out


def run(family: str, model: Path, dataset: Path, size: str, tmp_path: Path, monkeypatch, train: str, native: str = ""):
    width, height = SIZES[size]
    seen = train_one_step(family, model, dataset, tmp_path, monkeypatch, train=train, native=native,
                          dataset_extra=sample_table(width, height), replace=BUCKETS)
    b, c, h, w = seen.objective["x0"].shape
    assert w / h == width / height != 1, "the step trained the non-square bucket, width along the last axis"
    return seen


def sample_written(tmp_path: Path, size: str) -> None:
    from PIL import Image

    images = sorted((tmp_path / "run" / "samples").rglob("*.png"))
    assert images, "no sample was written"
    with Image.open(images[-1]) as image:
        assert image.size == SIZES[size], f"a {SIZES[size]} sample came out {image.size}"


def seeded(shape):
    from lora_run_native.adapters.base import seeded_noise

    return seeded_noise([SAMPLE_SEED], shape)


def transposed(x):
    return x.transpose(-1, -2).contiguous()


# ---------------------------------------------------------------------------------------------------- FLUX.1
@pytest.mark.slow
@pytest.mark.parametrize("size", ["wide", "tall"])
def test_flux1_non_square(size, models, datasets, tmp_path, monkeypatch):
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    folder = models["flux.1-dev"]
    seen = run("flux.1-dev", folder, datasets[size], size, tmp_path, monkeypatch, 'timestep_sampling = "flux-shift"',
               "text_max_length = 16")
    pred, target, weights, _order = check_flux1(seen, folder, datasets[size], "flux-shift", "", {})
    check_loss(seen, pred, target, weights)
    b, c, h, w = seen.objective["x0"].shape
    noisy = seen.objective["noisy"]
    agrees("packed latents", seen.fed["hidden_states"], FluxPipeline._pack_latents(noisy, b, c, h, w),
           {"the latent transposed": FluxPipeline._pack_latents(transposed(noisy), b, c, w, h)})

    # the sampler's first call: the seeded noise at the sample size, packed; σ = 1 as training feeds σ
    first = seen.calls[1]
    width, height = SIZES[size]
    scale = 2 ** (len(AutoencoderKL.load_config(folder, subfolder="vae")["block_out_channels"]) - 1)
    lh, lw = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    noise = seeded((c, lh, lw))
    # (any permutation of the starting noise is noise: no planted mistake here; the ids below carry the layout)
    agrees("sampler: starting tokens", first["hidden_states"], FluxPipeline._pack_latents(noise, 1, c, lh, lw), {})
    ids = FluxPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", torch.float32)
    agrees("sampler: img_ids", first["img_ids"], ids, {"row/col swapped": ids[:, [0, 2, 1]]})
    agrees("sampler: timestep at σ = 1", first["timestep"], torch.ones(1), {"σ·1000": torch.full((1,), 1000.0)})
    agrees("sampler: guidance", first["guidance"], torch.ones(1), {"guidance·1000": torch.full((1,), 1000.0)})
    with torch.no_grad():
        embeds, pooled, _ = FluxPipeline.from_pretrained(folder).encode_prompt(
            prompt=[CAPTIONS[0]], prompt_2=None, device="cpu", max_sequence_length=16)
    agrees("sampler: T5 sequence", first["encoder_hidden_states"], embeds, {})
    agrees("sampler: CLIP pooled", first["pooled_projections"], pooled, {})
    sample_written(tmp_path, size)


# ---------------------------------------------------------------------------------------------------- FLUX.2
@pytest.mark.slow
@pytest.mark.parametrize("variant, size", [("klein", "wide"), ("dev", "tall")])
def test_flux2_non_square(variant, size, models, datasets, tmp_path, monkeypatch):
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    family = f"flux.2-{variant}"
    folder = models[family]
    length = FLUX2_TEXT_LENGTH[variant]
    seen = run(family, folder, datasets[size], size, tmp_path, monkeypatch, 'timestep_sampling = "flux-shift"',
               f"text_max_length = {length}")
    check_flux2(seen, folder, datasets[size], variant, "flux-shift", "", {})
    pipeline = Flux2KleinPipeline if variant == "klein" else Flux2Pipeline
    noisy = seen.objective["noisy"]
    agrees("tokens", seen.fed["hidden_states"], pipeline._pack_latents(noisy),
           {"the latent transposed": pipeline._pack_latents(transposed(noisy))})
    ids = pipeline._prepare_latent_ids(noisy)
    assert not torch.equal(seen.fed["img_ids"].long(), ids[..., [0, 2, 1, 3]].long()), "planted: row/col swapped"

    first = seen.calls[1]
    width, height = SIZES[size]
    b, c, h, w = noisy.shape
    noise = seeded((c, height // 16, width // 16))        # FLUX.2's latent: 8× VAE, 2×2-patchified
    agrees("sampler: starting tokens", first["hidden_states"], pipeline._pack_latents(noise), {})
    ids = pipeline._prepare_latent_ids(noise)
    assert torch.equal(first["img_ids"].long(), ids.long())
    assert not torch.equal(first["img_ids"].long(), ids[..., [0, 2, 1, 3]].long()), "planted: row/col swapped"
    agrees("sampler: timestep at σ = 1", first["timestep"], torch.ones(1), {"σ·1000": torch.full((1,), 1000.0)})
    with torch.no_grad():
        embeds, _ = pipeline.from_pretrained(folder).encode_prompt([CAPTIONS[0]], device="cpu",
                                                                   max_sequence_length=length)
    agrees("sampler: text", first["encoder_hidden_states"], embeds, {})
    sample_written(tmp_path, size)


# ------------------------------------------------------------------------------------------- HunyuanImage-2.1
@pytest.mark.slow
def test_hunyuan_image_non_square(models, datasets, tmp_path, monkeypatch):
    import torch
    from diffusers import AutoencoderKLHunyuanImage, HunyuanImagePipeline

    folder = models["hunyuan-image-2.1"]
    size = "wide"
    seen = run("hunyuan-image-2.1", folder, datasets[size], size, tmp_path, monkeypatch,
               'timestep_sampling = "shift"\nshift = 5.0')
    check_hunyuan_image(seen, folder, datasets[size], "shift", {"shift": 5.0})
    noisy = seen.objective["noisy"]
    agrees("latents (unpacked)", seen.fed["hidden_states"], noisy, {"the latent transposed": transposed(noisy)})

    first = seen.calls[1]
    width, height = SIZES[size]
    factor = AutoencoderKLHunyuanImage.load_config(folder, subfolder="vae")["spatial_compression_ratio"]
    noise = seeded((noisy.shape[1], height // factor, width // factor))
    agrees("sampler: starting latent", first["hidden_states"], noise,
           {"noise drawn (width, height)": seeded((noisy.shape[1], width // factor, height // factor))})
    agrees("sampler: timestep at σ = 1", first["timestep"], torch.full((1,), 1000.0), {"σ": torch.ones(1)},
           atol=1e-3)
    with torch.no_grad():
        embeds, mask, embeds_2, mask_2 = HunyuanImagePipeline.from_pretrained(folder).encode_prompt(
            [CAPTIONS[0]], device="cpu", batch_size=1)
    agrees("sampler: Qwen sequence", first["encoder_hidden_states"], embeds, {})
    assert torch.equal(first["encoder_attention_mask"].long(), mask.long())
    agrees("sampler: ByT5", first["encoder_hidden_states_2"], embeds_2, {})
    sample_written(tmp_path, size)


# ------------------------------------------------------------------------------------------------ Hunyuan-DiT
def dit_rope(folder: Path, h: int, w: int):
    """The pipeline's rotary embedding for a latent of h × w (``HunyuanDiTPipeline.__call__``)."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    config = HunyuanDiT2DModel.load_config(folder, subfolder="transformer")
    patch = config["patch_size"]
    grid = (h // patch, w // patch)
    return get_2d_rotary_pos_embed(config["attention_head_dim"], get_resize_crop_region_for_grid(grid, 512 // 8 // patch),
                                   grid, output_type="pt")


def first_dit_step(folder: Path, steps: int = 2):
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps[0].to(torch.float32).view(1)


@pytest.mark.slow
@pytest.mark.parametrize("version, size", [("1.2", "tall"), ("1.1", "wide")])
def test_hunyuan_dit_non_square(version, size, models, datasets, tmp_path, monkeypatch):
    """v1.2: the whole step against the reference and the rotary grid (h/2, w/2) of the bucket; v1.1 adds the image
    size conditioning, (height, width) of the bucket in pixels as original and target size, crop (0, 0), style 0 —
    what ``HunyuanDiTPipeline`` builds from ``original_size``/``target_size`` (both (height, width))."""
    import torch

    folder = models[f"hunyuan-dit-{version}"]
    seen = run("hunyuan-dit-1.2", folder, datasets[size], size, tmp_path, monkeypatch, 'timestep_sampling = "uniform"')
    width, height = SIZES[size]
    if version == "1.2":
        check_hunyuan_dit(seen, folder, datasets[size], "uniform", "")
        assert seen.fed["image_meta_size"] is None and seen.fed["style"] is None
    else:
        meta = torch.tensor([[height, width, height, width, 0, 0]] * 2, dtype=torch.float32)
        agrees("image_meta_size", seen.fed["image_meta_size"], meta,
               {"(width, height)": meta[:, [1, 0, 3, 2, 4, 5]]})
        assert seen.fed["style"].tolist() == [0, 0]
    b, c, h, w = seen.objective["x0"].shape
    rope = dit_rope(folder, h, w)
    swapped = dit_rope(folder, w, h)
    for i in range(2):
        agrees("rotary embedding", seen.fed["image_rotary_emb"][i], rope[i],
               {"grid (w, h)": swapped[i]})

    first = seen.calls[1]
    noise = seeded((c, height // 8, width // 8))
    agrees("sampler: starting latent", first["hidden_states"], noise,
           {"noise drawn (width, height)": seeded((c, width // 8, height // 8))})
    agrees("sampler: timestep", first["timestep"], first_dit_step(folder), {"t/1000": first_dit_step(folder) / 1000})
    for i in range(2):
        agrees("sampler: rotary embedding", first["image_rotary_emb"][i], rope[i], {"grid (w, h)": swapped[i]})
    if version == "1.1":
        meta = torch.tensor([[height, width, height, width, 0, 0]], dtype=torch.float32)
        agrees("sampler: image_meta_size", first["image_meta_size"], meta,
               {"(width, height)": meta[:, [1, 0, 3, 2, 4, 5]]})
    sample_written(tmp_path, size)
