"""On CUDA: a run gives the process back its allocator cap and torch settings (``accel.torch_settings``).

A tiny FLUX.1 run capped at ``[train] gpu_memory_gib`` sets the allocator's per-process memory fraction; before it
was restored, a later run in the same process (the Python API, an agent's loop) was held to that cap. The CPU half
(the caches encoded with the run's own settings, a generation with the training step's) is
`tests/native/test_process_settings.py`; the families' step-graph test runs each family twice in one process and
asserts the two eager runs agree."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.gpu.test_step_graphs_gpu import _run  # noqa: E402
from tests.native.test_process_settings import _flags  # noqa: E402


def test_a_capped_run_gives_the_process_its_memory_and_settings_back(tmp_path):
    torch.cuda.init()
    fraction, flags = torch.cuda.get_per_process_memory_fraction(), _flags()
    capped = []
    real = torch.cuda.set_per_process_memory_fraction
    torch.cuda.set_per_process_memory_fraction = lambda f, *a, **k: (capped.append(f), real(f, *a, **k))[1]
    try:
        ctx, losses, _ = _run(tmp_path, "capped", "off", sets=["train.gpu_memory_gib=8", 'train.compile="off"'],
                              steps=4)
    finally:
        torch.cuda.set_per_process_memory_fraction = real
    assert len(losses) == 4 and ctx.artifacts["lora_diffusers"]
    assert capped and capped[0] < 1.0, capped                   # the run was capped ...
    assert torch.cuda.get_per_process_memory_fraction() == fraction == 1.0   # ... and the process is not now
    assert _flags() == flags
