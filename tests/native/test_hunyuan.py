"""The Hunyuan adapters of the native backend on tiny models built here: learning, exact resume, LoRA files
that load and change the output, the objectives, the FLUX recipe switched to each family, honest refusals."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_run.hookspecs import hookimpl

from .conftest import env_for_subprocess, lora_tensors

REPO = Path(__file__).resolve().parents[2]
FAMILIES = {"image": "hunyuan-image-2.1", "dit": "hunyuan-dit-1.2"}

RECIPE = """
[model]
family = "{family}"
source = "{model}"
offline = true

[dataset]
path = "{dataset}"
trigger = "ohwx"
resolution = 64
bucket_min = 64
bucket_max = 96
bucket_step = 32
min_images = 1

[lora]
rank = 4
alpha = 8.0
targets = "all-linear"

[optimizer]
name = "adamw"
lr = 1e-3

[scheduler]
name = "constant"

[train]
steps = 4
batch_size = 1
mixed_precision = "no"
gradient_checkpointing = true
seed = 7

[eval]
enabled = false

[output]
name = "tiny"
save_precision = "fp32"

[backend]
name = "native"

[backend.native]
progress_bar = false
tensorboard = false
"""


@pytest.fixture(scope="session")
def tiny_hunyuan(tmp_path_factory) -> dict[str, Path]:
    from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit
    from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image

    root = tmp_path_factory.mktemp("tiny-hunyuan")
    return {"image": build_tiny_hunyuan_image(root / "image"), "dit": build_tiny_hunyuan_dit(root / "dit")}


@pytest.fixture
def hunyuan_recipe(tmp_path, tiny_hunyuan, dataset):
    def write(kind: str, extra: str = "", name: str | None = None) -> Path:
        body = RECIPE.format(family=FAMILIES[kind], model=tiny_hunyuan[kind], dataset=dataset)
        path = tmp_path / (name or f"{kind}.toml")
        path.write_text(body + "\n" + extra, encoding="utf-8")
        return path
    return write


def mini(kind: str, model: Path | str = "/nowhere", **sections):
    """A parsed recipe of the family (no files needed), with section overrides."""
    from lora_run.recipe import replace
    from lora_run_devtools.testing import parse_recipe_text

    recipe = parse_recipe_text(RECIPE.format(family=FAMILIES[kind], model=model, dataset="/nowhere"))
    return replace(recipe, **sections) if sections else recipe


class Losses:
    def __init__(self):
        self.values = []

    @hookimpl
    def step_finished(self, step, metrics):
        self.values.append(metrics["loss"])


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "dit"])
def test_loss_falls_when_overfitting(kind, hunyuan_recipe, run_recipe, tmp_path):
    """Paired with a run at a (practically) zero learning rate: same batches, noise and timesteps."""
    recipe = hunyuan_recipe(kind)
    sets = ["train.steps=40", "lora.rank=8", "lora.alpha=8.0", "train.gradient_checkpointing=false"]
    trained, frozen = Losses(), Losses()
    run_recipe(recipe, [*sets, "optimizer.lr=1e-2"], [trained], output=tmp_path / "trained")
    run_recipe(recipe, [*sets, "optimizer.lr=1e-12"], [frozen], output=tmp_path / "frozen")
    assert trained.values[0] == pytest.approx(frozen.values[0], rel=1e-4)
    last_trained, last_frozen = sum(trained.values[-10:]) / 10, sum(frozen.values[-10:]) / 10
    assert last_trained < 0.85 * last_frozen, (last_trained, last_frozen)


KILLER = '''
import os, signal, sys
from lora_run.hookspecs import hookimpl
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run.run import execute

class KillAfterCheckpoint:
    @hookimpl
    def checkpoint_saved(self, step, path):
        if step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

execute(load_recipe(sys.argv[1], sys.argv[3:]), load_plugins(extra=[KillAfterCheckpoint()]), output_dir=sys.argv[2])
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "dit"])
def test_killed_and_resumed_run_is_bitwise_equal(kind, hunyuan_recipe, run_recipe, tmp_path):
    sets = ["train.steps=4", "train.save_every_steps=2", "train.noise_offset=0.1", "lora.dropout=0.1",
            "dataset.caption_dropout=0.3", "optimizer.lr=1e-2"]
    if kind == "dit":
        sets.append("train.min_snr_gamma=5.0")
    recipe = hunyuan_recipe(kind)
    whole = run_recipe(recipe, sets, output=tmp_path / "whole")
    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, str(script), str(recipe), str(cut), *sets], capture_output=True,
                            text=True, env=env_for_subprocess(), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (cut / "tiny.safetensors").exists()
    args = [sys.executable, "-m", "lora_run.cli", str(recipe), "--resume", "--output-dir", str(cut)]
    for s in sets:
        args += ["--set", s]
    resumed = subprocess.run(args, capture_output=True, text=True, env=env_for_subprocess(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = lora_tensors(whole.artifacts["lora_diffusers"]), lora_tensors(cut / "tiny.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert bool((a[key] == b[key]).all()), key


# -------------------------------------------------------------------------------------- HunyuanImage
@pytest.mark.parametrize("kind", ["image", "dit"])
def test_a_second_run_reads_every_cached_entry_as_valid(kind, hunyuan_recipe, run_recipe, tmp_path):
    """The cache requires the dtypes the adapter declares (``text_dtype``: embeddings in the compute dtype, the
    ``text_masks`` int64); its masks are declared, so a second run finds every entry valid, none rebuilt (an
    undeclared mask is named at the first encode). In-process runs share one precision (accelerate's state)."""
    sets = ["train.steps=1", f"train.cache_dir=\"{tmp_path / 'cache'}\""]
    run_recipe(hunyuan_recipe(kind), sets, output=tmp_path / "first")
    again = run_recipe(hunyuan_recipe(kind), sets, output=tmp_path / "again")
    for kind_stats in (again.artifacts["cache"]["latents"], again.artifacts["cache"]["text"]):
        assert kind_stats["hits"] > 0 and kind_stats["misses"] == kind_stats["corrupt"] == 0, kind_stats


@pytest.fixture(scope="module")
def image_run(tiny_hunyuan, tmp_path_factory):
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_devtools.testing import make_images

    root = tmp_path_factory.mktemp("image-run")
    make_images(root / "subject", count=2, size=(96, 80))
    recipe = root / "image.toml"
    recipe.write_text(RECIPE.format(family=FAMILIES["image"], model=tiny_hunyuan["image"], dataset=root / "subject"))
    ctx = execute(load_recipe(recipe, ["optimizer.lr=5e-2", "train.steps=3",
                                       'output.formats=["diffusers", "comfyui", "kohya"]']), load_plugins(),
                  output_dir=str(root / "run"), echo=lambda *_: None)
    return ctx


def test_image_targets_anchor_proj_out_and_skip_the_refiner(tiny_hunyuan):
    from diffusers import HunyuanImageTransformer2DModel

    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter

    model = HunyuanImageTransformer2DModel.from_pretrained(tiny_hunyuan["image"], subfolder="transformer")
    recipe = mini("image", tiny_hunyuan["image"])
    names = HunyuanImageAdapter(recipe).lora_target_modules(model, "all-linear", [])
    assert "single_transformer_blocks.0.proj_out" in names and "proj_out" not in names
    assert not any("refiner" in n or n.startswith(("context_embedder", "time_", "norm_out")) for n in names)
    assert "transformer_blocks.0.attn.add_q_proj" in names and "transformer_blocks.0.norm1.linear" in names


def test_image_gradient_checkpointing_workaround(tiny_hunyuan):
    """diffusers' default checkpoint function fails on this model; the adapter's kwargs-aware one gives the same
    gradients as no checkpointing."""
    import torch
    from diffusers import HunyuanImageTransformer2DModel

    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter

    recipe = mini("image")
    adapter = HunyuanImageAdapter(recipe)
    torch.manual_seed(0)
    x = torch.randn(1, 64, 2, 2)
    text = {"prompt_embeds": torch.randn(1, 5, 32), "prompt_embeds_mask": torch.tensor([[1, 1, 1, 0, 0]]),
            "prompt_embeds_2": torch.randn(1, 4, 32), "prompt_embeds_mask_2": torch.tensor([[1, 1, 0, 0]])}
    grads = []
    for checkpointing in (False, True):
        model = HunyuanImageTransformer2DModel.from_pretrained(tiny_hunyuan["image"], subfolder="transformer")
        model.train()
        if checkpointing:
            adapter.enable_gradient_checkpointing(model)
        out = adapter.predict(model, x, torch.tensor([0.5]), text, 1.0)
        assert out.shape == x.shape
        out.square().mean().backward()
        grads.append(model.transformer_blocks[0].attn.to_q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    plain = HunyuanImageTransformer2DModel.from_pretrained(tiny_hunyuan["image"], subfolder="transformer")
    plain.train()
    plain.enable_gradient_checkpointing()
    with pytest.raises(TypeError):
        adapter.predict(plain, x, torch.tensor([0.5]), text, 1.0).mean().backward()


def test_image_text_encoding_follows_the_pipeline(tiny_hunyuan):
    """Our cached encoding equals HunyuanImagePipeline.encode_prompt's, glyph text included."""
    import torch
    from diffusers import HunyuanImagePipeline

    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter

    recipe = mini("image", tiny_hunyuan["image"])
    adapter = HunyuanImageAdapter(recipe)
    adapter.load_encoders(only=("qwen", "byt5"))
    captions = ["ohwx, a man", 'ohwx holding a sign that says "hello"']
    ours = adapter.encode_captions(captions)
    pipe = HunyuanImagePipeline.from_pretrained(tiny_hunyuan["image"])
    ref = pipe.encode_prompt(captions, device=torch.device("cpu"), batch_size=2)
    for key, value in zip(("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"), ref):
        assert ours[key].shape == value.shape, key
        assert torch.allclose(ours[key].float(), value.float(), atol=1e-5), key
    assert ours["prompt_embeds_mask_2"][0].sum() == 0 and ours["prompt_embeds_mask_2"][1].sum() > 0


def test_image_every_format_loads_and_changes_the_output(image_run, tiny_hunyuan):
    import torch
    from diffusers import HunyuanImageTransformer2DModel
    from safetensors import safe_open

    from lora_run_hunyuan_image.adapter import load_hunyuan_image_lora

    diffusers_file = Path(image_run.artifacts["lora_diffusers"])
    comfy_file = Path(image_run.artifacts["lora_comfyui"])
    kohya_file = Path(image_run.artifacts["lora_kohya"])
    assert comfy_file.parent.name == "comfyui" and kohya_file.parent.name == "kohya"
    comfy = lora_tensors(comfy_file)
    assert comfy and all(k.startswith("diffusion_model.") for k in comfy)     # ComfyUI's layout, no alpha
    assert any("double_blocks.0.img_attn.qkv" in k for k in comfy) and any("single_blocks.0.linear1" in k for k in comfy)
    assert all(k.startswith("transformer.") for k in lora_tensors(diffusers_file))
    kohya = lora_tensors(kohya_file)                                         # sd-scripts' names, with alphas
    assert all(k.startswith("lora_unet_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    assert not any("_mod_lin." in k or "_mlp_0." in k or "modulation_lin." in k for k in kohya)
    with safe_open(str(kohya_file), "pt") as fh:
        assert fh.metadata()["ss_network_module"] == "networks.lora_hunyuan_image"

    torch.manual_seed(1)
    x = torch.randn(1, 64, 2, 2)
    kw = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 32),
              encoder_attention_mask=torch.ones(1, 5, dtype=torch.long), encoder_hidden_states_2=torch.randn(1, 3, 32),
              encoder_attention_mask_2=torch.ones(1, 3, dtype=torch.long), return_dict=False)
    outputs = {}
    for name, path in (("base", None), ("diffusers", diffusers_file), ("comfy", comfy_file), ("kohya", kohya_file)):
        model = HunyuanImageTransformer2DModel.from_pretrained(tiny_hunyuan["image"], subfolder="transformer")
        if path is not None:
            load_hunyuan_image_lora(model, path)
        with torch.no_grad():
            outputs[name] = model(x, **kw)[0]
    assert (outputs["diffusers"] - outputs["base"]).abs().max() > 1e-4, "the LoRA changes the output"
    assert torch.allclose(outputs["diffusers"], outputs["comfy"], atol=1e-5), "the formats are the same LoRA"
    assert torch.allclose(outputs["diffusers"], outputs["kohya"], atol=1e-5), "the formats are the same LoRA"
    # also the plain diffusers loader with the path, as users do
    model = HunyuanImageTransformer2DModel.from_pretrained(tiny_hunyuan["image"], subfolder="transformer")
    model.load_lora_adapter(str(diffusers_file), prefix="transformer")
    with torch.no_grad():
        assert torch.allclose(model(x, **kw)[0], outputs["diffusers"], atol=1e-6)


def test_image_generate_api_with_both_formats(image_run, tmp_path):
    from lora_run.recipe import load_recipe
    from lora_run_native.generate import generate_images

    recipe = load_recipe(Path(image_run.run_dir.path) / "recipe.toml").recipe
    job = {"prompt": "ohwx, a portrait", "seed": 3, "steps": 2, "guidance": 1.0, "width": 64, "height": 64}
    images = {}
    for name, lora, strength in (("base", None, 1.0), ("d", image_run.artifacts["lora_diffusers"], 1.0),
                                 ("c", image_run.artifacts["lora_comfyui"], 1.0), ("d0", image_run.artifacts["lora_diffusers"], 0.0)):
        out = generate_images(recipe, lora, [{**job, "name": name, "strength": strength}], tmp_path / name)
        images[name] = Path(out[0]["path"]).read_bytes()
    assert images["d"] != images["base"]
    assert images["d0"] == images["base"], "strength 0 is the base model"


# ------------------------------------------------------------------------------------------ Hunyuan-DiT
def test_dit_objective_matches_the_ddpm_scheduler():
    import torch
    from diffusers import DDPMScheduler

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    # no model folder: the documented v1.2 schedule (β_end 0.018; tests/parity checks it against the model's)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear",
                          prediction_type="v_prediction")
    recipe = mini("dit", train={"min_snr_gamma": 5.0, "timestep_sampling": "sigmoid"})
    adapter = HunyuanDiTAdapter(recipe)
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0.0, 500.0, 999.0])
    noisy, target = adapter.noisy_and_target(x0, noise, t)
    assert torch.allclose(noisy, sched.add_noise(x0, noise, t.long()), atol=1e-6)
    assert torch.allclose(target, sched.get_velocity(x0, noise, t.long()), atol=1e-6)
    ac = sched.alphas_cumprod[t.long()]
    snr = ac / (1 - ac)
    assert torch.allclose(adapter.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    drawn = adapter.sample_timesteps(4096, torch.Generator().manual_seed(0), x0)
    assert drawn.min() >= 0 and drawn.max() <= 999 and bool((drawn == drawn.round()).all())
    assert abs(float(drawn.mean()) - 499.5) < 20          # sigmoid(N(0,1)) is symmetric around 0.5


def test_dit_checkpointing_gives_the_same_gradients_and_keeps_names(tiny_hunyuan):
    import torch
    from diffusers import HunyuanDiT2DModel

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter

    recipe = mini("dit")
    adapter = HunyuanDiTAdapter(recipe)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 12)
    text = {"prompt_embeds": torch.randn(1, 77, 32), "prompt_attention_mask": torch.ones(1, 77, dtype=torch.long),
            "prompt_embeds_2": torch.randn(1, 256, 32), "prompt_attention_mask_2": torch.ones(1, 256, dtype=torch.long)}
    grads, names = [], []
    for checkpointing in (False, True):
        model = HunyuanDiT2DModel.from_pretrained(tiny_hunyuan["dit"], subfolder="transformer")
        if checkpointing:
            adapter.enable_gradient_checkpointing(model)
        out = adapter.predict(model, x, torch.tensor([300.0]), text, 1.0)
        assert out.shape == x.shape, "the v half of the learn_sigma output"
        out.square().mean().backward()
        grads.append(model.blocks[3].skip_linear.weight.grad.clone())
        names.append(sorted(model.state_dict()))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and names[0] == names[1]


