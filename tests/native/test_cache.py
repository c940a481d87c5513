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
    assert cache.load(key, ("latent",)) is not None
    other = entry_key("latents", "abd", "vae-1", "64x64")
    cache.path(other).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).rename(cache.path(other))           # a file under another entry's name
    assert cache.load(other, ("latent",)) is None and cache.stats.corrupt == 1, "metadata key must match"
    cache.store(key, {"latent": torch.full((2, 2), float("nan"))})
    assert cache.load(key, ("latent",)) is None and cache.stats.corrupt == 2
    cache.store(key, {"other": torch.zeros(1)})
    assert cache.load(key, ("latent",)) is None and cache.stats.corrupt == 3
    assert not cache.path(key).exists(), "corrupt entries are deleted"
