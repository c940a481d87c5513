"""The third-party example (docs/examples/lora-run-toy), pip-installed: its own model family (`toy-flux`) is
listed by `lora-run plugins`, refused by backends that do not train it, and trained end to end by the
built-in native backend with the example's own loss (`toy-abs`) — nothing in core or the built-ins names it."""
from __future__ import annotations

import json
import os

import pytest

from tests.core.test_plugins import toy_site  # noqa: F401 - session fixture reused

from .conftest import BASE_RECIPE, lora_tensors


def _env(site) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def toy_model(toy_site, tmp_path_factory):  # noqa: F811
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("toy-model") / "toy-flux"
    code = f"from lora_run_toy.family import build; build({str(folder)!r})"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **_env(toy_site)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder


def test_the_toy_family_is_listed_with_the_backend_that_trains_it(toy_site, run_cli):  # noqa: F811
    listing = run_cli("plugins", "--json", env=_env(toy_site))
    assert listing.returncode == 0, listing.stderr
    toy = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "toy")
    assert toy["families"] == ["toy-flux"] and toy["losses"] == ["toy-abs"]
    assert toy["trained_by"] == {"toy-flux": ["native"]}
    text = run_cli("plugins", env=_env(toy_site)).stdout
    assert "toy-flux is trained by: native" in text


@pytest.mark.slow
def test_native_trains_the_toy_family_with_the_toy_loss(toy_site, toy_model, dataset, tmp_path, run_cli):  # noqa: F811
    body = BASE_RECIPE.replace("{model}", str(toy_model)).replace("{dataset}", str(dataset))
    body = body.replace('family = "flux.1-dev"', 'family = "toy-flux"').replace("{length}", 'steps = 6\nloss = "toy-abs"')
    recipe = tmp_path / "toy-family.toml"
    recipe.write_text(body, encoding="utf-8")
    env = _env(toy_site)
    checked = run_cli("check", recipe, env=env)
    assert checked.returncode == 0, checked.stderr
    kohya = run_cli("check", recipe, "--set", 'backend.name="kohya"', env=env)
    assert kohya.returncode == 2 and 'backend "kohya" does not train toy-flux' in kohya.stderr
    assert "backends that do: native" in kohya.stderr and "Traceback" not in kohya.stderr
    run = tmp_path / "run"
    done = run_cli(recipe, "--output-dir", run, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["family"] == "toy-flux"
    assert any(p["name"] == "toy" for p in manifest["plugins"])
    assert 'loss = "toy-abs"' in (run / "recipe.toml").read_text()
    tensors = lora_tensors(run / "tiny.safetensors")
    assert tensors and all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k or "lora_B" in k)
    events = (run / "toy-events.txt").read_text().splitlines()  # the example's lifecycle hook saw every step
    assert len(events) == 6 and events[0].startswith("step 1 loss")
    # The toy loss was really used: the same first step with `mse` (same seed, same noise, same prediction)
    # gives mean(d²) >= mean(|d|)², and differs. A backend that fell back to mse would give equal values.
    mse_run = tmp_path / "run-mse"
    done = run_cli(recipe, "--output-dir", mse_run, "--set", 'train.loss="mse"', "--set", "train.steps=1", env=env,
                   timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    first_abs = float(events[0].split()[-1])
    first_mse = float((mse_run / "toy-events.txt").read_text().split()[-1])
    assert first_mse >= first_abs ** 2 and abs(first_mse - first_abs) > 1e-4, (first_abs, first_mse)
