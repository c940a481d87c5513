"""One data-parallel rank of a native run: ``python -m lora_run_native.worker RUN_DIR [--resume]``.

Started by :func:`lora_run_native.distributed.launch` (never by hand): the rank, world size and rendezvous
address come from its environment. The worker reloads the resolved ``recipe.toml`` of the run folder, lints
the dataset again (deterministic, read-only), and runs the ordinary trainer. Only rank 0 writes files and
reports lifecycle events (JSON lines on stdout); the other ranks' run log and hooks are silent.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import attrs

from lora_run.errors import LoraRunError, TrainingInterrupted
from lora_run.rundir import RECIPE, RunDir
from lora_run.run import RunContext

from .distributed import ENV_PARENT, Dist, emit


class _QuietRunDir(RunDir):
    """A non-zero rank's view of the run folder: it reads, never logs."""

    def log(self, message: str) -> None:
        pass

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        return self.read_manifest()


class _Events:
    """Lifecycle hooks of a worker: rank 0 sends them to the parent, which calls the real hooks."""

    def __init__(self, ctx: Any, main: bool):
        self.ctx, self.main = ctx, main

    def _artifacts(self) -> None:
        emit("artifacts", artifacts=self.ctx.artifacts)

    def step_finished(self, run: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.main:
            emit("step", step=step, metrics=metrics)

    def checkpoint_saved(self, run: Any, step: int, path: Path) -> None:
        if self.main:
            self._artifacts()
            emit("checkpoint", step=step, path=str(path))

    def samples_written(self, run: Any, step: int, paths: list[str]) -> None:
        if self.main:
            self._artifacts()
            emit("samples", step=step, paths=[str(p) for p in paths])


@attrs.define
class WorkerContext(RunContext):
    events: Any = None

    @property
    def hook(self) -> Any:
        return self.events


def _die_with_parent() -> None:
    """SIGKILL this worker if the parent dies (Linux), so no orphan keeps training or writing."""
    parent = int(os.environ.get(ENV_PARENT, "0") or 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the broken stdout pipe ends the worker instead
        pass
    if parent and os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora_run_native.worker")
    parser.add_argument("run_dir")
    parser.add_argument("--shown", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    _die_with_parent()
    dist = Dist.from_env()
    main_rank = dist.is_main
    try:
        from lora_run.plugins import load_plugins
        from lora_run.recipe import load_recipe
        from lora_run.run import lint, validate

        from .train import Trainer

        path = Path(args.run_dir)
        loaded = load_recipe(path / RECIPE)
        if args.shown:
            loaded = attrs.evolve(loaded, shown=args.shown)
        plugins = load_plugins()
        prepared = validate(loaded, plugins)
        report = lint(prepared.recipe, plugins)
        run_dir = RunDir(path) if main_rank else _QuietRunDir(path)
        echo = (lambda text: print(text, flush=True)) if main_rank else (lambda text: None)
        ctx = WorkerContext(prepared.recipe, plugins, prepared.backend, prepared.options, loaded, run_dir,
                            args.resume, report.usable, report, debug=args.debug, echo=echo)
        ctx.events = _Events(ctx, main_rank)
        Trainer(ctx, dist=dist).run()
        if main_rank:
            emit("artifacts", artifacts=ctx.artifacts)
        return 0
    except LoraRunError as exc:
        emit("error", code=exc.exit_code, type=type(exc).__name__, message=str(exc))
        print(f"error (rank {dist.rank}): {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        exc = TrainingInterrupted("aborted")
        emit("error", code=exc.exit_code, type=type(exc).__name__, message=str(exc))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported to the parent with the traceback in the log tail
        traceback.print_exc()
        emit("error", code=1, type=type(exc).__name__, message=f"crashed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
