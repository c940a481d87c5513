"""Recipe → diffusion-pipe configs and argv; refusals that name the recipe key; the shipped key data."""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

from lora_run.errors import RecipeError
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import make_backend, validate
from lora_run_diffusion_pipe import CAPABILITIES, keydata, translate
from lora_run_rundir import RunDir

from .conftest import FLUX_RECIPE, hunyuan_recipe

SHARED_KEYS = Path(__file__).resolve().parents[3] / "shared" / "tools-data" / "diffusion-pipe" / "config_keys.json"


def problems(path, *sets):
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(path, sets), load_plugins())
    return info.value.problems


def plan_of(path, tmp_path, *sets):
    plugins = load_plugins()
    prepared = validate(load_recipe(path, sets), plugins)
    return make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "run")).plan()


def parse_like_diffusion_pipe(text: str) -> dict:
    """diffusion-pipe reads with the `toml` package (then json round-trips the main config); tomllib must agree."""
    data = tomllib.loads(text)
    try:
        import toml
    except ImportError:  # the `test` extra installs it; without it only tomllib is checked
        return data
    parsed = toml.loads(text)
    assert parsed == data and json.loads(json.dumps(parsed)) == parsed
    return data


def test_generated_files_parse_with_diffusion_pipes_toml_reader(dp_recipe, tmp_path):
    toml = pytest.importorskip("toml")
    plan = plan_of(dp_recipe(), tmp_path)
    for text in plan.files.values():
        def plain(value):
            if isinstance(value, dict):
                assert type(value) is dict, f"{type(value).__name__}: inline tables cannot be pickled"
                return all(plain(v) for v in value.values())
            if isinstance(value, list):
                return all(plain(v) for v in value)
            return True
        assert plain(toml.loads(text))


def test_shipped_key_data_matches_the_shared_research_file():
    if not SHARED_KEYS.is_file():
        pytest.skip(f"{SHARED_KEYS} is not present in this checkout")
    data = json.loads(SHARED_KEYS.read_text("utf-8"))
    assert keydata.extract(data) == keydata.KEYS
    assert data["_meta"]["source"].split("@ ")[1].startswith(keydata.SOURCE_COMMIT)


def test_plan_writes_valid_configs_and_the_exact_command(dp_recipe, tmp_path, fake_checkout, fake_launcher,
                                                         flux_folder):
    plan = plan_of(dp_recipe(), tmp_path)
    run = tmp_path / "run"
    assert plan.backend == "diffusion-pipe" and plan.steps == 6
    assert plan.commands == [[str(fake_launcher), "--num_gpus=1", "train.py", "--deepspeed", "--config",
                              str(run / "diffusion-pipe" / "config.toml")]]
    assert set(plan.files) == {"diffusion-pipe/config.toml", "diffusion-pipe/dataset.toml"}
    config = parse_like_diffusion_pipe(plan.files["diffusion-pipe/config.toml"])
    dataset = parse_like_diffusion_pipe(plan.files["diffusion-pipe/dataset.toml"])
    assert tomllib.loads(plan.files["diffusion-pipe/config.toml"]) == config
    assert keydata.config_problems(config) == [] and keydata.dataset_problems(dataset) == []
    assert config["output_dir"] == str(run / "diffusion-pipe" / "output")
    assert config["dataset"] == str(run / "diffusion-pipe" / "dataset.toml")
    assert (config["epochs"], config["max_steps"], config["save_every_n_steps"]) == (6, 6, 2)
    assert config["model"] == {"type": "flux", "dtype": "bfloat16", "diffusers_path": str(flux_folder),
                               "guidance": 1.0, "timestep_sample_method": "logit_normal", "sigmoid_scale": 1.0}
    assert config["adapter"] == {"type": "lora", "rank": 4, "dtype": "float32"}       # never an alpha key
    assert config["optimizer"] == {"type": "adamw", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0,
                                   "eps": 1e-8}
    assert (config["lr_scheduler"], config["warmup_steps"], config["gradient_clipping"]) == ("constant", 2, 1.0)
    assert config["activation_checkpointing"] is True and config["checkpoint_every_n_minutes"] == 30
    assert dataset["enable_ar_bucket"] is True and dataset["skip_empty_caption"] is False
    assert dataset["resolutions"] == [512] and [512, 512] in dataset["ar_buckets"]
    assert dataset["directory"] == [{"path": str(run / "diffusion-pipe" / "data" / "subject"), "num_repeats": 1}]
    assert "[[directory]]" in plan.files["diffusion-pipe/dataset.toml"]   # never inline tables (not picklable)
    assert any("seed" in n and "not used" in n for n in plan.notes)
    assert plan.outputs[:2] == [str(run / "subject.safetensors"), str(run / "subject.diffusers.safetensors")]


