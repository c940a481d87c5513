"""Recipe → sd-scripts files: the mapping of every feature, the refusals, and every shipped recipe."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import attrs
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lora_run.errors import RecipeError
from lora_run.plugins import load_plugins
from lora_run.recipe import LoadedRecipe, load_recipe
from lora_run_rundir import RunDir, output_path
from lora_run.run import make_backend, validate
from lora_run_kohya import spec

from .conftest import model_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def planned(path: Path, plugins, sets=()):
    loaded = load_recipe(path, sets)
    prepared = validate(loaded, plugins)
    run_dir = RunDir(output_path(prepared.recipe, None))
    plan = make_backend(prepared, plugins, run_dir=run_dir).plan()
    return plan, tomllib.loads(plan.files["kohya/config.toml"]), tomllib.loads(plan.files["kohya/dataset.toml"])


def flat(config: dict) -> dict:
    out = {}
    for table in config.values():
        out.update(table)
    return out


def refusal(path: Path, plugins, sets=()) -> str:
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(path, sets), plugins)
    return str(info.value)


def test_plan_writes_validated_files_and_the_exact_command(kohya_recipe, plugins, fake_checkout, monkeypatch):
    monkeypatch.setenv("LORA_RUN_SD_SCRIPTS", str(fake_checkout))
    path = kohya_recipe()
    plan, config, dataset = planned(path, plugins)
    run = path.parent / "runs" / "ohwx"
    assert set(plan.files) == {"kohya/config.toml", "kohya/dataset.toml", "kohya/sample_prompts.txt"}
    assert spec.check_config("flux_train_network.py", config) == []
    assert spec.check_dataset(dataset) == []
    assert plan.commands == [[sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process",
                              "1", "--mixed_precision", "bf16", "--num_processes", "1", "--num_machines", "1",
                              "--dynamo_backend", "no", f"{fake_checkout}/flux_train_network.py",
                              "--config_file", f"{run}/kohya/config.toml", "--dataset_config",
                              f"{run}/kohya/dataset.toml"]]
    f = flat(config)
    assert f["network_module"] == "networks.lora_flux" and f["network_train_unet_only"] is True
    assert f["guidance_scale"] == 1.0 and f["model_prediction_type"] == "raw"
    assert f["network_dim"] == 4 and f["network_alpha"] == 2.0
    assert f["network_args"] == ["img_mod_dim=0", "txt_mod_dim=0", "single_mod_dim=0"]
    assert f["pretrained_model_name_or_path"].endswith("flux1-dev.safetensors") and f["ae"].endswith("ae.safetensors")
    assert f["learning_rate"] == 1e-4 and f["max_train_steps"] == 6 and f["seed"] == 42
    assert f["save_every_n_steps"] == 2 and f["save_last_n_steps"] == 2 and f["save_state"] is True
    assert f["cache_text_encoder_outputs"] is True and f["cache_latents_to_disk"] is True
    assert f["output_dir"] == f"{run}/kohya/output" and f["output_name"] == "ohwx"
    general = dataset["general"]
    assert general["caption_extension"] == ".txt" and general["bucket_reso_steps"] == 64
    assert dataset["datasets"][0]["subsets"] == [{"image_dir": f"{run}/kohya/data/subject", "num_repeats": 1,
                                                  "is_reg": False}]
    assert plan.files["kohya/sample_prompts.txt"] == "a photo of ohwx --w 512 --h 512 --d 1 --s 20 --g 3.5\n"
    assert plan.steps == 6 and plan.details["sd_scripts"] == str(fake_checkout)


def test_plan_works_without_a_checkout(kohya_recipe, plugins, monkeypatch):
    monkeypatch.delenv("LORA_RUN_SD_SCRIPTS", raising=False)
    plan, _, _ = planned(kohya_recipe(), plugins)
    assert plan.commands[0][13] == "<sd-scripts>/flux_train_network.py"
    assert any("no sd-scripts checkout configured" in n for n in plan.notes)


@pytest.mark.parametrize("sets, expected", [
    (["train.timestep_sampling=\"uniform\""], {"timestep_sampling": "uniform"}),
    (["train.timestep_sampling=\"sigmoid\"", "train.sigmoid_scale=2.0"],
     {"timestep_sampling": "sigmoid", "sigmoid_scale": 2.0}),
    (["train.timestep_sampling=\"shift\"", "train.shift=3.1582"],
     {"timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0}),
    (["train.timestep_sampling=\"flux-shift\""], {"timestep_sampling": "flux_shift"}),
    # sd-scripts' "sigma" path indexes descending timesteps with sigmoid(N(m, s)) (σ ≈ 1 − u), the native
    # convention too: the mean passes through unchanged
    (["train.timestep_sampling=\"logit-normal\"", "train.logit_mean=0.5", "train.logit_std=1.2"],
     {"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 1.2,
      "discrete_flow_shift": 1.0}),
    (["train.loss=\"pseudo-huber\"", "train.loss_options={c = 0.2}"],
     {"loss_type": "huber", "huber_c": 0.2, "huber_schedule": "constant", "huber_scale": 1.0}),
    (["train.loss=\"mse\""], {"loss_type": "l2"}),
    (["scheduler.name=\"cosine\"", "scheduler.warmup_steps=10", "scheduler.min_lr_ratio=0.1"],
     {"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1, "lr_warmup_steps": 10}),
    (["scheduler.name=\"cosine\""], {"lr_scheduler": "cosine", "lr_warmup_steps": 0}),
    (["scheduler.name=\"linear\"", "scheduler.min_lr_ratio=0.25"],
     {"lr_scheduler": "polynomial", "lr_scheduler_power": 1.0, "lr_scheduler_args": ["lr_end=2.5e-05"]}),
    (["scheduler.name=\"linear\"", "scheduler.min_lr_ratio=1.0", "scheduler.warmup_steps=5"],
     {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 5}),
    (["scheduler.name=\"constant\""], {"lr_scheduler": "constant"}),
    (["optimizer.name=\"adamw\"", "optimizer.weight_decay=0.01", "optimizer.betas=[0.9, 0.99]"],
     {"optimizer_type": "AdamW", "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)", "eps=1e-08"]}),
    (["optimizer.name=\"adafactor\""], {"optimizer_type": "Adafactor", "optimizer_args": [
        "relative_step=False", "scale_parameter=False", "warmup_init=False", "weight_decay=0.0"]}),
    (["optimizer.name=\"prodigy\"", "optimizer.lr=1.0"], {"optimizer_type": "Prodigy", "learning_rate": 1.0}),
    (["optimizer.name=\"adamw8bit\""], {"optimizer_type": "AdamW8bit"}),
    (["model.base_precision=\"fp8\""], {"fp8_base": True}),
    (["lora.targets=\"all-linear\""], {"network_train_unet_only": True}),
    (["train.guidance=3.5"], {"guidance_scale": 3.5}),
    (["train.mixed_precision=\"no\"", "output.save_precision=\"fp32\""],
     {"mixed_precision": "no", "save_precision": "float"}),
    (["train.epochs=3", "train.steps=null"], {"max_train_epochs": 3}),
    (["train.save_every_steps=null", "train.save_every_epochs=2", "train.keep_last=3", "train.epochs=4",
      "train.steps=null"], {"save_every_n_epochs": 2, "save_last_n_epochs": 3, "save_last_n_epochs_state": 3}),
    (["train.keep_last=1"], {"save_last_n_steps": 0}),
    (["train.num_workers=2"], {"max_data_loader_n_workers": 2, "persistent_data_loader_workers": True}),
    (["train.gradient_accumulation=4", "train.gradient_checkpointing=false"],
     {"gradient_accumulation_steps": 4, "gradient_checkpointing": False}),
])
def test_feature_mapping(kohya_recipe, plugins, sets, expected):
    replace = {}
    if "train.steps=null" in sets:
        sets = [s for s in sets if s != "train.steps=null"]
        replace["steps = 6"] = ""
    if "train.save_every_steps=null" in sets:
        sets = [s for s in sets if s != "train.save_every_steps=null"]
        replace["save_every_steps = 2"] = ""
    _, config, dataset = planned(kohya_recipe(replace=replace), plugins, sets)
    f = flat(config)
    for key, value in expected.items():
        assert f.get(key) == value, key
    assert spec.check_config("flux_train_network.py", config) == []
    if any("lora.targets=\"all-linear\"" in s for s in sets):
        assert "network_args" not in f


def test_steps_from_epochs_count_images_and_regularisation(kohya_recipe, plugins, tmp_path):
    from lora_run_devtools.testing import make_images

    make_images(tmp_path / "reg", count=3, trigger="", prefix="reg")
    extra = f'[[dataset.regularization]]\npath = "{tmp_path / "reg"}"\nweight = 0.5\nrepeats = 2\n'
    plan, config, dataset = planned(kohya_recipe(extra, replace={"steps = 6": ""}), plugins,
                                    ["train.epochs=5", "train.batch_size=3", "dataset.repeats=2"])
    # 4 subject images × 2 repeats, regularisation balanced to the same count: 16 samples / batch 3 = 6 per epoch
    assert plan.steps == 5 * 6
    subsets = dataset["datasets"][0]["subsets"]
    assert subsets[1] == {"image_dir": str(tmp_path / "runs/ohwx/kohya/data/reg0"), "num_repeats": 2, "is_reg": True}
    assert flat(config)["prior_loss_weight"] == 0.5
    assert any("balances regularisation images" in n for n in plan.notes)


def test_text_encoder_training_and_caption_dropout(kohya_recipe, plugins):
    sets = ["text_encoder.train=true", "text_encoder.train_fraction=1.0", "text_encoder.lr_ratio=0.5",
            "model.base_precision=\"fp8\"", "dataset.caption_dropout=0.1"]
    _, config, dataset = planned(kohya_recipe(), plugins, sets)
    f = flat(config)
    assert "network_train_unet_only" not in f and f["text_encoder_lr"] == [5e-5]
    assert f["fp8_base_unet"] is True and "fp8_base" not in f       # CLIP-L stays in bf16 while it trains
    assert "cache_text_encoder_outputs" not in f                     # sd-scripts forbids it with either
    assert dataset["datasets"][0]["subsets"][0]["caption_dropout_rate"] == 0.1


def test_backend_options(kohya_recipe, plugins, tmp_path):
    extra = ('[backend.kohya]\nblocks_to_swap = 18\nnum_processes = 2\ntensorboard = true\n'
             'tokenizer_cache_dir = "/tok"\ncache_latents = false\npython = "py/bin/python"\n'
             'extra_args = { full_bf16 = true, lr_scheduler_num_cycles = 1 }\n')
    (tmp_path / "py" / "bin").mkdir(parents=True)
    (tmp_path / "py" / "bin" / "python").write_text("")
    plan, config, _ = planned(kohya_recipe(extra), plugins)
    f = flat(config)
    assert f["blocks_to_swap"] == 18 and f["log_with"] == "tensorboard" and f["tokenizer_cache_dir"] == "/tok"
    assert "cache_latents" not in f and f["full_bf16"] is True
    argv = plan.commands[0]
    assert argv[0] == str(tmp_path / "py/bin/python") and argv[argv.index("--num_processes") + 1] == "2"


def test_hunyuan_image(kohya_recipe, plugins):
    extra = "[sample]\nguidance = 4.0\n"
    path = kohya_recipe(family="hunyuan-image-2.1")
    plan, config, _ = planned(path, plugins, ["model.base_precision=\"fp8\"", "sample.guidance=4.0",
                                              "dataset.resolution=1024", "dataset.bucket_max=2048",
                                              "dataset.bucket_min=512", "dataset.bucket_step=64"])
    del extra
    f = flat(config)
    assert spec.check_config("hunyuan_image_train_network.py", config) == []
    assert f["network_module"] == "networks.lora_hunyuan_image" and f["network_train_unet_only"] is True
    assert f["fp8_scaled"] is True and "guidance_scale" not in f and "fp8_base" not in f
    assert f["text_encoder"].endswith("qwen_2.5_vl_7b.safetensors") and f["byt5"].endswith("byt5.safetensors")
    assert f["vae"].endswith("vae.safetensors") and "network_args" not in f    # all-linear: the network default
    _, config, _ = planned(path, plugins, ["lora.targets=\"attention+mlp\""])
    assert flat(config)["network_args"] == ["network_reg_dims=img_mod_lin=0,txt_mod_lin=0,modulation_lin=0"]
    assert plan.commands[0][13].endswith("/hunyuan_image_train_network.py")
    assert plan.files["kohya/sample_prompts.txt"].strip().endswith("--l 4")


@pytest.mark.parametrize("sets, key, words", [
    (["train.noise_offset=0.05"], "train.noise_offset", "plain randn noise"),
    # sd-scripts rounds a sample size down to a multiple of 16 without a word; the native backend refuses it
    (["sample.width=520"], "sample.width", "would sample at 512"),
    # sd-scripts asserts mixed precision with --fp8_base (FLUX); it passed check and stopped at start-up
    (["model.base_precision=\"fp8\"", "train.mixed_precision=\"no\""], "model.base_precision", "fp8_base requires"),
    (["train.min_snr_gamma=5.0"], "train.min_snr_gamma", "return the loss unchanged"),
    (["lora.targets=\"attention\""], "lora.targets", "linear1"),
    (["train.loss=\"huber\""], "train.loss", "pseudo-Huber"),
    (["train.loss=\"smooth-l1\""], "train.loss", "SmoothL1"),
    (["lora.dropout=0.1"], "lora.dropout", "down-projection's outputs"),
    (["train.timestep_weighting=\"cosmap\""], "train.timestep_weighting", "sigma_scaled"),
    (["lora.modules=[\"attn\"]"], "lora.modules", "targets preset"),
    (["text_encoder.train=true"], "text_encoder.train_fraction", "cannot stop the text-encoder LoRA early"),
    (["text_encoder.train=true", "text_encoder.train_fraction=1.0", "text_encoder.rank=8"], "text_encoder.rank",
     "same rank"),
    (["dataset.bucket_step=48", "dataset.bucket_min=240", "dataset.bucket_max=1008", "dataset.resolution=480"],
     "dataset.bucket_step", "multiple of 32"),
    (["dataset.bucket_min=320", "dataset.bucket_step=128"], "dataset.bucket_min", "multiple of dataset.bucket_step"),
    (["sample.strengths=[0.5, 1.0]"], "sample.strengths", "strength 1.0 only"),
    (["sample.prompts=[\"a photo --w 5\"]"], "sample.prompts[0]", "reads as an option"),
    (["lora.init=\"gaussian\""], "lora.init", "Kaiming"),
    (["scheduler.name=\"constant\"", "scheduler.warmup_steps=5"], "scheduler.warmup_steps", "constant_with_warmup"),
    (["train.memory_mode=\"low-vram\""], "train.memory_mode", "blocks_to_swap"),
    (["train.compile=\"on\""], "train.compile", "do not compile"),
    (["train.attention=\"fa4\""], "train.attention", "native-backend setting"),
    (["train.save_every_epochs=1"], "train.save_every_epochs", "give one of them"),
    (["backend.kohya.blocks_to_swap=36"], "backend.kohya.blocks_to_swap", "at most 35"),
    (["backend.kohya.blocks_to_swap=4", "backend.kohya.cpu_offload_checkpointing=true"],
     "backend.kohya.cpu_offload_checkpointing", "together"),
    (["dataset.caption_dropout=0.1", "backend.kohya.cache_text_encoder_outputs=true"],
     "backend.kohya.cache_text_encoder_outputs", "caption dropout"),
    (["backend.kohya.extra_args={lerning_rate = 0.1}"], "backend.kohya.extra_args", "did you mean `learning_rate`"),
    (["backend.kohya.extra_args={full_bf16 = \"yes\"}"], "backend.kohya.extra_args", "expects bool"),
    (["backend.kohya.extra_args={learning_rate = 0.1}"], "backend.kohya.extra_args.learning_rate",
     "cannot be overridden"),
    (["backend.kohya.extra_args={output_dir = \"/x\"}"], "backend.kohya.extra_args.output_dir", "cannot be"),
    (["backend.kohya.sd_scripts=\"/nonexistent/sd-scripts\""], "backend.kohya.sd_scripts", "not a folder"),
])
def test_refusals_name_the_key(kohya_recipe, plugins, sets, key, words):
    message = refusal(kohya_recipe(), plugins, sets)
    assert f"[{key}]" in message and words in message, message


def test_regularisation_sets_with_different_weights(kohya_recipe, plugins, tmp_path):
    from lora_run_devtools.testing import make_images

    make_images(tmp_path / "r1", count=2, trigger="", prefix="a")
    make_images(tmp_path / "r2", count=2, trigger="", prefix="b")
    extra = (f'[[dataset.regularization]]\npath = "{tmp_path / "r1"}"\nweight = 0.5\n'
             f'[[dataset.regularization]]\npath = "{tmp_path / "r2"}"\nweight = 1.0\n')
    message = refusal(kohya_recipe(extra), plugins)
    assert "[dataset.regularization]" in message and "one --prior_loss_weight" in message


def test_model_source_only_names_every_needed_file(kohya_recipe, plugins, tmp_path):
    path = kohya_recipe()
    text = path.read_text()
    files = text[text.index("[model.files]"):text.index("[dataset]")]
    path.write_text(text.replace(files, "").replace('[model]\n', '[model]\nsource = "black-forest-labs/FLUX.1-dev"\n'))
    message = refusal(path, plugins)
    assert "[model.files] transformer, clip_l, t5xxl, vae are required by the kohya backend" in message
    assert message.count("sd-scripts loads single-file checkpoints only") == 1   # one problem, said once
    assert "flux1-dev.safetensors" in message and "t5xxl_fp16.safetensors" in message and "ae.safetensors" in message
    assert "hub id or diffusers folder" in message


def test_missing_model_file_and_folder(kohya_recipe, plugins, tmp_path):
    path = kohya_recipe()
    (tmp_path / "models" / "clip_l.safetensors").unlink()
    (tmp_path / "models" / "ae.safetensors").unlink()
    (tmp_path / "models" / "ae.safetensors").mkdir()
    message = refusal(path, plugins)
    assert "[model.files.clip_l]" in message and "does not exist" in message
    assert "[model.files.vae]" in message and "is a folder, not a single file" in message


def test_hunyuan_refusals(kohya_recipe, plugins):
    path = kohya_recipe(family="hunyuan-image-2.1")
    message = refusal(path, plugins, ["train.guidance=3.5", "text_encoder.train=true", "lora.targets=\"attention\"",
                                      "output.formats=[\"kohya\", \"diffusers\"]"])
    assert "[train.guidance]" in message and "no guidance embedding" in message
    assert "[text_encoder.train]" in message and "--network_train_unet_only" in message
    assert "[lora.targets]" in message
    message = refusal(path, plugins, ["sample.height=528"])          # HunyuanImage-2.1 decodes 32-pixel sizes
    assert "[sample.height]" in message and "multiple of 32" in message


def test_hunyuan_flux_shift_is_refused_not_a_quarter_of_the_tokens(kohya_recipe, plugins):
    """sd-scripts' `flux_shift` takes μ from (h // 2)·(w // 2) of the latent (library/flux_train_utils.py
    `get_noisy_model_input_and_timesteps`, written for FLUX.1's packed 2×2 patches). HunyuanImage-2.1's latent has
    patch size 1, so that is a quarter of its token count: neither lora-run's `flux-shift` (μ of the tokens the
    transformer sees) nor anything the model samples with (a fixed shift; the native backend refuses it too)."""
    path = kohya_recipe(family="hunyuan-image-2.1")
    message = refusal(path, plugins, ["train.timestep_sampling=\"flux-shift\""])
    assert "[train.timestep_sampling]" in message and "quarter" in message
    # FLUX.1's latent is packed 2×2, so there (h // 2)·(w // 2) is the token count: translated
    _plan, config, _dataset = planned(kohya_recipe(), plugins, ["train.timestep_sampling=\"flux-shift\""])
    assert flat(config)["timestep_sampling"] == "flux_shift"
    # HunyuanImage's own shifted sampling still translates
    _plan, config, _dataset = planned(path, plugins, ["train.timestep_sampling=\"shift\"", "train.shift=5.0"])
    assert flat(config)["timestep_sampling"] == "shift" and flat(config)["discrete_flow_shift"] == 5.0


def test_hunyuan_dit_is_refused_naming_the_backends_that_train_it(kohya_recipe, plugins, tmp_path):
    path = kohya_recipe()
    path.write_text(path.read_text().replace('family = "flux.1-dev"', 'family = "hunyuan-dit-1.2"'))
    message = refusal(path, plugins)
    assert 'backend "kohya" does not train hunyuan-dit-1.2' in message
    assert "sd-scripts has no Hunyuan-DiT trainer" in message and "backends that do:" in message


# ------------------------------------------------------------------------------------------ shipped recipes
FIXES = {("lora", "targets"): {"flux.1-dev": "attention+mlp", "hunyuan-image-2.1": "all-linear"},
         ("train", "loss"): "pseudo-huber", ("text_encoder", "train_fraction"): 1.0,
         ("output", "formats"): ["kohya"]}


def _fix(recipe, key):
    """The documented remedy for one refusal, or the field's default."""
    section, field = key[0], key[1]
    value = FIXES.get((section, field))
    if isinstance(value, dict):
        value = value[recipe.model.family]
    if value is None:
        value = attrs.fields_dict(type(getattr(recipe, section)))[field].default
        if isinstance(value, attrs.Factory):
            value = value.factory()
    if section == "model" and field == "files":
        return recipe
    return attrs.evolve(recipe, **{section: attrs.evolve(getattr(recipe, section), **{field: value})})


