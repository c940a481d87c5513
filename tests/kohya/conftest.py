"""Fixtures for the kohya backend: a fake sd-scripts checkout (a real git repo with a stand-in trainer) and
recipes with dummy single-file model checkpoints (the released files' headers, no weights)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_run.hookspecs import hookimpl
from lora_run_devtools.testing import MODEL_FILES, SLOT_FILES, header_only_weights
from lora_run_kohya import spec

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "fake_sd_scripts" / "train_network_standin.py"
#: the real sd-scripts' output, which the stand-in prints (see the README there)
RECORDED = HERE / "fixtures" / "sd-scripts-48d368f"

TYPES = {"str": "str", "Path": "str", "int": "int", "float": "float", "int_or_float": "int_or_float"}


def generated_train_util(drop: tuple[str, ...] = ()) -> str:
    """A `library/train_util.py` declaring sd-scripts' options per trainer with real argparse calls."""
    lines = ['"""Generated for tests: the options sd-scripts declares (from lora_run_kohya/data)."""',
             "", "", "def int_or_float(value):", "    try:", "        return int(value)",
             "    except ValueError:", "        return float(value)", "", "", "def add_arguments(parser, script):",
             '    parser.add_argument("--config_file", type=str, default=None)']
    for script in ("flux_train_network.py", "hunyuan_image_train_network.py"):
        lines.append(f"    if script == {script!r}:")
        for dest, s in spec.options(script).items():
            if dest in drop or dest == "config_file":
                continue
            args = [repr(f"--{dest}")]
            if s.get("action") == "StoreTrue":
                args.append('action="store_true"')
            else:
                args.append(f"type={TYPES[s['type']]}")
                if s.get("nargs"):
                    args.append(f"nargs={s['nargs']!r}")
                if s.get("choices"):
                    args.append(f"choices={s['choices']!r}")
                if "default" in s:
                    args.append(f"default={s['default']!r}")
            lines.append(f"        parser.add_argument({', '.join(args)})")
    return "\n".join(lines) + "\n"


def make_checkout(root: Path, *, drop: tuple[str, ...] = (), scripts=("flux_train_network.py",
                                                                        "hunyuan_image_train_network.py"),
                  git: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "library").mkdir(exist_ok=True)
    (root / "networks").mkdir(exist_ok=True)
    for script in scripts:
        shutil.copy(STANDIN, root / script)
    (root / "lora_run_recorded").mkdir(exist_ok=True)
    for name in ("flux_resume.log", "flux_train.log", "hunyuan_train.log"):
        shutil.copy(RECORDED / name, root / "lora_run_recorded" / name)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(generated_train_util(drop))
    (root / "train_network.py").write_text("# the generic trainer (not used by the stand-in)\n")
    for module in ("lora_flux", "lora_hunyuan_image"):
        (root / "networks" / f"{module}.py").write_text(f"# {module} marker\n")
    if git:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True)  # noqa: E731
        run("init", "-q")
        run("-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
        run("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "fake sd-scripts")
    return root


@pytest.fixture
def fake_checkout(tmp_path: Path) -> Path:
    return make_checkout(tmp_path / "sd-scripts")


def model_files(folder: Path, family: str = "flux.1-dev") -> dict[str, str]:
    names = {"flux.1-dev": {"transformer": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors",
                            "t5xxl": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"},
             "hunyuan-image-2.1": {"transformer": "hunyuanimage2.1.safetensors", "vae": "vae.safetensors",
                                   "qwen": "qwen_2.5_vl_7b.safetensors", "byt5": "byt5.safetensors"}}[family]
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, name in names.items():
        # the released file's header, its data a hole (the backend checks each header and what file it is before
        # launch; nothing loads it)
        header_only_weights(folder / name, MODEL_FILES[SLOT_FILES[family][key]])
        out[key] = str(folder / name)
    return out


def recipe_text(dataset: Path, models: dict[str, str], extra: str = "", family: str = "flux.1-dev",
                sd_scripts: Path | None = None) -> str:
    files = "\n".join(f'{k} = "{v}"' for k, v in models.items())
    kohya = '\n[backend]\nname = "kohya"\n'
    if sd_scripts:
        kohya += f'[backend.kohya]\nsd_scripts = "{sd_scripts}"\nstall_minutes = 2.0\n'
    return f"""
[model]
family = "{family}"
[model.files]
{files}
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[lora]
targets = "{'attention+mlp' if family == 'flux.1-dev' else 'all-linear'}"
rank = 4
alpha = 2.0
[train]
steps = 6
save_every_steps = 2
keep_last = 2
timestep_sampling = "sigmoid"
[sample]
prompts = ["a photo of {{trigger}}"]
every_steps = 3
[output]
dir = "runs/{{name}}"
name = "ohwx"
{'formats = ["kohya"]' if family != 'flux.1-dev' else ''}
[eval]
enabled = false
{kohya}
{extra}
"""


@pytest.fixture
def kohya_recipe(tmp_path: Path, subject_dataset: Path):
    """kohya_recipe(extra="", family=..., sd_scripts=None) -> recipe path (dummy model files next to it)."""
    def write(extra: str = "", family: str = "flux.1-dev", sd_scripts: Path | None = None,
              name: str = "recipe.toml", replace: dict[str, str] | None = None) -> Path:
        models = model_files(tmp_path / "models", family)
        path = tmp_path / name
        text = recipe_text(subject_dataset, models, extra, family, sd_scripts)
        for old, new in (replace or {}).items():
            assert old in text, old
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
        return path
    return write


class HookRecorder:
    """Records the lifecycle hooks a backend calls."""

    def __init__(self):
        self.steps: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.samples: list[tuple[int, list[str]]] = []

    @hookimpl
    def step_finished(self, step, metrics):
        self.steps.append((step, dict(metrics)))

    @hookimpl
    def checkpoint_saved(self, step, path):
        self.checkpoints.append((step, str(path)))

    @hookimpl
    def samples_written(self, step, paths):
        self.samples.append((step, [str(p) for p in paths]))


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())