def test_dit_lora_loads_for_inference_and_changes_the_output(hunyuan_recipe, run_recipe, tiny_hunyuan, tmp_path):
    from lora_run.errors import OutputError
    from lora_run.recipe import load_recipe
    from lora_run_native.generate import generate_images

    recipe = hunyuan_recipe("dit")
    ctx = run_recipe(recipe, ["optimizer.lr=5e-2", "train.steps=3"])
    lora = Path(ctx.artifacts["lora_diffusers"])
    tensors = lora_tensors(lora)
    assert tensors and all(k.startswith("transformer.blocks.") for k in tensors)
    loaded = load_recipe(recipe).recipe
    job = {"prompt": "ohwx, a portrait", "seed": 3, "steps": 2, "guidance": 1.0, "width": 64, "height": 64}
    images = {}
    for name, path, strength in (("base", None, 1.0), ("lora", lora, 1.0), ("half", lora, 0.5), ("zero", lora, 0.0)):
        out = generate_images(loaded, path, [{**job, "name": name, "strength": strength}], tmp_path / name)
        images[name] = Path(out[0]["path"]).read_bytes()
    assert images["lora"] != images["base"] and images["half"] != images["lora"]
    assert images["zero"] == images["base"]
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.nope.lora_A.weight": tensors[next(iter(tensors))]}, str(bad))
    with pytest.raises(OutputError, match="bad.safetensors"):
        generate_images(loaded, bad, [{**job, "name": "bad", "strength": 1.0}], tmp_path / "bad")


