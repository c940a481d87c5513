"""Fixtures for the native backend: one tiny FLUX model per session, small datasets, recipe writers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

BASE_RECIPE = """
[model]
family = "flux.1-dev"
source = "{model}"
offline = true

[dataset]
path = "{dataset}"
trigger = "ohwx"
resolution = 64
bucket_min = 64
bucket_max = 96
bucket_step = 16
min_images = 1

[lora]
rank = 4
alpha = 4.0
targets = "all-linear"

[optimizer]
name = "adamw"
lr = 1e-3

[scheduler]
name = "constant"

[train]
{length}
batch_size = 1
mixed_precision = "no"
gradient_checkpointing = false
seed = 7

[eval]
enabled = false

[output]
name = "tiny"
save_precision = "fp32"

[backend]
name = "native"

[backend.native]
text_max_length = 16
progress_bar = false
tensorboard = false
"""


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from lora_run_flux.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_single_files(tiny_flux, tmp_path_factory) -> dict:
    from lora_run_flux.tiny import write_single_files

    return write_single_files(tiny_flux, tmp_path_factory.mktemp("single"))


@pytest.fixture
def dataset(tmp_path) -> Path:
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "subject"
    make_images(folder, count=3, size=(96, 80))
    return folder


@pytest.fixture
def flux_recipe(tmp_path, tiny_flux, dataset):
    """``flux_recipe(extra_toml="", name="recipe.toml", **format_values) -> Path``: the base tiny recipe with
    extra TOML appended (later tables override by `--set`-like merging is not needed: append new tables or
    use `sets` when loading)."""
    def write(extra: str = "", name: str = "recipe.toml", model: Path | None = None, data: Path | None = None,
              length: str = "steps = 4") -> Path:
        body = BASE_RECIPE.replace("{model}", str(model or tiny_flux)).replace("{dataset}", str(data or dataset))
        body = body.replace("{length}", length)
        path = tmp_path / name
        path.write_text(body + "\n" + extra, encoding="utf-8")
        return path
    return write


@pytest.fixture
def run_recipe(tmp_path):
    """Run a recipe in-process through the real orchestrator: ``run_recipe(path, sets=(), extra_plugins=(),
    output=None, resume=False) -> RunContext``."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    def run(path: Path, sets=(), extra_plugins=(), output: Path | None = None, resume: bool = False,
            overwrite: bool = False):
        loaded = load_recipe(path, list(sets))
        out = output or (tmp_path / "run")
        return execute(loaded, load_plugins(extra=extra_plugins), output_dir=str(out), resume=resume,
                       overwrite=overwrite, echo=lambda *_: None)
    return run


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def env_for_subprocess() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def reachable_hub(monkeypatch):
    """HF_ENDPOINT pointed at a local server that answers every request with 404: a hub that is reachable
    (it has no models). Yields the endpoint; the hub probe's cached answers are cleared around the test."""
    import http.server
    import threading

    from lora_run_native.adapters import base

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    base._HUB_PROBES.clear()
    yield endpoint
    base._HUB_PROBES.clear()
    server.shutdown()
    server.server_close()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT pointed at a local port nobody listens on: connections are refused, as without network."""
    import socket

    from lora_run_native.adapters import base

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base._HUB_PROBES.clear()
    yield endpoint
    base._HUB_PROBES.clear()
