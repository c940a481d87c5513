"""Shared helpers of the parity tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from lora_run_devtools.testing import parse_recipe_text


def minimal_recipe(family: str, source: str | Path, *, train: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None,
                   native: dict[str, Any] | None = None):
    """The smallest recipe a family's adapter is built from: the family, its source (also the dataset path,
    which these tests never read), one step, and the given `[train]`, `[model]`, `[dataset]` and
    `[backend.native]` entries."""
    raw: dict[str, Any] = {"model": {"family": family, "source": str(source), **(model or {})},
                           "dataset": {"path": str(source), "trigger": "ohwx", **(dataset or {})},
                           "train": {"steps": 1, **(train or {})}}
    if native:
        raw["backend"] = {"native": native}
    return parse_recipe_text(tomli_w.dumps(raw))


def transformer_inputs(predict, model, noisy, t, text) -> tuple[dict[str, Any], Any]:
    """What `predict(model, noisy, t, text, 1.0)` feeds the transformer, by the names of its forward's
    parameters (passed by position or keyword; tensors cloned), and the prediction."""
    import inspect

    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        seen.update({k: (v.detach().clone() if hasattr(v, "detach") else v) for k, v in bound.items()})
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = predict(model, noisy, t, text, 1.0)
    finally:
        handle.remove()
    return seen, out


@pytest.fixture
def flux2_registered(tmp_path_factory):
    """The FLUX.2 family registered in this process (as tests/flux2/conftest.py provides it), for the tests that
    use it (`pytest.mark.usefixtures("flux2_registered")`)."""
    import sys

    from tests.flux2.conftest import _installed

    if not _installed():
        site = tmp_path_factory.mktemp("flux2-density-site")
        info = site / "lora_run_flux2_entry-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lora-run-flux2-entry\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text("[lora_run]\nflux.2 = lora_run_flux2\n")
        sys.path.insert(0, str(site))
    from lora_run_native import adapters

    adapters._registered.cache_clear()
    yield
    adapters._registered.cache_clear()
