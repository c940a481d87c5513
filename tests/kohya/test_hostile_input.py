"""Hostile recipe values through the files and the command line lora-run generates for sd-scripts: every generated
file must read back exactly with sd-scripts' own readers (`toml` 0.10.2, its prompt-file parser), every argv
element must be one argument, and what cannot round-trip is refused naming the recipe key."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import tomli_w

from .test_run import run_in_process
from .test_translate import planned, plugins, refusal  # noqa: F401  (plugins: a fixture)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

toml = pytest.importorskip("toml")      # sd-scripts' reader (the `test` extra installs it)

NAMES = ["it's", 'a",b', "with space", "hash#x", "eq=x", "[br]", "-lead", "--lead", "ünï€😀", "q\"x", "x" * 150]


@pytest.fixture
def short_dir():
    """A folder with a short, fixed path: `toml` 0.10.2's misreading depends on the whole string (a second `'`
    balances the first), and pytest's own `tmp_path` happens to hide it where `/home/me/runs/it's` does not."""
    folder = Path(tempfile.gettempdir()) / f"lora-run-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("name", NAMES)
def test_generated_files_read_back_exactly_with_sd_scripts_reader(kohya_recipe, plugins, short_dir, name):  # noqa: F811
    trigger = name if not name.startswith("-") else f"x{name}"    # a prompt may not hold " --" (refused)
    sets = [f"output.name={tomllib_str(name)}", f"dataset.trigger={tomllib_str(trigger)}",
            f"output.dir={tomllib_str(str(short_dir / '{name}'))}"]
    plan, config, dataset = planned(kohya_recipe(), plugins, sets)
    for rel in ("kohya/config.toml", "kohya/dataset.toml"):
        text = plan.files[rel]
        assert toml.loads(text) == tomllib.loads(text), rel
    run = short_dir / name
    assert config["saving"]["output_name"] == name and config["saving"]["metadata_trigger_phrase"] == trigger
    assert [s["image_dir"] for s in dataset["datasets"][0]["subsets"]] == [str(run / "kohya" / "data" / "subject")]
    if name == "it's":   # planted-mistake control: tomli-w's inline tables are what sd-scripts' reader loses
        assert toml.loads(tomli_w.dumps(dataset))["datasets"][0]["subsets"] == []
    # argv: one element per argument, each path whole, none read as an option
    argv = plan.commands[0]
    assert argv[-4:] == ["--config_file", str(run / "kohya" / "config.toml"), "--dataset_config",
                         str(run / "kohya" / "dataset.toml")]


@pytest.mark.parametrize("part", ["it's", 'a",b', "[x] = 'y' # z", "new\nline"])
def test_a_hostile_cache_folder_reads_back_exactly(kohya_recipe, plugins, short_dir, part):  # noqa: F811
    cache = short_dir / f"cache {part}"
    plan, _, dataset = planned(kohya_recipe(), plugins, [f"train.cache_dir={tomllib_str(str(cache))}"])
    assert toml.loads(plan.files["kohya/dataset.toml"]) == dataset
    staged = Path(dataset["datasets"][0]["subsets"][0]["image_dir"])
    assert staged.name == "subject" and staged.parent.parent == cache / "kohya-data"


