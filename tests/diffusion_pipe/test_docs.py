"""docs/backend-diffusion-pipe.md stays in step with the code."""
from __future__ import annotations

from pathlib import Path

import attrs

from lora_run_training.capabilities import FEATURES
from lora_run_diffusion_pipe import REASONS
from lora_run_diffusion_pipe.options import DiffusionPipeOptions

PAGE = Path(__file__).resolve().parents[2] / "docs" / "backend-diffusion-pipe.md"


def test_every_option_is_documented():
    text = PAGE.read_text("utf-8")
    table = text.split("## Options: `[backend.diffusion-pipe]`")[1].split("\n## ")[0]
    for field in attrs.fields(DiffusionPipeOptions):
        assert f"`{field.name}`" in table, f"option {field.name} missing from the options table"


def test_every_refused_feature_names_its_key_in_the_page():
    text = PAGE.read_text("utf-8")
    refused = text.split("## What is refused, and why")[1].split("\n## ")[0]
    keys = {f.name: ".".join(f.key) for f in FEATURES}
    keys.update({"loss:pseudo-huber": "train.loss"})
    keys.update({f: "train.timestep_sampling" for f in REASONS if f.startswith("timestep_sampling:")})
    for feature in REASONS:
        assert f"`{keys[feature]}" in refused, f"{feature} ({keys[feature]}) is not in the refusal table"


def test_the_complete_flux_recipe_checks_after_changing_the_marked_lines(run_cli, tmp_path, flux_folder, monkeypatch):
    """As the page says: only the lines marked `← yours` change, and no diffusion-pipe checkout is needed."""
    from lora_run_devtools.testing import make_images

    text = PAGE.read_text("utf-8")
    block = text.split("### A complete FLUX.1-dev recipe")[1].split("```toml\n", 1)[1].split("```", 1)[0]
    marked = [line for line in block.splitlines() if "← yours" in line]
    assert len(marked) == 2
    make_images(tmp_path / "data" / "subject", count=3, size=(800, 800))
    recipe = tmp_path / "dp.toml"
    recipe.write_text(block.replace('"/models/FLUX.1-dev"', f'"{flux_folder}"'))
    env = {"LORA_RUN_DIFFUSION_PIPE": "", "PATH": "/usr/bin:/bin"}
    out = run_cli("check", recipe, env=env)
    assert out.returncode == 0, out.stderr
    as_written = tmp_path / "as-written.toml"
    as_written.write_text(block)
    out = run_cli("check", as_written, env=env)
    assert out.returncode == 2 and "[model.source] folder not found: /models/FLUX.1-dev" in out.stderr
