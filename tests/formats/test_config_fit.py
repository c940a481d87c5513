"""A config.json describing another model than its weights (`num_layers = 100000`) is refused from the headers
before anything is built: by `lora-run check` and the run's pre-flight (exit 2, the config file and field named,
nothing written), for every family's tiny model, its transformer and its text encoders, and for a `[model.files]`
file whose config comes from the source. Before, diffusers and transformers built the model the config described
first: minutes and gigabytes for 100000 blocks, bounded only by the machine (docs/reliability.md)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.flux2.conftest import flux2_registered, flux2_site  # noqa: F401 - the FLUX.2 family where not installed

pytest.importorskip("diffusers")

RECIPE = """
[model]
family = "{family}"
source = "{model}"
offline = true
{files}
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

[optimizer]
name = "adamw"
lr = 1e-3

[train]
steps = 2
batch_size = 1
mixed_precision = "no"

[eval]
enabled = false

[backend]
name = "native"

[backend.native]
progress_bar = false
tensorboard = false
"""

#: family -> (tiny builder, module and class of its transformer)
FAMILIES = {
    "flux.1-dev": ("lora_run_flux.tiny:build_tiny_flux", "diffusers:FluxTransformer2DModel"),
    "flux.2-klein": ("lora_run_flux2.tiny:build_tiny_flux2", "diffusers:Flux2Transformer2DModel"),
    "flux.2-dev": ("lora_run_flux2.tiny:build_tiny_flux2", "diffusers:Flux2Transformer2DModel"),
    "hunyuan-dit-1.2": ("lora_run_hunyuan_dit.tiny:build_tiny_hunyuan_dit", "diffusers:HunyuanDiT2DModel"),
    "hunyuan-image-2.1": ("lora_run_hunyuan_image.tiny:build_tiny_hunyuan_image",
                          "diffusers:HunyuanImageTransformer2DModel"),
}

#: (family, component folder, the field set to 100000, the class it would build, what the one line says the
#: weights hold)
PLANTED = [
    ("flux.1-dev", "transformer", "num_layers", "diffusers:FluxTransformer2DModel",
     "1 double block (transformer_blocks.0)"),
    ("flux.1-dev", "text_encoder_2", "num_layers", "transformers:T5EncoderModel", "1 block (encoder.block.0)"),
    ("flux.2-klein", "transformer", "num_single_layers", "diffusers:Flux2Transformer2DModel",
     "1 single block (single_transformer_blocks.0)"),
    ("flux.2-klein", "text_encoder", "num_hidden_layers", "transformers:Qwen3ForCausalLM",
     "27 layers (model.layers.0 … model.layers.26)"),
    ("flux.2-dev", "transformer", "num_layers", "diffusers:Flux2Transformer2DModel",
     "1 double block (transformer_blocks.0)"),
    ("flux.2-dev", "text_encoder", "text_config.num_hidden_layers", "transformers:Mistral3ForConditionalGeneration",
     "30 language-model layers (language_model.model.layers.0 … language_model.model.layers.29)"),
    ("hunyuan-dit-1.2", "transformer", "num_layers", "diffusers:HunyuanDiT2DModel", "4 blocks (blocks.0 … blocks.3)"),
    ("hunyuan-dit-1.2", "text_encoder", "num_hidden_layers", "transformers:BertModel", "1 layer (encoder.layer.0)"),
    ("hunyuan-image-2.1", "transformer", "num_refiner_layers", "diffusers:HunyuanImageTransformer2DModel",
     "1 refiner block (context_embedder.token_refiner.refiner_blocks.0)"),
    ("hunyuan-image-2.1", "text_encoder", "text_config.num_hidden_layers",
     "transformers:Qwen2_5_VLForConditionalGeneration", "3 language-model layers (model.layers.0 … model.layers.2)"),
]

#: the most a refusal from the headers may take here, on a loaded machine (it takes about a second)
QUICK_S = 60


def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for family, (builder, _) in FAMILIES.items():
        kw = {"variant": family.split("-")[1]} if family.startswith("flux.2") else {}
        out[family] = _load(builder)(root / family, **kw)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from lora_run_devtools.testing import make_images

    folder = tmp_path_factory.mktemp("data") / "subject"
    make_images(folder, count=2, size=(64, 64))
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def built(monkeypatch):
    """``built(spec)``: from then on, instantiating that model class fails and is recorded (a sensor: the list of
    classes that were built)."""
    calls: list[str] = []

    def watch(spec: str) -> list[str]:
        cls = _load(spec)

        def sensor(self, *args, **kwargs):
            calls.append(spec)
            raise RuntimeError(f"sensor: {spec} was built")

        monkeypatch.setattr(cls, "__init__", sensor)
        return calls
    return watch


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / f"{model.name}-copy"))


def _set(config: Path, field: str, value) -> None:
    """``field`` (``a.b``: key b of the table a) of the JSON file ``config`` set to ``value``."""
    data = json.loads(config.read_text())
    table = data
    *path, last = field.split(".")
    for part in path:
        table = table[part]
    table[last] = value
    config.write_text(json.dumps(data))


def _recipe(tmp_path: Path, family: str, model: Path, dataset: Path, files: str = "", name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(family=family, model=model, dataset=dataset, files=files), encoding="utf-8")
    return path


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from lora_run.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text and "unexpected" not in text, text[-2000:]
    return code, text


@pytest.mark.parametrize("family, sub, field, cls, holds", PLANTED, ids=[f"{p[0]}-{p[1]}" for p in PLANTED])
def test_a_config_of_a_larger_model_is_refused_before_anything_is_built(family, sub, field, cls, holds, tiny_models,
                                                                        dataset, tmp_path, capsys, built):
    model = _copy(tiny_models[family], tmp_path)
    control = _recipe(tmp_path, family, model, dataset, name="control.toml")
    code, text = _cli(["check", str(control)], capsys)
    assert code == 0, text[-2000:]                                   # the unedited folder passes
    _set(model / sub / "config.json", field, 100000)
    calls = built(cls)
    recipe = _recipe(tmp_path, family, model, dataset)
    line = f"[model.source] {model}/{sub}/config.json: {field} = 100000, but the weights hold {holds}"
    start = time.monotonic()
    code, text = _cli(["check", str(recipe)], capsys)
    assert code == 2 and line in text, text[-2000:]
    out = tmp_path / "run"
    code, text = _cli([str(recipe), "--output-dir", str(out)], capsys)
    assert code == 2 and line in text and not out.exists(), text[-2000:]
    assert calls == [] and time.monotonic() - start < QUICK_S


#: (a size field of every family's transformer config, a value, what the line says)
ABSURD = [("num_layers", -1, "num_layers = -1 is not a number of "),
          ("num_layers", 2.5, "num_layers = 2.5 is not a number of "),
          ("num_layers", "1", 'num_layers = "1" is not a number of '),
          ("num_layers", True, "num_layers = true is not a number of "),
          ("num_layers", 10 ** 30, "num_layers = 1000000000000000000000000000000, but the weights hold "),
          ("num_layers", 0, "num_layers = 0, but the weights hold "),
          ("attention_head_dim", 0, "attention_head_dim = 0 is not a width (a whole number from 1 to 1048576)"),
          ("num_attention_heads", None, "num_attention_heads = null is not a width"),
          ("num_attention_heads", 10 ** 30, "num_attention_heads × attention_head_dim = 1000000000000000000000000000000"
                                            " × "),
          ("in_channels", 100000, "in_channels = 100000, but "),
          ("in_channels", -64, "in_channels = -64 is not a width")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_absurd_size_fields_of_a_transformer_config_are_named(family, tiny_models, dataset, tmp_path, capsys):
    """Negative, zero, non-integer and enormous values of the size fields: each named with the config file, exit 2
    (an integer the weights disagree with, as what they hold)."""
    model = _copy(tiny_models[family], tmp_path)
    config = model / "transformer" / "config.json"
    intact = config.read_text()
    recipe = _recipe(tmp_path, family, model, dataset)
    for field, value, says in ABSURD:
        config.write_text(intact)
        _set(config, field, value)
        code, text = _cli(["check", str(recipe)], capsys)
        assert code == 2 and f"[model.source] {config}: {says}" in text, (field, value, text[-2000:])


def test_a_single_file_is_compared_with_the_config_the_source_gives_it(tiny_models, dataset, tmp_path, capsys,
                                                                       built):
    """A `[model.files]` transformer takes its config from the source's transformer/config.json: FLUX.1's loader
    built that model (on the meta device, still one module per block) before it compared the file's tensors."""
    from lora_run_flux.tiny import write_single_files

    files = write_single_files(tiny_models["flux.1-dev"], tmp_path / "single")
    source = files["tokenizers"]
    (source / "transformer").mkdir()
    shutil.copy(tiny_models["flux.1-dev"] / "transformer" / "config.json", source / "transformer" / "config.json")
    slots = "\n[model.files]\n" + "".join(f'{k} = "{files[k]}"\n' for k in ("transformer", "vae", "clip_l", "t5xxl"))
    recipe = _recipe(tmp_path, "flux.1-dev", source, dataset, files=slots)
    code, text = _cli(["check", str(recipe)], capsys)
    assert code == 0, text[-2000:]                                   # the control: the config fits the file
    _set(source / "transformer" / "config.json", "num_layers", 100000)
    calls = built("diffusers:FluxTransformer2DModel")
    line = (f"[model.files.transformer] {source}/transformer/config.json: num_layers = 100000, but the weights of "
            "flux1-dev.safetensors hold 1 double block (model.diffusion_model.double_blocks.0)")
    code, text = _cli(["check", str(recipe)], capsys)
    assert code == 2 and line in text, text[-2000:]
    out = tmp_path / "run"
    code, text = _cli([str(recipe), "--output-dir", str(out)], capsys)
    assert code == 2 and line in text and not out.exists() and calls == [], text[-2000:]