def tomllib_str(value: str) -> str:
    """`value` as a TOML string for `--set`."""
    import json

    return json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("sets, key, words", [
    (['output.name="\\""'], "output.name", "empty string"),
    (['output.name="\\"\\"ohwx"'], "output.name", "empty string"),
    (['dataset.trigger="\\"\\"ohwx"', 'dataset.trigger_policy="prepend"'], "dataset.trigger", "empty string"),
    (['backend.kohya.extra_args={lr_scheduler_args=[",x=1"]}'], "backend.kohya.extra_args.lr_scheduler_args",
     "comma"),
    # the reader strips any white space Python knows off a list item, the no-break space too
    (['backend.kohya.extra_args={lr_scheduler_args=["\\u00a0,x=1"]}'], "backend.kohya.extra_args.lr_scheduler_args",
     "comma"),
    # a control character, then a backslash-u: the reader stops ("Reserved escape sequence used")
    (['dataset.trigger="\\u001bC:\\\\users"', 'dataset.trigger_policy="prepend"'], "dataset.trigger",
     "Reserved escape"),
    (['output.dir="/tmp/r\\u001b\\\\u/{name}"'], "output.dir", "Reserved escape"),
    (["backend.kohya.extra_args={noise_offset=nan}"], "backend.kohya.extra_args", "finite number, got float nan"),
    (["backend.kohya.extra_args={huber_c=-inf}"], "backend.kohya.extra_args", "finite number"),
    (['sample.prompts=[""]'], "sample.prompts[0]", "is empty"),
    (['sample.prompts=["   "]'], "sample.prompts[0]", "is empty"),
    (['sample.prompts=["n blurry, {trigger}"]'], "sample.prompts[0]", "\"--n\" option"),
    (['sample.prompts=["L 7 {trigger}"]'], "sample.prompts[0]", "\"--l\" option"),
    (['sample.prompts=["{trigger} in snow"]', 'dataset.trigger="ss euler"', 'dataset.trigger_policy="prepend"'],
     "sample.prompts[0]", "\"--ss\" option"),
])
def test_values_sd_scripts_would_read_otherwise_are_refused_by_key(kohya_recipe, plugins, sets, key,  # noqa: F811
                                                                     words):
    message = refusal(kohya_recipe(), plugins, sets)
    line = next(m for m in message.splitlines() if f"[{key}]" in m)
    assert words in line, message


@pytest.mark.parametrize("prompt", ["a photo of {trigger}", "{trigger} in snow", "w x {trigger}", "n", "Newton {trigger}",
                                    "a photo, \"quoted\" [x] = y #1 of {trigger}"])
def test_ordinary_prompts_pass_and_read_back_whole(kohya_recipe, plugins, prompt):  # noqa: F811
    plan, _, _ = planned(kohya_recipe(), plugins, [f"sample.prompts={tomllib_str(prompt)}".replace("=\"", "=[\"", 1)
                                                   + "]"])
    line = plan.files["kohya/sample_prompts.txt"].splitlines()[0]
    assert line.split(" --")[0] == prompt.replace("{trigger}", "ohwx")


@pytest.mark.slow
def test_a_run_folder_with_an_apostrophe_trains(kohya_recipe, fake_checkout, plugins_with, short_dir):
    """The stand-in reads the dataset config with `toml` as sd-scripts does: written as inline tables, its subsets
    came back empty and sd-scripts found no image."""
    path = kohya_recipe(sd_scripts=fake_checkout, replace={'name = "ohwx"': 'name = "it\'s"',
                                                           'dir = "runs/{name}"': f'dir = "{short_dir}/{{name}}"'})
    ctx, _, _, error = run_in_process(path, plugins_with)
    assert error is None, error
    assert (short_dir / "it's" / "it's.safetensors").is_file()


@pytest.mark.parametrize("extra, words", [
    ("{max_bucket_reso=2048}", "generated dataset file"),
    ("{bucket_reso_steps=32}", "generated dataset file"),
    ("{caption_extension=\".caption\"}", "generated dataset file"),
    ("{noise_offset=0.05}", "randn noise"),
    ("{min_snr_gamma=5.0}", "loss unchanged"),
])
def test_extra_args_sd_scripts_would_ignore_are_refused_by_key(kohya_recipe, plugins, extra, words):  # noqa: F811
    """sd-scripts takes the dataset file's values over its options, so an `extra_args` key the generated dataset file
    sets changed nothing; `noise_offset` and `min_snr_gamma`, refused as recipe keys because these trainers ignore
    them, came back through `extra_args`. Each is refused at its key; an option neither file sets still passes."""
    key = extra.strip("{}").split("=")[0]
    message = refusal(kohya_recipe(), plugins, [f"backend.kohya.extra_args={extra}"])
    line = next(m for m in message.splitlines() if f"[backend.kohya.extra_args.{key}]" in m)
    assert words in line, message
    _, config, _ = planned(kohya_recipe(), plugins, ["backend.kohya.extra_args={scale_weight_norms=1.0}"])
    assert config["extra"]["scale_weight_norms"] == 1.0


