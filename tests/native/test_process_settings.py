"""A run's process-wide torch settings are its own (``accel.torch_settings``): whatever an earlier run in the same
process (the Python API, an agent's loop, the tests) or the user left set, the caches are encoded with TF32 off and
cuDNN's SDPA off, a generation runs with the training step's settings, and the process gets its own back after.

Found on an H100 (2026-12-06): two identical Hunyuan-DiT runs in one process trained LoRAs 6e-2 apart, because the
first run's training left TF32 matmuls on and the second encoded its caches with them."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import accel  # noqa: E402


def _flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends
    return b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cuda.cudnn_sdp_enabled(), b.cuda.flash_sdp_enabled()


@pytest.fixture
def leftover():
    """What an earlier run's training (or the user) left set in this process: TF32 on, cuDNN's SDPA on, flash off."""
    saved = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(False)
    yield (True, True, True, False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cuda.enable_cudnn_sdp(saved[2])
    torch.backends.cuda.enable_flash_sdp(saved[3])


def test_the_settings_are_fixed_inside_and_given_back_after_even_on_an_error(leftover):
    with accel.torch_settings(tf32=False):
        assert _flags() == (False, False, False, True)
        accel.configure_cuda()                          # the training step's, after the caches
        assert _flags() == (True, True, False, True)
    assert _flags() == leftover
    with pytest.raises(RuntimeError), accel.torch_settings(tf32=True):
        assert _flags() == (True, True, False, True)
        raise RuntimeError("a run that fails")
    assert _flags() == leftover


def test_a_run_encodes_its_caches_with_its_own_settings_and_gives_the_process_its_own_back(
        flux_recipe, run_recipe, monkeypatch, leftover):
    from lora_run_flux.adapter import FluxAdapter

    seen = []
    for name in ("encode_captions", "encode_images"):
        real = getattr(FluxAdapter, name)
        monkeypatch.setattr(FluxAdapter, name,
                            lambda self, *a, _real=real, **k: (seen.append(_flags()), _real(self, *a, **k))[1])
    ctx = run_recipe(flux_recipe())
    assert ctx.artifacts["lora_diffusers"]
    assert len(seen) >= 2 and set(seen) == {(False, False, False, True)}, seen
    assert _flags() == leftover


def test_a_generation_runs_with_the_training_steps_settings_and_gives_them_back(flux_recipe, tmp_path, monkeypatch,
                                                                                 leftover):
    from lora_run.recipe import load_recipe
    from lora_run_flux.adapter import FluxAdapter
    from lora_run_native.generate import generate_images

    seen = []
    real = FluxAdapter.generate_batch
    monkeypatch.setattr(FluxAdapter, "generate_batch",
                        lambda self, *a, **k: (seen.append(_flags()), real(self, *a, **k))[1])
    job = {"name": "one", "prompt": "ohwx person", "seed": 1, "strength": 1.0, "steps": 2, "guidance": 3.5,
           "width": 64, "height": 64}
    done = generate_images(load_recipe(flux_recipe()).recipe, None, [job], tmp_path / "out", device="cpu")
    assert len(done) == 1 and seen == [(True, True, False, True)]
    assert _flags() == leftover