def shipped():
    return sorted((REPO / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", shipped(), ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_translates_to_valid_sd_scripts_files(path, plugins, tmp_path):
    loaded = load_recipe(path)
    recipe = loaded.recipe
    family = recipe.model.family
    if family not in plugins.registry["family"]:
        pytest.skip(f"the {family} family plugin is not installed")
    refused = {"hunyuan-dit-1.2": "sd-scripts has no Hunyuan-DiT", "flux.2-klein": "sd-scripts has no FLUX.2",
               "flux.2-dev": "sd-scripts has no FLUX.2"}
    files = model_files(tmp_path / "models", family) if family not in refused else {}
    recipe = attrs.evolve(recipe, backend=attrs.evolve(recipe.backend, name="kohya"),
                          model=attrs.evolve(recipe.model, files={**recipe.model.files, **files}),
                          output=attrs.evolve(recipe.output, dir=str(tmp_path / "runs" / "{name}")))
    if family in refused:
        with pytest.raises(RecipeError, match=f"does not train {re.escape(family)}.*{refused[family]}"):
            validate(LoadedRecipe(recipe, path, path.name, {}), plugins)
        return
    for _attempt in range(6):
        try:
            prepared = validate(LoadedRecipe(recipe, path, path.name, {}), plugins)
            break
        except RecipeError as exc:
            for line in exc.problems:
                assert "backend \"kohya\" cannot honour" in line or "sd-scripts" in line or "kohya" in line, line
            keys = {tuple(p.split("[", 1)[1].split("]", 1)[0].split(".")) for p in exc.problems if "[" in p}
            for key in keys:
                recipe = _fix(recipe, (key[0], key[1].split("[")[0]))
    else:
        pytest.fail(f"{path}: still refused after applying the documented remedies")
    plan = make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "runs" / "x")).plan()
    script = "flux_train_network.py" if family == "flux.1-dev" else "hunyuan_image_train_network.py"
    config = tomllib.loads(plan.files["kohya/config.toml"])
    dataset = tomllib.loads(plan.files["kohya/dataset.toml"])
    assert spec.check_config(script, config) == []
    assert spec.check_dataset(dataset) == []
    assert plan.commands[0][13].endswith(script)


