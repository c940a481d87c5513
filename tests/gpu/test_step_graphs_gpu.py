"""On CUDA: `[train] cuda_graphs = "step"` (plugins/lora_run_native/stepgraph.py) trains what eager steps train.

A tiny FLUX.1 run through the real orchestrator, two token counts (a 64×64 and a wide bucket), two micro-batches a
step, LoRA dropout off, once with step graphs and once with `off` (the same compiled blocks, no graphs): the losses
step by step and the final LoRA agree, and the manifest's timing says how many micro-steps were replayed from how
many graphs. Controls: a planted replay that does not copy the new step's inputs in, and one whose optimizer frees
the gradients between steps (`set_to_none=True`, which a recorded backward cannot follow), must each move the
LoRA away (the freed one runs in a process of its own: its replay may end in an illegal memory access, which
counts as caught). A loss that reads its `step` on the host cannot be recorded: the run goes on with eager steps, says
so, and trains the same."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lora_run.hookspecs import hookimpl  # noqa: E402
from tests.native.conftest import BASE_RECIPE, lora_tensors  # noqa: E402


class Losses:
    """Collects each step's loss (the `step_finished` hook)."""

    def __init__(self):
        self.values: list[float] = []

    @hookimpl
    def step_finished(self, step, metrics):
        self.values.append(metrics["loss"])


class HostStepLoss:
    """A loss plugin that reads its `step` on the host (``int(step)``)."""

    @hookimpl
    def register_losses(self, register):
        def factory(_options=None):
            def loss(prediction, target, step=0, **_info):
                bump = 1.0 + 0.0 * int(step)
                return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1) * bump
            return loss
        register("host-step-mse", factory, description="mse that reads its step on the host (test)")


def _run(tmp_path: Path, name: str, graphs: str, extra=(), sets=(), family: str = "flux.1-dev", steps: int = 12,
         resolution: int = 80):
    """One run of ``family``'s tiny model (two token counts, two micro-batches a step) with `cuda_graphs` =
    ``graphs`` into ``tmp_path / name``; the families with a 32-pixel grid get buckets of that step and no T5 length."""
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_devtools.testing import build_tiny, make_images

    torch._dynamo.reset()          # each run compiles as in its own process (a user's run), not after the others'
    model = tmp_path / f"tiny-{family}"
    if not model.exists():
        build_tiny(family, model)
        make_images(tmp_path / "subject", count=2, size=(64, 64))
        make_images(tmp_path / "subject", count=2, size=(96, 64), seed=5, prefix="wide")
    text = (BASE_RECIPE.replace("{model}", str(model)).replace("{dataset}", str(tmp_path / "subject"))
            .replace("{length}", f"steps = {steps}"))
    if family != "flux.1-dev":
        text = (text.replace('family = "flux.1-dev"', f'family = "{family}"')
                .replace("bucket_step = 16", "bucket_step = 32").replace("text_max_length = 16\n", ""))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text, encoding="utf-8")
    watch = Losses()
    lines: list[str] = []
    ctx = execute(load_recipe(recipe, ['train.memory_mode="speed"', 'train.mixed_precision="bf16"',
                                       f'train.cuda_graphs="{graphs}"', f"dataset.resolution={resolution}",
                                       "train.gradient_accumulation=2", *sets]),
                  load_plugins(extra=[watch, *extra]), output_dir=str(tmp_path / name), echo=lines.append)
    return ctx, watch.values, lines


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _lora_gap(ctx, reference) -> float:
    """The largest relative difference of the LoRA's up-projections (zero at the start: all they hold is training)."""
    a, b = lora_tensors(ctx.artifacts["lora_diffusers"]), lora_tensors(reference.artifacts["lora_diffusers"])
    return max(_rel(a[k], b[k]) for k in b if "lora_B" in k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step-graphs")
    ctx, losses, _ = _run(tmp, "off", "off")
    return tmp, ctx, losses


def test_step_graphs_train_what_eager_steps_train(reference):
    tmp, off, off_losses = reference
    ctx, losses, lines = _run(tmp, "step", "step")
    timing = ctx.artifacts["timing"]
    assert "compiled + step CUDA graphs" in ctx.artifacts["gpu_plan"]["plan"]
    # 12 steps × 2 micro-batches; per token count: 1 eager call, 1 warm-up + recording, then replays
    assert timing["step_graphs"].endswith("micro-steps replayed from 2 CUDA graph(s)"), timing["step_graphs"]
    replayed = int(timing["step_graphs"].split(" of ")[0])
    assert replayed >= 12, timing["step_graphs"]
    assert len(losses) == len(off_losses) == 12
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, off_losses))
    assert worst < 1e-3, (losses, off_losses)
    gap = _lora_gap(ctx, off)
    print(f"step graphs against eager steps: losses within {worst:.1e}, LoRA within {gap:.1e}")
    assert gap < 1e-2
    assert not any("step CUDA graphs" in line and "warning" in line for line in lines)


