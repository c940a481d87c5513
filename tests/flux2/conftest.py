"""Fixtures for the FLUX.2 family: the plugin's entry point, tiny [klein]/[dev] folders, a recipe writer.

The family is found through the `lora_run` entry-point group like any installed plugin. Until the checkout's
package metadata is regenerated (`pip install -e .` reads pyproject.toml's `flux.2 = "lora_run_flux2"`), the
entry point is provided by a dist-info folder written here; with the metadata installed nothing is added.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.native.conftest import BASE_RECIPE

#: the native tests' tiny-model recipe, on a FLUX.2 family, writing every LoRA format
RECIPE = BASE_RECIPE.replace('family = "flux.1-dev"', 'family = "{family}"').replace(
    'save_precision = "fp32"', 'save_precision = "fp32"\nformats = ["kohya", "diffusers", "comfyui"]')


def _installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "flux.2" for ep in entry_points(group="lora_run"))


@pytest.fixture(scope="session")
def flux2_site(tmp_path_factory) -> Path | None:
    """A folder to put on the path that declares the `flux.2` entry point (None when it is installed)."""
    if _installed():
        return None
    site = tmp_path_factory.mktemp("flux2-site")
    info = site / "lora_run_flux2_entry-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lora-run-flux2-entry\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lora_run]\nflux.2 = lora_run_flux2\n")
    return site


@pytest.fixture(scope="session")
def flux2_env(flux2_site) -> dict:
    """Environment for `lora-run` subprocesses that see the family."""
    if flux2_site is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(flux2_site), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def flux2_registered(flux2_site):
    """The family in this process's registry too (adapters are looked up through it)."""
    if flux2_site is not None and str(flux2_site) not in sys.path:
        sys.path.insert(0, str(flux2_site))
    from lora_run_native import adapters

    adapters._registered.cache_clear()
    yield


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> Path:
    from lora_run_flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("tiny") / "klein", "klein")


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory) -> Path:
    from lora_run_flux2.tiny import build_tiny_flux2

    return build_tiny_flux2(tmp_path_factory.mktemp("tiny") / "dev", "dev")


@pytest.fixture
def dataset(tmp_path) -> Path:
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "subject"
    make_images(folder, 2, size=(64, 64))
    return folder


def write_recipe(path: Path, family: str, model: Path, dataset: Path, steps: int = 2, extra: str = "") -> Path:
    body = RECIPE.replace("{family}", family).replace("{model}", str(model)).replace("{dataset}", str(dataset))
    path.write_text(body.replace("{length}", f"steps = {steps}") + extra, encoding="utf-8")
    return path