def test_train_gpus_feeds_accelerate_num_processes(kohya_recipe, plugins):
    argv = planned(kohya_recipe(), plugins, ["train.gpus=2"])[0].commands[0]
    assert argv[argv.index("--num_processes") + 1] == "2" and "--multi_gpu" in argv
    argv = planned(kohya_recipe(), plugins)[0].commands[0]
    assert argv[argv.index("--num_processes") + 1] == "1" and "--multi_gpu" not in argv
    argv = planned(kohya_recipe("[backend.kohya]\nnum_processes = 4\n", name="own.toml"), plugins,
                   ["train.gpus=2"])[0].commands[0]
    assert argv[argv.index("--num_processes") + 1] == "4"   # the backend's own option wins


def test_switching_the_fast_flux_recipe_to_kohya_reports_everything_in_one_check(run_cli, tmp_path):
    """noise offset, the missing single files (said once) and the dataset lint, in one `check`."""
    from lora_run_devtools.testing import make_images

    photos = tmp_path / "photos"
    make_images(photos, count=3, trigger="")                  # captions without the trigger: lint errors
    shipped = Path(__file__).resolve().parents[2] / "recipes" / "flux" / "identity-fast.toml"
    out = run_cli("check", shipped, "--set", "backend=\"kohya\"", "--set", f"dataset.path=\"{photos}\"",
                  "--set", "model.offline=true")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    err = out.stderr
    assert "[train.noise_offset]" in err
    assert err.count("sd-scripts loads single-file checkpoints only") == 1
    assert "transformer, clip_l, t5xxl, vae are required" in err
    assert "[dataset] has" in err and "trigger" in out.stdout
    assert "backends that can: native" in err and "flux," not in err


