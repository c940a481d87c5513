"""On CUDA (skipped without a GPU): for every family, a text encoder that does not fit ``[train]
gpu_memory_gib`` is streamed from host memory by the real placement rule, and its encodings match the
encoder placed whole."""
from __future__ import annotations

import pytest

from lora_run_devtools.testing import build_tiny


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2", "flux.2-klein"])
def test_encoders_streamed_under_a_budget(family, tmp_path):
    import torch

    from lora_run_native.adapters import adapter_class
    from tests.parity.conftest import minimal_recipe

    source = build_tiny(family, tmp_path / "m")
    cls = adapter_class(family)
    encoders = tuple(cls.text_encoders)

    def adapter(**train):
        recipe = minimal_recipe(family, source, train={"mixed_precision": "bf16", **train})
        a = cls(recipe, device=torch.device("cuda"))
        a.load_encoders(only=encoders)
        return a

    whole, streamed = adapter(), adapter(gpu_memory_gib=0.0001)
    assert not whole.offloaded and streamed.offloaded
    captions = ["ohwx, a person in a red coat", "a dog on a beach"]
    a, b = whole.encode_captions(captions), streamed.encode_captions(captions)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-2), key
