"""A damaged LoRA given to `lora-run eval --lora` (or to the generation API) is refused from its header before anything
loads: a module whose down and up ranks disagree or that lacks a matrix, an alpha that is a vector, matrices that are
transposed, a LoRA of another model size (wider, or naming blocks the model does not have). These were refused only
after the base pipeline had loaded and "generating N images" was printed: minutes of loading and GPU memory for a
full-size model. Each case is tried on the tiny FLUX.1 and HunyuanImage-2.1 models, in the formats their loaders read;
the pipeline's load is a sentinel that fails the test if reached, and nothing may be written."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import run_cli

EVAL = ["--set", 'eval.prompts=["{trigger}"]', "--set", "eval.strengths=[1.0]", "--set", "eval.seeds=[1]",
        "--set", "eval.steps=2"]

HUNYUAN_IMAGE_RECIPE = """
[model]
family = "hunyuan-image-2.1"
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
alpha = 4.0

[train]
steps = 2
mixed_precision = "no"

[eval]
enabled = false

[backend]
name = "native"
"""


class PipelineLoaded(Exception):
    """Raised by the sentinel that stands for the pipeline's load."""


@pytest.fixture(scope="module")
def tiny_image_model(tmp_path_factory) -> Path:
    from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image

    return build_tiny_hunyuan_image(tmp_path_factory.mktemp("tiny-hunyuan-image") / "model")


@pytest.fixture
def recipes(tiny_recipe, tiny_image_model, small_dataset, tmp_path) -> dict[str, Path]:
    image = tmp_path / "image.toml"
    image.write_text(HUNYUAN_IMAGE_RECIPE.format(model=tiny_image_model, dataset=small_dataset), encoding="utf-8")
    return {"flux": tiny_recipe(), "image": image}


@pytest.fixture(scope="module")
def flux_single_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from lora_run_flux.tiny import write_single_files

    return write_single_files(tiny_model, tmp_path_factory.mktemp("single"))


@pytest.fixture
def sentinel(monkeypatch):
    """Every native adapter's ``load_pipeline`` records the call and raises (exit 2 through the CLI, a line naming
    it): a refusal after it would have come after the load."""
    from lora_run.errors import OutputError
    from lora_run_native.adapters import registered_adapters

    calls: list[str] = []

    def load_pipeline(self, device, dtype):
        calls.append(self.family)
        raise OutputError("sentinel: the pipeline's load was reached")

    for cls in set(registered_adapters().values()):
        monkeypatch.setattr(cls, "load_pipeline", load_pipeline)
    return calls


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def pair(module: str, down: tuple[int, ...], up: tuple[int, ...], kohya: bool, alpha: tuple[int, ...] | None = ()):
    """The tensors of one module: kohya's (``lora_down``/``lora_up``/``alpha``) or peft's (``lora_A``/``lora_B``)."""
    names = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    out = {f"{module}.{names[0]}.weight": np.full(down, 0.01), f"{module}.{names[1]}.weight": np.full(up, 0.01)}
    if alpha is not None and kohya:
        out[f"{module}.alpha"] = np.full(alpha, 4.0)
    return out


#: family -> (a module of a 64 × 64 layer in the LoRA format the family's loader reads (kohya: alpha), the module in
#: the first block past the tiny model's, its layer's name)
MODULES = {"flux": ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_7_img_attn_proj", True,
                    "transformer.transformer_blocks.0.attn.to_out.0"),
           "image": ("diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.double_blocks.7.img_attn.proj",
                     False, "transformer.transformer_blocks.0.attn.to_out.0")}