def test_plan_gives_our_memory_estimate_for_the_equivalent_settings(kohya_recipe, plugins, run_cli):
    from lora_run.recipe import replace
    from lora_run_native.memory import equivalent_estimate

    path = kohya_recipe()
    plan, _, _ = planned(path, plugins)
    recipe = load_recipe(path).recipe
    gib, assumed = equivalent_estimate(recipe)
    assert plan.memory_estimate_gib == round(gib, 1) > 0
    assert plan.memory_source.startswith("lora-run's native memory model for the equivalent settings")
    assert "eager" in plan.memory_source
    # it follows the settings: bf16 base weights need more than fp8, swapped blocks less
    fp8 = replace(recipe, model={"base_precision": "fp8"}, train={"mixed_precision": "bf16"})
    bf16 = replace(fp8, model={"base_precision": "bf16"})
    assert equivalent_estimate(bf16)[0] > equivalent_estimate(fp8)[0] > equivalent_estimate(fp8, 20)[0]
    shown = run_cli("plan", path)
    assert "# memory estimate:" in shown.stdout and "lora-run's native memory model" in shown.stdout


# ------------------------------------------------------------------------------------------ semantics (audit)
def test_warmup_counts_optimizer_steps_on_several_gpus(kohya_recipe, plugins):
    """sd-scripts builds its schedule over max_train_steps × processes scheduler steps (accelerate steps a prepared
    scheduler once per process at every optimizer step) but takes an integer lr_warmup_steps as it is, so with 2 GPUs
    the warmup ended after half the recipe's warmup_steps. lora-run's warmup counts optimizer steps."""
    for gpus, warmup in ((1, 10), (2, 20), (4, 40)):
        _, config, _ = planned(kohya_recipe(), plugins, [f"train.gpus={gpus}", "scheduler.warmup_steps=10",
                                                         "scheduler.name=\"cosine\""])
        assert flat(config)["lr_warmup_steps"] == warmup
    plan, config, _ = planned(kohya_recipe("[backend.kohya]\nnum_processes = 3\n"), plugins,
                              ["scheduler.warmup_steps=5"])
    assert flat(config)["lr_warmup_steps"] == 15 and flat(config)["max_train_steps"] == 6