def _perturbed(config: dict, rule) -> str:
    """``config`` with the first field of a ``config_fit`` rule one larger (a list: one entry longer); its name."""
    from lora_run_formats.config_fit import Blocks, _lookup

    field = rule.field if isinstance(rule, Blocks) else rule.fields[0]
    name, value = _lookup(config, field)
    table = config
    *path, last = name.split(".")
    for part in path:
        table = table[part]
    table[last] = value + value[:1] if isinstance(value, list) else value + 1
    return name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_declared_field_is_compared_with_the_tiny_models_weights(family, tiny_models, tmp_path):
    """Each rule a family declares (``config_fits`` per component folder, ``file_fits`` per single file) finds its
    blocks or tensor in the tiny model, folder and single files: the field one larger is named. A pattern that
    matched nothing would let that field go unchecked."""
    from lora_run_formats.config_fit import _lookup
    from lora_run_formats.model_files import component_fit_problems, file_fit_problems
    from lora_run_native.adapters import adapter_class

    adapter = adapter_class(family)
    model = _copy(tiny_models[family], tmp_path)
    singles = _single_files(family, model, tmp_path)
    cases = [(sub, fit, lambda sub=sub, fit=fit: component_fit_problems(model / sub, fit))
             for sub, fit in adapter.config_fits.items()]
    cases += [(adapter.SUBFOLDER[key], fit, lambda key=key, fit=fit: file_fit_problems(
        model / adapter.SUBFOLDER[key] / "config.json", singles[key], fit)) for key, fit in adapter.file_fits.items()]
    assert cases and all(problems() == [] for _, _, problems in cases)
    compared = 0
    for sub, fit, problems in cases:
        config = model / sub / "config.json"
        intact = json.loads(config.read_text())
        for rule in fit:
            data = json.loads(json.dumps(intact))
            field = rule.field if hasattr(rule, "field") else rule.fields[0]
            if _lookup(data, field) is None:                    # not in this model's config: the default applies
                continue
            name = _perturbed(data, rule)
            config.write_text(json.dumps(data))
            found = problems()
            assert found and f": {name} " in found[0] and "but" in found[0], (sub, rule, found)
            compared += 1
        config.write_text(json.dumps(intact))
    assert compared >= 10


