"""Every shipped recipe, switched to each engine backend and to each family that backend trains, generates files whose
every option, key, value type and choice is checked here against the engines' own extracted data in shared/tools-data
(sd-scripts' argparse options per trainer and its voluptuous dataset schema; diffusion-pipe's config keys per model
type), not against lora-run's copy of it. A recipe value the backend refuses is set to a value it takes (or unset), so
each cell produces its files. Each validator has a planted mistake it must catch."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lora_run.errors import RecipeError
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import make_backend, validate
from lora_run_devtools.testing import make_images
from lora_run_rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO.parent / "shared" / "tools-data"
SHIPPED = sorted((REPO / "recipes").rglob("*.toml"))
FAMILIES = ("flux.1-dev", "hunyuan-image-2.1")
SLOTS = {"flux.1-dev": ("transformer", "clip_l", "t5xxl", "vae"), "hunyuan-image-2.1": ("transformer", "vae", "qwen", "byt5")}
SCRIPT = {"flux.1-dev": "flux_train_network", "hunyuan-image-2.1": "hunyuan_image_train_network"}
#: a value each backend takes for a recipe key it refuses (keys not here are unset)
TAKEN = {"optimizer.name": 'optimizer.name="adamw"', "scheduler.name": 'scheduler.name="constant_with_warmup"',
         "train.loss": 'train.loss="mse"', "lora.targets": 'lora.targets="all-linear"',
         "dataset.bucket_step": "dataset.bucket_step=64", "dataset.bucket_min": "dataset.bucket_min=256",
         "dataset.bucket_max": "dataset.bucket_max=1024"}
KEYED = re.compile(r"^.+?: \[([a-z0-9_.\-]+)\] ")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not TOOLS.is_dir(), reason="shared/tools-data not present")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    from lora_run_devtools.testing import build_tiny, header_only_files

    root = tmp_path_factory.mktemp("tools-data")
    make_images(root / "subject", count=4, size=(640, 640))
    make_images(root / "reg", count=2, size=(640, 640), trigger="", prefix="reg")
    files = header_only_files(root, SLOTS)
    return {"root": root, "files": files, "flux": build_tiny("flux.1-dev", root / "flux")}


def generated(world: dict, recipe: Path, backend: str, family: str, run: Path) -> tuple[dict, dict]:
    """The backend's two generated files for the cell (refused keys set to a taken value, or unset)."""
    sets = [f'backend.name="{backend}"', f'model.family="{family}"', f'dataset.path="{world["root"] / "subject"}"',
            "model.offline=true", "eval.enabled=false",
            f'model.source="{world["flux"]}"' if family == "flux.1-dev" else 'model.source="unused"']
    if backend == "kohya" or family != "flux.1-dev":      # diffusion-pipe loads FLUX.1 from the diffusers folder
        sets.append("model.files={" + ", ".join(f'{k}="{v}"' for k, v in world["files"][family].items()) + "}")
    if load_recipe(recipe).recipe.dataset.regularization:
        sets.append(f'dataset.regularization=[{{path="{world["root"] / "reg"}", default_caption="a person"}}]')
    unsets: list[str] = []
    plugins = load_plugins()
    problems: list[str] = []
    for _ in range(8):
        try:
            prepared = validate(load_recipe(recipe, sets, unsets), plugins)
            break
        except RecipeError as exc:
            problems = exc.problems
            keys = [m[1] for m in map(KEYED.match, problems) if m]
            assert len(keys) == len(problems), problems
            sets += [TAKEN[k] for k in keys if k in TAKEN and TAKEN[k] not in sets]
            unsets += [k for k in keys if k not in TAKEN and k not in unsets]
    else:
        pytest.fail(f"still refused: {problems}")
    plan = make_backend(prepared, plugins, run_dir=RunDir(run)).plan()
    folder = "kohya" if backend == "kohya" else "diffusion-pipe"
    return (tomllib.loads(plan.files[f"{folder}/config.toml"]), tomllib.loads(plan.files[f"{folder}/dataset.toml"]))