def test_steps_from_epochs_share_the_batches_between_gpus(kohya_recipe, plugins):
    """train_network.py: steps per epoch = ceil(batches / processes / gradient accumulation); the plan's step count
    (progress, disk check) left the processes out and was twice sd-scripts' on 2 GPUs."""
    plan, _, _ = planned(kohya_recipe(replace={"steps = 6": ""}), plugins,
                         ["train.epochs=5", "dataset.repeats=3", "train.gpus=2"])
    assert plan.steps == 5 * 6           # 4 images × 3 repeats = 12 batches of 1, over 2 processes: 6 per epoch
    plan, _, _ = planned(kohya_recipe(replace={"steps = 6": ""}), plugins, ["train.epochs=5", "dataset.repeats=3"])
    assert plan.steps == 5 * 12


def test_caption_dropout_reaches_the_regularisation_images(kohya_recipe, plugins, tmp_path):
    """[dataset] caption_dropout drops the caption of any sample (the native backend's data order, diffusion-pipe's
    uncond_fraction); sd-scripts reads caption_dropout_rate per subset, and only the subject's had it."""
    from lora_run_devtools.testing import make_images

    make_images(tmp_path / "reg", count=2, trigger="", prefix="reg")
    extra = f'[[dataset.regularization]]\npath = "{tmp_path / "reg"}"\n'
    _, _, dataset = planned(kohya_recipe(extra), plugins, ["dataset.caption_dropout=0.2"])
    assert [s.get("caption_dropout_rate") for s in dataset["datasets"][0]["subsets"]] == [0.2, 0.2]
    assert spec.check_dataset(dataset) == []
    _, _, dataset = planned(kohya_recipe(extra), plugins)
    assert all("caption_dropout_rate" not in s for s in dataset["datasets"][0]["subsets"])


