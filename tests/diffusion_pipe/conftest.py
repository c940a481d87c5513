"""Fixtures: a fake diffusion-pipe checkout (a real git repo whose train.py is fake_train.py) and a fake
`deepspeed` launcher, both real subprocesses; recipes that point at them."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lora_run_devtools.testing import MODEL_FILES, SLOT_FILES, header_only_weights

HERE = Path(__file__).resolve().parent
#: the real diffusion-pipe's GPU output, which the stand-ins print (see the README there)
RECORDED = HERE / "fixtures" / "diffusion-pipe-8f83dbf" / "gpu-h200-20261202"
#: the first real run to completion (2026-12-03): lora-run's console output and the run folders' files
RECORDED_RUN = HERE / "fixtures" / "diffusion-pipe-8f83dbf" / "gpu-h200-20261203"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


@pytest.fixture(scope="session")
def fake_checkout(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("diffusion-pipe")
    (repo / "train.py").write_text(f"RECORDED_DIR = {str(RECORDED)!r}\n" + (HERE / "fake_train.py").read_text("utf-8"),
                                   "utf-8")
    (repo / "README.md").write_text("fake diffusion-pipe for lora-run tests\n")
    for rel in ("submodules/ComfyUI/comfy/sd.py", "submodules/HunyuanVideo/hyvideo/__init__.py",
                "submodules/HunyuanImage-2.1/hyimage/models/hunyuan/__init__.py"):  # what the backend checks for
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("")
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    subprocess.run([*GIT, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", "fake"], check=True)
    return repo


@pytest.fixture(scope="session")
def fake_launcher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bin")
    launcher = folder / "deepspeed"
    launcher.write_text(f"#!{sys.executable}\nRECORDED_DIR = {str(RECORDED)!r}\n"
                        + (HERE / "fake_deepspeed.py").read_text("utf-8"), "utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


@pytest.fixture
def flux_folder(tmp_path) -> Path:
    folder = tmp_path / "FLUX.1-dev"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture
def hunyuan_files(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "comfy"
    folder.mkdir()
    files = {}
    for key, name in (("transformer", "hunyuanimage2.1.safetensors"), ("vae", "hunyuan_image_2.1_vae_fp16.safetensors"),
                      ("qwen", "qwen_2.5_vl_7b.safetensors"), ("byt5", "byt5_small_glyphxl_fp16.safetensors")):
        # the released file's header (model files are checked: complete, and of the slot's kind), never loaded
        files[key] = header_only_weights(folder / name, MODEL_FILES[SLOT_FILES["hunyuan-image-2.1"][key]])
    return files


FLUX_RECIPE = """\
# a FLUX recipe for the diffusion-pipe backend tests
[model]
family = "flux.1-dev"
source = "{flux}"

[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 1

[lora]
rank = 4
alpha = 4
targets = "all-linear"

[optimizer]
name = "adamw"

[scheduler]
warmup_steps = 2

[train]
steps = 6
save_every_steps = 2

[eval]
enabled = false

[output]
name = "subject"

[backend]
name = "diffusion-pipe"

[backend.diffusion-pipe]
path = "{checkout}"
deepspeed = "{launcher}"
"""


def hunyuan_recipe(files: dict[str, Path]) -> str:
    """FLUX_RECIPE turned into a HunyuanImage-2.1 recipe on the given ComfyUI files (32-pixel buckets)."""
    table = "\n".join(f'{key} = "{path}"' for key, path in files.items())
    return FLUX_RECIPE.replace('family = "flux.1-dev"\nsource = "{flux}"',
                               f'family = "hunyuan-image-2.1"\n\n[model.files]\n{table}') \
        .replace('min_images = 1', 'min_images = 1\nbucket_min = 256\nbucket_step = 64')


@pytest.fixture
def dp_recipe(write_recipe, fake_checkout, fake_launcher, flux_folder):
    """write(body=FLUX_RECIPE, **extra placeholders) -> recipe path pointing at the fake checkout/launcher."""
    def write(body: str = FLUX_RECIPE, name: str = "recipe.toml", **extra: str) -> Path:
        text = body.replace("{flux}", str(flux_folder)).replace("{checkout}", str(fake_checkout)) \
            .replace("{launcher}", str(fake_launcher))
        for key, value in extra.items():
            text = text.replace("{" + key + "}", str(value))
        return write_recipe(text, name)
    return write


@pytest.fixture(scope="session")
def flash_attn_site(tmp_path_factory) -> Path:
    """A folder with a stand-in flash-attn 2 (`flash_attn` with the two functions HunyuanImage-2.1 imports): the
    stand-in engine's environment has flash-attn, as a GPU user's HunyuanImage-2.1 environment must (the backend
    checks for it before launch)."""
    site = tmp_path_factory.mktemp("site")
    (site / "flash_attn").mkdir()
    (site / "flash_attn" / "__init__.py").write_text("def flash_attn_varlen_func(*args, **kwargs): ...\n\n\n"
                                                     "def flash_attn_varlen_qkvpacked_func(*args, **kwargs): ...\n")
    return site


@pytest.fixture(scope="session")
def flash_attn_4_site(tmp_path_factory) -> Path:
    """A folder with what flash-attn-4 alone installs: `flash_attn/cute/` and no `flash_attn/__init__.py`, which
    makes `flash_attn` a namespace package (the GPU machine's environment on 2026-12-03)."""
    site = tmp_path_factory.mktemp("site-fa4")
    (site / "flash_attn" / "cute").mkdir(parents=True)
    (site / "flash_attn" / "cute" / "__init__.py").write_text("")
    return site


@pytest.fixture(autouse=True)
def _engine_has_flash_attn(monkeypatch, flash_attn_site):
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(flash_attn_site) + (os.pathsep + old if old else ""))


@pytest.fixture
def fake_env(monkeypatch):
    """Set FAKE_DP_* variables for the fake train.py (inherited by the subprocesses)."""
    def setenv(**values: object) -> None:
        for key, value in values.items():
            monkeypatch.setenv(f"FAKE_DP_{key.upper()}", str(value))
    for key in [k for k in os.environ if k.startswith("FAKE_DP_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("LORA_RUN_DIFFUSION_PIPE", raising=False)
    return setenv