def _single_files(family: str, model: Path, tmp_path: Path) -> dict[str, Path]:
    """The family's single files of ``model``, by ``[model.files]`` slot (none for Hunyuan-DiT)."""
    if family == "flux.1-dev":
        from lora_run_flux.tiny import write_single_files

        return write_single_files(model, tmp_path / "single")
    if family.startswith("flux.2"):
        from lora_run_flux2.tiny import write_single_files as flux2_files

        files = flux2_files(model, tmp_path / "single")
        return {**files, "qwen3": files["text_encoder"], "mistral": files["text_encoder"]}
    if family == "hunyuan-image-2.1":
        from lora_run_hunyuan_image.tiny import write_hunyuan_image_single_files

        return write_hunyuan_image_single_files(model, tmp_path / "single")
    return {}


@pytest.mark.parametrize("family, sub", [("flux.1-dev", "vae"), ("flux.1-dev", "text_encoder_2"),
                                         ("flux.2-klein", "vae"), ("hunyuan-dit-1.2", "text_encoder"),
                                         ("hunyuan-image-2.1", "transformer")])
def test_a_component_with_a_config_but_no_weights_is_named_at_check(family, sub, tiny_models, dataset, tmp_path,
                                                                    capsys):
    """An interrupted download or copy leaves a component folder with its config.json and no weights: `check`
    passed it, and the run stopped after caching on diffusers' "no file named diffusion_pytorch_model.bin". A
    component a `[model.files]` slot provides is not read from the folder, so a config alone is right there
    (the single-file test above is that control)."""
    model = _copy(tiny_models[family], tmp_path)
    for weights in (model / sub).glob("*.safetensors*"):
        weights.unlink()
    code, text = _cli(["check", str(_recipe(tmp_path, family, model, dataset))], capsys)
    assert code == 2 and f"[model.source] {model}/{sub}: has a config.json but no weights file" in text, text[-2000:]


