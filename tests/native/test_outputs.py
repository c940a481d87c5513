"""Both LoRA formats load with diffusers' FluxPipeline.load_lora_weights and give the same images; the
generation API; kohya key names and metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import lora_tensors

SHARED_KEYS = Path(__file__).resolve().parents[3] / "shared" / "tools-data" / "sd-scripts" / "flux_lora_keys_rank16.json"

#: diffusers' own kohya converter assumes FLUX.1's full width for the fused single-block `linear1` (see
#: docs/native-backend.md), so the diffusers-loader comparison trains every other layer kind.
NOT_LINEAR1 = [r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
               r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
               r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear",
               r"single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"]


def _image(pipe, seed=3):
    import torch

    gen = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt="a photo of ohwx", num_inference_steps=2, guidance_scale=3.5, width=64, height=64,
               generator=gen, max_sequence_length=16, output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    """A LoRA (alpha ≠ rank) trained on the tiny model, in both formats."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_devtools.testing import make_images

    from .conftest import BASE_RECIPE

    tmp = tmp_path_factory.mktemp("outputs")
    make_images(tmp / "subject", count=3, size=(96, 80))
    body = BASE_RECIPE.replace("{model}", str(tiny_flux)).replace("{dataset}", str(tmp / "subject"))
    body = body.replace("{length}", "steps = 6")
    path = tmp / "recipe.toml"
    path.write_text(body, encoding="utf-8")
    modules = json.dumps(NOT_LINEAR1)
    ctx = execute(load_recipe(path, ["lora.alpha=8.0", "optimizer.lr=3e-2", f"lora.modules={modules}"]),
                  load_plugins(), output_dir=str(tmp / "run"), echo=lambda *_: None)
    full = execute(load_recipe(path, ["lora.alpha=2.0", "optimizer.lr=3e-2", "text_encoder.train=true"]),
                   load_plugins(), output_dir=str(tmp / "run-all-linear"), echo=lambda *_: None)
    return {"path": path, "partial": ctx.artifacts, "full": full.artifacts, "recipe": full.recipe}


def test_both_formats_give_the_same_images_through_diffusers_loader(trained, tiny_flux):
    from diffusers import FluxPipeline

    images = {}
    for name in ("base", "lora_kohya", "lora_diffusers"):
        pipe = FluxPipeline.from_pretrained(str(tiny_flux))
        pipe.set_progress_bar_config(disable=True)
        if name != "base":
            pipe.load_lora_weights(trained["partial"][name], adapter_name="identity")
            assert any("lora_A" in n for n, _ in pipe.transformer.named_parameters())
        images[name] = _image(pipe)
    same = np.abs(images["lora_kohya"] - images["lora_diffusers"]).max()
    effect = np.abs(images["lora_kohya"] - images["base"]).max()
    assert effect > 1e-3, "the LoRA changes the image"
    assert same < 1e-4 and same * 20 < effect, (same, effect)


def test_generate_images_api_both_formats_strengths_and_base(trained, tmp_path):
    from lora_run_native.generate import generate_images

    recipe = trained["recipe"]
    jobs = [{"name": f"s{s:g}", "prompt": "a photo of ohwx", "seed": 5, "strength": s, "steps": 2, "guidance": 3.5,
             "width": 64, "height": 64} for s in (0.0, 1.0)]
    kohya = generate_images(recipe, trained["full"]["lora_kohya"], jobs, tmp_path / "k")
    diffusers = generate_images(recipe, trained["full"]["lora_diffusers"], jobs, tmp_path / "d")
    base = generate_images(recipe, None, jobs[:1], tmp_path / "b")
    assert [j["name"] for j in kohya] == ["s0", "s1"] and all(Path(j["path"]).is_file() for j in kohya)
    from PIL import Image

    def px(job):
        return np.asarray(Image.open(job["path"]), dtype=np.int16)

    assert np.abs(px(kohya[1]) - px(diffusers[1])).max() <= 1, "kohya and diffusers files: same image"
    assert np.abs(px(kohya[0]) - px(base[0])).max() <= 1, "strength 0 is the base model"
    assert np.abs(px(kohya[1]) - px(base[0])).max() > 2, "strength 1 applies the LoRA"
    again = generate_images(recipe, trained["full"]["lora_kohya"], jobs[1:], tmp_path / "again")
    assert np.array_equal(px(again[0]), px(kohya[1])), "a seed gives the same image"


def test_kohya_keys_follow_sd_scripts_and_carry_metadata(trained):
    from lora_run_formats import load_lora

    tensors, meta = load_lora(trained["full"]["lora_kohya"])
    unet = {k for k in tensors if k.startswith("lora_unet_")}
    assert {k.split(".")[0] for k in unet} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin",
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
        "lora_unet_single_blocks_0_modulation_lin"}, "all-linear = sd-scripts' lora_flux module set"
    if SHARED_KEYS.is_file():
        reference = set(json.loads(SHARED_KEYS.read_text()))
        assert unet <= reference
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_") for k in tensors)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["ss_network_module"] == "networks.lora_flux"
    diffusers = lora_tensors(trained["full"]["lora_diffusers"])
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in diffusers)
