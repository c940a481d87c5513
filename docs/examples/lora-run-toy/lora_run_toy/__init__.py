"""lora-run-toy: a complete third-party plugin, small enough to read in a minute.

It registers a backend (`toy`) that "trains" by fitting one number with plain Python, a loss
(`toy-abs`), a tiny model family (`toy-flux`, see `family.py`) that the built-in native backend trains,
and implements a lifecycle hook that appends every event to `<run>/toy-events.txt`. Any backend that
takes every registered loss (`loss:*`, as the native backend does) trains with `toy-abs`.
"""
from __future__ import annotations

import json

import attrs

from lora_run.hookspecs import hookimpl
from lora_run_rundir import atomic_write_text
from lora_run.run import Plan
from lora_run.schema import option


@attrs.frozen(kw_only=True)
class ToyOptions:
    """Options of the `[backend.toy]` table."""

    target: float = option(3.0, "The number the toy backend learns.")
    greeting: str = option("hello", "Written into the toy LoRA file.")


class ToyBackend:
    def __init__(self, ctx):
        self.ctx = ctx
        self.options = ctx.options or ToyOptions()

    def check(self):
        if self.options.target != self.options.target:  # NaN
            return [(("backend", "options", "toy", "target"), "must be a number, got nan")]
        return []

    def plan(self) -> Plan:
        r = self.ctx.recipe
        return Plan(backend="toy", family=r.model.family, steps=r.train.steps or 1,
                    files={"toy/plan.json": json.dumps({"target": self.options.target}) + "\n"},
                    outputs=[f"{r.output.name}.toy.json"], memory_estimate_gib=0.0)

    def run(self) -> None:
        r, ctx = self.ctx.recipe, self.ctx
        value, lr = 0.0, r.optimizer.lr
        for step in range(1, (r.train.steps or 1) + 1):
            value += 2 * lr * (self.options.target - value)
            ctx.hook.step_finished(run=ctx, step=step, metrics={"loss": abs(self.options.target - value)})
        out = ctx.run_dir.file(f"{r.output.name}.toy.json")
        ctx.run_dir.claim(out.name)          # the run's: listed in its manifest, so --overwrite may replace it
        atomic_write_text(out, json.dumps({"value": value, "greeting": self.options.greeting}) + "\n")
        ctx.artifacts["toy_lora"] = str(out)
        ctx.hook.checkpoint_saved(run=ctx, step=r.train.steps or 1, path=out)


def toy_abs(_options=None):
    def loss(prediction, target, **_info):
        return (prediction - target).abs().flatten(1).mean(dim=1)
    return loss


@hookimpl
def register_backends(register):
    register("toy", ToyBackend, options=ToyOptions, description="fits one number; shows the plugin API",
             capabilities={"flux.1-dev": {"steps", "timestep_sampling:sigmoid", "targets:attention",
                                          "optimizer:adafactor", "optimizer:adamw",
                                          "scheduler:constant", "scheduler:constant_with_warmup", "loss:mse"}})


@hookimpl
def register_families(register):
    register("toy-flux", description="a FLUX-shaped toy DiT for CPU demos (build one: lora_run_toy.family.build)",
             file_slots={}, pixel_multiple=16, lora_formats=("kohya", "diffusers"),
             adapters={"native": "lora_run_toy.family:ToyFluxAdapter"})


@hookimpl
def register_losses(register):
    register("toy-abs", toy_abs, description="mean absolute error")


@hookimpl
def step_finished(run, step, metrics):
    if run.run_dir is not None:
        run.run_dir.claim("toy-events.txt")
        with open(run.run_dir.file("toy-events.txt"), "a", encoding="utf-8") as fh:
            fh.write(f"step {step} loss {metrics['loss']:.6f}\n")