def test_dit_lora_reloads_with_peft_exactly(hunyuan_recipe, run_recipe, tiny_hunyuan):
    """The saved file, injected into a fresh transformer, reproduces the trained model's prediction."""
    import torch
    from diffusers import HunyuanDiT2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from lora_run_hunyuan_dit.adapter import load_hunyuan_dit_lora

    ctx = run_recipe(hunyuan_recipe("dit"), ["optimizer.lr=5e-2", "train.steps=2", "lora.alpha=2.0"])
    tensors = lora_tensors(ctx.artifacts["lora_diffusers"])
    torch.manual_seed(0)
    kw = dict(encoder_hidden_states=torch.randn(1, 77, 32), text_embedding_mask=torch.ones(1, 77, dtype=torch.long),
              encoder_hidden_states_t5=torch.randn(1, 256, 32),
              text_embedding_mask_t5=torch.ones(1, 256, dtype=torch.long), return_dict=False)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([400.0])
    a = HunyuanDiT2DModel.from_pretrained(tiny_hunyuan["dit"], subfolder="transformer")
    load_hunyuan_dit_lora(a, Path(ctx.artifacts["lora_diffusers"]))
    # the same weights through peft with the unfolded alpha/rank scale (rank 4, alpha 2)
    b = HunyuanDiT2DModel.from_pretrained(tiny_hunyuan["dit"], subfolder="transformer")
    targets = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in tensors})
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, target_modules=targets), b)
    state = {k[len("transformer."):]: (v * 2.0 if ".lora_B." in k else v) for k, v in tensors.items()}
    set_peft_model_state_dict(b, state)
    with torch.no_grad():
        assert torch.allclose(a(x, t, **kw)[0], b(x, t, **kw)[0], atol=1e-5)