def damaged(family: str, folder: Path) -> list[tuple[str, Path, str]]:
    """(damage, file, what the refusal says) for each damage kind, in the family's format."""
    module, far, kohya, layer = MODULES[family]
    down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    cases = [
        ("ranks disagree", pair(module, (4, 64), (64, 8), kohya),
         f"module {module}: its ranks disagree: {down}.weight is [4, 64] (rank × inputs) but {up}.weight is [64, 8]"),
        ("up matrix missing", {k: v for k, v in pair(module, (4, 64), (64, 4), kohya).items() if up not in k},
         f"module {module}: has {down}.weight but not the up ({'lora_up / lora_B'}) matrix"),
        ("transposed", pair(module, (64, 4), (4, 64), kohya),
         f"module {module}: its matrices are transposed: {down}.weight is [64, 4] and {up}.weight [4, 64], but "
         f"{layer} takes 64 inputs and gives 64 outputs"),
        ("wider model", pair(module, (4, 128), (128, 4), kohya),
         f"module {module}: {down}.weight is [4, 128] (128 inputs), but {layer} takes 64 inputs"),
        ("more blocks", pair(far, (4, 64), (64, 4), kohya),
         f"module {far}: names the layer transformer.transformer_blocks.7.attn.to_out.0, which this model does not "
         "have"),
    ]
    if kohya:
        cases.append(("alpha a vector", pair(module, (4, 64), (64, 4), kohya, alpha=(4,)),
                      f"module {module}: its alpha has shape [4], not one number"))
    else:       # the peft layouts carry no alpha; a kohya file of the family does
        kohya_module = "lora_unet_double_blocks_0_img_attn_proj"
        cases.append(("alpha a vector", pair(kohya_module, (4, 64), (64, 4), True, alpha=(4,)),
                      f"module {kohya_module}: its alpha has shape [4], not one number"))
    return [(what, save(folder / f"{family}-{what.replace(' ', '-')}.safetensors", tensors), says)
            for what, tensors, says in cases]


@pytest.mark.parametrize("family", ["flux", "image"])
def test_a_damaged_lora_is_refused_before_the_pipeline_loads(family, recipes, sentinel, tmp_path, capsys, figures):
    cases = damaged(family, tmp_path)
    for what, lora, says in cases:
        out = tmp_path / f"eval-{lora.stem}"
        started = time.monotonic()
        code, text = run_cli(["eval", str(recipes[family]), "--lora", str(lora), "--output-dir", str(out), *EVAL],
                             capsys, never="unexpected")
        took = time.monotonic() - started
        assert code == 2 and f"--lora {lora}: " in text and says in text, (what, text[-1500:])
        assert "generating" not in text and not sentinel, (what, text[-1500:])
        assert not out.exists(), what
        assert took < 30, (what, took)
    figures("hostile weights", cases=len(cases), faults=len(cases))


def test_a_damaged_lora_is_refused_before_a_single_file_transformer_loads(tiny_recipe, flux_single_files, sentinel,
                                                                         tmp_path, capsys):
    """The same cases against FLUX.1's transformer given as BFL's single file (``[model.files]``, as
    flux1-dev.safetensors): its layers are read from its header in diffusers' names (``file_layer_shapes``)."""
    from .test_hostile_weights import _files_recipe

    recipe = _files_recipe(tiny_recipe, flux_single_files, name="files.toml")
    for what, lora, says in damaged("flux", tmp_path):
        out = tmp_path / f"eval-{lora.stem}"
        code, text = run_cli(["eval", str(recipe), "--lora", str(lora), "--output-dir", str(out), *EVAL], capsys,
                             never="unexpected")
        assert code == 2 and f"--lora {lora}: " in text and says in text, (what, text[-1500:])
        assert "generating" not in text and not sentinel and not out.exists(), what


@pytest.mark.parametrize("family", ["flux", "image"])
def test_a_lora_that_fits_reaches_the_pipeline(family, recipes, sentinel, tmp_path, capsys):
    """The control: an intact LoRA of the model passes every check and reaches the pipeline's load (the sentinel),
    so the refusals above are the checks', not the sentinel's."""
    module, _, kohya, _ = MODULES[family]
    lora = save(tmp_path / "good.safetensors", pair(module, (4, 64), (64, 4), kohya))
    code, text = run_cli(["eval", str(recipes[family]), "--lora", str(lora), "--output-dir", str(tmp_path / "e"),
                          *EVAL], capsys, never="unexpected")
    assert code == 2 and "sentinel: the pipeline's load was reached" in text and sentinel, text[-1500:]


def test_a_check_that_ignores_shapes_lets_the_transposed_lora_through(recipes, sentinel, tmp_path, capsys,
                                                                      monkeypatch):
    """Planted mistake: with the fit check reduced to the structure check (shapes of the model ignored), the
    transposed LoRA, whose ranks agree, reaches the pipeline: the test above would fail on it."""
    import lora_run_native.adapters.base as base

    monkeypatch.setattr(base, "fit_problem", lambda *args, **kwargs: None)
    lora = next(path for what, path, _ in damaged("flux", tmp_path) if what == "transposed")
    code, text = run_cli(["eval", str(recipes["flux"]), "--lora", str(lora), "--output-dir", str(tmp_path / "e"),
                          *EVAL], capsys, never="unexpected")
    assert "sentinel: the pipeline's load was reached" in text and sentinel == ["flux.1-dev"], text[-1500:]