@pytest.mark.parametrize("guidance, written", [(3.5, "3.5"), (1.0, "1"), (0.0, "0"), (0.00001, "0.00001"),
                                               (12.25, "12.25")])
def test_sample_guidance_is_written_as_sd_scripts_reads_it(kohya_recipe, plugins, guidance, written):
    """sd-scripts reads `--g` / `--l` with the pattern [\\d.]+: 0.00001, written `1e-05` by {:g}, came back as 1."""
    import re

    plan, _, _ = planned(kohya_recipe(), plugins, [f"sample.guidance={guidance!r}"])
    line = plan.files["kohya/sample_prompts.txt"].splitlines()[0]
    assert line.endswith(f" --g {written}")
    assert float(re.search(r"--g ([\d.]+)", line)[1]) == guidance     # what sd-scripts' line_to_prompt_dict takes


def test_the_plan_says_sd_scripts_does_not_sample_at_the_end(kohya_recipe, plugins):
    """[sample] every_steps samples every N steps and at the end; sd-scripts samples at the multiples of
    sample_every_n_steps only, which the plan did not say."""
    plan, _, _ = planned(kohya_recipe(), plugins, ["sample.every_steps=4"])       # 6 steps: samples at 4 only
    assert any("not also at the end" in n and "step 4 of 6" in n for n in plan.notes), plan.notes
    plan, _, _ = planned(kohya_recipe(), plugins, ["sample.every_steps=3"])       # 3 and 6: the end is one
    assert not any("not also at the end" in n for n in plan.notes)