# ------------------------------------------------------------------------------ switching and refusals
def _fast_recipe_for(kind: str, model: Path, dataset: Path, folder: Path) -> Path:
    """recipes/flux/identity-fast.toml with only the [model] lines changed."""
    text = (REPO / "recipes" / "flux" / "identity-fast.toml").read_text("utf-8")
    text = re.sub(r'family = "flux\.1-dev"', f'family = "{FAMILIES[kind]}"', text)
    text = re.sub(r'source = "black-forest-labs/FLUX\.1-dev"', f'source = "{model}"\noffline = true', text)
    path = folder / f"fast-{kind}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "dit"])
def test_flux_fast_recipe_switched_to_hunyuan_plans_and_runs(kind, tiny_hunyuan, dataset, tmp_path, run_cli):
    recipe = _fast_recipe_for(kind, tiny_hunyuan[kind], dataset, tmp_path)
    before = (REPO / "recipes" / "flux" / "identity-fast.toml").read_text("utf-8").splitlines()
    after = recipe.read_text("utf-8").splitlines()
    changed = [line for line in after if line not in before]
    assert all(line.startswith(("family", "source", "offline")) for line in changed), changed
    sets = ["--set", f"dataset.path={dataset}", "--set", "dataset.resolution=64", "--set", "dataset.bucket_min=64",
            "--set", "dataset.bucket_max=96", "--set", "dataset.min_images=1"]
    plan = run_cli("plan", recipe, *sets)
    assert plan.returncode == 0, plan.stderr
    assert FAMILIES[kind] in plan.stdout and ("DDPM (v-prediction" if kind == "dit" else "rectified flow") in plan.stdout
    if kind == "dit":               # the plan says which schedule trains, and where it came from
        assert "β 0.00085 → 0.018" in plan.stdout and "scheduler_config.json" in plan.stdout, plan.stdout
    out = tmp_path / "run"
    run = run_cli(recipe, *sets, "--set", "train.steps=2", "--set", "train.save_every_steps=1", "--set", "sample.steps=2",
                  "--set", "sample.width=64", "--set", "sample.height=64", "--set", "backend.native.progress_bar=false",
                  "--set", "backend.native.tensorboard=false", "--set", "eval.enabled=false", "--output-dir", out)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (out / "subject_fast.safetensors").is_file()
    assert list((out / "samples").rglob("*.png")), "the final samples were drawn"
    if kind == "image":
        assert (out / "kohya" / "subject_fast.safetensors").is_file()     # the recipe asks for kohya + diffusers