def test_control_stale_inputs_and_freed_gradients_are_caught(reference, monkeypatch):
    from lora_run_native import stepgraph

    tmp, off, _ = reference

    def stale(self, entry, inputs, step):          # planted: the new step's inputs are not copied in
        graph, _static, _step, loss = entry
        graph.replay()
        self.replays += 1
        return loss.clone()

    with monkeypatch.context() as m:
        m.setattr(stepgraph.StepGraphs, "_replay", stale)
        stale_run, _, _ = _run(tmp, "stale", "step")
    assert _lora_gap(stale_run, off) > 5e-2

    # the freed gradients' replay writes where the allocator may have put something else: it can end in an illegal
    # memory access, which leaves this process's CUDA context unusable, so that run has a process of its own
    done = subprocess.run([sys.executable, "-c", f"from tests.gpu.test_step_graphs_gpu import _freed; _freed({str(tmp)!r})"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    said = done.stdout[-3000:] + done.stderr[-3000:]
    if done.returncode != 0:      # caught as a crash: a user's run would stop, not train something else
        assert "an illegal memory access" in said, said
        return
    freed = Path(done.stdout.strip().splitlines()[-1])
    assert max(_rel(a, lora_tensors(off.artifacts["lora_diffusers"])[k]) for k, a in lora_tensors(freed).items()
               if "lora_B" in k) > 5e-2, said


def _freed(tmp: str) -> None:
    """The planted optimizer that frees the gradients between steps (``set_to_none=True``), in its own process
    (``python -c``); prints the final LoRA's path."""
    from lora_run_native import train

    made = train.make_optimizer

    def freeing(*args, **kwargs):
        optimizer = made(*args, **kwargs)
        zero = optimizer.zero_grad
        optimizer.zero_grad = lambda set_to_none=True: zero(set_to_none=True)
        return optimizer

    train.make_optimizer = freeing
    ctx, _, _ = _run(Path(tmp), "freed", "step")
    print(ctx.artifacts["lora_diffusers"])


def test_a_loss_reading_its_step_on_the_host_falls_back_to_eager_steps(reference):
    tmp, _off, _ = reference
    ctx, losses, lines = _run(tmp, "host-step-step", "step", extra=[HostStepLoss()], sets=['train.loss="host-step-mse"'])
    _, eager, _ = _run(tmp, "host-step-off", "off", extra=[HostStepLoss()], sets=['train.loss="host-step-mse"'])
    warned = [line for line in lines if "[train.cuda_graphs]" in line and "eager steps" in line]
    assert warned, lines
    assert ctx.artifacts["timing"]["step_graphs"].startswith("eager micro-steps: recording the step")
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, eager)) < 1e-3
    torch.rand(2, device="cuda")          # the failed recording left the random generator usable (compiling draws)


def test_a_failed_capture_is_put_right_for_the_random_generator():
    """A capture that draws random numbers and then reads the host ends in an error without the generators' end of
    capture: the next draw outside a graph fails (the control, as first seen on an H100). `reset_after_failed_capture`
    (which `StepGraphs` and the graphed samples call) puts them back."""
    from lora_run_native.graphed import reset_after_failed_capture

    graph = torch.cuda.CUDAGraph()
    with pytest.raises(Exception):
        with torch.cuda.graph(graph):
            x = torch.rand(4, device="cuda")
            float(x.sum())
    try:
        torch.rand(2, device="cuda")
        broken = False
    except RuntimeError as exc:
        broken = "outside graph capture" in str(exc)
    reset_after_failed_capture()
    torch.rand(2, device="cuda")
    assert broken, "the control: without the reset, a draw after the failed capture fails"