def test_the_generation_api_refuses_before_the_pipeline_loads(recipes, sentinel, tmp_path):
    """`generate_images`, which `eval` and anyone comparing LoRA files call, checks the file itself."""
    from lora_run.errors import OutputError
    from lora_run.recipe import load_recipe
    from lora_run_native.generate import generate_images

    recipe = load_recipe(recipes["flux"], []).recipe
    lora = next(path for what, path, _ in damaged("flux", tmp_path) if what == "transposed")
    job = {"name": "a", "prompt": "ohwx", "seed": 1, "strength": 1.0, "steps": 1, "guidance": 1.0, "width": 64,
           "height": 64}
    with pytest.raises(OutputError, match="its matrices are transposed"):
        generate_images(recipe, lora, [job], tmp_path / "out", device="cpu")
    assert not sentinel and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- every module of each format
def _peft_state(model: Path, targets: str = "all-linear") -> dict[str, np.ndarray]:
    """A peft state dict of rank 4 on every layer of the tiny transformer the preset targets (A: rank × inputs,
    B: outputs × rank), from its weights' header."""
    import re

    from lora_run_formats.lora_check import linear_shapes
    from lora_run_formats.model_files import component_headers
    from lora_run_native.adapters.base import MMDIT_TARGET_PRESETS

    layers = linear_shapes(component_headers(model / "transformer"))
    patterns = [re.compile(p) for p in MMDIT_TARGET_PRESETS[targets]]
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in sorted(layers.items()):
        if shape is not None and len(shape) == 2 and any(p.search(name) for p in patterns) and \
                not name.startswith("context_embedder"):
            out[f"transformer.{name}.lora_A.weight"] = rng.standard_normal((4, shape[1])).astype(np.float32)
            out[f"transformer.{name}.lora_B.weight"] = rng.standard_normal((shape[0], 4)).astype(np.float32)
    return out


@pytest.mark.parametrize("family", ["flux", "image"])
def test_every_format_lora_run_writes_fits_its_model(family, recipes, tiny_model, tiny_image_model, tmp_path):
    """Control for the fused layers (FLUX.1's and HunyuanImage's q/k/v and linear1 in one kohya or ComfyUI module):
    a LoRA on every layer of `all-linear`, in each format the family's converters write, passes; the same file with
    one fused module's up matrix a row short is named."""
    import torch
    from safetensors.torch import save_file

    from lora_run.recipe import load_recipe
    from lora_run_native.adapters import adapter_class

    model = tiny_model if family == "flux" else tiny_image_model
    recipe = load_recipe(recipes[family], []).recipe
    adapter = adapter_class(recipe.model.family)(recipe)
    state = {k: torch.from_numpy(v) for k, v in _peft_state(model).items()}
    if family == "flux":
        from lora_run_flux.lora import diffusers_to_kohya

        files = {"diffusers": state, "kohya": diffusers_to_kohya(state, alpha=4.0, rank=4)}
        fused = "lora_unet_single_blocks_0_linear1"
    else:
        from lora_run_hunyuan_image.lora import diffusers_to_comfy, diffusers_to_sd_scripts

        files = {"diffusers": state, "comfyui": diffusers_to_comfy(state, alpha=4.0, rank=4),
                 "kohya": diffusers_to_sd_scripts(state, alpha=4.0, rank=4)}
        fused = "diffusion_model.single_blocks.0.linear1"
    for name, tensors in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        assert adapter.lora_problem(path) is None, name
    short = dict(files["kohya" if family == "flux" else "comfyui"])
    up = next(k for k in short if k.startswith(fused) and ("lora_up" in k or "lora_B" in k))
    short[up] = short[up][:-1].contiguous()
    path = tmp_path / "short.safetensors"
    save_file({k: v.contiguous() for k, v in short.items()}, str(path))
    why = adapter.lora_problem(path)
    assert why is not None and f"module {fused}: " in why and "(4 fused parts)" in why, why