def value_ok(kind: str, value: Any) -> bool | None:
    """Whether ``value`` (as TOML read it) is of sd-scripts' ``kind``; None for a kind this check does not know."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"bool": isinstance(value, bool), "str": isinstance(value, str), "float": isinstance(value, float),
            "int": isinstance(value, int) and not isinstance(value, bool), "int_or_float": number,
            "float|int": number, "dict": isinstance(value, dict),
            "int|[int,int]": (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)),
            }.get(kind)


def sd_scripts_problems(script: str, config: dict, dataset: dict) -> list[str]:
    """Every option of the generated config.toml and key of dataset.toml that sd-scripts' trainer `script` would not
    take as it is (sd-scripts does not check config-file values itself; its dataset schema rejects extra keys)."""
    options = {o["dest"]: o for o in json.loads((TOOLS / "sd-scripts" / f"{script}_args.json").read_text("utf-8"))}
    schema = json.loads((TOOLS / "sd-scripts" / "dataset_config_keys.json").read_text("utf-8"))["default"]
    out = []
    for table in config.values():
        for key, value in table.items():
            option = options.get(key)
            if option is None:
                out.append(f"--{key}: not an option of {script}.py")
                continue
            kind = "bool" if option["action"] in ("StoreTrue", "StoreFalse") else option["type"]
            many = option["nargs"] in ("*", "+")
            if many and not isinstance(value, list):
                out.append(f"--{key}: takes a list, got {value!r}")
                continue
            for item in value if many else [value]:
                if not value_ok(kind, item):
                    out.append(f"--{key}: {kind} expected, got {item!r}")
                if option["choices"] and item not in option["choices"]:
                    out.append(f"--{key}: {item!r} not one of {option['choices']}")

    def table(values: dict, allowed: dict, where: str) -> None:
        for key, value in values.items():
            if key == "subsets" and where.startswith("[[datasets]]"):
                continue
            if key not in allowed:
                out.append(f"{where} {key}: extra keys not allowed")
            elif not value_ok(allowed[key]["type"], value):
                out.append(f"{where} {key}: {allowed[key]['type']} expected, got {value!r}")

    out += [f"top level {k}" for k in dataset if k not in schema["top_level_keys"]]
    table(dataset.get("general", {}), schema["general"], "[general]")
    for ds in dataset.get("datasets", []):
        table(ds, schema["datasets_dreambooth"], "[[datasets]]")
        for subset in ds.get("subsets", []):
            table(subset, schema["subsets_dreambooth"], "[[datasets.subsets]]")
            out += [f"[[datasets.subsets]] {k}: required" for k, v in schema["subsets_dreambooth"].items()
                    if v.get("required") and k not in subset]
    return out


def diffusion_pipe_problems(config: dict, dataset: dict) -> list[str]:
    """Every key of the generated files diffusion-pipe does not read for the config's model type (or forbids), and a
    model type or dtype it does not know."""
    data = json.loads((TOOLS / "diffusion-pipe" / "config_keys.json").read_text("utf-8"))

    def read(name: str) -> set[str]:
        return {k for k, v in data[name].items() if not k.startswith("_") and "NOT READ" not in v
                and not v.startswith("FORBIDDEN")}

    model = config.get("model", {})
    kind = model.get("type")
    out = [] if kind in data["model_types"] else [f"model.type {kind!r} unknown"]
    dtypes = {name.split(" ")[0] for name in data["dtype_names"]}
    out += [f"{where} {value!r} not a dtype" for where, value in (("model.dtype", model.get("dtype")),
            ("save_dtype", config.get("save_dtype")), ("model.transformer_dtype", model.get("transformer_dtype")))
            if value is not None and value not in dtypes]
    out += [k for k, v in config.items() if not isinstance(v, dict) and k not in read("top_level")]
    out += [f"model.{k}" for k in model if k != "type" and k not in data["model_keys_by_type_autogrep"].get(kind, [])]
    out += [f"adapter.{k}" for k in config.get("adapter", {}) if k not in read("adapter")]
    out += [f"dataset {k}" for k in dataset if k not in read("dataset")]
    out += [f"directory.{k}" for d in dataset.get("directory", []) for k in d
            if k not in read("directory") | set(data["directory"]["_overridable"])]
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", SHIPPED, ids=[str(p.relative_to(REPO / "recipes")) for p in SHIPPED])
def test_kohya_files_are_sd_scripts_own_options_and_schema(recipe, family, world, tmp_path):
    config, dataset = generated(world, recipe, "kohya", family, tmp_path / "run")
    assert sd_scripts_problems(SCRIPT[family], config, dataset) == []
    # planted mistakes: an int for a float, a string for a choice, a FLUX-only option, a doc-bug dataset key
    planted = {"training": {"network_alpha": 4, "timestep_sampling": "bogus", "guidance_scale": 1.0}}
    found = sd_scripts_problems("hunyuan_image_train_network", planted,
                                {**dataset, "general": {**dataset["general"], "interpolation_type": "lanczos"}})
    assert found == ["--network_alpha: float expected, got 4", "--timestep_sampling: 'bogus' not one of "
                     "['sigma', 'uniform', 'sigmoid', 'shift', 'flux_shift']",
                     "--guidance_scale: not an option of hunyuan_image_train_network.py",
                     "[general] interpolation_type: extra keys not allowed"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", SHIPPED, ids=[str(p.relative_to(REPO / "recipes")) for p in SHIPPED])
def test_diffusion_pipe_files_are_read_by_diffusion_pipe(recipe, family, world, tmp_path):
    config, dataset = generated(world, recipe, "diffusion-pipe", family, tmp_path / "run")
    assert diffusion_pipe_problems(config, dataset) == []
    # planted mistakes: a key Flux reads but HunyuanImage does not, alpha (forbidden), a dtype diffusion-pipe lacks
    planted = {**config, "model": {"type": "hunyuan_image", "dtype": "bf16", "diffusers_path": "/x"},
               "adapter": {**config["adapter"], "alpha": 4}}
    assert diffusion_pipe_problems(planted, dataset) == ["model.dtype 'bf16' not a dtype", "model.diffusers_path",
                                                         "adapter.alpha"]