@pytest.mark.parametrize("kind,sets,key,why", [
    ("image", ["train.guidance=3.5"], "train.guidance", "no guidance-embedding input"),
    ("image", ['train.timestep_sampling="flux-shift"'], "train.timestep_sampling", "fixed shift"),
    ("image", ["train.min_snr_gamma=5.0"], "train.min_snr_gamma", "flow matching"),
    ("image", ["text_encoder.train=true"], "text_encoder.train", "CLIP-L"),
    ("dit", ["train.guidance=3.5"], "train.guidance", "no guidance-embedding input"),
    ("dit", ['train.timestep_sampling="flux-shift"'], "train.timestep_sampling", "DDPM"),
    ("dit", ['train.timestep_sampling="shift"'], "train.timestep_sampling", "DDPM"),
    ("dit", ['train.timestep_weighting="cosmap"'], "train.timestep_weighting", "min_snr_gamma"),
])
def test_flux_only_settings_are_refused_with_the_key_and_reason(kind, sets, key, why, hunyuan_recipe, run_cli):
    recipe = hunyuan_recipe(kind)
    args = []
    for s in sets:
        args += ["--set", s]
    result = run_cli("check", recipe, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert key.split(".")[-1] in text and why in text and "Traceback" not in text


def test_dit_refuses_single_files_and_text_length_by_key(hunyuan_recipe, dataset, run_cli):
    recipe = hunyuan_recipe("dit", f'[model.files]\ntransformer = "{dataset}/x.safetensors"\n')
    result = run_cli("check", recipe)
    assert result.returncode == 2 and "[model.files.transformer] single files are not read" in result.stderr
    result = run_cli("check", hunyuan_recipe("dit", name="len.toml"), "--set", "backend.native.text_max_length=64")
    assert result.returncode == 2 and "text_max_length" in result.stderr and "fixed" in result.stderr


def test_dit_version_must_agree_with_the_model_folder(hunyuan_recipe, run_cli):
    """`[model] version` names the release; the tiny folder is v1.2 (its scheduler config says β_end 0.018)."""
    result = run_cli("check", hunyuan_recipe("dit"), "--set", 'model.version="1.1"')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[model.version]" in result.stderr and "scheduler_config.json" in result.stderr, result.stderr
    assert run_cli("check", hunyuan_recipe("dit", name="v12.toml"), "--set", 'model.version="1.2"').returncode == 0
    result = run_cli("check", hunyuan_recipe("image", name="img.toml"), "--set", 'model.version="1.2"')
    assert result.returncode == 2 and "[model.version]" in result.stderr and "no release" in result.stderr


@pytest.mark.slow
def test_dit_v11_trains_and_samples_from_the_cli(tmp_path, dataset, run_cli):
    """A v1.1 model (style and image-size conditioning, β_end 0.03 in its scheduler config) trains and draws its
    samples with `[model] version = "1.1"`, on its own schedule."""
    from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit

    model = build_tiny_hunyuan_dit(tmp_path / "v11", version="1.1")
    recipe = tmp_path / "v11.toml"
    recipe.write_text(RECIPE.format(family="hunyuan-dit-1.2", model=model, dataset=dataset)
                      + '\n[sample]\nprompts = ["a photo of {trigger}"]\nevery_steps = 2\nsteps = 2\nwidth = 64\n'
                      'height = 64\n', encoding="utf-8")
    out = tmp_path / "run"
    run = run_cli(recipe, "--set", 'model.version="1.1"', "--set", "train.steps=2", "--output-dir", out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "tiny.safetensors").is_file() and list((out / "samples").rglob("*.png"))
    refused = run_cli("check", recipe, "--set", 'model.version="1.2"')
    assert refused.returncode == 2 and "[model.version]" in refused.stderr and "0.03" in refused.stderr


def test_backend_registers_both_families_honestly():
    from lora_run.plugins import load_plugins

    native = load_plugins().registry["backend"]["native"]
    image, dit = native.capabilities["hunyuan-image-2.1"], native.capabilities["hunyuan-dit-1.2"]
    assert "min_snr_gamma" in dit and "min_snr_gamma" not in image
    assert "timestep_weighting" in image and "timestep_weighting" not in dit
    for caps in (image, dit):
        assert "guidance" not in caps and "timestep_sampling:flux-shift" not in caps
        assert "text_encoder_training" not in caps and "timestep_sampling:sigmoid" in caps


def test_shipped_hunyuan_recipes_check(tiny_hunyuan, dataset, run_cli):
    for kind, folder in (("image", "hunyuan-image"), ("dit", "hunyuan-dit")):
        recipe = REPO / "recipes" / folder / "identity.toml"
        result = run_cli("plan", recipe, "--set", f"model.source={tiny_hunyuan[kind]}", "--set", "model.offline=true",
                         "--set", f"dataset.path={dataset}", "--set", "dataset.min_images=1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert FAMILIES[kind] in result.stdout


# ------------------------------------------------------------------------------- HunyuanImage single files
@pytest.fixture(scope="module")
def image_single_files(tiny_hunyuan, tmp_path_factory) -> dict:
    from lora_run_hunyuan_image.tiny import write_hunyuan_image_single_files

    return write_hunyuan_image_single_files(tiny_hunyuan["image"], tmp_path_factory.mktemp("image-single"))


def _files_toml(files: dict) -> str:
    return "[model.files]\n" + "".join(f'{k} = "{files[k]}"\n' for k in ("transformer", "vae", "qwen", "byt5"))


def test_image_single_files_load_the_same_model_as_the_folder(image_single_files, tiny_hunyuan, tmp_path):
    """The Tencent-layout transformer and VAE, ComfyUI's Qwen and the ByT5 file give the folder's weights."""
    import torch
    from safetensors.torch import load_file

    from lora_run.recipe import load_recipe
    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter
    from lora_run_hunyuan_image.files import qwen_comfy_to_transformers5

    assert any(k.startswith("double_blocks.0.img_attn_qkv") for k in load_file(str(image_single_files["transformer"])))
    recipe_path = tmp_path / "files.toml"
    body = RECIPE.format(family=FAMILIES["image"], model=image_single_files["tokenizers"], dataset=tmp_path)
    recipe_path.write_text(body + _files_toml(image_single_files), encoding="utf-8")
    recipe = load_recipe(recipe_path).recipe
    adapter = HunyuanImageAdapter(recipe)
    assert adapter.check_sources() == []
    folder = {"transformer": "transformer", "vae": "vae", "qwen": "text_encoder", "byt5": "text_encoder_2"}
    for key, sub in folder.items():
        model = adapter._component(key, torch.float32)
        reference = load_file(str(next((tiny_hunyuan["image"] / sub).glob("*.safetensors"))))
        if key == "qwen":       # saved with transformers-4 names, like ComfyUI's file
            reference = qwen_comfy_to_transformers5(reference)
        own = model.state_dict()
        for name, value in reference.items():
            assert name in own, (key, name)
            assert torch.equal(own[name].float(), value.float()), (key, name)


def test_image_trains_from_single_files_and_names_a_wrong_file(image_single_files, dataset, run_recipe, tmp_path):
    from lora_run.errors import RecipeError

    def write(files: dict, name: str) -> Path:
        body = RECIPE.format(family=FAMILIES["image"], model=image_single_files["tokenizers"], dataset=dataset)
        path = tmp_path / name
        path.write_text(body + _files_toml(files), encoding="utf-8")
        return path

    ctx = run_recipe(write(image_single_files, "files.toml"), ["train.steps=2"])
    assert Path(ctx.artifacts["lora_diffusers"]).is_file()
    wrong = write({**image_single_files, "vae": image_single_files["byt5"]}, "wrong.toml")
    with pytest.raises(RecipeError, match=r"model\.files\.vae.*byt5_small_glyphxl.*is a T5 encoder, not a "
                       "HunyuanImage-2.1 autoencoder"):     # before the dataset is linted or anything loads
        run_recipe(wrong, ["train.steps=1"], output=tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_dit_transformer_loaded_for_training_dispatches_its_attention(tiny_hunyuan):
    """The family's load_transformer gives every attention module the dispatching processor, so the native
    backend's kernel choice (FlashAttention-4) reaches Hunyuan-DiT; a transformer loaded by diffusers alone
    does not dispatch (its processor calls SDPA itself)."""
    from diffusers import HunyuanDiT2DModel

    from lora_run_hunyuan_dit.adapter import HunyuanDiTAdapter
    from lora_run_hunyuan_dit.attention import DispatchingHunyuanAttnProcessor
    from lora_run_native.attention import set_backend

    adapter = HunyuanDiTAdapter(mini("dit", model=tiny_hunyuan["dit"]))
    model = adapter.load_transformer()
    processors = list(model.attn_processors.values())
    assert processors and all(isinstance(p, DispatchingHunyuanAttnProcessor) for p in processors)
    assert set_backend(model, None) == len(processors) == 2 * len(model.blocks)
    plain = HunyuanDiT2DModel.from_pretrained(tiny_hunyuan["dit"], subfolder="transformer")
    assert set_backend(plain, None) == 0
