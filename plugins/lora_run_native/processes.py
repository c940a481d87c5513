"""Runs of several processes (no torch here; :mod:`.distributed` holds the torch part): the built-in answer to the
``run_processes`` hook, :func:`take_part`, for every backend.

A process finds its place in the ``RANK`` / ``WORLD_SIZE`` environment a launcher sets (core's
``Processes.from_env``, which core also reads to refuse a launched process no plugin places). Under a launcher
the launcher's process count becomes ``[train] gpus`` of the run, ranks other than 0 print nothing and call no
hook, and a backend without a ``run_processes`` method is refused. A backend's ``run_processes`` gets:

- ``[train] gpus = N`` (``lora-run --gpus N``) without a launcher: the native backend's :func:`launch_all` starts
  this same command (:func:`relaunch_command`) N times through torchrun and waits; the run's result is read back
  from the manifest rank 0 wrote;
- a rank other than 0 of a launched run (``torchrun``, ``accelerate launch`` or the above): :func:`follow` trains
  its share and writes nothing. Rank 0 goes through core's ordinary run: it prepares and locks the folder, writes
  the manifest, calls the plugins' hooks and evaluates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import attrs

from lora_run.errors import LoraRunError, RecipeError, TrainingInterrupted
from lora_run.recipe import replace
from lora_run.run import Processes, RunContext, Signals, crash_error
from lora_run_rundir import RunDir, output_path


class SilentHooks:
    """What a rank other than 0 sees as `ctx.hook`: every hook call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., list]:
        return lambda **_kw: []


def quiet(_text: str) -> None:
    pass


def take_part(run: RunContext, output_dir: str | None, overwrite: bool) -> Callable[[], RunContext] | None:
    """The built-in ``run_processes``: a launched process takes its place (above); the backend's ``run_processes``
    runs a `gpus` > 1 run started without a launcher and every rank other than 0. None: core runs it here."""
    if run.process.launched:        # another plugin's launcher placed this process (rank 0: it goes on in core)
        return None
    process, gpus = Processes.from_env(), getattr(getattr(run.recipe, "train", None), "gpus", 1)
    if not process.launched and gpus <= 1:
        return None
    several = getattr(run.backend.factory(run), "run_processes", None)
    if process.launched:
        run.process, shown = process, run.loaded.shown if run.loaded else "recipe.toml"
        if not process.main:
            run.echo, run.hook = quiet, SilentHooks()
        if process.world > 1 and several is None:
            raise RecipeError(f"{shown}: backend \"{run.recipe.backend.name}\" starts its own processes; run "
                              f"`lora-run {shown} --gpus {process.world}` once instead of under a launcher "
                              f"({process.world} processes here) — see `lora-run docs multi-gpu`")
        if gpus not in (1, process.world):
            run.echo(f"note: {shown}: [train.gpus] = {gpus} is replaced by the launcher's {process.world} process(es)")
        if gpus != process.world:           # under a launcher the number of processes is the launcher's
            run.recipe = replace(run.recipe, train={"gpus": process.world})
            if run.loaded is not None:      # ... and the `--resume` line the run prints keeps it (else refused)
                run.loaded = attrs.evolve(run.loaded, sets=(*run.loaded.sets, f"train.gpus={process.world}"))
    if several is None or process.launched and process.main:
        return None
    return lambda: several(run, output_dir=output_dir, overwrite=overwrite)


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
    """A rank other than 0 of a launched run: it trains its share and writes nothing. A failure ends it as rank 0's
    ends core's run, naming the rank: a LoraRunError as it is, any other exception as the backend's crash (exit 1;
    the message reaches the launcher's error file, :func:`lora_run_commands.run.tell_launcher`)."""
    ctx.run_dir = FollowerRunDir(output_path(ctx.recipe, output_dir))
    signals = Signals()
    signals.term()
    try:
        ctx.backend.factory(ctx).run()
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted") from None
    except LoraRunError:
        raise
    except Exception as exc:  # noqa: BLE001 - worded as rank 0's crash is, not as a bug of lora-run
        if signals.caused(exc):
            raise TrainingInterrupted("interrupted") from None
        where = f" on rank {ctx.process.rank} of {ctx.process.world}"
        raise ctx.run_dir.error_for(exc) or crash_error(exc, ctx.recipe.backend.name, ctx.run_dir.path, where) from exc
    finally:
        signals.restore()
    return ctx
