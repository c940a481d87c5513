"""FLUX.2 on CUDA (skipped without a GPU): a text encoder larger than the memory the run may use is streamed
from host memory for caching and gives the same encodings as one placed whole."""
from __future__ import annotations

import pytest

from lora_run.recipe import parse_recipe_text


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_text_encoder_streamed_when_it_does_not_fit(tiny_dev):
    import torch

    from lora_run_native.adapters import adapter_class

    def adapter(cap):
        recipe = parse_recipe_text(f"""
[model]
family = "flux.2-dev"
source = "{tiny_dev}"
[dataset]
path = "{tiny_dev}"
trigger = "ohwx"
[train]
steps = 1
mixed_precision = "bf16"
{f"gpu_memory_gib = {cap}" if cap else ""}
""")
        return adapter_class("flux.2-dev")(recipe, device=torch.device("cuda"))

    whole, streamed = adapter(None), adapter(1e-4)
    whole.load_encoders(only=("mistral",))
    streamed.load_encoders(only=("mistral",))
    assert not whole.offloaded and streamed.offloaded
    captions = ["ohwx, a person", "a dog"]
    assert torch.allclose(whole.encode_captions(captions)["prompt_embeds"].float(),
                          streamed.encode_captions(captions)["prompt_embeds"].float(), atol=1e-2)