def test_recipes_sharing_a_cache_folder_stage_their_datasets_apart(kohya_recipe, plugins, tmp_path):  # noqa: F811
    """The staged view under `[train] cache_dir` was one folder for every recipe using that cache, so a second recipe
    (another trigger, another folder) staged its links and captions over the first's, under a run still reading them.
    Each `[dataset]` table now has its own folder, and the same table (a resume, a rerun) finds its own again."""
    cache = f"train.cache_dir={tomllib_str(str(tmp_path / 'cache'))}"

    def image_dir(*sets: str) -> str:
        _, _, dataset = planned(kohya_recipe(), plugins, [cache, *sets])
        return dataset["datasets"][0]["subsets"][0]["image_dir"]

    first = image_dir()
    assert first == image_dir() and first.startswith(str(tmp_path / "cache" / "kohya-data"))
    assert image_dir('dataset.trigger="zxq"', 'dataset.trigger_policy="prepend"') != first
    assert image_dir('output.name="other"') == first       # the dataset, not the run, names the folder


def test_a_model_file_the_engines_reader_cannot_read_is_refused_at_its_key(kohya_recipe, plugins, tmp_path):  # noqa: F811
    """A model file whose path holds a control character and, after it, a backslash-u cannot be read back by
    sd-scripts' `toml` 0.10.2 ("Reserved escape sequence used"); it was refused under [backend.kohya], naming no
    recipe key, or (before the rule) passed and sd-scripts stopped reading its config."""
    from .conftest import model_files

    files = model_files(tmp_path / "m\x1b\\user")
    message = refusal(kohya_recipe(), plugins, [f"model.files.transformer={tomllib_str(files['transformer'])}"])
    line = next(m for m in message.splitlines() if "[model.files.transformer]" in m)
    assert "Reserved escape" in line and "pretrained_model_name_or_path" in line, message


@pytest.mark.parametrize("extra, words", [
    # sd-scripts reads these argparse options as the dataset file's `batch_size` / `num_repeats` /
    # `caption_extension`, which the generated file sets, so they were ignored without a word
    ("{train_batch_size=4}", "as `batch_size`"),
    ("{dataset_repeats=3}", "as `num_repeats`"),
    ("{caption_extention=\".caption\"}", "as `caption_extension`"),
    # options that override (or lose to) one lora-run sets from the recipe
    ("{max_train_epochs=2}", "`max_train_steps`"),
    ("{save_every_n_epochs=1}", "`save_every_n_steps`"),
    ("{sample_every_n_epochs=1}", "`sample_every_n_steps`"),
    ("{unet_lr=0.001}", "`learning_rate`"),
    ("{lr_scheduler_type=\"CosineAnnealingLR\"}", "`lr_scheduler`"),
    # it makes sd-scripts ignore min/max_bucket_reso, which the dataset file sets from dataset.bucket_min/max
    ("{bucket_no_upscale=true}", "ignore min_bucket_reso and max_bucket_reso"),
])
def test_extra_args_that_shadow_or_override_recipe_keys_are_refused(kohya_recipe, plugins, extra, words):  # noqa: F811
    key = extra.strip("{}").split("=")[0]
    message = refusal(kohya_recipe(), plugins, [f"backend.kohya.extra_args={extra}"])
    line = next(m for m in message.splitlines() if f"[backend.kohya.extra_args.{key}]" in m)
    assert words in line, message


def test_a_recipe_file_named_with_a_control_character_gives_valid_toml(kohya_recipe, plugins):  # noqa: F811
    """config.toml's comment header names the recipe file; a control character in that name went into the comment,
    where TOML forbids it: tomllib refused the whole file."""
    plan, config, _ = planned(kohya_recipe(name="r\x1b{x}.toml"), plugins)
    text = plan.files["kohya/config.toml"]
    assert "\x1b" not in text and "r\\x1b{x}.toml" in text.splitlines()[0]
    assert tomllib.loads(text) == toml.loads(text) == config
    assert config["saving"]["training_comment"].endswith("r\x1b{x}.toml")     # the value itself is kept exactly