def test_recipe_keys_sd_scripts_does_not_use_are_named_in_the_plan(kohya_recipe, plugins):
    """[model] source / revision (sd-scripts loads the single files) and the native-only [train] gpu_memory_gib and
    cuda_graphs were dropped without a word."""
    plan, config, _ = planned(kohya_recipe(), plugins, ['model.source="black-forest-labs/FLUX.1-dev"',
                                                        'model.revision="main"', "train.gpu_memory_gib=20.0",
                                                        'train.cuda_graphs="on"'])
    for words in ("[model] source black-forest-labs/FLUX.1-dev not used", "[model] revision not used",
                  "[train] gpu_memory_gib = 20 not used", "[train] cuda_graphs = \"on\" not used"):
        assert any(words in n for n in plan.notes), (words, plan.notes)
    plan, _, _ = planned(kohya_recipe(), plugins)
    assert not any("not used" in n for n in plan.notes)


@pytest.mark.parametrize("sets", [
    ["scheduler.name=\"cosine\"", "scheduler.warmup_steps=10"],
    ["scheduler.name=\"cosine\"", "scheduler.warmup_steps=10", "scheduler.min_lr_ratio=0.1"],
    ["scheduler.name=\"linear\""],
    ["scheduler.name=\"linear\"", "scheduler.min_lr_ratio=0.25", "scheduler.warmup_steps=5", "train.gpus=2"],
])
def test_a_resumed_run_keeps_its_lr_schedule(kohya_recipe, plugins, sets):
    """A step-based resume runs sd-scripts with --max_train_steps <steps left>, from which it builds the schedule
    before --resume restores the scheduler's step count (not its totals: transformers' schedules are partials). A
    cosine of 100 steps resumed at 50 fell to ~0 and climbed back to the peak. The resume's command line now names
    the same schedule with the run's totals; replayed here as sd-scripts' get_scheduler_fix builds it."""
    import ast
    import importlib

    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lora_run_kohya.translate import resume_schedule_args

    path = kohya_recipe(replace={"steps = 6": "steps = 100"})
    plan, config, _ = planned(path, plugins, sets)
    f, processes = flat(config), int(plan.commands[0][plan.commands[0].index("--num_processes") + 1])
    backend = make_backend(validate(load_recipe(path, sets), plugins), plugins,
                           run_dir=RunDir(output_path(load_recipe(path, sets).recipe, None)))
    argv = resume_schedule_args(backend.recipe, backend.options)
    assert argv[0] == "--lr_scheduler_type" and argv[-2:] == ["--lr_warmup_steps", "0"]

    def schedule(total_steps, scheduler_args=None, scheduler_type=None):    # sd-scripts' get_scheduler_fix
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        if scheduler_type:
            module, name = scheduler_type.rsplit(".", 1)
            kwargs = {k: ast.literal_eval(v) for k, v in (a.split("=") for a in scheduler_args)}
            return optimizer, getattr(importlib.import_module(module), name)(optimizer, **kwargs)
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        kwargs = {"num_warmup_steps": f["lr_warmup_steps"], "num_training_steps": total_steps * processes}
        if f["lr_scheduler"] == "cosine_with_min_lr":
            kwargs.update(num_cycles=0.5, min_lr_rate=f["lr_scheduler_min_lr_ratio"])
        if f["lr_scheduler"] == "polynomial":
            kwargs.update(power=f["lr_scheduler_power"], lr_end=float(f["lr_scheduler_args"][0].split("=")[1]))
        return optimizer, TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(f["lr_scheduler"])](optimizer, **kwargs)

    def run(scheduler, optimizer, steps):       # accelerate steps a prepared scheduler once per process
        out = []
        for _ in range(steps):
            optimizer.step()
            for _ in range(processes):
                scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    whole = run(*reversed(schedule(100)), 100)
    optimizer, first = schedule(100)
    run(first, optimizer, 50)
    state = first.state_dict()
    i = argv.index("--lr_scheduler_args")
    optimizer, resumed = schedule(50, argv[i + 1:-2], argv[1])          # --max_train_steps 50: the steps left
    resumed.load_state_dict(state)
    assert run(resumed, optimizer, 50) == pytest.approx(whole[50:], rel=1e-6, abs=1e-12)
    optimizer, broken = schedule(50)                                     # planted mistake: the steps-left schedule
    broken.load_state_dict(state)
    assert run(broken, optimizer, 50) != pytest.approx(whole[50:], rel=1e-3)


