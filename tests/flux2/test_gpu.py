"""FLUX.2 on CUDA (skipped without a GPU): a text encoder larger than the memory the run may use is streamed
from host memory for caching and gives the same encodings as one placed whole."""
from __future__ import annotations

import pytest

from .conftest import write_recipe


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_text_encoder_streamed_when_it_does_not_fit(tiny_dev, dataset, tmp_path):
    import torch

    from lora_run.recipe import load_recipe
    from lora_run_native.adapters import adapter_class

    path = write_recipe(tmp_path / "r.toml", "flux.2-dev", tiny_dev, dataset)

    def adapter(*sets):
        recipe = load_recipe(path, ['train.mixed_precision="bf16"', *sets]).recipe
        return adapter_class("flux.2-dev")(recipe, device=torch.device("cuda"))

    whole, streamed = adapter(), adapter("train.gpu_memory_gib=0.0001")
    whole.load_encoders(only=("mistral",))
    streamed.load_encoders(only=("mistral",))
    assert not whole.offloaded and streamed.offloaded
    captions = ["ohwx, a person", "a dog"]
    assert torch.allclose(whole.encode_captions(captions)["prompt_embeds"].float(),
                          streamed.encode_captions(captions)["prompt_embeds"].float(), atol=1e-2)
