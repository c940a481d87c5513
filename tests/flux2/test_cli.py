"""FLUX.2 as users meet it: listed by `lora-run plugins`, refused with the reason by the backends that cannot
train it, a FLUX.1 recipe switched by its [model] lines (plus what the capability check names), the shipped
recipes, clear errors for wrong sources."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import write_recipe

REPO = Path(__file__).resolve().parents[2]


def test_plugins_lists_both_families_trained_by_native(run_cli, flux2_env):
    listing = run_cli("plugins", "--json", env=flux2_env)
    assert listing.returncode == 0, listing.stderr
    plugin = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "flux.2")
    assert plugin["families"] == ["flux.2-dev", "flux.2-klein"]
    assert plugin["trained_by"] == {"flux.2-dev": ["native"], "flux.2-klein": ["native"]}
    assert "flux.2-klein is trained by: native" in run_cli("plugins", env=flux2_env).stdout


@pytest.mark.parametrize("backend, why", [("kohya", "sd-scripts has no FLUX.2 trainer"),
                                          ("diffusion-pipe", "does not translate it yet")])
def test_other_backends_refuse_with_the_reason(backend, why, tiny_klein, dataset, tmp_path, run_cli, flux2_env):
    recipe = write_recipe(tmp_path / "r.toml", "flux.2-klein", tiny_klein, dataset)
    done = run_cli("check", recipe, "--set", f'backend.name="{backend}"', env=flux2_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f'backend "{backend}" does not train flux.2-klein' in done.stderr and why in done.stderr
    assert "backends that do: native" in done.stderr


def _switched(family: str, model: Path, folder: Path) -> Path:
    """recipes/flux/identity-fast.toml with only the [model] lines changed."""
    text = (REPO / "recipes" / "flux" / "identity-fast.toml").read_text("utf-8")
    text = text.replace('family = "flux.1-dev"', f'family = "{family}"')
    text = re.sub(r'source = "black-forest-labs/FLUX\.1-dev"', f'source = "{model}"\noffline = true', text)
    path = folder / "switched.toml"
    path.write_text(text, encoding="utf-8")
    return path


SMALL = ["--set", "dataset.resolution=64", "--set", "dataset.bucket_min=64", "--set", "dataset.bucket_max=96",
         "--set", "dataset.min_images=1", "--set", "sample.width=64", "--set", "sample.height=64"]


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_a_flux1_recipe_switches_by_its_model_lines(variant, request, dataset, tmp_path, run_cli, flux2_env):
    recipe = _switched(f"flux.2-{variant}", request.getfixturevalue(f"tiny_{variant}"), tmp_path)
    plan = run_cli("plan", recipe, "--set", f"dataset.path={dataset}", *SMALL, env=flux2_env)
    assert plan.returncode == 0, plan.stderr
    assert f"flux.2-{variant} via diffusers" in plan.stdout and "rectified flow" in plan.stdout
    # what the capability check names when a FLUX.1-only setting is used
    te = run_cli("check", recipe, "--set", f"dataset.path={dataset}", *SMALL, "--set", "text_encoder.train=true",
                 env=flux2_env)
    assert te.returncode == 2 and "[text_encoder.train]" in te.stderr and "Traceback" not in te.stderr
    guided = run_cli("check", recipe, "--set", f"dataset.path={dataset}", *SMALL, "--set", "train.guidance=3.5",
                     env=flux2_env)
    assert (guided.returncode == 0) == (variant == "dev"), guided.stderr     # [klein] has no guidance input
    if variant == "klein":
        assert "[train.guidance]" in guided.stderr


@pytest.mark.parametrize("variant, hub", [("klein", "FLUX.2-klein-base-4B"), ("dev", "FLUX.2-dev")])
def test_family_line_alone_names_the_source_to_change(variant, hub, dataset, run_cli, flux2_env):
    recipe = REPO / "recipes" / "flux" / "identity-fast.toml"
    done = run_cli("check", recipe, "--set", f'model.family="flux.2-{variant}"', "--set", f"dataset.path={dataset}",
                   *SMALL, env=flux2_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (f"[model.source] black-forest-labs/FLUX.1-dev is a FLUX.1 pipeline, not a flux.2-{variant} model: set "
            f"it to black-forest-labs/{hub}") in done.stderr


@pytest.mark.slow
def test_switched_flux1_recipe_trains_klein(tiny_klein, dataset, tmp_path, run_cli, flux2_env):
    recipe = _switched("flux.2-klein", tiny_klein, tmp_path)
    out = tmp_path / "run"
    done = run_cli(recipe, "--set", f"dataset.path={dataset}", *SMALL, "--set", "train.steps=2",
                   "--set", "train.save_every_steps=1", "--set", "sample.steps=2", "--set", "eval.enabled=false",
                   "--set", "backend.native.progress_bar=false", "--set", "backend.native.tensorboard=false",
                   "--set", "backend.native.text_max_length=16", "--output-dir", out, env=flux2_env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "subject_fast.safetensors").is_file() and (out / "diffusers/subject_fast.safetensors").is_file()


@pytest.mark.parametrize("name", ["identity-fast.toml", "identity-hifi.toml"])
def test_shipped_flux2_recipes_check(name, tiny_klein, tmp_path, run_cli, flux2_env):
    from lora_run_devtools.testing import make_images

    dataset = tmp_path / "photos"
    make_images(dataset, 2, size=(512, 512))
    path = REPO / "recipes" / "flux2" / name
    text = path.read_text("utf-8")
    assert text.startswith("# FLUX.2 [klein] identity LoRA") and "Command:" in text and "What actually happens" in text
    sets = ["--set", f"model.source={tiny_klein}", "--set", "model.offline=true", "--set", f"dataset.path={dataset}",
            "--set", "dataset.min_images=1", "--unset", "dataset.regularization"]
    done = run_cli("check", path, *sets, env=flux2_env)
    assert done.returncode == 0, done.stdout + done.stderr
    plan = run_cli("plan", path, *sets, env=flux2_env)
    assert plan.returncode == 0 and "low-vram" in plan.stdout, plan.stderr


def test_wrong_sources_are_named(tiny_klein, tiny_dev, dataset, tmp_path, run_cli, flux2_env):
    # a [dev] folder named as [klein]
    recipe = write_recipe(tmp_path / "r.toml", "flux.2-klein", tiny_dev, dataset)
    done = run_cli("check", recipe, env=flux2_env)
    assert done.returncode == 2 and "[model.source]" in done.stderr and "Flux2Pipeline" in done.stderr
    # a distilled version for a base folder
    recipe = write_recipe(tmp_path / "v.toml", "flux.2-klein", tiny_klein, dataset)
    done = run_cli("check", recipe, "--set", 'model.version="4b"', env=flux2_env)
    assert done.returncode == 2 and "[model.version]" in done.stderr and "is_distilled = false" in done.stderr
    # a version on [dev]
    recipe = write_recipe(tmp_path / "d.toml", "flux.2-dev", tiny_dev, dataset)
    done = run_cli("check", recipe, "--set", 'model.version="4b"', env=flux2_env)
    assert done.returncode == 2 and "[model.version]" in done.stderr and "Traceback" not in done.stderr
    # a file slot of the other variant
    done = run_cli("check", recipe, "--set", f'model.files.qwen3="{tmp_path / "x.safetensors"}"', env=flux2_env)
    assert done.returncode == 2 and "qwen3" in done.stderr and "mistral" in done.stderr
