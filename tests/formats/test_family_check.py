"""A model of another family or component passed `lora-run check` and `plan`: a `[model] source` folder of another
family (a FLUX.1 folder under `family = "hunyuan-image-2.1"`, a Hunyuan-DiT folder under FLUX.1) and a
`[model.files]` file of another component or family (`ae.safetensors` given as the transformer, a text encoder as
the VAE) were refused only at model load, after the dataset lint and the caching (docs/reliability.md). `check` and
the run's pre-flight now name both (exit 2, nothing written), from `model_index.json`, the transformer's config and
the safetensors headers alone. The controls: every family's own folder and each single-file layout its loader
takes pass, and a file `check` refuses is one the family's loader refuses too."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lora_run_formats import layouts as L
from tests.flux2.conftest import flux2_registered, flux2_site  # noqa: F401 - the FLUX.2 family where not installed
from tests.formats.test_config_fit import (FAMILIES, QUICK_S, _cli, _recipe, built, dataset,  # noqa: F401
                                           tiny_models)

pytest.importorskip("diffusers")

PIPELINES = {"flux.1-dev": "FluxPipeline", "flux.2-klein": "Flux2KleinPipeline", "flux.2-dev": "Flux2Pipeline",
             "hunyuan-dit-1.2": "HunyuanDiTPipeline", "hunyuan-image-2.1": "HunyuanImagePipeline"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _adapter(family: str, source, files: dict | None = None):
    from lora_run_devtools.testing import parse_recipe_text
    from lora_run_native.adapters import adapter_class

    lines = "".join(f'{k} = "{v}"\n' for k, v in (files or {}).items())
    recipe = parse_recipe_text(f'[model]\nfamily = "{family}"\nsource = "{source}"\noffline = true\n'
                               f'[model.files]\n{lines}[dataset]\npath = "/tmp"\ntrigger = "ohwx"\n'
                               '[train]\nsteps = 1\nmixed_precision = "no"\n')
    return adapter_class(family)(recipe)


def _at(problems, *key: str) -> list[str]:
    return [why for path, why in problems if path == key]


def _foreign(owner: str, family: str, shown, says: str | None = None) -> str:
    says = says or f"its model_index.json names {PIPELINES[owner]}"
    return (f"{shown} is a {owner} model ({says}), not a {family} one: set [model] family = \"{owner}\", or "
            f"[model] source to a {family} folder or hub id")


# ------------------------------------------------------------------------------------- a source of another family
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_source_folder_of_another_family_is_named(family, tiny_models):
    """Each family's own tiny folder passes (the control); every other family's folder is named first, and its
    configs are not compared with this family's rules (which would blame a config.json for fitting its model)."""
    assert _at(_adapter(family, tiny_models[family]).check_sources(), "model", "source") == []
    for owner, folder in tiny_models.items():
        if owner != family:
            problems = _at(_adapter(family, folder).check_sources(), "model", "source")
            assert problems and problems[0] == _foreign(owner, family, folder), (owner, problems)
            assert not any("config.json: " in why for why in problems), (owner, problems)


def test_check_plan_and_the_run_refuse_a_flux1_folder_for_hunyuan_image(tiny_models, dataset, tmp_path, capsys):
    """The audit's case: a FLUX.1 recipe switched by its family line alone. The run stopped at model load with exit
    2, after the dataset lint and the start of caching; now nothing is linted, built or written."""
    folder = tiny_models["flux.1-dev"]
    code, text = _cli(["check", str(_recipe(tmp_path, "flux.1-dev", folder, dataset, name="control.toml"))], capsys)
    assert code == 0, text[-2000:]
    recipe = _recipe(tmp_path, "hunyuan-image-2.1", folder, dataset)
    line = "[model.source] " + _foreign("flux.1-dev", "hunyuan-image-2.1", folder)
    out = tmp_path / "run"
    start = time.monotonic()
    for argv in (["check", str(recipe)], ["plan", str(recipe)], [str(recipe), "--output-dir", str(out)]):
        code, text = _cli(argv, capsys)
        assert code == 2 and line in text, (argv, text[-2000:])
    assert not out.exists() and time.monotonic() - start < QUICK_S


