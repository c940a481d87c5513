"""FLUX.2 end to end on CPU through the CLI: tiny [klein] and [dev] folders built here train with
`lora-run <recipe>`, write every LoRA format, and the files load back (diffusers' own FLUX.2 loader included)."""
from __future__ import annotations

import json

import pytest

from .conftest import write_recipe


def _lora(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_cli_trains_tiny_flux2(variant, request, dataset, tmp_path, run_cli, flux2_env):
    model = request.getfixturevalue(f"tiny_{variant}")
    recipe = write_recipe(tmp_path / "r.toml", f"flux.2-{variant}", model, dataset, steps=3,
                          extra="\n[sample]\nprompts = [\"a photo of {trigger}\"]\nevery_steps = 3\nsteps = 2\n"
                                "width = 64\nheight = 64\nguidance = 2.0\n")
    checked = run_cli("check", recipe, env=flux2_env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    run = tmp_path / "run"
    done = run_cli(recipe, "--output-dir", run, env=flux2_env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["family"] == f"flux.2-{variant}"
    kohya, diffusers, comfy = _lora(run / "tiny.safetensors"), _lora(run / "diffusers/tiny.safetensors"), \
        _lora(run / "comfyui/tiny.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in kohya)
    assert any(k.startswith("lora_unet_double_stream_modulation_img_lin") for k in kohya)
    assert all(k.startswith("transformer.") for k in diffusers)
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert any(v.abs().sum() > 0 for k, v in diffusers.items() if ".lora_B." in k)     # it trained
    assert list((run / "samples").rglob("*.png"))


@pytest.mark.slow
def test_cli_trains_from_single_files(tiny_klein, dataset, tmp_path, run_cli, flux2_env):
    """ComfyUI users' files: BFL transformer, flux2-vae, one-file Qwen3; a folder with only the tokenizer and the
    text encoder's and VAE's small config files (what a hub id's cache gives) supplies the rest."""
    import shutil

    from lora_run_flux2.tiny import write_single_files

    files = write_single_files(tiny_klein, tmp_path / "files")
    configs = tmp_path / "configs"
    shutil.copytree(tiny_klein / "tokenizer", configs / "tokenizer")
    for sub in ("text_encoder", "vae"):
        (configs / sub).mkdir(parents=True)
        shutil.copy(tiny_klein / sub / "config.json", configs / sub / "config.json")
    extra = (f'\n[model.files]\ntransformer = "{files["transformer"]}"\nvae = "{files["vae"]}"\n'
             f'qwen3 = "{files["text_encoder"]}"\n')
    recipe = write_recipe(tmp_path / "r.toml", "flux.2-klein", configs, dataset, steps=2, extra=extra)
    run = tmp_path / "run"
    done = run_cli(recipe, "--output-dir", run, env=flux2_env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert (run / "diffusers/tiny.safetensors").is_file()
