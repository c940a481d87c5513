"""Built-in backend plugin `native` (alias `flux`): the in-process trainer (diffusers + peft + accelerate).

One training loop, data pipeline, cache, checkpoint format and generation API for every model family; the
family specifics live in ``adapters/`` (one :class:`~lora_run_native.adapters.base.ModelAdapter` per family).
The backend's capabilities are the adapters' ``features``, so adding an adapter adds its family.

No torch import at module level: `lora-run check` and `lora-run plugins` load this module.
"""
from __future__ import annotations

from pathlib import Path

from lora_run.hookspecs import hookimpl


def make_backend(ctx):
    from .backend import NativeBackend

    return NativeBackend(ctx)


def _demo_arguments(parser):
    from lora_run_commands.arguments import path_argument

    parser.add_argument("--output-dir", default="runs/demo", type=path_argument, help="where the demo's assets and "
                        "run go")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run")


def _cmd_demo(args, plugins):
    """`lora-run demo`: build the tiny assets and run them end to end with this backend."""
    from .demo import run_demo

    return run_demo(args.output_dir, plugins, overwrite=args.overwrite, debug=args.debug)


def _generate(*args, **kwargs):
    """Image generation for evaluators (`generate_images(recipe, lora_path, jobs, out_dir, device=None,
    on_image=None)`). Without the `train` extra (a kohya or diffusion-pipe recipe evaluated in an install that drives
    only the engines) it says which packages to install, exit 2, instead of failing on the first import."""
    from lora_run.errors import PluginError

    from .backend import missing_packages
    from .generate import generate_images

    if (why := missing_packages()) is not None:
        raise PluginError(f"generating the evaluation images: {why}")

    return generate_images(*args, **kwargs)


def _memory_estimate(recipe, swapped_blocks=0):
    from .memory import equivalent_estimate

    return equivalent_estimate(recipe, swapped_blocks)


@hookimpl
def register_backends(register, families):
    from .adapters import adapter_classes
    from .backend import NativeOptions

    classes = adapter_classes(families)
    capabilities = {family: cls.features for family, cls in classes.items()}
    reasons = {family: dict(cls.reasons) for family, cls in classes.items()}   # per family: its own words
    notes = {f: "its family plugin declares no native adapter" for f in families if f not in classes}
    register("native", make_backend, options=NativeOptions, capabilities=capabilities,
             description="in-process trainer (diffusers + peft + accelerate) for " + ", ".join(sorted(classes)),
             reasons=reasons, family_notes=notes, memory_estimate=_memory_estimate,
             generate=_generate, default=True)
    flux = classes.get("flux.1-dev")
    if flux is None:  # the alias exists only with the FLUX.1-dev family plugin
        return
    register("flux", make_backend, options=NativeOptions, capabilities={"flux.1-dev": flux.features},
             description="alias of native for FLUX.1-dev", reasons={"flux.1-dev": dict(flux.reasons)},
             alias_of="native")


@hookimpl(trylast=True)
def run_processes(run, output_dir, overwrite):
    """Several processes for every backend: a launcher's processes take their places, and a backend's own
    ``run_processes`` gets the runs it must start or follow (``processes.take_part``)."""
    from .processes import take_part

    return take_part(run, output_dir, overwrite)


@hookimpl
def check_resume(run_dir, recipe, loaded, report, allow_dataset_change, plugins):
    """A native run's checkpoints, before anything is written: no file or link where a checkpoint folder goes, no
    folder there lora-run did not write, and no checkpoint of a recipe this one differs from where a resumed run
    cannot follow it."""
    from lora_run.errors import OutputError, RecipeError
    from lora_run.files import shown
    from lora_run.recipe import to_dict

    from .checkpoint import (misplaced_entries, past_the_end, recorded_checkpoints, recorded_recipe_differences,
                             unwritten_checkpoints)

    backend = plugins.registry["backend"].get(recipe.backend.name)
    if backend is None or backend.factory is not make_backend:
        return
    root = run_dir.file("checkpoints")
    misplaced = misplaced_entries(root)
    if misplaced:
        raise OutputError(f"{shown(run_dir.path)}: cannot resume: {'; '.join(misplaced)} (checkpoints are folders lora-run "
                          "writes); move it out of the run folder, or start a new run with --output-dir")
    unwritten = unwritten_checkpoints(root, recorded_checkpoints(run_dir.read_manifest()))
    if unwritten:     # moved aside as damaged, it would be renamed; written into, replaced
        raise OutputError(f"{shown(run_dir.path)}: cannot resume: {', '.join(shown(f.relative_to(run_dir.path)) for f in unwritten)} "
                          f"{'is a folder' if len(unwritten) == 1 else 'are folders'} lora-run did not write (no "
                          "checkpoint state in it, and no checkpoint of that name recorded in the manifest); move it "
                          "out of the run folder, or start a new run with --output-dir")
    differences = recorded_recipe_differences(root, to_dict(recipe))
    if differences:
        state, keys = differences[-1]
        raise RecipeError(f"{loaded.shown}: cannot resume from {shown(state)}: that checkpoint was trained with another "
                          f"recipe (it differs at {', '.join('[' + k + ']' for k in keys)}); only steps/epochs, save "
                          "policy, [sample] and [eval] may change on resume")
    past = past_the_end(root, recipe)
    if past is not None:
        raise RecipeError(shorter_than_checkpoint(loaded.shown, *past))


def shorter_than_checkpoint(where: str, state: Path, step: int, total: int, key: str) -> str:
    """The refusal of a resume whose run is now shorter than its newest checkpoint (``[train] steps`` or ``epochs``
    lowered below it): it would write that checkpoint's LoRA as the final one of a shorter run."""
    from lora_run.files import shown

    folder = state.parent.parent if state.name == "state.json" else state
    return (f"{where}: cannot resume from {shown(folder)}: that checkpoint has trained {step} steps, more than the "
            f"{total} [{key}] gives now; a resume trains on from its newest checkpoint and cannot go back. Set "
            f"[{key}] so the run is at least {step} steps long, take the LoRA of an earlier step from its checkpoint "
            "folder, or start over with --overwrite")


@hookimpl
def register_commands(register):
    register("demo", _cmd_demo, configure=_demo_arguments,
             description="run the embedded tiny end-to-end demo (CPU, no download)")
