"""The native backend's side of a run with several processes (no torch here; :mod:`.distributed` holds the
torch part).

Core hands a run to :meth:`NativeBackend.run_processes` in two cases:

- ``[train] gpus = N`` (``lora-run --gpus N``) without a launcher: :func:`launch_all` starts this same command
  (:func:`relaunch_command`) N times through torchrun and waits; the run's result is read back from the
  manifest rank 0 wrote;
- a rank other than 0 of a launched run (``torchrun``, ``accelerate launch`` or the above): :func:`follow`
  trains its share and writes nothing. Rank 0 goes through core's ordinary run: it prepares and locks the
  folder, writes the manifest, calls the plugins' hooks and evaluates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_run.errors import TrainingInterrupted
from lora_run_rundir import RunDir, output_path
from lora_run.run import RunContext, Signals


class FollowerRunDir(RunDir):
    """A rank other than 0's view of the run folder: it reads (caches, checkpoints), never writes."""

    def prepare(self, *, overwrite: bool, resume: bool) -> None:
        pass

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        return self.read_manifest()

    def log(self, message: str) -> None:
        pass


def relaunch_command(ctx: RunContext, run_path: Path, overwrite: bool) -> list[str]:
    """The `python -m lora_run` arguments every process of a `--gpus N` run gets: this same run."""
    loaded = ctx.loaded
    assert loaded is not None
    return ["-m", "lora_run", "run", str(loaded.path), *loaded.overrides(),
            "--output-dir", str(run_path), *(["--resume"] if ctx.resume else []),
            *(["--overwrite"] if overwrite else []), *(["--debug"] if ctx.debug else [])]


def launch_all(ctx: RunContext, output_dir: str | None, overwrite: bool) -> RunContext:
    """`[train] gpus = N` without a launcher: N processes of this run through torchrun, each running core's
    ``execute`` (rank 0 writes); waits for them and takes the artifacts from the manifest."""
    from .distributed import launch

    ctx.run_dir = RunDir(output_path(ctx.recipe, output_dir))
    launch(ctx.recipe.train.gpus, relaunch_command(ctx, ctx.run_dir.path, overwrite), ctx, overwrite=overwrite)
    artifacts = ctx.run_dir.read_manifest().get("artifacts")
    ctx.artifacts.update(artifacts if isinstance(artifacts, dict) else {})
    return ctx


def follow(ctx: RunContext, output_dir: str | None) -> RunContext:
    """A rank other than 0 of a launched run: it trains its share and writes nothing."""
    ctx.run_dir = FollowerRunDir(output_path(ctx.recipe, output_dir))
    signals = Signals()
    signals.term()
    try:
        ctx.backend.factory(ctx).run()
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted") from None
    finally:
        signals.restore()
    return ctx