def _shard(folder: Path, single: str, index: str, stale: str, wide: str, dim: int) -> None:
    """Beside the single file ``single`` of ``folder``, the same tensors as two shards and the index ``index``;
    then the tensor ``wide`` made twice as wide along ``dim`` in the copy named ``stale`` ("single" or "index"): a
    folder re-saved sharded over an older save, as `save_pretrained(max_shard_size=…)` leaves one."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / single)
    names = sorted(tensors)
    shards = {f"{index.split('.')[0]}-0000{i}-of-00002.safetensors": names[i - 1::2] for i in (1, 2)}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    target = folder / (single if stale == "single" else next(s for s, ks in shards.items() if wide in ks))
    held = load_file(target)
    shape = list(held[wide].shape)
    shape[dim] *= 2
    held[wide] = torch.zeros(shape, dtype=held[wide].dtype)
    save_file(held, target, metadata={"format": "pt"})


#: (family, component, single file, index, the tensor made wider, its dimension the config's width is read from,
#: which copy the loader reads, its class)
BOTH = [("flux.1-dev", "transformer", "diffusion_pytorch_model.safetensors",
         "diffusion_pytorch_model.safetensors.index.json", "x_embedder.weight", 0, "index",
         "diffusers:FluxTransformer2DModel"),
        ("flux.1-dev", "text_encoder", "model.safetensors", "model.safetensors.index.json",
         "embeddings.token_embedding.weight", 1, "single", "transformers:CLIPTextModel")]


@pytest.mark.parametrize("family, sub, single, index, wide, dim, read, cls", BOTH, ids=[b[1] for b in BOTH])
def test_of_a_shard_index_and_a_single_file_only_the_one_the_loader_reads_is_compared(
        family, sub, single, index, wide, dim, read, cls, tiny_models, dataset, tmp_path, capsys):
    """diffusers loads a component's shard index before a single file beside it, transformers the single file
    first; the config check compared both (their shapes merged), so a stale file the loader never reads refused the
    model: the GPU acceptance bench's full-size FLUX.1 folder (sharded over the tiny builder's single file) was
    refused by every row. The loaders themselves are the reference here: each loads the folder whose unread copy is
    wrong. The control: the copy the loader reads is the wrong one, and the check refuses it."""
    stale = "single" if read == "index" else "index"
    model = _copy(tiny_models[family], tmp_path)
    _shard(model / sub, single, index, stale=stale, wide=wide, dim=dim)
    loaded = _load(cls).from_pretrained(model / sub)         # the loader reads the intact copy
    held = next(v for k, v in loaded.state_dict().items() if k.endswith(wide))
    assert held.shape[dim] * 2 == _wide_shape(model / sub, single, index, stale, wide)[dim]
    recipe = _recipe(tmp_path, family, model, dataset)
    code, text = _cli(["check", str(recipe)], capsys)
    assert code == 0, text[-2000:]
    control = _copy(tiny_models[family], tmp_path / "control")
    _shard(control / sub, single, index, stale=read, wide=wide, dim=dim)
    code, text = _cli(["check", str(_recipe(tmp_path, family, control, dataset, name="control.toml"))], capsys)
    assert code == 2 and f"{control}/{sub}/config.json: " in text and "a config.json of another model" in text, \
        text[-2000:]


def _wide_shape(folder: Path, single: str, index: str, stale: str, wide: str) -> list[int]:
    """The shape of ``wide`` in the copy ``stale`` names (the one the loader leaves unread)."""
    from safetensors import safe_open

    path = folder / single if stale == "single" else \
        folder / json.loads((folder / index).read_text())["weight_map"][wide]
    with safe_open(path, "pt") as f:
        return list(f.get_slice(wide).get_shape())