def test_the_transformer_decides_where_model_index_names_no_known_pipeline(tiny_models, tmp_path):
    """A pipeline no family lists around FLUX.1's transformer (FLUX.1 Kontext's, say) is loaded by FLUX.1 (the
    control) and named for the others by its transformer's class; so is a folder without model_index.json."""
    kontext = Path(shutil.copytree(tiny_models["flux.1-dev"], tmp_path / "kontext"))
    index = json.loads((kontext / "model_index.json").read_text())
    (kontext / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    assert _at(_adapter("flux.1-dev", kontext).check_sources(), "model", "source") == []
    for family in ("flux.2-klein", "hunyuan-image-2.1", "hunyuan-dit-1.2"):
        problems = _at(_adapter(family, kontext).check_sources(), "model", "source")
        assert problems[0] == _foreign("flux.1-dev", family, kontext, "its transformer is a FluxTransformer2DModel")
    bare = Path(shutil.copytree(tiny_models["hunyuan-dit-1.2"], tmp_path / "bare"))
    (bare / "model_index.json").unlink()
    assert not any(why.startswith(f"{bare} is a") for _, why in _adapter("hunyuan-dit-1.2", bare).check_sources())
    problems = _at(_adapter("flux.1-dev", bare).check_sources(), "model", "source")
    assert problems[0] == _foreign("hunyuan-dit-1.2", "flux.1-dev", bare, "its transformer is a HunyuanDiT2DModel")


def test_a_cached_hub_model_of_another_family_is_named(tiny_models, tmp_path, monkeypatch):
    """A hub id is not looked up (no network), but its copy in the local cache is a folder like any other."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-flux1"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(tiny_models["flux.1-dev"] / "model_index.json", repo / "snapshots" / ("0" * 40) / "model_index.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))   # read at import otherwise
    shown = "someone/tiny-flux1 (its copy in the local Hugging Face cache)"
    assert _at(_adapter("flux.1-dev", "someone/tiny-flux1").check_sources(), "model", "source") == []
    for family in ("flux.2-dev", "hunyuan-image-2.1"):
        problems = _at(_adapter(family, "someone/tiny-flux1").check_sources(), "model", "source")
        assert problems[0] == _foreign("flux.1-dev", family, shown), problems


# ----------------------------------------------------------------------------------- a file of another component
@pytest.fixture(scope="module")
def pool(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, tuple[L.Layout, ...]]]:
    """Model files by name: (path, the layouts it is, what it is first). Each family's single files as its writer
    gives them, the other prefixes and names its loader takes, each folder's component weights as a file, a
    LoRA, a file of unknown tensors and one of none."""
    import torch

    from lora_run_flux.tiny import write_single_files as flux1_files
    from lora_run_flux2.tiny import write_single_files as flux2_files
    from lora_run_hunyuan_image.tiny import write_hunyuan_image_single_files
    from lora_run_native.tinykit import save_tensors
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("pool")
    f1 = flux1_files(tiny_models["flux.1-dev"], root / "flux1")
    kl = flux2_files(tiny_models["flux.2-klein"], root / "klein")
    dv = flux2_files(tiny_models["flux.2-dev"], root / "dev")
    hy = write_hunyuan_image_single_files(tiny_models["hunyuan-image-2.1"], root / "hunyuan-image")
    files = {"flux1-dev": (f1["transformer"], (L.FLUX1_TRANSFORMER,)),
             "ae": (f1["vae"], (L.FLUX1_VAE,)),
             "clip_l": (f1["clip_l"], (L.CLIP_TEXT,)), "t5xxl": (f1["t5xxl"], (L.T5_ENCODER,)),
             "klein transformer": (kl["transformer"], (L.FLUX2_TRANSFORMER,)),
             "klein vae": (kl["vae"], (L.FLUX2_VAE,)), "qwen3": (kl["text_encoder"], (L.QWEN3,)),
             "dev transformer": (dv["transformer"], (L.FLUX2_TRANSFORMER,)), "dev vae": (dv["vae"], (L.FLUX2_VAE,)),
             "mistral, as saved": (dv["text_encoder"], (L.MISTRAL3,)),
             "hunyuanimage2.1": (hy["transformer"], (L.HUNYUAN_IMAGE_TRANSFORMER,)),
             "hunyuan vae": (hy["vae"], (L.HUNYUAN_IMAGE_VAE,)), "qwen2.5-vl": (hy["qwen"], (L.QWEN2_5_VL,)),
             "byt5": (hy["byt5"], (L.T5_ENCODER,))}
    folders = {"flux.1-dev": {"transformer": (L.FLUX1_DIFFUSERS_TRANSFORMER,), "vae": (L.DIFFUSERS_VAE,),
                              "text_encoder": (L.CLIP_TEXT,), "text_encoder_2": (L.T5_ENCODER,)},
               "flux.2-klein": {"transformer": (L.FLUX2_TRANSFORMER,), "vae": (L.DIFFUSERS_VAE,),
                                "text_encoder": (L.QWEN3,)},
               "flux.2-dev": {"transformer": (L.FLUX2_TRANSFORMER,), "text_encoder": (L.MISTRAL3,)},
               "hunyuan-image-2.1": {"transformer": (L.HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER,),
                                     "vae": (L.HUNYUAN_IMAGE_VAE,), "text_encoder": (L.QWEN2_5_VL,),
                                     "text_encoder_2": (L.T5_ENCODER,)},
               "hunyuan-dit-1.2": {"transformer": (L.HUNYUAN_DIT_TRANSFORMER,), "vae": (L.DIFFUSERS_VAE,),
                                   "text_encoder": (L.BERT,), "text_encoder_2": (L.T5_ENCODER,)}}
    for family, subs in folders.items():
        for sub, kinds in subs.items():
            files[f"{family} {sub}"] = (next((tiny_models[family] / sub).glob("*.safetensors")), kinds)

    def variant(name: str, source: str, rename, kinds) -> None:
        state = {rename(k): v for k, v in load_file(str(files[source][0])).items()}
        save_tensors(state, root / f"{name}.safetensors")
        files[name] = (root / f"{name}.safetensors", kinds)

    def unprefixed(prefix: str):
        return lambda k: k[len(prefix):] if k.startswith(prefix) else k

    variant("flux1-dev, BFL names alone", "flux1-dev", unprefixed("model.diffusion_model."), (L.FLUX1_TRANSFORMER,))
    variant("flux1-dev, under diffusion_model.", "flux1-dev", lambda k: k.replace("model.", "", 1),
            (L.FLUX1_TRANSFORMER,))
    variant("ae, under first_stage_model.", "ae", lambda k: "first_stage_model." + k, files["ae"][1])
    variant("clip_l, transformers 5 names", "clip_l", unprefixed("text_model."), (L.CLIP_TEXT,))
    variant("clip_l, under ComfyUI's prefix", "clip_l", lambda k: "text_encoders.clip_l.transformer." + k,
            (L.CLIP_TEXT,))
    variant("t5xxl, embed_tokens for shared", "t5xxl", lambda k: "encoder.embed_tokens.weight" if k == "shared.weight"
            else k, (L.T5_ENCODER,))
    variant("klein transformer, BFL names alone", "klein transformer", unprefixed("model.diffusion_model."),
            (L.FLUX2_TRANSFORMER,))
    from transformers import Mistral3ForConditionalGeneration

    mistral = Mistral3ForConditionalGeneration.from_pretrained(tiny_models["flux.2-dev"] / "text_encoder")
    save_tensors({k: v.clone() for k, v in mistral.state_dict().items() if k != "lm_head.weight"},
                 root / "mistral5.safetensors")          # transformers 5's names (its head is tied to the input)
    files["mistral, transformers 5 names"] = (root / "mistral5.safetensors", (L.MISTRAL3,))
    save_tensors({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 4)}, root / "lora.safetensors")
    files["a LoRA"] = (root / "lora.safetensors", (L.LORA,))
    save_tensors({"foo.bar.weight": torch.zeros(2, 2), "foo.baz.weight": torch.zeros(2)}, root / "odd.safetensors")
    files["unknown tensors"] = (root / "odd.safetensors", ())
    save_tensors({}, root / "empty.safetensors")
    files["no tensors"] = (root / "empty.safetensors", ())
    return files


#: family -> slot -> the pool files its loader loads in that slot (the controls)
LOADS = {
    "flux.1-dev": {"transformer": ["flux1-dev", "flux1-dev, BFL names alone", "flux1-dev, under diffusion_model."],
                   "vae": ["ae", "ae, under first_stage_model."],
                   "clip_l": ["clip_l", "clip_l, transformers 5 names", "clip_l, under ComfyUI's prefix",
                              "flux.1-dev text_encoder"],
                   "t5xxl": ["t5xxl", "t5xxl, embed_tokens for shared", "flux.1-dev text_encoder_2"]},
    "flux.2-klein": {"transformer": ["klein transformer", "klein transformer, BFL names alone",
                                     "flux.2-klein transformer"],
                     "vae": ["klein vae"], "qwen3": ["qwen3", "flux.2-klein text_encoder"]},
    "flux.2-dev": {"transformer": ["dev transformer", "flux.2-dev transformer"], "vae": ["dev vae"],
                   "mistral": ["mistral, transformers 5 names"]},
    "hunyuan-image-2.1": {"transformer": ["hunyuanimage2.1", "hunyuan-image-2.1 transformer"],
                          "vae": ["hunyuan vae", "hunyuan-image-2.1 vae"],
                          "qwen": ["qwen2.5-vl", "hunyuan-image-2.1 text_encoder"],
                          "byt5": ["byt5", "hunyuan-image-2.1 text_encoder_2"]},
}


#: family -> slot -> the layouts its loader converts (the families' ``file_layouts``)
TAKES = {"flux.1-dev": {"transformer": (L.FLUX1_TRANSFORMER,), "vae": (L.FLUX1_VAE,), "clip_l": (L.CLIP_TEXT,),
                        "t5xxl": (L.T5_ENCODER,)},
         "flux.2-klein": {"transformer": (L.FLUX2_TRANSFORMER,), "vae": (L.FLUX2_VAE,), "qwen3": (L.QWEN3,)},
         "flux.2-dev": {"transformer": (L.FLUX2_TRANSFORMER,), "vae": (L.FLUX2_VAE,), "mistral": (L.MISTRAL3,)},
         "hunyuan-image-2.1": {"transformer": (L.HUNYUAN_IMAGE_TRANSFORMER, L.HUNYUAN_IMAGE_DIFFUSERS_TRANSFORMER),
                               "vae": (L.HUNYUAN_IMAGE_VAE,), "qwen": (L.QWEN2_5_VL,), "byt5": (L.T5_ENCODER,)}}


def _layout_lines(family: str, source: Path, slot: str, path: Path) -> list[str]:
    """What `check` says about ``path`` given as ``slot`` itself (config comparisons name the config file)."""
    return [why for why in _at(_adapter(family, source, {slot: path}).check_sources(), "model", "files", slot)
            if why.startswith(f"{path} ")]


@pytest.mark.parametrize("family", list(LOADS))
def test_each_slot_takes_its_layouts_and_names_what_else_a_file_is(family, pool, tiny_models, monkeypatch):
    """Every file of the pool in every slot: one of the slot's layouts passes (each file its loader loads is one),
    any other is named with what it is. Nothing but headers is read: loading a file, or hashing one as the caches'
    identities do, fails the test."""
    import safetensors
    import safetensors.torch

    from lora_run_native.adapters import base

    def sensor(*args, **kwargs):
        raise AssertionError("check read more than a header")

    for module, name in ((safetensors.torch, "load_file"), (safetensors, "safe_open"), (base, "file_identity"),
                         (base, "folder_identity")):
        monkeypatch.setattr(module, name, sensor)
    for slot, accepted in TAKES[family].items():
        wanted = " or ".join(layout.what for layout in accepted)
        assert set(LOADS[family][slot]) <= {n for n, (_, kinds) in pool.items() if set(kinds) & set(accepted)}, slot
        for name, (path, kinds) in pool.items():
            lines = _layout_lines(family, tiny_models[family], slot, path)
            if set(kinds) & set(accepted):
                assert lines == [], (slot, name, lines)
            elif kinds:
                assert lines == [f"{path} is {kinds[0].what}, not {wanted}"], (slot, name, lines)
            elif name == "no tensors":
                assert lines == [f"{path} holds no tensors: not {wanted}"], (slot, name, lines)
            else:
                assert lines == [f"{path} is not {wanted}, nor any model file lora-run knows (its 2 tensors are "
                                 "named like foo.bar.weight, foo.baz.weight)"], (slot, name, lines)
    assert type(_adapter(family, tiny_models[family])).file_layouts == TAKES[family]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(LOADS))
def test_a_file_check_refuses_is_one_the_loader_refuses(family, pool, tiny_models):
    """`check` never refuses what the family's loader would load: every control loads, every file `check` names
    in a slot fails to load there (exit 2), so the check only says earlier what the load would."""
    import torch

    from lora_run.errors import LoraRunError

    def load(slot: str, path: Path):
        adapter = _adapter(family, tiny_models[family], {slot: path})
        if family == "flux.1-dev":
            adapter._load_tokenizers()               # its CLIP config takes the tokenizer's special tokens
        return adapter.load_transformer() if slot == "transformer" else adapter._component(slot, torch.float32)

    for slot, names in LOADS[family].items():
        for name in names:
            assert load(slot, pool[name][0]) is not None, (slot, name)
        for name, (path, _) in pool.items():
            if name not in names and _layout_lines(family, tiny_models[family], slot, path):
                with pytest.raises(LoraRunError) as refused:
                    load(slot, path)
                assert refused.value.exit_code == 2, (slot, name, refused.value)


@pytest.mark.parametrize("slot, given, says", [
    ("transformer", "vae", "is a FLUX.1 autoencoder (LDM layout, 16 latent channels, as ae.safetensors), not a "
                          "FLUX.1 transformer (BFL layout, as flux1-dev.safetensors)"),
    ("vae", "clip_l", "is a CLIP text encoder, not a FLUX.1 autoencoder (LDM layout, 16 latent channels, as "
                      "ae.safetensors)"),
])
def test_check_plan_and_the_run_name_a_file_of_another_component(slot, given, says, pool, tiny_models, dataset,
                                                                  tmp_path, capsys, built):
    """The audit's cases: `transformer = "ae.safetensors"` and a text encoder given as the VAE passed `check` and
    `plan`; the run refused them only after caching the whole dataset. The right files are the control."""
    files = {"transformer": pool["flux1-dev"][0], "vae": pool["ae"][0], "clip_l": pool["clip_l"][0],
             "t5xxl": pool["t5xxl"][0]}

    def recipe(chosen: dict, name: str) -> Path:
        slots = "\n[model.files]\n" + "".join(f'{k} = "{v}"\n' for k, v in chosen.items())
        return _recipe(tmp_path, "flux.1-dev", tiny_models["flux.1-dev"], dataset, files=slots, name=name)

    code, text = _cli(["check", str(recipe(files, "control.toml"))], capsys)
    assert code == 0, text[-2000:]
    wrong = recipe({**files, slot: files[given]}, "wrong.toml")
    line = f"[model.files.{slot}] {files[given]} {says}"
    built("diffusers:FluxTransformer2DModel")
    calls = built("diffusers:AutoencoderKL")             # one list: every watched class built
    out = tmp_path / "run"
    start = time.monotonic()
    for argv in (["check", str(wrong)], ["plan", str(wrong)], [str(wrong), "--output-dir", str(out)]):
        code, text = _cli(argv, capsys)
        assert code == 2 and line in text, (argv, text[-2000:])
    assert not out.exists() and calls == [] and time.monotonic() - start < QUICK_S
