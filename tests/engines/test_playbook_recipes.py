"""The playbook's two FLUX.1 profiles (§4.1 fast, §4.2 high-fidelity) as the shipped recipes give them, through every
backend, value by value: sd-scripts' files against §4.1's CLI script and §4.2's excerpt (as its FLUX trainer spells
them: `flux_train_network.py` + `networks.lora_flux`, not the SD trainer the script names), diffusion-pipe's files
against the same values, every key checked against the engines' own option lists in shared/tools-data, and the
native backend's resolved values. What an engine cannot express is refused naming its key, and exactly those keys.
Every comparison has a planted mistake it must catch."""
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
from lora_run_devtools.testing import MODEL_FILES, SLOT_FILES, header_only_weights, make_images
from lora_run_rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
TOOLS = REPO.parent / "shared" / "tools-data"
FAST, HIFI = RECIPES / "flux" / "identity-fast.toml", RECIPES / "flux" / "identity-hifi.toml"
FLUX_FILES = {"transformer": "flux1-dev.safetensors", "clip_l": "clip_l.safetensors",
              "t5xxl": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
MISSING = object()


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    """A local FLUX.1 diffusers folder (tiny, random): diffusion-pipe and the native plan need one."""
    from lora_run_devtools.testing import build_tiny

    return build_tiny("flux.1-dev", tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """1024² photos of the subject (trigger in every caption), generic regularisation photos, dummy single files."""
    root = tmp_path_factory.mktemp("playbook")
    make_images(root / "subject", count=4, size=(1024, 1024))
    make_images(root / "reg", count=2, size=(1024, 1024), trigger="", prefix="reg")
    for key, name in FLUX_FILES.items():       # the released files' headers (their kinds are checked), no weights
        header_only_weights(root / "models" / name, MODEL_FILES[SLOT_FILES["flux.1-dev"][key]])
    return {"root": root, "subject": root / "subject", "reg": root / "reg", "models": root / "models"}


def recipe_sets(data: dict[str, Path], recipe: Path, backend: str, *extra: str) -> list[str]:
    sets = [f'backend="{backend}"', f'dataset.path="{data["subject"]}"', "model.offline=true"]
    if recipe == HIFI:
        sets.append(f'dataset.regularization=[{{path="{data["reg"]}", default_caption="a person"}}]')
    if backend == "kohya":
        sets.append("model.files={" + ", ".join(f'{k}="{data["models"] / v}"' for k, v in FLUX_FILES.items()) + "}")
    return [*sets, *extra]


def refused_keys(recipe: Path, sets: list[str], plugins, unsets: tuple[str, ...] = ()) -> set[str]:
    """The recipe keys a `check` refuses (each problem names one), or an empty set."""
    try:
        validate(load_recipe(recipe, sets, list(unsets)), plugins)
    except RecipeError as exc:
        keys = set()
        for problem in exc.problems:
            found = re.match(r"^.+?: \[([a-z0-9_.\-]+)\] ", problem)
            assert found, f"a refusal that names no recipe key: {problem}"
            keys.add(found[1])
        return keys
    return set()


def planned(recipe: Path, sets: list[str], plugins, run: Path, unsets: tuple[str, ...] = ()) -> Any:
    prepared = validate(load_recipe(recipe, sets, list(unsets)), plugins)
    return make_backend(prepared, plugins, run_dir=RunDir(run)).plan()


def wrong(value: Any) -> Any:
    """A planted mistake of the same type as ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 10 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    return [*value, "x"]


def mismatches(actual: dict, wanted: dict, absent: tuple[str, ...] = ()) -> list[str]:
    """Each wanted value the generated table does not hold with its exact type (sd-scripts and diffusion-pipe take
    TOML values as they are: `32` is not `32.0`), and each key that must not be there."""
    out = [f"{k} = {actual.get(k, '<missing>')!r}, the playbook's is {v!r}" for k, v in wanted.items()
           if type(actual.get(k, MISSING)) is not type(v) or actual.get(k) != v]
    return out + [f"{k} is set ({actual[k]!r})" for k in absent if k in actual]


# ------------------------------------------------------------------------------------------------ kohya
#: playbook §4.1's CLI script flag by flag, as sd-scripts' FLUX trainer takes it (sd-scripts research notes §3: the
#: script's train_network.py is the SD trainer and networks.lora builds no LoRA module on the FLUX transformer)
FAST_KOHYA = {
    "network_module": "networks.lora_flux", "network_dim": 32, "network_alpha": 32.0,
    "learning_rate": 1e-4,              # --unet_lr=1e-4 (sd-scripts' unet_lr falls back to learning_rate)
    "network_train_unet_only": True,    # --text_encoder_lr=0: no text-encoder LoRA (§5: a unique trigger)
    "optimizer_type": "Adafactor", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100,
    "mixed_precision": "bf16", "fp8_base": True, "gradient_checkpointing": True, "seed": 42,
    "max_train_steps": 1500,            # "Steps: 1500" (the script's --max_train_epochs=100 says otherwise)
    "guidance_scale": 1.0, "model_prediction_type": "raw",     # the FLUX trainer's own defaults are wrong for dev
}
#: §4.2's excerpt: rank 64/64, cosine after 500 warmup steps, 2000–3000 steps; "Loss: SNR / Huber": min_snr_gamma is
#: a no-op for FLUX in sd-scripts, so the Huber loss, with the schedule that works for flow models (its default `snr`
#: raises for FLUX); prior images in their own subset with the prior loss weight
HIFI_KOHYA = {**FAST_KOHYA, "network_dim": 64, "network_alpha": 64.0, "lr_scheduler": "cosine", "lr_warmup_steps": 500,
              "max_train_steps": 2500, "loss_type": "huber", "huber_c": 0.1, "huber_schedule": "constant",
              "prior_loss_weight": 1.0}
#: what must not be written: epochs (steps are the playbook's), min/max_bucket_reso's silencer, and the no-ops
KOHYA_ABSENT = ("max_train_epochs", "bucket_no_upscale", "min_snr_gamma", "noise_offset", "text_encoder_lr",
                "network_dropout", "network_args")
FAST_BUCKETS = {"resolution": 512, "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 768,
                "caption_extension": ".txt"}
HIFI_BUCKETS = {**FAST_BUCKETS, "resolution": 768, "min_bucket_reso": 384, "max_bucket_reso": 1024}
#: the values a kohya `check` refuses, each a no-op or another thing in sd-scripts' FLUX trainer
KOHYA_REFUSED = {FAST: {"train.noise_offset"}, HIFI: {"train.noise_offset", "lora.dropout"}}


def sd_scripts_options(script: str) -> set[str]:
    """The options of an sd-scripts trainer: shared/tools-data's list, or without it lora-run's copy (equal to it:
    tests/kohya/test_spec.py)."""
    if not TOOLS.is_dir():
        from lora_run_kohya import spec

        return set(spec.options(f"{script}.py"))
    return {o["dest"] for o in json.loads((TOOLS / "sd-scripts" / f"{script}_args.json").read_text("utf-8"))}


def sd_scripts_dataset_keys() -> dict[str, set[str]]:
    if not TOOLS.is_dir():
        from lora_run_kohya import spec

        return {k: set(spec.load()["dataset"][k]) for k in ("general", "datasets", "subsets")}
    schema = json.loads((TOOLS / "sd-scripts" / "dataset_config_keys.json").read_text("utf-8"))["default"]
    return {"general": set(schema["general"]), "datasets": set(schema["datasets_dreambooth"]),
            "subsets": set(schema["subsets_dreambooth"])}


def kohya_unknown(config: dict, dataset: dict) -> list[str]:
    """Keys of the generated files that sd-scripts' FLUX trainer (its parser, its dataset schema) does not have."""
    options, keys = sd_scripts_options("flux_train_network"), sd_scripts_dataset_keys()
    out = [f"--{k}" for table in config.values() for k in table if k not in options]
    out += [f"[general] {k}" for k in dataset.get("general", {}) if k not in keys["general"]]
    for d in dataset.get("datasets", []):
        out += [f"[[datasets]] {k}" for k in d if k != "subsets" and k not in keys["datasets"]]
        out += [f"[[datasets.subsets]] {k}" for s in d.get("subsets", []) for k in s if k not in keys["subsets"]]
    return out


@pytest.mark.parametrize("recipe, wanted, buckets",
                         [(FAST, FAST_KOHYA, FAST_BUCKETS), (HIFI, HIFI_KOHYA, HIFI_BUCKETS)], ids=["fast", "hifi"])
def test_the_profile_through_kohya_is_the_playbooks_sd_scripts_run(recipe, wanted, buckets, data, plugins, tmp_path):
    sets = recipe_sets(data, recipe, "kohya")
    assert refused_keys(recipe, sets, plugins) == KOHYA_REFUSED[recipe]
    plan = planned(recipe, sets, plugins, tmp_path / "run", tuple(KOHYA_REFUSED[recipe]))
    config = tomllib.loads(plan.files["kohya/config.toml"])
    dataset = tomllib.loads(plan.files["kohya/dataset.toml"])
    flat = {k: v for table in config.values() for k, v in table.items()}
    argv = plan.commands[0]
    assert argv[argv.index("--config_file") - 1].endswith("/flux_train_network.py")
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    assert mismatches(flat, wanted, KOHYA_ABSENT) == []
    assert {"relative_step=False", "scale_parameter=False"} <= set(flat["optimizer_args"])
    assert mismatches(dataset["general"], buckets, ("bucket_no_upscale",)) == []
    subsets = dataset["datasets"][0]["subsets"]
    assert [s["is_reg"] for s in subsets] == ([False, True] if recipe == HIFI else [False])
    assert len({s["image_dir"] for s in subsets}) == len(subsets)       # the priors in a subset of their own
    assert kohya_unknown(config, dataset) == []
    if TOOLS.is_dir():    # the FLUX options are the FLUX trainer's: the playbook's train_network.py has none of them
        flux_only = {"guidance_scale", "model_prediction_type", "clip_l", "t5xxl", "ae"}
        assert flux_only - sd_scripts_options("train_network") == flux_only

    # planted mistakes: every value, a key that must be absent, Adafactor's relative step, unknown keys
    for key, value in wanted.items():
        assert any(m.startswith(f"{key} ") for m in mismatches({**flat, key: wrong(value)}, wanted)), key
    assert mismatches({**flat, "network_alpha": 32}, {"network_alpha": 32.0}) != []      # an int where a float
    assert mismatches({**dataset["general"], "bucket_no_upscale": True}, buckets, ("bucket_no_upscale",)) != []
    assert mismatches({**flat, "max_train_epochs": 100}, wanted, KOHYA_ABSENT) != []
    assert mismatches({**flat, "min_snr_gamma": 5.0}, wanted, KOHYA_ABSENT) != []
    assert kohya_unknown({**config, "x": {"fp8_basee": True}}, dataset) == ["--fp8_basee"]
    assert kohya_unknown(config, {**dataset, "general": {**dataset["general"], "interpolation_type": "lanczos"}}) \
        == ["[general] interpolation_type"]


# ------------------------------------------------------------------------------------------------ diffusion-pipe
#: what a diffusion-pipe `check` refuses: no Adafactor (its pytorch_optimizer fallback is another optimizer), no
#: sampling, no noise offset; for §4.2 also no cosine over the run's steps and no pseudo-Huber
DPIPE_REFUSED = {FAST: {"optimizer.name", "sample.every_steps", "train.noise_offset"},
                 HIFI: {"optimizer.name", "sample.every_steps", "train.noise_offset", "scheduler.name", "train.loss"}}
#: the remedies the refusals name, so the rest of the profile can be compared
DPIPE_REMEDIES = {FAST: (("optimizer.name=\"adamw\"",), ("sample.every_steps", "train.noise_offset")),
                  HIFI: (("optimizer.name=\"adamw\"", "scheduler.name=\"constant_with_warmup\"", "train.loss=\"mse\""),
                         ("sample.every_steps", "train.noise_offset", "train.loss_options"))}
FAST_DPIPE = {"max_steps": 1500, "lr_scheduler": "constant", "warmup_steps": 100, "activation_checkpointing": True,
              "gradient_clipping": 1.0, "model.type": "flux", "model.dtype": "bfloat16",
              "model.transformer_dtype": "float8", "model.guidance": 1.0,
              "model.timestep_sample_method": "logit_normal", "model.sigmoid_scale": 1.0, "adapter.type": "lora", "adapter.rank": 32, "optimizer.lr": 1e-4,
              "save_dtype": "bfloat16"}
HIFI_DPIPE = {**FAST_DPIPE, "max_steps": 2500, "warmup_steps": 500, "adapter.rank": 64, "adapter.dropout": 0.1}
DPIPE_ABSENT = ("adapter.alpha", "model.shift", "model.flux_shift", "huber_delta", "pseudo_huber_c")


def dotted(config: dict) -> dict:
    """A config's keys as `table.key` (tables one level deep, as diffusion-pipe's are)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def dpipe_unknown(config: dict, dataset: dict) -> list[str]:
    """Keys of the generated files diffusion-pipe does not read (shared/tools-data/diffusion-pipe/config_keys.json:
    a key noted as not read or forbidden counts as unknown; without it, lora-run's copy, equal to it:
    tests/diffusion_pipe/test_translate.py)."""
    if not TOOLS.is_dir():
        return list(dict.fromkeys(p.split(":")[0] for p in keydata_problems(config, dataset)))
    data = json.loads((TOOLS / "diffusion-pipe" / "config_keys.json").read_text("utf-8"))

    def read(table: dict) -> set[str]:
        return {k for k, v in table.items() if not k.startswith("_") and "NOT READ" not in v
                and not v.startswith("FORBIDDEN")}
    model = read(data["model.common"]) | read(data["model.flux"])
    out = [k for k, v in config.items() if not isinstance(v, dict) and k not in read(data["top_level"])]
    out += [f"model.{k}" for k in config.get("model", {}) if k not in model]
    out += [f"adapter.{k}" for k in config.get("adapter", {}) if k not in read(data["adapter"])]
    out += [f"{k}" for k in dataset if k not in read(data["dataset"])]
    out += [f"directory.{k}" for d in dataset.get("directory", []) for k in d
            if k not in read(data["directory"]) | set(data["directory"]["_overridable"])]
    return out


def keydata_problems(config: dict, dataset: dict) -> list[str]:
    """lora-run's own key check (keydata), as `key: why` lines, for the unknown-key comparison without tools-data."""
    from lora_run_diffusion_pipe import keydata

    return [p for p in keydata.config_problems(config) + keydata.dataset_problems(dataset)
            if "not a key" in p or "ignores" in p or "refuses" in p]


@pytest.mark.parametrize("recipe, wanted, res",
                         [(FAST, FAST_DPIPE, (512, 256, 768)), (HIFI, HIFI_DPIPE, (768, 384, 1024))], ids=["fast", "hifi"])
def test_the_profile_through_diffusion_pipe_says_what_the_recipe_says(recipe, wanted, res, data, plugins, tmp_path,
                                                                     tiny_flux):
    sets = recipe_sets(data, recipe, "diffusion-pipe", f'model.source="{tiny_flux}"')
    assert refused_keys(recipe, sets, plugins) == DPIPE_REFUSED[recipe]
    more, unsets = DPIPE_REMEDIES[recipe]
    plan = planned(recipe, [*sets, *more], plugins, tmp_path / "run", unsets)
    config = tomllib.loads(plan.files["diffusion-pipe/config.toml"])
    dataset = tomllib.loads(plan.files["diffusion-pipe/dataset.toml"])
    flat = dotted(config)
    assert mismatches(flat, wanted, DPIPE_ABSENT) == []
    assert dpipe_unknown(config, dataset) == []
    resolution, low, high = res
    sides = {side for pair in dataset["ar_buckets"] for side in pair}
    assert dataset["resolutions"] == [resolution] and dataset["enable_ar_bucket"] is True
    assert min(sides) == low and max(sides) == high                # the buckets span bucket_min to bucket_max
    assert dataset["skip_empty_caption"] is False
    assert [Path(d["path"]).name for d in dataset["directory"]] == (["subject", "reg-0"] if recipe == HIFI
                                                                    else ["subject"])

    for key, value in wanted.items():
        assert any(m.startswith(f"{key} ") for m in mismatches({**flat, key: wrong(value)}, wanted)), key
    assert mismatches({**flat, "adapter.alpha": 32.0}, wanted, DPIPE_ABSENT) != []
    assert dpipe_unknown({**config, "pseudo_huber_c": 0.1}, dataset) == ["pseudo_huber_c"]     # documented, not read
    assert dpipe_unknown({**config, "adapter": {**config["adapter"], "alpha": 32}}, dataset) == ["adapter.alpha"]
    assert dpipe_unknown(config, {**dataset, "bucket_min": 256}) == ["bucket_min"]


# ------------------------------------------------------------------------------------------------ native
#: the profiles' values in the native backend's own terms (what `lora-run plan` resolves and trains with)
FAST_NATIVE = {"lora.rank": 32, "lora.alpha": 32.0, "lora.dropout": 0.0, "optimizer.name": "adafactor",
               "optimizer.lr": 1e-4, "scheduler.name": "constant_with_warmup", "scheduler.warmup_steps": 100,
               "train.steps": 1500, "train.noise_offset": 0.05, "train.seed": 42, "train.mixed_precision": "bf16",
               "train.gradient_checkpointing": True, "train.loss": "mse",
               "text_encoder.train": False, "dataset.resolution": 512, "dataset.bucket_min": 256,
               "dataset.bucket_max": 768, "dataset.caption_extension": ".txt"}
HIFI_NATIVE = {**FAST_NATIVE, "lora.rank": 64, "lora.alpha": 64.0, "lora.dropout": 0.1, "scheduler.name": "cosine",
               "scheduler.warmup_steps": 500, "train.steps": 2500, "train.noise_offset": 0.1,
               "train.loss": "pseudo-huber", "dataset.resolution": 768, "dataset.bucket_min": 384,
               "dataset.bucket_max": 1024, "eval.width": 768, "eval.height": 768}
FLUX1 = {"model.base_precision": "fp8", "model.family": "flux.1-dev"}      # fp8 storage where memory needs it
#: unset (`lora-run plan --json` leaves out unset keys): Min-SNR-γ is for DDPM schedules, not flow matching
NATIVE_UNSET = ("train.min_snr_gamma",)


def set_but_unset(values: dict) -> list[str]:
    return [f"{k} = {values[k]!r}" for k in NATIVE_UNSET if values.get(k) is not None]


def resolved(recipe_json: dict) -> dict:
    return {f"{table}.{k}": v for table, values in recipe_json.items() if isinstance(values, dict)
            for k, v in values.items()}


@pytest.mark.parametrize("recipe, wanted", [(FAST, {**FAST_NATIVE, **FLUX1}), (HIFI, {**HIFI_NATIVE, **FLUX1})],
                         ids=["fast", "hifi"])
def test_the_native_plan_resolves_the_playbooks_values(recipe, wanted, data, tmp_path, tiny_flux, capsys, monkeypatch):
    from lora_run.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["plan", str(recipe), "--json", "--output-dir", str(tmp_path / "run")]
    for value in recipe_sets(data, recipe, "native", f'model.source="{tiny_flux}"'):
        args += ["--set", value]
    assert main(args) == 0, capsys.readouterr().err
    shown = json.loads(capsys.readouterr().out)
    values = resolved(shown["recipe"])
    assert mismatches(values, wanted) == []
    assert [(r["default_caption"], r["weight"]) for r in shown["recipe"]["dataset"]["regularization"]] == \
        ([("a person", 1.0)] if recipe == HIFI else [])
    notes = "\n".join(shown["plan"]["notes"])
    assert f"noise offset {wanted['train.noise_offset']}" in notes and "float8" in notes
    assert set_but_unset(values) == []
    for key, value in wanted.items():
        assert any(m.startswith(f"{key} ") for m in mismatches({**values, key: wrong(value)}, wanted)), key
    assert set_but_unset({**values, "train.min_snr_gamma": 5.0}) == ["train.min_snr_gamma = 5.0"]


@pytest.mark.parametrize("recipe, wanted", [(RECIPES / "flux2" / "identity-fast.toml", FAST_NATIVE),
                                            (RECIPES / "flux2" / "identity-hifi.toml", HIFI_NATIVE)],
                         ids=["fast", "hifi"])
def test_the_flux2_profiles_hold_the_same_values(recipe, wanted):
    values = resolved({name: (v if isinstance(v, dict) else {}) for name, v in
                       _as_tables(load_recipe(recipe).recipe).items()})
    assert mismatches(values, wanted) == [] and set_but_unset(values) == []


def _as_tables(recipe: Any) -> dict:
    import attrs

    return attrs.asdict(recipe, recurse=True)


# ------------------------------------------------------------------------------------------------ the recipe files
def inherited_sizes(child: Path) -> list[str]:
    """The image sizes and sampling steps a recipe that `extends` another inherits although it trains at another
    resolution: each `[sample]` / `[eval]` width, height and steps its parent sets (for the parent's training size) and
    it does not."""
    raw = tomllib.loads(child.read_text("utf-8"))
    if "extends" not in raw:
        return []
    parent = tomllib.loads((child.parent / raw["extends"]).read_text("utf-8"))
    if raw.get("dataset", {}).get("resolution", parent.get("dataset", {}).get("resolution")) == \
            parent.get("dataset", {}).get("resolution"):
        return []
    return [f"[{table}] {key} = {parent[table][key]} (from {raw['extends']})" for table in ("sample", "eval")
            for key in ("width", "height", "steps") if key in parent.get(table, {})
            and key not in raw.get(table, {}) and not (table == "sample" and key == "steps")]


SHIPPED = sorted(RECIPES.rglob("*.toml"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=[str(p.relative_to(RECIPES)) for p in SHIPPED])
def test_a_recipe_that_extends_another_does_not_inherit_its_image_sizes(recipe, tmp_path):
    assert inherited_sizes(recipe) == []
    if recipe == HIFI:        # the high-fidelity profile evaluates at its own 768², the protocol's size
        assert (load_recipe(recipe).recipe.eval.width, load_recipe(recipe).recipe.eval.height) == (768, 768)
    # planted mistake: the child without its own [eval] inherits the fast profile's 512² × 20 steps
    if recipe == HIFI:
        text = recipe.read_text("utf-8")
        start = text.index("[eval]")
        planted = tmp_path / recipe.name
        planted.write_text(text[:start] + text[text.index("[output]", start):], encoding="utf-8")
        (tmp_path / "identity-fast.toml").write_text(FAST.read_text("utf-8"), encoding="utf-8")
        assert inherited_sizes(planted) == ["[eval] width = 512 (from identity-fast.toml)",
                                            "[eval] height = 512 (from identity-fast.toml)",
                                            "[eval] steps = 20 (from identity-fast.toml)"]
        assert load_recipe(planted).recipe.eval.width == 512
