"""Latent and text-embedding caches: hits, misses, stale and corrupt entries, encoder identity, unloading."""
from __future__ import annotations

import gc
import warnings

from lora_run.hookspecs import hookimpl


class EncodersGone:
    """Records, at every step, whether a text encoder or VAE is still alive anywhere in the process."""

    def __init__(self):
        self.alive = []

    @hookimpl
    def step_finished(self, step):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, T5EncoderModel

        gc.collect()
        with warnings.catch_warnings():       # isinstance on every object touches deprecated torch aliases
            warnings.simplefilter("ignore")
            alive = {type(o).__name__ for o in gc.get_objects()
                     if isinstance(o, (AutoencoderKL, CLIPTextModel, T5EncoderModel))}
        self.alive.append(sorted(alive))


def _stats(ctx):
    return ctx.artifacts["cache"]["latents"], ctx.artifacts["cache"]["text"]


def test_cache_hits_misses_stale_corrupt_and_identity(flux_recipe, run_recipe, tmp_path, dataset):
    from PIL import Image

    cache = tmp_path / "shared-cache"
    recipe = flux_recipe()
    sets = ["train.steps=1", f"train.cache_dir=\"{cache}\""]
    watch = EncodersGone()

    first = run_recipe(recipe, sets, [watch], output=tmp_path / "r1")
    latents, text = _stats(first)
    assert latents["misses"] == 3 and latents["hits"] == 0
    assert text["misses"] == 3 and text["hits"] == 0           # three distinct captions
    assert watch.alive == [[]], "VAE and text encoders are gone before the first step"

    second = run_recipe(recipe, sets, output=tmp_path / "r2")
    assert _stats(second) == ({"hits": 3, "misses": 0, "stale": 0, "corrupt": 0},
                              {"hits": 3, "misses": 0, "stale": 0, "corrupt": 0})

    changed = sorted(dataset.glob("*.png"))[0]
    Image.new("RGB", (96, 80), (200, 10, 10)).save(changed)
    third = run_recipe(recipe, sets, output=tmp_path / "r3")
    latents, text = _stats(third)
    assert (latents["hits"], latents["misses"], latents["stale"]) == (2, 1, 1)
    assert text["hits"] == 3

    entries = sorted((cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 3, "the stale entry was removed, not left behind"
    entries[0].write_bytes(entries[0].read_bytes()[:40])                 # truncated
    text_entry = sorted((cache / "text").rglob("*.safetensors"))[0]
    text_entry.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")  # garbage header
    fourth = run_recipe(recipe, sets, output=tmp_path / "r4")
    latents, text = _stats(fourth)
    assert (latents["corrupt"], latents["misses"], latents["hits"]) == (1, 1, 2)
    assert (text["corrupt"], text["misses"], text["hits"]) == (1, 1, 2)
    fifth = run_recipe(recipe, sets, output=tmp_path / "r5")
    assert _stats(fifth)[0]["hits"] == 3 and _stats(fifth)[1]["hits"] == 3, "rebuilt entries are valid"

    other_encoder = run_recipe(recipe, [*sets, "backend.native.text_max_length=24"], output=tmp_path / "r6")
    latents, text = _stats(other_encoder)
    assert latents["hits"] == 3 and text["misses"] == 3 and text["hits"] == 0


def test_entry_with_wrong_key_or_non_finite_values_is_corrupt(tmp_path):
    import torch

    from lora_run_native.cache import Cache, entry_key

    cache = Cache(tmp_path, "latents")
    key = entry_key("latents", "abc", "vae-1", "64x64")
    cache.store(key, {"latent": torch.zeros(16, 8, 8)})
    assert cache.load(key, {"latent": torch.float32}) is not None
    other = entry_key("latents", "abd", "vae-1", "64x64")
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).rename(cache.path(other))           # a file under another entry's name
    assert cache.load(other, {"latent": torch.float32}) is None and cache.stats.corrupt == 1, "metadata key must match"
    cache.store(key, {"latent": torch.full((2, 2), float("nan"))})
    assert cache.load(key, {"latent": torch.float32}) is None and cache.stats.corrupt == 2
    cache.store(key, {"other": torch.zeros(1)})
    assert cache.load(key, {"latent": torch.float32}) is None and cache.stats.corrupt == 3
    assert not cache.path(key).exists(), "corrupt entries are deleted"
    cache.store(key, {"latent": torch.zeros(16, 8, 8), "extra": torch.zeros(1)})
    assert cache.load(key, {"latent": torch.float32}) is None and cache.stats.corrupt == 4, "exactly the expected"
    for dtype in (torch.float64, torch.float16, torch.int32, torch.bool):   # each with its own consistent record
        cache.store(key, {"latent": torch.zeros(16, 8, 8, dtype=dtype)})
        assert cache.load(key, {"latent": torch.float32}) is None, dtype
    assert cache.stats.corrupt == 8


def test_odd_texts_follow_a_fresh_encode_else_the_most_common_shapes():
    import torch

    from lora_run_native.cache import odd_texts

    good = {"prompt_embeds": torch.zeros(16, 32), "pooled_prompt_embeds": torch.zeros(64)}
    short = {**good, "prompt_embeds": torch.zeros(8, 32)}
    texts = {"a": good, "b": good, "c": short}
    assert odd_texts(texts) == ["c"]
    assert odd_texts({"a": short, "b": short, "c": good}, reference=good) == ["a", "b"]
    assert odd_texts({"a": good, "b": {"prompt_embeds": torch.zeros(16, 32)}}, reference=good) == ["b"]
    assert odd_texts({}) == [] and odd_texts(texts, reference=good) == ["c"]


def test_odd_texts_follow_the_shapes_the_family_declares_first():
    """A family's declared shapes (``ModelAdapter.text_shapes``; None: a dimension not known ahead) decide before
    the entries' majority: a whole cache of one other shape is odd, with or without a fresh encode."""
    import torch

    from lora_run_native.cache import fits_shapes, odd_texts

    good = {"prompt_embeds": torch.zeros(16, 32), "pooled_prompt_embeds": torch.zeros(64)}
    short = {**good, "prompt_embeds": torch.zeros(8, 32)}
    narrow = {**good, "prompt_embeds": torch.zeros(16, 8)}
    declared = {"prompt_embeds": (16, 32), "pooled_prompt_embeds": (None,)}
    assert odd_texts({"a": short, "b": short}) == [], "without a declaration the entries agree: trusted"
    assert odd_texts({"a": short, "b": short}, expected=declared) == ["a", "b"]
    assert odd_texts({"a": narrow, "b": narrow, "c": good}, expected=declared) == ["a", "b"]
    assert odd_texts({"a": good, "b": {**good, "pooled_prompt_embeds": torch.zeros(48)}}, expected=declared) == ["b"], \
        "an undeclared dimension still follows the run's other entries"
    assert odd_texts({"a": good, "b": good}, reference=good, expected=declared) == []
    assert fits_shapes(good, declared) is None and fits_shapes(good, None) is None
    assert fits_shapes({**good, "pooled_prompt_embeds": torch.zeros(1, 64)}, declared) is not None, "another rank"
    assert fits_shapes(short, declared) == "prompt_embeds has shape [8, 32], not [16, 32]"
    assert fits_shapes(good, {"prompt_embeds": (None, 32), "other": (3,)}) is None, "names it lacks: not compared"


def test_a_fresh_encode_unlike_the_declared_shapes_is_the_adapters_error(flux_recipe, run_recipe, tmp_path,
                                                                          monkeypatch):
    """A family that declares shapes its encoders do not give would have its cache rebuilt on every run: the first
    fresh encode names the adapter and the tensor instead, before anything is cached."""
    import pytest

    from lora_run.errors import BackendError
    from lora_run_flux.adapter import FluxAdapter

    monkeypatch.setattr(FluxAdapter, "text_shapes", lambda self, encoder: {
        "clip_l": {"pooled_prompt_embeds": (None,)}, "t5xxl": {"prompt_embeds": (17, None)}}[encoder])
    cache = tmp_path / "cache"
    with pytest.raises(BackendError, match=r"prompt_embeds has shape \[16, 32\], not \[17, \*\].*text_shapes"):
        run_recipe(flux_recipe(), ["train.steps=1", f"train.cache_dir=\"{cache}\""], output=tmp_path / "r")
    assert not list((cache / "text").rglob("*.safetensors")), "nothing cached"


# ------------------------------------------- entries rewritten with a consistent record (checksum recomputed)
def _entries(cache, kind):
    """key → tensors of every entry of ``kind``, read as they are (no checks)."""
    from safetensors import safe_open

    out = {}
    for path in sorted((cache / kind).rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out[fh.metadata()["key"]] = {name: fh.get_tensor(name) for name in fh.keys()}
    return out


def _plant(cache, kind, key, tensors):
    """Rewrite an entry through the cache's own writer: its metadata and checksums are consistent."""
    from lora_run_native.cache import Cache

    Cache(cache, kind).store(key, tensors)


def _same_lora(a, b):
    from .conftest import lora_tensors

    x, y = lora_tensors(a.artifacts["lora_diffusers"]), lora_tensors(b.artifacts["lora_diffusers"])
    return x.keys() == y.keys() and all(torch_equal(x[k], y[k]) for k in x)


def torch_equal(a, b):
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def test_an_entry_of_another_dtype_is_rebuilt_not_trained_on(flux_recipe, run_recipe, tmp_path):
    """int latents and text embeddings of another dtype, each with a consistent record: the dtype a fresh encode
    gives (latents float32, embeddings the compute dtype) is required, so they are rebuilt and the run trains as
    on a clean cache (were they trusted, the LoRA would differ)."""
    import torch

    cache = tmp_path / "cache"
    recipe = flux_recipe()
    sets = ["train.steps=3", f"train.cache_dir=\"{cache}\""]      # 3 images, batch 1: every entry is trained on
    clean = run_recipe(recipe, sets, output=tmp_path / "clean")
    latents, texts = _entries(cache, "latents"), _entries(cache, "text")
    assert len(latents) == 3 and len(texts) == 3
    (lkey, latent), (k1, t1), (k2, t2) = next(iter(latents.items())), *list(texts.items())[:2]
    _plant(cache, "latents", lkey, {"latent": (latent["latent"] * 4).round().to(torch.int32)})
    _plant(cache, "text", k1, {**t1, "prompt_embeds": t1["prompt_embeds"] > 0})
    _plant(cache, "text", k2, {**t2, "pooled_prompt_embeds": t2["pooled_prompt_embeds"].double() * 2})

    again = run_recipe(recipe, sets, output=tmp_path / "again")
    assert _stats(again) == ({"hits": 2, "misses": 1, "stale": 0, "corrupt": 1},
                             {"hits": 1, "misses": 2, "stale": 0, "corrupt": 2})
    assert _entries(cache, "latents")[lkey]["latent"].dtype == torch.float32
    rebuilt = _entries(cache, "text")
    for key, original in texts.items():
        assert all(torch_equal(rebuilt[key][name], value) for name, value in original.items()), key
    assert _same_lora(clean, again), "trained on the rebuilt entries, as on a clean cache"


def test_a_text_entry_of_another_shape_is_rebuilt(flux_recipe, run_recipe, tmp_path, dataset):
    """A text embedding of another sequence length (FLUX trained on it silently) or width (the first step crashed),
    with a consistent record, is rebuilt; so is a whole text cache rewritten to one other shape once a fresh encode
    of the run shows the shape a fresh encode gives."""
    cache = tmp_path / "cache"
    recipe = flux_recipe()
    sets = ["train.steps=3", f"train.cache_dir=\"{cache}\""]
    clean = run_recipe(recipe, sets, output=tmp_path / "clean")
    texts = _entries(cache, "text")
    keys = list(texts)
    shorter = {**texts[keys[0]], "prompt_embeds": texts[keys[0]]["prompt_embeds"][:8].clone()}
    _plant(cache, "text", keys[0], shorter)
    short = run_recipe(recipe, sets, output=tmp_path / "short")
    assert _stats(short)[1] == {"hits": 2, "misses": 1, "stale": 0, "corrupt": 1}
    assert _same_lora(clean, short)

    narrower = {**texts[keys[1]], "prompt_embeds": texts[keys[1]]["prompt_embeds"][:, :16].clone()}
    _plant(cache, "text", keys[1], narrower)
    narrow = run_recipe(recipe, sets, output=tmp_path / "narrow")
    assert _stats(narrow)[1] == {"hits": 2, "misses": 1, "stale": 0, "corrupt": 1}
    assert _same_lora(clean, narrow)

    for key in keys:                    # every entry of one other shape: they agree with each other
        _plant(cache, "text", key, {**texts[key], "prompt_embeds": texts[key]["prompt_embeds"][:8].clone()})
    sorted(dataset.glob("*.txt"))[0].write_text("ohwx, a new caption", encoding="utf-8")
    foreign = run_recipe(recipe, sets, output=tmp_path / "foreign")
    assert _stats(foreign)[1] == {"hits": 0, "misses": 3, "stale": 0, "corrupt": 2}, "the fresh encode decides"
    lengths = sorted(t["prompt_embeds"].shape[0] for t in _entries(cache, "text").values())
    assert lengths == [8, 16, 16, 16], "the run's entries rebuilt; the changed caption's old one is not read"
