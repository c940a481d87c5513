"""A text cache rewritten *whole* to one other shape, in a run that encodes no caption (every entry a hit, so no
fresh encode to compare with, and the entries agree with each other): each built-in family declares the shapes a
fresh encode gives before any encoder loads (``ModelAdapter.text_shapes``: fixed sequence lengths, widths from the
configs), so the entries are rebuilt and the run trains; an intact cache is read whole, nothing re-encoded."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from .conftest import BASE_RECIPE
from .test_cache import _entries, _plant, _stats

FAMILIES = ["flux.1-dev", "flux.2-klein", "flux.2-dev", "hunyuan-dit-1.2", "hunyuan-image-2.1"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """``tiny_models(family) -> Path``: each family's tiny model, built once for the module."""
    from lora_run_devtools.testing import build_tiny

    root, made = tmp_path_factory.mktemp("text-shapes"), {}

    def get(family: str):
        if family not in made:
            made[family] = build_tiny(family, root / family)
        return made[family]
    return get


def family_recipe(family: str, model, dataset, folder):
    """The native tests' tiny recipe on ``family``, one step (Hunyuan-DiT's text lengths are the model's: no
    ``text_max_length``)."""
    body = BASE_RECIPE.replace('family = "flux.1-dev"', f'family = "{family}"').replace("{length}", "steps = 1")
    body = body.replace("{model}", str(model)).replace("{dataset}", str(dataset))
    body = body.replace("bucket_step = 16", "bucket_step = 32")      # HunyuanImage's 32-pixel multiple, for all
    if family.startswith("hunyuan-dit"):
        body = body.replace("text_max_length = 16\n", "")
    path = folder / f"{family}.toml"
    path.write_text(body, encoding="utf-8")
    return path


def shorter(tensors: dict) -> dict:
    """Every sequence (an embedding ``[L, W]`` and its mask ``[L]``) cut to half its length; a pooled embedding
    (one vector, no sequence) is left."""
    return {name: value[: value.shape[0] // 2].clone() if value.dim() == 2 or not value.is_floating_point()
            else value for name, value in tensors.items()}


def narrower(tensors: dict) -> dict:
    """Every embedding sequence ``[L, W]`` cut to half its width."""
    return {name: value[:, : value.shape[1] // 2].clone() if value.dim() == 2 else value
            for name, value in tensors.items()}


def rewritten_whole_is_rebuilt(run, recipe, tmp_path) -> None:
    """The scenario for one family's recipe (``run``: the ``run_recipe`` fixture)."""
    import torch

    cache = tmp_path / "cache"
    sets = ["train.steps=1", f"train.cache_dir=\"{cache}\""]
    run(recipe, sets, output=tmp_path / "clean")
    texts = _entries(cache, "text")
    n = len(texts)
    assert n >= 2

    control = run(recipe, sets, output=tmp_path / "control")
    assert _stats(control)[1] == {"hits": n, "misses": 0, "stale": 0, "corrupt": 0}, "an intact cache: all hits"

    for name, rewrite in (("length", shorter), ("width", narrower)):
        for key, tensors in texts.items():       # every entry, each with a consistent record, all of one shape
            changed = rewrite(tensors)
            assert any(changed[k].shape != v.shape for k, v in tensors.items()), name
            _plant(cache, "text", key, changed)
        done = run(recipe, sets, output=tmp_path / name)
        assert _stats(done)[1] == {"hits": 0, "misses": n, "stale": 0, "corrupt": n}, name
        manifest = json.loads((tmp_path / name / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["status"] == "completed", name
        rebuilt = _entries(cache, "text")
        assert rebuilt.keys() == texts.keys(), name
        for key, original in texts.items():        # rebuilt as a fresh encode gives them
            assert all(rebuilt[key][k].shape == v.shape and torch.equal(rebuilt[key][k], v)
                       for k, v in original.items()), (name, key)



@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_cache_rewritten_whole_to_another_shape_is_rebuilt(family, tiny_models, dataset, run_recipe,
                                                                   tmp_path):
    rewritten_whole_is_rebuilt(run_recipe, family_recipe(family, tiny_models(family), dataset, tmp_path), tmp_path)


#: what each family declares of the tiny models (their configs' widths; the recipe's 16 tokens where the family
#: takes ``text_max_length``, Hunyuan-DiT's fixed 77 and 256)
DECLARED = {
    "flux.1-dev": {"clip_l": {"pooled_prompt_embeds": (64,)}, "t5xxl": {"prompt_embeds": (16, 32)}},
    "flux.2-klein": {"qwen3": {"prompt_embeds": (16, 3 * 16)}},
    "flux.2-dev": {"mistral": {"prompt_embeds": (16, 3 * 16)}},
    "hunyuan-dit-1.2": {"bert": {"prompt_embeds": (77, 32), "prompt_attention_mask": (77,)},
                        "mt5": {"prompt_embeds_2": (256, 32), "prompt_attention_mask_2": (256,)}},
    "hunyuan-image-2.1": {"qwen": {"prompt_embeds": (16, 32), "prompt_embeds_mask": (16,)},
                          "byt5": {"prompt_embeds_2": (128, 32), "prompt_embeds_mask_2": (128,)}},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_declares_the_shapes_of_a_fresh_encode(family, tiny_models, dataset, tmp_path):
    """Read from the tiny model's configs without loading an encoder: every dimension known, equal to what a fresh
    encode gives (the run above checks that against the encoders themselves)."""
    from lora_run.recipe import load_recipe
    from lora_run_native.adapters import adapter_class

    recipe = load_recipe(family_recipe(family, tiny_models(family), dataset, tmp_path)).recipe
    adapter = adapter_class(family)(recipe, options=SimpleNamespace(text_max_length=16))
    shapes = {encoder: adapter.text_shapes(encoder) for encoder in adapter.text_encoders}
    assert all(set(declared) == set(adapter.text_keys(encoder)) and all(None not in s for s in declared.values())
               for encoder, declared in shapes.items()), shapes
    if family in DECLARED:
        assert shapes == DECLARED[family]


def test_single_files_declare_the_widths_their_headers_hold(tiny_single_files, tmp_path):
    """FLUX.1's text encoders as ``[model.files]`` files and no source (so no config.json): the widths come from the
    files' safetensors headers (the family's ``file_fits`` rules), nothing loaded."""
    from lora_run_devtools.testing import parse_recipe_text
    from lora_run_native.adapters import adapter_class

    body = BASE_RECIPE.replace('source = "{model}"\n', "").replace("{dataset}", str(tmp_path))
    body = body.replace("{length}", "steps = 1") + "\n[model.files]\n" + "".join(
        f'{key} = "{tiny_single_files[key]}"\n' for key in ("transformer", "vae", "clip_l", "t5xxl"))
    adapter = adapter_class("flux.1-dev")(parse_recipe_text(body), options=SimpleNamespace(text_max_length=16))
    assert {e: adapter.text_shapes(e) for e in adapter.text_encoders} == DECLARED["flux.1-dev"]
