"""Caching fits every budget training fits: a frozen text encoder too big for the run's memory is streamed
from host memory (diffusers' group offloading) instead of placed whole, for every family, and gives the same
encodings. The placement rule is checked against the encoders users load; the streaming itself runs here on
the CPU through the real hooks with each family's tiny encoders (tests/gpu runs it on CUDA)."""
from __future__ import annotations

import pytest

from lora_run_devtools.testing import build_tiny
from lora_run_native.adapters.base import encoder_fits

T5_XXL, QWEN25_VL_7B, MISTRAL3 = 8.87, 15.45, 44.7     # GiB in bf16


def test_the_rule_for_the_encoders_users_load():
    # the placements the acceptance run proved stay as they were: T5-XXL whole in 12, 16 and 24 GiB
    assert all(encoder_fits(T5_XXL, budget) for budget in (12.0, 16.0, 24.0))
    # streamed where whole would not fit its activations: T5-XXL on 8 GiB, Qwen2.5-VL-7B on 16, Mistral-3 on 24
    assert not encoder_fits(T5_XXL, 8.0)
    assert not encoder_fits(QWEN25_VL_7B, 16.0) and encoder_fits(QWEN25_VL_7B, 24.0)
    assert not encoder_fits(MISTRAL3, 24.0) and encoder_fits(MISTRAL3, 80.0)
    # planted mistake: the weights alone fit 16 GiB, so a rule without room for activations would place it
    assert QWEN25_VL_7B <= 16.0


def streamed_and_whole(family: str, source, device: str):
    """Two adapters of ``family`` on ``device``: one places its text encoders whole, the other streams them."""
    import torch

    from lora_run_native.adapters import adapter_class
    from tests.parity.conftest import minimal_recipe

    recipe = minimal_recipe(family, source, train={"mixed_precision": "no"})
    cls = adapter_class(family)
    whole, streamed = cls(recipe, device=torch.device(device)), cls(recipe, device=torch.device(device))
    streamed.place_encoder = lambda module: streamed.stream_encoder(module, torch.device(device))
    encoders = tuple(k for k in cls.text_encoders)
    whole.load_encoders(only=encoders)
    streamed.load_encoders(only=encoders)
    return whole, streamed


@pytest.mark.parametrize("family", ["flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2", "flux.2-klein"])
def test_streamed_encoders_give_the_same_encodings(family, tmp_path):
    import torch

    whole, streamed = streamed_and_whole(family, build_tiny(family, tmp_path / "m"), "cpu")
    assert streamed.offloaded and not whole.offloaded
    hooked = [m for enc in streamed.encoders.values() for m in enc.modules() if getattr(m, "_diffusers_hook", None)]
    assert hooked, "no group-offloading hooks on the streamed encoders"
    captions = ["ohwx, a person in a red coat", "a dog on a beach"]
    a, b = whole.encode_captions(captions), streamed.encode_captions(captions)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_trainable_text_encoder_is_always_placed_whole(tmp_path):
    """CLIP-L, which a text-encoder LoRA trains, never goes through place_encoder (hooks would move its
    LoRA weights back to the host after every layer)."""
    import torch

    from lora_run_native.adapters import adapter_class
    from tests.parity.conftest import minimal_recipe

    recipe = minimal_recipe("flux.1-dev", build_tiny("flux.1-dev", tmp_path / "m"))
    adapter = adapter_class("flux.1-dev")(recipe, device=torch.device("cpu"))
    placed: list[str] = []
    adapter.place_encoder = lambda module: placed.append(type(module).__name__) or module
    adapter.load_encoders()
    assert placed == ["T5EncoderModel"]          # t5xxl only: clip_l and the VAE are placed whole
