"""`lora-run run RECIPE` (also `lora-run RECIPE`): train a recipe through core's ``run.execute``."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .arguments import load_recipe_for, path_argument, recipe_arguments
from lora_run.errors import EXIT_INTERRUPTED, EXIT_OK, LoraRunError, RecipeError


def run_arguments(p: argparse.ArgumentParser) -> None:
    recipe_arguments(p)
    p.add_argument("--output-dir", type=path_argument, help="run folder (default: [output.dir] of the recipe)")
    p.add_argument("--gpus", type=int, metavar="N", help="data-parallel processes on this machine, one per GPU, "
                   "started through torchrun (overrides [train.gpus]; under torchrun / accelerate launch the "
                   "launcher decides)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    group.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty output folder "
                       "(only a folder lora-run created)")
    p.add_argument("--allow-dataset-change", action="store_true", help="with --resume: continue although images or "
                   "captions changed since the run started (refused otherwise)")


def cmd_run(args: argparse.Namespace, plugins: Any) -> int:
    try:
        return _train(args, plugins)
    except LoraRunError as err:
        tell_launcher(err)
        raise


def _train(args: argparse.Namespace, plugins: Any) -> int:
    from lora_run.run import execute

    if args.gpus is not None:       # after the --set values: it overrides [train.gpus] as its help says
        args.sets = [*args.sets, f"train.gpus={args.gpus}"]
    loaded = load_recipe_for(args, plugins)
    if args.allow_dataset_change and not args.resume:
        raise RecipeError("--allow-dataset-change only applies with --resume")
    started = time.perf_counter()
    ctx = execute(loaded, plugins, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite,
                  debug=args.debug, allow_dataset_change=args.allow_dataset_change)
    if not ctx.process.main:          # one of several processes: rank 0 reports
        return EXIT_OK
    print(f"done: {ctx.run_dir.path if ctx.run_dir else ''}")
    for key, value in ctx.artifacts.items():
        if isinstance(value, (str, Path)):
            print(f"  {key}: {value}")
    split = time_split(ctx.artifacts.get("timing"), time.perf_counter() - started)
    if split:
        print(split)
    return EXIT_OK


#: The parts of a run's time a backend records in the manifest's ``timing`` (docs/run-directory.md), in run order
_PARTS = (("cache_s", "caching"), ("load_s", "load"), ("compile_s", "compilation"), ("train_s", "steps"),
          ("samples_s", "samples"), ("checkpoints_s", "checkpoints"), ("finish_s", "final LoRA and samples"),
          ("evaluate_s", "evaluation"))


def time_split(timing: Any, total: float) -> str | None:
    """One line of where the run's ``total`` seconds went, from the ``timing`` its backend recorded: each part the
    backend measured (the steps without their compilation, which is a part of its own), then the rest (start-up
    before the caching, lint, writing the records). None when the backend measured none of its own parts (an
    external engine's run, whose training the evaluation's time alone would leave as "the rest")."""
    if not isinstance(timing, dict):
        return None
    measured = [(key, label, timing[key]) for key, label in _PARTS
                if isinstance(timing.get(key), (int, float)) and not isinstance(timing.get(key), bool)]
    if not {key for key, _, _ in measured} - {"evaluate_s"}:
        return None
    parts, counted = [], 0.0
    for key, label, value in measured:
        detail = ""
        if key == "train_s":
            value = max(0.0, value - (timing.get("compile_s") or 0))
            if isinstance(timing.get("steps"), int) and isinstance(timing.get("step_s"), (int, float)):
                detail = f" ({timing['steps']} at {timing['step_s']:.3f} s)"
        parts.append(f"{label} {_seconds(value)}{detail}")
        counted += value
    return f"time: {_seconds(total)}: " + ", ".join(parts) + f", the rest {_seconds(max(0.0, total - counted))}"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def tell_launcher(err: LoraRunError) -> None:
    """Under torchrun (also behind `accelerate launch`) a failing process writes its message to the error file
    the launcher names, so the launcher's failure summary shows lora-run's message for that rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and err.exit_code != EXIT_INTERRUPTED:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": f"{type(err).__name__} (exit {err.exit_code}): {err}",
                       "timestamp": int(time.time())}, fh)
