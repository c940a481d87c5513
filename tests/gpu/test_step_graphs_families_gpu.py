"""On CUDA: whole-step graphs (`[train] cuda_graphs = "step"`) on the families other than FLUX.1-dev.

`FamilyShape.whole_step_graphs` lets `cuda_graphs = "auto"` pick step graphs only for families whose recordings were
run and checked on a GPU. This file is that check for HunyuanImage-2.1, Hunyuan-DiT v1.2 and FLUX.2 [klein] (``FAMILIES``: which record): each
family's tiny model trains 8 steps × 2 micro-batches over two token counts, once with step graphs and once with
`off` (the same compiled blocks, no graphs), through the real orchestrator. It passes where the run replayed its
micro-steps from graphs (not an eager fallback) and the losses and the LoRA agree with the eager steps. The control
(`test_step_graphs_gpu.py`'s planted stale replay) shows the comparison catches a replay that trains something else;
here a family that records but replays wrongly fails the same comparison."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.gpu.test_step_graphs_gpu import _lora_gap  # noqa: E402
from tests.gpu.test_step_graphs_gpu import _run as run  # noqa: E402

#: family -> whether its step records as a CUDA graph. Measured on an H100 at ce40f56 (2026-12-06): Hunyuan-DiT and
#: [klein] replay 11 of 16 micro-steps from 2 graphs and train what eager steps train; HunyuanImage-2.1's recording
#: fails ("operation failed due to a previous error during capture": its forward reads the host, as its graphed
#: samples do, graphed.py) and the run goes on with eager steps.
FAMILIES = {"hunyuan-image-2.1": False, "hunyuan-dit-1.2": True, "flux.2-klein": True}


def _run(tmp: Path, family: str, graphs: str, name: str | None = None):
    return run(tmp, name or graphs, graphs, family=family, steps=8, resolution=96)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_graphs_train_what_eager_steps_train_on_every_family(family, tmp_path):
    off, off_losses, _ = _run(tmp_path, family, "off")
    # the eager steps against themselves first: on an H100 (2026-12-06) the second of two identical eager runs of
    # Hunyuan-DiT and HunyuanImage-2.1 in one process ended as far from the first (LoRA 6e-2 / 4e-2) as their step
    # graphs did: the first run's training had left TF32 matmuls on and the second encoded its caches with them
    # (accel.torch_settings now fixes and restores them). Two runs of one recipe in one process must agree.
    again, again_losses, _ = _run(tmp_path, family, "off", name="off-again")
    floor, floor_losses = _lora_gap(again, off), max(abs(a - b) / abs(b) for a, b in zip(again_losses, off_losses))
    print(f"{family}: eager steps against eager steps: losses within {floor_losses:.1e}, LoRA within {floor:.1e}")
    ctx, losses, lines = _run(tmp_path, family, "step")
    timing = ctx.artifacts["timing"]
    print(f"{family}: {ctx.artifacts['gpu_plan']['plan']}; {timing.get('step_graphs')}")
    assert "compiled + step CUDA graphs" in ctx.artifacts["gpu_plan"]["plan"]
    if FAMILIES[family]:
        assert "replayed from" in timing["step_graphs"] and not timing["step_graphs"].startswith("eager"), \
            (timing["step_graphs"], [line for line in lines if "cuda_graphs" in line])
        assert int(timing["step_graphs"].split(" of ")[0]) >= 8, timing["step_graphs"]
    else:                               # the recording fails: said once, and the run goes on with eager steps
        assert timing["step_graphs"].startswith("eager micro-steps: recording the step as a CUDA graph failed")
        assert any("[train.cuda_graphs]" in line and "eager steps" in line for line in lines), lines
    assert len(losses) == len(off_losses) == 8
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, off_losses))
    gap = _lora_gap(ctx, off)
    print(f"{family}: step graphs against eager steps: losses within {worst:.1e}, LoRA within {gap:.1e}")
    assert floor_losses < 1e-3 and floor < 1e-2, "the eager runs themselves differ: the comparison below means nothing"
    assert worst < 1e-3, (losses, off_losses)
    assert gap < 1e-2
