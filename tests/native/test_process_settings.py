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
    """What an earlier run's training (or the user) left set in this process: TF32 on, cuDNN's SDPA on, flash off;
    transformers and diffusers logging at INFO with their progress bars on (a tiny model's builder quiets them)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = _flags()
    logs = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (tlog, dlog)]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(False)
    for log, _, _ in logs:
        log.set_verbosity_info()
        log.enable_progress_bar()
    yield (True, True, True, False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cuda.enable_cudnn_sdp(saved[2])
    torch.backends.cuda.enable_flash_sdp(saved[3])
    for log, verbosity, bars in logs:
        log.set_verbosity(verbosity)
        (log.enable_progress_bar if bars else log.disable_progress_bar)()


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


def _process_state() -> dict:
    """What a run could leave changed in its process, beyond torch's flags above."""
    import os
    import signal
    import sys
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    state = {"flags": _flags(), "grad": torch.is_grad_enabled(),
             "logging": [(log.get_verbosity(), log.is_progress_bar_enabled()) for log in (tlog, dlog)], "dtype": torch.get_default_dtype(),
             "threads": torch.get_num_threads(), "cwd": os.getcwd(), "sys.path": list(sys.path),
             "warnings": list(warnings.filters),
             "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
             # the compile caches' folders are set once for the process (setdefault: a user's own setting wins)
             "env": {k: v for k, v in os.environ.items()
                     if k not in ("TORCHINDUCTOR_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",
                                  "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")}}
    return state


def _imported() -> None:
    """What a first run imports (diffusers, transformers and peft add warning filters as they load): imported before
    the state is taken, so that only what the run itself does is compared."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lora_run_flux.adapter  # noqa: F401
    import lora_run_native.train  # noqa: F401


def test_two_runs_of_one_recipe_in_one_process_train_the_same_lora_and_leave_it_as_they_found_it(
        flux_recipe, run_recipe, tmp_path, leftover):
    """The Python API as an agent's loop uses it, in a process whose settings are not torch's defaults (``leftover``):
    each run leaves the process as it found it (the compile caches' folders apart, which the first run names for the
    process and a user's own value overrides), and the second trains what the first trained, bit for bit."""
    from .conftest import lora_tensors

    _imported()
    recipe = flux_recipe(length="steps = 3")
    before = _process_state()
    first = run_recipe(recipe, output=tmp_path / "first")
    assert _process_state() == before
    second = run_recipe(recipe, output=tmp_path / "second")
    assert _process_state() == before
    a, b = lora_tensors(first.artifacts["lora_diffusers"]), lora_tensors(second.artifacts["lora_diffusers"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_run_leaves_the_process_as_it_found_it_too(flux_recipe, tmp_path, leftover):
    """A run stopped by a NaN loss (an error inside training) gives the process its state back as a finished one does."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_training import NonFiniteLoss

    from .test_training import NaNLoss, _with_loss

    _imported()
    plugins = _with_loss(load_plugins(extra=[NaNLoss()]), "nan-after-3")
    loaded = load_recipe(flux_recipe(), ["train.steps=6", 'train.loss="nan-after-3"'])
    before = _process_state()
    with pytest.raises(NonFiniteLoss):
        execute(loaded, plugins, output_dir=str(tmp_path / "nan"), echo=lambda *_: None)
    assert _process_state() == before