def test_every_mapped_setting(dp_recipe, tmp_path):
    body = FLUX_RECIPE.replace('name = "adamw"', 'name = "prodigy"\nlr = 1.0\nmax_grad_norm = 0.0') \
        .replace("steps = 6", "epochs = 3")
    path = dp_recipe(body)
    plan = plan_of(path, tmp_path, "train.save_every_epochs=1",
                   "train.save_every_steps=5", "train.timestep_sampling=shift", "train.shift=3.5",
                   "train.sigmoid_scale=1.5", "train.guidance=2.5", "model.base_precision=fp8",
                   "train.loss=huber", "train.loss_options={c = 0.25}", "dataset.caption_dropout=0.1",
                   "lora.dropout=0.05", "train.batch_size=2", "train.gradient_accumulation=3",
                   "train.gradient_checkpointing=false", "output.save_precision=fp16", "train.compile=on",
                   "dataset.repeats=5", "backend.diffusion-pipe.num_gpus=4", "backend.diffusion-pipe.pipeline_stages=2",
                   "backend.diffusion-pipe.partition_split=[10]", "backend.diffusion-pipe.master_port=29611",
                   "backend.diffusion-pipe.activation_checkpointing=unsloth", "backend.diffusion-pipe.caching_batch_size=4")
    config = parse_like_diffusion_pipe(plan.files["diffusion-pipe/config.toml"])
    dataset = parse_like_diffusion_pipe(plan.files["diffusion-pipe/dataset.toml"])
    assert keydata.config_problems(config) == []
    assert config["epochs"] == 3 and "max_steps" not in config
    assert (config["save_every_n_epochs"], config["save_every_n_steps"], config["checkpoint_every_n_epochs"]) == (1, 5, 1)
    assert config["model"]["transformer_dtype"] == "float8" and config["model"]["guidance"] == 2.5
    assert (config["model"]["shift"], config["model"]["sigmoid_scale"]) == (3.5, 1.5)
    assert config["huber_delta"] == 0.25 and config["uncond_fraction"] == 0.1
    assert config["adapter"]["dropout"] == 0.05 and config["save_dtype"] == "float16"
    assert config["optimizer"]["type"] == "Prodigy" and config["gradient_clipping"] == 0.0
    assert (config["micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert (config["pipeline_stages"], config["partition_method"], config["partition_split"]) == (2, "manual", [10])
    assert config["activation_checkpointing"] == "unsloth" and config["compile"] is True
    assert config["caching_batch_size"] == 4 and dataset["directory"][0]["num_repeats"] == 5
    # 4 images × 5 repeats / (2 × 3 × 2 data-parallel copies) → 1 step per epoch
    assert plan.steps == 3
    assert plan.commands[0][:3] == [plan.commands[0][0], "--num_gpus=4", "--master_port=29611"]
    assert plan.commands[0][-2:] == ["--master_port", "29611"]
    assert any("uncond_fraction" in n and "undocumented" in n for n in plan.notes)


def test_timestep_sampling_variants():
    from lora_run.recipe import replace
    from lora_run_devtools.testing import parse_recipe_text

    base = parse_recipe_text('[dataset]\npath = "/d"\ntrigger = "ohwx"\n[model]\nsource = "/m"\n[train]\nsteps = 1\n')
    cases = {
        "uniform": {"timestep_sample_method": "uniform"},
        "sigmoid": {"timestep_sample_method": "logit_normal", "sigmoid_scale": 1.0},
        "logit-normal": {"timestep_sample_method": "logit_normal", "sigmoid_scale": 0.7},
        "flux-shift": {"timestep_sample_method": "logit_normal", "sigmoid_scale": 1.0, "flux_shift": True},
    }
    for value, expected in cases.items():
        recipe = replace(base, train={"timestep_sampling": value, "logit_std": 0.7})
        assert translate.timestep_keys(recipe) == expected, value


def test_hunyuan_image_uses_the_comfyui_files(dp_recipe, tmp_path, hunyuan_files):
    path = dp_recipe(hunyuan_recipe(hunyuan_files), "hy.toml")
    plan = plan_of(path, tmp_path)
    config = parse_like_diffusion_pipe(plan.files["diffusion-pipe/config.toml"])
    assert keydata.config_problems(config) == []
    assert config["model"] == {
        "type": "hunyuan_image", "dtype": "bfloat16", "transformer_path": str(hunyuan_files["transformer"]),
        "vae_path": str(hunyuan_files["vae"]), "text_encoder_path": str(hunyuan_files["qwen"]),
        "byt5_path": str(hunyuan_files["byt5"]), "timestep_sample_method": "logit_normal", "sigmoid_scale": 1.0}
    dataset = parse_like_diffusion_pipe(plan.files["diffusion-pipe/dataset.toml"])
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in dataset["ar_buckets"])
    assert any("/cache/hunyuan_image/" in n for n in plan.notes)


@pytest.mark.parametrize("sets, key, words", [
    (["optimizer.name=adafactor"], "optimizer.name", "Adafactor"),
    (["lora.alpha=8"], "lora.alpha", "alpha = rank"),
    (["lora.targets=attention"], "lora.targets", "all-linear"),
    (["lora.modules=['to_q']"], "lora.modules", "module list"),
    (["train.loss=pseudo-huber"], "train.loss", "pseudo_huber_c"),
    (["scheduler.name=cosine"], "scheduler.name", "constant_with_warmup"),
    (["train.noise_offset=0.05"], "train.noise_offset", "noise offset"),
    (["text_encoder.train=true"], "text_encoder.train", "text-encoder"),
    (["sample.every_steps=10", "sample.prompts=['x']"], "sample.every_steps", "#119"),
    (["dataset.regularization=[{path='reg', weight=0.5}]"], "dataset.regularization", "num_repeats"),
    (["train.timestep_weighting=sigma_sqrt"], "train.timestep_weighting", "weighting"),
    (["train.min_snr_gamma=5.0"], "train.min_snr_gamma", "SDXL"),
    (["model.family=hunyuan-dit-1.2"], "model.family", "no Hunyuan-DiT"),
    (["model.source=black-forest-labs/FLUX.1-dev"], "model.source", "hub id"),
    (["train.timestep_sampling=logit-normal", "train.logit_mean=0.5"], "train.logit_mean", "mean 0"),
    (["scheduler.name=constant"], "scheduler.warmup_steps", "no warmup"),
    (["lora.init=gaussian"], "lora.init", "peft's default"),
    (["backend.diffusion-pipe.num_gpus=3", "backend.diffusion-pipe.pipeline_stages=2"],
     "backend.diffusion-pipe.pipeline_stages", "must divide num_gpus"),
    (["backend.diffusion-pipe.num_gpus=2", "backend.diffusion-pipe.pipeline_stages=2",
      "backend.diffusion-pipe.blocks_to_swap=4"], "backend.diffusion-pipe.blocks_to_swap", "pipeline_stages = 1"),
    (["backend.diffusion-pipe.blocks_to_swap=35"], "backend.diffusion-pipe.blocks_to_swap", "at most 34"),
    (["backend.diffusion-pipe.num_gpus=3", "backend.diffusion-pipe.pipeline_stages=3",
      "backend.diffusion-pipe.partition_split=[5]"], "backend.diffusion-pipe.partition_split", "needs pipeline_stages"),
    (["backend.diffusion-pipe.num_gpus=2", "backend.diffusion-pipe.pipeline_stages=2",
      "backend.diffusion-pipe.partition_split=[59]"], "backend.diffusion-pipe.partition_split", "59 pipeline layers"),
    (["train.batch_size=8"], "train.batch_size", "Processed dataset was empty"),
    (["train.gradient_accumulation=5", "dataset.repeats=2", "train.gpus=2"], "train.gradient_accumulation",
     "largest: 8"),
    (["backend.diffusion-pipe.path=/nonexistent/dp"], "backend.diffusion-pipe.path", "is not a folder"),
    (["backend.diffusion-pipe.deepspeed=/nonexistent/deepspeed"], "backend.diffusion-pipe.deepspeed", "executable"),
    (["backend.diffusion-pipe.stall_timeout=-1"], "backend.diffusion-pipe.stall_timeout", ">= 0"),
])
def test_refusals_name_the_key(dp_recipe, tmp_path, sets, key, words):
    (tmp_path / "reg").mkdir(exist_ok=True)
    found = problems(dp_recipe(), *sets)
    assert any(f"[{key}]" in p and words in p for p in found), found


def test_hunyuan_refusals(dp_recipe, tmp_path):
    grid = ("dataset.bucket_step=64", "dataset.bucket_min=256", "dataset.resolution=512")
    text = "\n".join(problems(dp_recipe(), "model.family=hunyuan-image-2.1", "train.guidance=3.0",
                               "train.timestep_sampling=flux-shift", *grid))
    assert "[train.guidance]" in text and "guidance embedding" in text
    assert "[train.timestep_sampling]" in text and "quarter" in text
    text = "\n".join(problems(dp_recipe(), "model.family=hunyuan-image-2.1", *grid))
    assert "[model.files.transformer]" in text and "[model.files.byt5]" in text and "ComfyUI files" in text


def test_capabilities_are_honest():
    assert set(CAPABILITIES) == {"flux.1-dev", "hunyuan-image-2.1"}
    for features in CAPABILITIES.values():
        assert "targets:all-linear" in features and "targets:attention" not in features
        assert "lora_alpha" not in features and "sampling" not in features
        assert "text_encoder_training" not in features and "regularization_weight" not in features
    assert "guidance" not in CAPABILITIES["hunyuan-image-2.1"]


def test_launch_argv_for_resume_and_env():
    from lora_run_diffusion_pipe.options import DiffusionPipeOptions

    options = DiffusionPipeOptions(num_gpus=2, nccl_p2p_disable=True, nccl_ib_disable=True, expandable_segments=True)
    argv = translate.launch_argv("/x/deepspeed", Path("/r/config.toml"), options, "20261127_10-00-00")
    assert argv == ["/x/deepspeed", "--num_gpus=2", "train.py", "--deepspeed", "--config", "/r/config.toml",
                    "--resume_from_checkpoint", "20261127_10-00-00"]
    env = translate.child_env(options, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PYTHONUNBUFFERED": "1", "NCCL_P2P_DISABLE": "1", "NCCL_IB_DISABLE": "1",
                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                   "TORCH_CUDNN_SDPA_DEPRIORITIZED": "1", "TORCH_CUDNN_SDPA_PREFERRED": "0"}
    assert "NCCL_P2P_DISABLE" not in translate.child_env(DiffusionPipeOptions(), {})
    # a user who wants cuDNN's attention in the engine says so in the environment, and that wins
    mine = translate.child_env(DiffusionPipeOptions(), {"TORCH_CUDNN_SDPA_DEPRIORITIZED": "0"})
    assert mine["TORCH_CUDNN_SDPA_DEPRIORITIZED"] == "0"


def test_bucket_grid_matches_the_recipe():
    from lora_run_devtools.testing import parse_recipe_text

    recipe = parse_recipe_text('[dataset]\npath = "/d"\ntrigger = "ohwx"\nresolution = 512\nbucket_min = 384\nbucket_max = 640\n'
                               'bucket_step = 64\n[model]\nsource = "/m"\n[train]\nsteps = 1\n')
    pairs = translate.bucket_sizes(recipe)
    assert [512, 512] in pairs and [384, 640] in pairs and [640, 384] in pairs
    assert all(w * h <= 512 * 512 and 384 <= min(w, h) and max(w, h) <= 640 for w, h in pairs)
    assert pairs == sorted(pairs, key=lambda p: (p[0] / p[1], p[0]))


def test_plan_cli_shows_files_and_command(dp_recipe, run_cli, tmp_path):
    path = dp_recipe()
    out = run_cli("plan", path, "--output-dir", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    assert "# command: " in out.stdout and "train.py --deepspeed --config" in out.stdout
    assert "# file: " + str(tmp_path / "r" / "diffusion-pipe" / "config.toml") in out.stdout
    assert "[[directory]]" in out.stdout and "# note: " in out.stdout
    as_json = run_cli("plan", path, "--json", "--output-dir", tmp_path / "r")
    data = json.loads(as_json.stdout)
    assert data["plan"]["backend"] == "diffusion-pipe" and "diffusion-pipe/dataset.toml" in data["plan"]["files"]
    bad = run_cli("check", path, "--set", "lora.alpha=8")
    assert bad.returncode == 2 and "[lora.alpha]" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r").exists(), "plan and check write nothing"


def test_check_and_plan_do_not_import_torch(dp_recipe, tmp_path):
    import subprocess

    code = ("import sys; from lora_run.cli import main; "
            f"assert main(['check', {str(dp_recipe())!r}]) == 0; "
            f"assert main(['plan', {str(dp_recipe())!r}, '--output-dir', {str(tmp_path / 'p')!r}]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


def test_an_empty_regularisation_set_is_left_out(dp_recipe, tmp_path):
    (tmp_path / "empty-reg").mkdir()
    body = FLUX_RECIPE + '\n[[dataset.regularization]]\npath = "{reg}"\n'
    plan = plan_of(dp_recipe(body, reg=tmp_path / "empty-reg"), tmp_path)
    dataset = parse_like_diffusion_pipe(plan.files["diffusion-pipe/dataset.toml"])
    assert [Path(d["path"]).name for d in dataset["directory"]] == ["subject"]
    assert any("has no usable image and is left out" in n for n in plan.notes)



def test_train_gpus_feeds_num_gpus_unless_the_backend_option_is_set(dp_recipe, tmp_path):
    plan = plan_of(dp_recipe(), tmp_path, "train.gpus=2")
    assert plan.commands[0][1] == "--num_gpus=2"
    assert any("2 GPUs" in note for note in plan.notes)
    plan = plan_of(dp_recipe(), tmp_path, "train.gpus=2", "backend.diffusion-pipe.num_gpus=4",
                   "backend.diffusion-pipe.pipeline_stages=2")
    assert plan.commands[0][1] == "--num_gpus=4"        # the backend's own option wins
    assert plan_of(dp_recipe(), tmp_path).commands[0][1] == "--num_gpus=1"


def test_native_only_train_keys_are_named_in_the_plan(dp_recipe, tmp_path):
    """[train] gpu_memory_gib and cuda_graphs (in-process backends only) were dropped without a word."""
    plan = plan_of(dp_recipe(), tmp_path, "train.gpu_memory_gib=20.0", 'train.cuda_graphs="off"')
    assert any("[train] gpu_memory_gib = 20 not used" in n for n in plan.notes), plan.notes
    assert any("[train] cuda_graphs = \"off\" not used" in n for n in plan.notes), plan.notes
    assert not any("gpu_memory_gib" in n or "cuda_graphs" in n for n in plan_of(dp_recipe(), tmp_path).notes)


def test_aspect_buckets_follow_diffusion_pipes_assignment():
    """utils/dataset.py (8f83dbf): user ar_buckets [w, h] become w / h rounded to 3 digits, deduplicated and sorted
    (`dedup_and_sort`); an image goes to the ratio nearest in log space, the first on a tie (np.argmin)."""
    ratios = [0.5, 0.667, 1.0, 1.5, 2.0]
    assert translate.bucket_of(ratios, 512, 512) == 2
    assert translate.bucket_of(ratios, 600, 512) == 2       # log 1.17 is nearer log 1.0 than log 1.5
    assert translate.bucket_of(ratios, 640, 512) == 3       # 1.25: nearer 1.5 in log space (nearer 1.0 linearly)
    assert translate.bucket_of(ratios, 700, 512) == 3
    assert translate.bucket_of(ratios, 100, 1000) == 0      # beyond the grid: the extreme bucket
    ratio = 1.5 ** 0.5                                        # the geometric middle of 1.0 and 1.5: a tie
    assert translate.bucket_of([1.0, 1.5], 10000, round(10000 / ratio)) in (0, 1)


def test_steps_per_epoch_keeps_whole_global_batches_per_bucket(dp_recipe):
    """ConcatenatedBatchedDataset._make_divisible_by keeps, per bucket, only whole global batches."""
    from lora_run_diffusion_pipe.options import DiffusionPipeOptions

    recipe = load_recipe(dp_recipe(), ["train.batch_size=2", "train.gradient_accumulation=2"]).recipe
    options = DiffusionPipeOptions(num_gpus=2)
    assert translate.global_batch(recipe, options) == 8
    assert translate.steps_per_epoch(recipe, options, 23, [7, 9, 7]) == 1        # only the 9 holds a batch of 8
    assert translate.steps_per_epoch(recipe, options, 23) == 2                   # the estimate ignores buckets
    assert translate.steps_per_epoch(recipe, options, 0, [16, 8]) == 3
    assert translate.empty_dataset_problem(recipe, options, [7, 7, 7])[0] == ("train", "batch_size")
    assert translate.empty_dataset_problem(recipe, options, [8]) is None


def test_plan_counts_steps_per_aspect_bucket(dp_recipe, tmp_path, subject_dataset):
    """Images of two aspect ratios: each bucket keeps whole global batches, so the plan's steps are exact."""
    from lora_run_devtools.testing import make_images

    make_images(subject_dataset, count=3, size=(256, 512), prefix="tall", seed=3)  # 4 wide (320×288) + 3 tall
    body = FLUX_RECIPE.replace("steps = 6", "epochs = 5").replace("save_every_steps = 2", "")
    plan = plan_of(dp_recipe(body), tmp_path, "train.batch_size=2", "dataset.bucket_min=256",
                   "dataset.bucket_max=768", "dataset.bucket_step=64", "dataset.resolution=512")
    # per epoch: 4 // 2 + 3 // 2 = 3 steps (the estimate 7 // 2 said 3 too, but drops one tall image per epoch)
    assert plan.steps == 15
    assert any("2 aspect bucket(s) → 3 steps" in n and "drops 1 per epoch" in n for n in plan.notes), plan.notes


def test_fp16_is_noted_as_unscaled(dp_recipe, tmp_path):
    """train.py (8f83dbf) builds its DeepSpeed config with no fp16 section: float16 training has no loss scaling."""
    plan = plan_of(dp_recipe(), tmp_path, "train.mixed_precision=fp16")
    config = parse_like_diffusion_pipe(plan.files["diffusion-pipe/config.toml"])
    assert config["model"]["dtype"] == "float16"
    assert any("without loss scaling" in n for n in plan.notes), plan.notes
    assert not any("loss scaling" in n for n in plan_of(dp_recipe(), tmp_path / "bf16").notes)


def test_the_plan_names_the_images_diffusion_pipe_scales_up(dp_recipe, tmp_path):
    """diffusion-pipe trains every image at its aspect bucket's size at the area resolution² (utils/dataset.py), up
    where the image is smaller; the native backend never upscales. The fixture's 320×288 photos go to the square
    bucket, 512×512 at resolution 512, and are named; photos larger than every bucket are not."""
    from lora_run_devtools.testing import make_images

    plan = plan_of(dp_recipe(), tmp_path)
    note = [n for n in plan.notes if "scaled up" in n]
    assert translate.size_of(load_recipe(dp_recipe(name="again.toml")).recipe, 320, 288) == (512, 512)
    assert len(note) == 1 and note[0].startswith("4 image(s) are smaller than the bucket diffusion-pipe puts them in")
    assert "img000.png (320×288 → 512×512)" in note[0] and "and 1 more" in note[0]
    large = tmp_path / "large"
    make_images(large, count=2, size=(1024, 1024))
    plan = plan_of(dp_recipe(name="large.toml"), tmp_path, f'dataset.path="{large}"')
    assert not [n for n in plan.notes if "scaled up" in n]


def test_the_bucket_note_gives_the_sizes_diffusion_pipe_trains_and_the_sides_past_bucket_max(dp_recipe, tmp_path):
    """diffusion-pipe keeps each aspect bucket's area at resolution² and has no side limits: at buckets 256–768 the 1:3
    bucket (256×768 in our grid) trains at 288×880, past bucket_max; the note names it. Control: at 384–704 every
    bucket stays inside, and the note says nothing of it."""
    def note(*sets):
        plan = plan_of(dp_recipe(name=f"r{len(sets)}.toml"), tmp_path, *sets)
        return next(n for n in plan.notes if n.startswith("aspect buckets:"))
    wide = note("dataset.bucket_min=256", "dataset.bucket_max=768")
    assert "sides 288 to 880, rounded to its 16-pixel grid" in wide
    assert "288×880, 336×800, 800×336, 880×288 go past bucket_min/bucket_max = 256/768" in wide
    narrow = note("dataset.bucket_min=384", "dataset.bucket_max=704", "dataset.resolution=512")
    assert "go past" not in narrow and "sides 400 to 656" in narrow