def test_a_run_folder_from_output_dir_the_reader_cannot_read_is_refused_by_plan(kohya_recipe, plugins,  # noqa: F811
                                                                                  tmp_path):
    """`--output-dir` is not seen by check(): `lora-run plan --output-dir` showed a config.toml sd-scripts' reader
    cannot read, without a word (only the run refused it)."""
    from lora_run.errors import RecipeError
    from lora_run.run import make_backend, validate
    from lora_run.recipe import load_recipe
    from lora_run_rundir import RunDir

    prepared = validate(load_recipe(kohya_recipe()), plugins)
    with pytest.raises(RecipeError) as info:
        make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "r\x1b\\u")).plan()
    assert "[output.dir]" in str(info.value) and "toml 0.10.2" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["kohya/data", "kohya"])
def test_a_resume_never_stages_through_a_link_in_the_run_folder(kohya_recipe, fake_checkout, plugins_with,  # noqa: F811
                                                               subject_dataset, tmp_path, monkeypatch, where):
    """The run folder's `kohya/data` (or `kohya`) replaced by a link to a folder holding the dataset: `--resume`
    deleted the dataset's images and captions through it (sd-scripts' staging removes the images and captions no
    longer staged), then trained. It is refused before the engine starts (exit 2, named), the dataset untouched."""
    parent = tmp_path / "project"                  # the dataset's parent, where the link will point
    target = parent
    dataset = parent / ("subject" if where == "kohya/data" else "data/subject")
    shutil.copytree(subject_dataset, dataset)
    monkeypatch.setenv("FAKE_KOHYA_MODE", "crash")
    monkeypatch.setenv("FAKE_KOHYA_AT", "3")
    path = kohya_recipe(sd_scripts=fake_checkout, replace={str(subject_dataset): str(dataset)})
    _, _, _, error = run_in_process(path, plugins_with)
    assert error is not None
    monkeypatch.delenv("FAKE_KOHYA_MODE")
    run = tmp_path / "runs" / "ohwx"
    entry = run / where
    shutil.rmtree(entry)
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    entry.symlink_to(target, target_is_directory=True)
    _, _, _, error = run_in_process(path, plugins_with, resume=True)
    assert error is not None and getattr(error, "exit_code", None) == 2, error
    assert f"{run}{'/' if where == 'kohya/data' else ': cannot resume: '}{where}" in str(error), error
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before, "the dataset is untouched"


@pytest.mark.parametrize("extra", ["{noise_offset_random_strength=true}", "{adaptive_noise_scale=0.1}",
                                   "{multires_noise_iterations=6}", "{multires_noise_discount=0.5}",
                                   "{debiased_estimation_loss=true}", "{scale_v_pred_loss_like_noise_pred=true}",
                                   "{v_pred_like_loss=0.5}"])
@pytest.mark.parametrize("family", ["flux.1-dev", "hunyuan-image-2.1"])
def test_extra_args_that_shape_ignored_noise_or_loss_weights_are_refused(kohya_recipe, plugins, extra, family):  # noqa: F811
    """The noise offset's companions and the loss weightings beside Min-SNR-γ act where `noise_offset` and
    `min_snr_gamma` act, which sd-scripts' FLUX.1 and HunyuanImage trainers replace (plain randn noise; a
    `post_process_loss` that returns the loss unchanged): refused at their key like the two, not passed on to do
    nothing."""
    key = extra.strip("{}").split("=")[0]
    message = refusal(kohya_recipe(family=family), plugins, [f"backend.kohya.extra_args={extra}"])
    line = next(m for m in message.splitlines() if f"[backend.kohya.extra_args.{key}]" in m)
    assert "changes nothing" in line and "lora-run refuses it here" in line, message