def test_a_constant_schedule_resumes_without_overrides(kohya_recipe, plugins):
    from lora_run_kohya.translate import resume_schedule_args

    backend = make_backend(validate(load_recipe(kohya_recipe()), plugins), plugins,
                           run_dir=RunDir(output_path(load_recipe(kohya_recipe()).recipe, None)))
    assert resume_schedule_args(backend.recipe, backend.options) == []


# ------------------------------------------------------------------------------------------ buckets (audit)
def sd_scripts_bucket(general: dict, width: int, height: int) -> tuple[int, int]:
    """The bucket sd-scripts 48d368f gives an image for a generated `[general]` table (library/train_util.py
    `BucketManager.select_bucket`, written out here from its source): with `bucket_no_upscale` the image's own size,
    shrunk to the area resolution² and rounded down to the steps, min/max_bucket_reso unused; without it the
    grid of `model_util.make_bucket_resolutions` and its nearest aspect ratio."""
    res, step = general["resolution"], general["bucket_reso_steps"]
    area = res * res
    if general.get("bucket_no_upscale"):
        w, h = width, height
        if w * h > area:
            w = math.sqrt(area * width / height)
            h = area / w
        return int(w) - int(w) % step, int(h) - int(h) % step
    grid = {(res // step * step,) * 2}
    low, high = general["min_bucket_reso"], general["max_bucket_reso"]
    for w in range(low, high + 1, step):
        h = min(high, area // w // step * step)
        if h >= low:
            grid |= {(w, h), (h, w)}
    grid = sorted(grid)
    errors = [abs(w / h - width / height) for w, h in grid]
    return grid[errors.index(min(errors))]


def outside(general: dict, sizes) -> list[str]:
    low, high = general["min_bucket_reso"], general["max_bucket_reso"]
    return [f"{w}×{h} → {b}" for w, h in sizes for b in [sd_scripts_bucket(general, w, h)]
            if not all(low <= side <= high for side in b)]


def test_the_buckets_keep_to_bucket_min_and_max_and_are_the_native_grid(kohya_recipe, plugins):
    """With `bucket_no_upscale` sd-scripts ignores min/max_bucket_reso (it says so in a warning: the recorded logs in
    fixtures/sd-scripts-48d368f) and gave a 2048×512 photo a 1024×256 bucket at buckets 256–768; lora-run writes
    the grid, the native backend's, that keeps every bucket inside the recipe's bounds."""
    from lora_run_kohya.translate import bucket_of, buckets
    from lora_run_native.data import choose_bucket, make_buckets

    path = kohya_recipe(replace={"min_images = 2": "min_images = 2\nbucket_min = 256\nbucket_max = 768"})
    _, _, dataset = planned(path, plugins)
    general = dataset["general"]
    photos = [(1024, 1024), (2048, 512), (512, 2048), (3000, 2000), (1200, 1600), (4000, 1000)]
    assert "bucket_no_upscale" not in general and outside(general, photos) == []
    recipe = load_recipe(path).recipe
    d = recipe.dataset
    assert buckets(recipe) == make_buckets(d.resolution, d.bucket_min, d.bucket_max, d.bucket_step)
    for w, h in photos:    # photos larger than every bucket land where the native backend puts them
        assert bucket_of(buckets(recipe), w, h) == sd_scripts_bucket(general, w, h) \
            == choose_bucket((w, h), make_buckets(d.resolution, d.bucket_min, d.bucket_max, d.bucket_step), 64)
    # planted mistake: the flag as it was written until 2026-12-05
    assert outside({**general, "bucket_no_upscale": True}, photos) == ["2048×512 → (1024, 256)",
                                                                      "512×2048 → (256, 1024)",
                                                                      "4000×1000 → (1024, 256)"]


def test_the_plan_names_the_images_sd_scripts_scales_up(kohya_recipe, plugins, tmp_path):
    """The fixture's 320×288 photos are smaller than their 512×512 bucket: sd-scripts scales them up (the native
    backend trains them at a smaller bucket), and the plan says so, naming them; photos larger than every bucket
    are not named."""
    from lora_run_devtools.testing import make_images

    plan, _, _ = planned(kohya_recipe(), plugins)
    note = [n for n in plan.notes if "scaled up" in n]
    assert len(note) == 1 and note[0].startswith("4 image(s) are smaller than the bucket sd-scripts puts them in")
    assert "img000.png (320×288 → 512×512)" in note[0] and "and 1 more" in note[0]
    large = tmp_path / "large"
    make_images(large, count=2, size=(1024, 1024))
    path = kohya_recipe(name="large.toml")
    plan, _, _ = planned(path, plugins, [f'dataset.path="{large}"'])
    assert not [n for n in plan.notes if "scaled up" in n]
