from __future__ import annotations

import json

import attrs
import pytest

from lora_run.hookspecs import hookimpl
from lora_run.run import Plan
from lora_run.schema import option

ALL_FLUX = {"steps", "epochs", "timestep_sampling:sigmoid", "targets:attention", "optimizer:adafactor",
            "scheduler:constant_with_warmup", "loss:mse", "noise_offset", "regularization"}


@attrs.frozen(kw_only=True)
class RecordingOptions:
    fail_at: int | None = option(None, "Raise at this step.", ge=1)


class RecordingBackend:
    """A backend for core tests: writes one file per step, calls the lifecycle hooks."""

    def __init__(self, ctx):
        self.ctx = ctx

    def plan(self):
        r = self.ctx.recipe
        return Plan(backend="recording", family=r.model.family, steps=r.train.steps or 1,
                    files={"recording/config.json": json.dumps({"steps": r.train.steps})},
                    commands=[["echo", "it's a plan"]], memory_estimate_gib=1.5)

    def run(self):
        ctx = self.ctx
        for step in range(1, (ctx.recipe.train.steps or 1) + 1):
            if ctx.options and ctx.options.fail_at == step:
                raise RuntimeError("boom at step %d" % step)
            ctx.hook.step_finished(run=ctx, step=step, metrics={"loss": 1.0 / step})
        out = ctx.run_dir.write_text("lora.txt", "weights")
        ctx.artifacts["lora"] = str(out)


class RecordingPlugin:
    def __init__(self):
        self.events = []

    @hookimpl
    def register_backends(self, register):
        register("recording", RecordingBackend, options=RecordingOptions,
                 capabilities={"flux.1-dev": ALL_FLUX},
                 reasons={"min_snr_gamma": "it records, it does not weight"})

    @hookimpl
    def run_started(self, run):
        self.events.append(("run_started",))

    @hookimpl
    def step_finished(self, step, metrics):
        self.events.append(("step", step, metrics["loss"]))

    @hookimpl
    def run_finished(self, status, error):
        self.events.append(("run_finished", status, type(error).__name__ if error else None))


@pytest.fixture
def recording(plugins_with):
    plugin = RecordingPlugin()
    return plugin, plugins_with(plugin)


GOOD = """
backend = "recording"
[model]
source = "black-forest-labs/FLUX.1-dev"
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[train]
steps = 3
[eval]
enabled = false
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Messages show paths relative to the working directory, as a user in that folder sees them."""
    monkeypatch.chdir(tmp_path)