@pytest.mark.parametrize("family", ["flux.1-dev", "hunyuan-image-2.1"])
@pytest.mark.parametrize("sets, key, words", [
    # the text-encoder cache (on by default) and the caption changes sd-scripts asserts against with it: the dataset
    # file does not set them, so the option reaches every subset
    (["backend.kohya.extra_args={shuffle_caption=true}"], "shuffle_caption", "text-encoder outputs are cached"),
    (["backend.kohya.extra_args={caption_dropout_rate=0.1}"], "caption_dropout_rate", "text-encoder outputs"),
    (["backend.kohya.extra_args={caption_tag_dropout_rate=0.1}"], "caption_tag_dropout_rate", "text-encoder"),
    (["backend.kohya.extra_args={token_warmup_step=10.0}"], "token_warmup_step", "text-encoder outputs are cached"),
    # the cache turned back on through extra_args where caption dropout keeps it off
    (["dataset.caption_dropout=0.1", "backend.kohya.extra_args={cache_text_encoder_outputs_to_disk=true}"],
     "cache_text_encoder_outputs_to_disk", "`caption_dropout_rate`"),
    # the latent cache (on by default) and the augmentations sd-scripts asserts against with it
    (["backend.kohya.extra_args={color_aug=true}"], "color_aug", "latents are cached"),
    (["backend.kohya.extra_args={random_crop=true}"], "random_crop", "latents are cached"),
    # block swap and CPU-offloaded checkpointing, each half given through extra_args
    (["backend.kohya.blocks_to_swap=4", "backend.kohya.extra_args={cpu_offload_checkpointing=true}"],
     "cpu_offload_checkpointing", "together with cpu_offload_checkpointing"),
    (["backend.kohya.cpu_offload_checkpointing=true", "backend.kohya.extra_args={blocks_to_swap=4}"],
     "blocks_to_swap", "together with cpu_offload_checkpointing"),
    (["backend.kohya.extra_args={blocks_to_swap=60}"], "blocks_to_swap", "swaps at most"),
    # a warmup for the schedule that takes none (sd-scripts raises), the fused backward pass beside AdamW
    (["scheduler.name=\"constant\"", "scheduler.warmup_steps=0", "backend.kohya.extra_args={lr_warmup_steps=10}"],
     "lr_warmup_steps", "takes no warmup"),
    (["optimizer.name=\"adamw\"", "backend.kohya.extra_args={fused_backward_pass=true}"], "fused_backward_pass",
     "never fuse the backward pass"),
    (["optimizer.name=\"adafactor\"", "backend.kohya.extra_args={fused_backward_pass=true}"],
     "fused_backward_pass", "would change nothing"),
])
def test_extra_args_sd_scripts_asserts_against_with_the_generated_options_are_refused(
        kohya_recipe, plugins, family, sets, key, words):  # noqa: F811
    """Each option is valid on its own, so the key check passed it, and sd-scripts stopped at start on the combination
    (its trainers assert that no caption change is used while text-encoder outputs are cached, no augmentation while
    latents are cached, no block swap with CPU-offloaded checkpointing, no warmup for `constant`; the fused backward
    pass asserts Adafactor and no accumulation, and then the LoRA trainers do not fuse anyway). Refused at the
    extra_args key; with the cache turned off the same option passes."""
    message = refusal(kohya_recipe(family=family), plugins, sets)
    line = next(m for m in message.splitlines() if f"[backend.kohya.extra_args.{key}]" in m)
    assert words in line, message
    if key in ("shuffle_caption", "color_aug"):
        off = "cache_text_encoder_outputs" if key == "shuffle_caption" else "cache_latents"
        _, config, _ = planned(kohya_recipe(family=family), plugins, [*sets, f"backend.kohya.{off}=false"])
        assert config["extra"][key] is True


@pytest.mark.parametrize("key", ["fp8_base", "fp8_base_unet"])
def test_fp8_base_through_extra_args_is_refused_for_hunyuan_image(kohya_recipe, plugins, key):  # noqa: F811
    """sd-scripts' HunyuanImage trainer does not support --fp8_base / --fp8_base_unet (it warns, and drops them for
    --fp8_scaled): refused at the key, naming the recipe setting that gives --fp8_scaled. FLUX.1 takes them."""
    message = refusal(kohya_recipe(family="hunyuan-image-2.1"), plugins, [f"backend.kohya.extra_args={{{key}=true}}"])
    line = next(m for m in message.splitlines() if f"[backend.kohya.extra_args.{key}]" in m)
    assert "does not support" in line and "base_precision" in line, message
    _, config, _ = planned(kohya_recipe(), plugins, [f"backend.kohya.extra_args={{{key}=true}}"])
    assert config["extra"][key] is True
