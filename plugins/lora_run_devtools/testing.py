"""Test helpers for lora-run and for plugin authors (a pytest plugin, loaded through the `pytest11` entry point).

Fixtures:
- ``subject_dataset``: a folder of small captioned images (distinct patterns, trigger ``ohwx``);
- ``write_recipe``: ``write_recipe(body, name="recipe.toml") -> Path`` in a temp folder, with a
  ``{dataset}`` placeholder for the subject folder;
- ``plugins_with``: ``plugins_with(obj, ...)`` loads the installed plugins plus test plugin objects.

Functions: ``make_images`` (the images behind ``subject_dataset``), ``build_tiny(family, folder)`` (a built-in
family's tiny random model), ``parse_recipe_text(text)`` (a recipe from TOML text, without a file).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest


def build_tiny(family: str, folder: str | Path) -> Path:
    """The tiny random model of a built-in family (its package's ``tiny`` builder) written to ``folder``: FLUX.1-dev,
    HunyuanImage-2.1, Hunyuan-DiT v1.2, FLUX.2 [klein] or [dev]."""
    if family == "flux.1-dev":
        from lora_run_flux.tiny import build_tiny_flux
        return build_tiny_flux(folder)
    if family == "hunyuan-image-2.1":
        from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image
        return build_tiny_hunyuan_image(folder)
    if family == "hunyuan-dit-1.2":
        from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit
        return build_tiny_hunyuan_dit(folder)
    if family in ("flux.2-klein", "flux.2-dev"):
        from lora_run_flux2.tiny import build_tiny_flux2
        return build_tiny_flux2(folder, family.removeprefix("flux.2-"))
    raise ValueError(f"no tiny builder for family {family!r}")


def parse_recipe_text(text: str, name: str = "recipe.toml", base: Path | None = None, plugins: Any = None) -> Any:
    """Structure a recipe from TOML text with the tables of ``plugins`` (default: the installed plugins'); paths
    are relative to ``base`` (default: the current folder). Raises ``RecipeError`` naming ``name``."""
    from lora_run.errors import RecipeError
    from lora_run.plugins import load_plugins
    from lora_run.recipe import Problems, resolve_paths, structure, tomllib

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{name}: not valid TOML: {exc}") from None
    recipe_class = (plugins or load_plugins()).recipe_class
    resolve_paths(raw, base or Path.cwd(), recipe_class)
    raw.pop("extends", None)
    problems = Problems(name)
    recipe = structure(raw, problems, recipe_class)
    problems.raise_if_any()
    return recipe


def header_only_files(root: Path, slots: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    """``{family: {slot: path}}``: for each family's ``[model.files]`` slots a ``.safetensors`` file under
    ``root/files/FAMILY/`` that holds only a header (no tensors), for recipes whose files are named but never loaded
    (config generation, `check` without the layout check)."""
    header = json.dumps({"__metadata__": {"note": "not really weights"}}).encode()
    files: dict[str, dict[str, str]] = {}
    for family, names in slots.items():
        files[family] = {}
        for slot in names:
            path = Path(root) / "files" / family / f"{slot}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(len(header).to_bytes(8, "little") + header)
            files[family][slot] = str(path)
    return files


def make_images(folder: Path, count: int = 4, size: tuple[int, int] = (320, 288), trigger: str = "ohwx",
                captions: bool = True, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Distinct synthetic RGB images (no near-duplicates) with `<trigger>, ...` captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        freq = 2 + i
        base = np.stack([np.sin(xx / w * freq * np.pi + c) * np.cos(yy / h * (i + 1) * np.pi) for c in range(3)], -1)
        noise = rng.normal(0, 0.15, size=(h, w, 3))
        pixels = ((base + noise) * 0.5 + 0.5).clip(0, 1) * 255
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(pixels.astype("uint8")).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"{trigger}, a photo number {i}" if trigger else f"a photo {i}",
                                                encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def subject_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "subject"
    make_images(folder, count=4)
    return folder


@pytest.fixture
def write_recipe(tmp_path: Path, subject_dataset: Path) -> Callable[..., Path]:
    def write(body: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(body.replace("{dataset}", str(subject_dataset)), encoding="utf-8")
        return path
    return write


@pytest.fixture
def plugins_with() -> Callable[..., Any]:
    from lora_run.plugins import load_plugins

    def load(*objects: Any) -> Any:
        return load_plugins(extra=objects)
    return load
