"""The diffusion-pipe backend object: check, plan, run."""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from lora_run.errors import BackendError, OutputError, PluginError, RecipeError, TrainingInterrupted
from lora_run.recipe import resume_command
from lora_run.run import Plan, RunContext
import lora_run_engines as engines
from lora_run_engines import tomlfile
from lora_run_engines.output import collectable
from lora_run_engines.stage import staged_size, upscale_note
from lora_run_formats.model_files import weights_problem

from . import collect, keydata, translate
from .options import ENV_PATH, DiffusionPipeOptions
from .supervise import LogParser, PhaseEvent, SaveEvent, StepEvent
from lora_run_engines.supervise import Supervisor
from lora_run_training import ModelSourceError, NonFiniteLoss
from lora_run_training.sections import loss_options

NAME = "diffusion-pipe"


def _toml(data: dict[str, Any], header: str) -> str:
    return engines.commented(header, tomlfile.dumps(data))


class Progress:
    """One line every `every_s` seconds (and at the first and last step) through `echo`."""

    def __init__(self, echo: Callable[[str], None], total: int | None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.echo, self.total, self.every_s, self.clock = echo, total, every_s, clock
        self.last_print = -math.inf
        self.phases: set[str] = set()

    def phase(self, text: str) -> None:
        if text not in self.phases:
            self.phases.add(text)
            self.echo(f"diffusion-pipe: {text}")

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        now = self.clock()
        last = self.total is not None and step >= self.total
        if step > 1 and not last and now - self.last_print < self.every_s:
            return
        self.last_print = now
        parts = [f"step {step}" + (f"/{self.total} ({100 * step // max(1, self.total)}%)" if self.total else "")]
        parts.append(f"loss {metrics['loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "s_per_it" in metrics:
            parts.append(f"{metrics['s_per_it']:.2f} s/it")
            if self.total:
                left = (self.total - step) * metrics["s_per_it"]
                parts.append(f"ETA {_duration(left)}")
        self.echo("diffusion-pipe: " + "  ".join(parts))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class DiffusionPipeBackend:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipe = ctx.recipe
        self.options: DiffusionPipeOptions = ctx.options or DiffusionPipeOptions()
        raw = self.recipe.backend.options.get(getattr(ctx.backend, "name", "diffusion-pipe"), {})
        if self.recipe.train.gpus > 1 and "num_gpus" not in raw:     # [train] gpus / --gpus feed --num_gpus
            self.options = attrs.evolve(self.options, num_gpus=self.recipe.train.gpus)
        self.family = self.recipe.model.family
        self._sets: Any = None
        self._bucket_counts: list[int] | None = None

    # ------------------------------------------------------------------------------ locations
    def _base(self) -> Path:
        loaded = self.ctx.loaded
        return loaded.path.resolve().parent if loaded is not None else Path.cwd()

    def _resolve(self, value: str) -> Path:
        return engines.resolve_path(value, self._base())

    def checkout(self) -> tuple[Path | None, str]:
        """(checkout path or None, where it came from)."""
        path, env = engines.configured_path(self.options.path, self._base(), ENV_PATH)
        where = f"the {env} environment variable" if env else "[backend.diffusion-pipe] path" if path else ""
        return path, where

    def launcher(self) -> Path | None:
        if self.options.deepspeed:
            return self._resolve(self.options.deepspeed)
        beside = Path(sys.executable).parent / "deepspeed"
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
        found = shutil.which("deepspeed")
        return Path(found) if found else None

    def layout(self) -> translate.Layout:
        assert self.ctx.run_dir is not None
        from .stage import content_digest

        content = content_digest(self._staged_sets()) if self.recipe.train.cache_dir else ""
        return translate.Layout.of(self.ctx.run_dir.path, self.recipe, self.options, content)

    def _staged_sets(self) -> Any:
        """What the run stages (`stage.wanted_sets`), from the linted items and the lint's digests; `lora-run plan`
        (no lint yet) runs the lint here, so it names the staging folder the run will use."""
        if self._sets is None:
            from lora_run_engines.stage import linted

            from .stage import wanted_sets

            items, report = linted(self.ctx)
            self._sets = wanted_sets(self.recipe, items, translate.set_names(self.recipe), lint=report,
                                     copy=self.options.copy_images)
        return self._sets

    def _items(self) -> list[Any]:
        if self.ctx.items:
            return list(self.ctx.items)
        try:
            from lora_run.run import scan_dataset

            return scan_dataset(self.recipe, self.ctx.plugins)
        except Exception:  # noqa: BLE001 - only for the plan's estimate (the run uses the linted items)
            return []

    def _examples(self) -> int:
        return sum(max(1, getattr(i, "repeats", 1)) for i in self._items())

    def _buckets(self) -> list[int] | None:
        """The examples (images × repeats) of each of diffusion-pipe's aspect buckets over all sets
        (`translate.bucket_of`, from each image's size as it is staged: EXIF orientation applied), for the exact steps
        per epoch; None when no image could be measured."""
        if self._bucket_counts is None:
            ratios = translate.aspect_ratios(self.recipe)
            counts = [0] * len(ratios)
            measured = False
            for item in self._items():
                size = staged_size(item.image)
                if size is not None:             # staged_size: None for an unreadable image or an empty side
                    counts[translate.bucket_of(ratios, *size)] += max(1, getattr(item, "repeats", 1))
                    measured = True
            self._bucket_counts = counts if measured else []
        return self._bucket_counts or None

    def _set_counts(self) -> dict[str, int]:
        from .stage import set_of

        counts = {name: 0 for name in translate.set_names(self.recipe)}
        for item in self._items():
            counts[set_of(item)] = counts.get(set_of(item), 0) + 1
        return counts

    def _loss_options(self) -> Any:
        try:
            return loss_options(self.recipe, self.ctx.plugins)
        except Exception:  # noqa: BLE001 - validated by the core already
            return None

    # ------------------------------------------------------------------------------ check
    def check(self) -> list[tuple[tuple, str]]:
        problems = translate.recipe_problems(self.recipe, self.options) + self.model_problems() + self.toml_problems()
        if self.family in translate.MODEL_TYPE:
            empty = translate.empty_dataset_problem(self.recipe, self.options, self._buckets())
            if empty:
                problems.append(empty)
        key = translate.OPTIONS_KEY
        path, where = self.checkout()
        if path is not None:
            problem = _checkout_problem(path, self.family)
            if problem:
                problems.append(((*key, "path"), f"{problem} (from {where})"))
        launcher = self.launcher()      # the [backend.diffusion-pipe] deepspeed option, or the one found
        usable = launcher is not None and launcher.is_file() and os.access(launcher, os.X_OK)
        if self.options.deepspeed and not usable:
            problems.append(((*key, "deepspeed"), f"{launcher} is not an executable file"))
        required = REQUIRED_IMPORTS.get(self.family or "", ())
        python = engine_python(launcher) if required and launcher is not None else None
        for wanted in required if python else ():
            problem = import_problem(python, wanted, translate.child_env(self.options))
            if problem:
                problems.append(((*key, "deepspeed"), f"diffusion-pipe's Python ({python}, from the launcher "
                                 f"{launcher}) {problem}: {wanted.why}; {wanted.fix}"))
        return problems

    def toml_problems(self) -> list[tuple[tuple, str]]:
        """Recipe values (paths: the run folder, `[train] cache_dir`, the model) that the generated files would hold
        and diffusion-pipe's `toml` 0.10.2 reader would not read back (`tomlfile.misread`), each at its recipe key,
        so `check` refuses them instead of the plan failing as a translation bug. No lint, no staging: the staged
        folder's content hash only appends hex digits to a name."""
        if self.family not in translate.MODEL_TYPE:
            return []
        run_dir = self.ctx.run_dir.path if self.ctx.run_dir is not None else None
        if run_dir is None:
            from lora_run_rundir import output_path

            run_dir = output_path(self.recipe, None)
        layout = translate.Layout.of(Path(run_dir), self.recipe, self.options)
        config = translate.build_config(self.recipe, self.options, layout, examples=0,
                                        loss_options=self._loss_options())
        return self._misread(config, translate.build_dataset(self.recipe, layout))

    def _misread(self, config: dict[str, Any], dataset: dict[str, Any]) -> list[tuple[tuple, str]]:
        """(recipe key, why) for each value of the generated files that `toml` 0.10.2 would not read back."""
        staged = ("train", "cache_dir") if self.recipe.train.cache_dir else ("output", "dir")
        keys = {"output_dir": ("output", "dir"), "dataset": ("output", "dir"), "path": staged,
                "diffusers_path": ("model", "source"), "transformer_path": ("model", "files", "transformer"),
                "vae_path": ("model", "files", "vae"), "text_encoder_path": ("model", "files", "qwen"),
                "byt5_path": ("model", "files", "byt5")}
        found = tomlfile.misread_at((("config.toml", config), ("dataset.toml", dataset)), lambda _name, path: keys.get(
            [p for p in path if isinstance(p, str)][-1], translate.OPTIONS_KEY))
        return [(where, f"generated diffusion-pipe/{name}: {'.'.join(map(str, path))}: {why}")
                for where, name, path, why in found]

    # ------------------------------------------------------------------------------ plan
    def _configs(self, layout: translate.Layout, examples: int) -> tuple[dict[str, Any], dict[str, Any]]:
        config = translate.build_config(self.recipe, self.options, layout, examples=examples,
                                        loss_options=self._loss_options())
        dataset = translate.build_dataset(self.recipe, layout, self._set_counts())
        misread = self._misread(config, dataset)   # a run folder from --output-dir, which check() does not see
        if misread:
            shown = self.ctx.loaded.shown if self.ctx.loaded else "recipe"
            raise RecipeError([f"{shown}: [{'.'.join(map(str, key))}] {why}" for key, why in misread])
        problems = keydata.config_problems(config) + keydata.dataset_problems(dataset)
        if problems:  # a bug in the translation, not in the recipe
            raise PluginError("diffusion-pipe backend generated a config diffusion-pipe would not accept: "
                              + "; ".join(problems))
        return config, dataset

    def _argv(self, layout: translate.Layout, resume_from: str | None = None) -> list[str]:
        launcher = self.launcher()
        return translate.launch_argv(str(launcher) if launcher else "deepspeed", layout.config, self.options,
                                     resume_from)

    def plan(self) -> Plan:
        layout = self.layout()
        run_dir = self.ctx.run_dir.path  # type: ignore[union-attr]
        examples = self._examples()
        config, dataset = self._configs(layout, examples)
        _, _, steps = translate.training_length(self.recipe, self.options, examples, self._buckets())
        checkout, _ = self.checkout()
        shown = self.ctx.loaded.shown if self.ctx.loaded else "recipe"

        def header(what: str) -> str:     # never str.format over the recipe's path: it may hold braces
            return (f"diffusion-pipe {what} generated by lora-run from {shown}.\n"
                    f"Keys checked against diffusion-pipe {keydata.SOURCE_COMMIT[:12]}.")
        files = {
            layout.relative(layout.config, run_dir): _toml(config, header("main config")),
            layout.relative(layout.dataset, run_dir): _toml(dataset, header("dataset config")),
        }
        env = {k: v for k, v in translate.child_env(self.options, {}).items()}
        memory = engines.borrowed_memory_estimate(self.recipe, self.ctx.plugins, self.options.blocks_to_swap or 0)
        return Plan(
            backend=NAME, family=self.family, steps=steps, files=files, commands=[self._argv(layout)],
            memory_estimate_gib=memory[0] if memory else None, memory_mode=None,
            memory_source=memory[1] if memory else None,
            outputs=[*translate.expected_outputs(self.recipe, run_dir), str(layout.log)],
            notes=[f"runs in {checkout or '<the diffusion-pipe checkout: [backend.diffusion-pipe] path or $' + ENV_PATH + '>'}"
                   + (f" with {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}" if env else ""),
                   *translate.notes(self.recipe, self.options, layout, examples, self._set_counts(),
                                     self._buckets()),
                   *filter(None, [upscale_note("diffusion-pipe", self._items(),
                                               lambda w, h: translate.size_of(self.recipe, w, h),
                                               self.recipe.dataset.bucket_min,
                                               f"its aspect bucket at the area of {self.recipe.dataset.resolution}²")])],
            details={"cwd": str(checkout) if checkout else None, "env": env,
                     "model_type": translate.MODEL_TYPE[self.family], "examples": examples,
                     "key_data_commit": keydata.SOURCE_COMMIT},
        )

    # ------------------------------------------------------------------------------ run
    def _require_checkout(self) -> Path:
        path, where = self.checkout()
        if path is None:
            raise RecipeError(f"{self._shown()}: [backend.diffusion-pipe] path is not set: point it (or the "
                              f"{ENV_PATH} environment variable) at a diffusion-pipe checkout (git clone "
                              "--recurse-submodules https://github.com/tdrussell/diffusion-pipe)")
        problem = _checkout_problem(path, self.family)
        if problem:
            raise RecipeError(f"{self._shown()}: [backend.diffusion-pipe] path: {problem} (from {where})")
        return path

    def _require_launcher(self) -> Path:
        launcher = self.launcher()
        if launcher is None:
            raise RecipeError(f"{self._shown()}: [backend.diffusion-pipe] deepspeed: no `deepspeed` launcher next "
                              f"to {sys.executable} or on PATH; install DeepSpeed in diffusion-pipe's environment and "
                              "set [backend.diffusion-pipe] deepspeed to its launcher")
        if not (launcher.is_file() and os.access(launcher, os.X_OK)):
            raise RecipeError(f"{self._shown()}: [backend.diffusion-pipe] deepspeed: {launcher} is not an "
                              "executable file")
        return launcher

    def _shown(self) -> str:
        return self.ctx.loaded.shown if self.ctx.loaded else "recipe"

    def model_problems(self) -> list[tuple[tuple, str]]:
        """Model files and folders that do not exist (or are not what diffusion-pipe loads), and files and folders of
        another kind, family or model size (the native backend's checks, ``lora_run_engines.model_file_problems`` /
        ``source_folder_problems``); no torch."""
        m = self.recipe.model
        out: list[tuple[tuple, str]] = []
        if self.family == "flux.1-dev":
            paths = [(("model", "files", "transformer"), m.files.get("transformer"))]
            source = Path(m.source or "")
            if m.source and os.path.isabs(m.source):  # a hub id is refused by translate.recipe_problems
                if not source.is_dir():
                    out.append((("model", "source"), f"folder not found: {source} (diffusion-pipe loads FLUX.1-dev's "
                                "VAE and text encoders from this diffusers folder)"))
                elif not (source / "model_index.json").is_file():
                    out.append((("model", "source"), f"{source} is not a diffusers folder (no model_index.json); "
                                "diffusion-pipe loads FLUX.1-dev's VAE and text encoders from it"))
        else:
            paths = [(("model", "files", n), m.files.get(n)) for n in ("transformer", "vae", "qwen", "byt5")]
        complete: dict[str, str] = {}
        for key, value in paths:
            if value and (not os.path.lexists(value) or os.path.isdir(value)):
                what = "is a folder, not a file" if os.path.isdir(value) else "does not exist"
                out.append((key, f"{value} {what}"))
            elif value and (why := weights_problem(value)) is not None:   # a FIFO, a link loop, a damaged file
                out.append((key, f"{value} is not a readable .safetensors file ({why})"))
            elif value and key[-1] == "transformer" and self.family == "flux.1-dev" and \
                    (wrong := _flux_transformer_problem(key, Path(value))):
                out += wrong
            elif value:
                complete[key[-1]] = value
        out += engines.model_file_problems(self.recipe, complete)    # what each file is: the native backend's check
        if self.family == "flux.1-dev" and m.source and source.is_dir() and (source / "model_index.json").is_file():
            out += engines.source_folder_problems(self.recipe, source)   # another family's folder, then its files
        return out

    def _check_model_files(self) -> None:
        problems = self.model_problems()
        if problems:
            raise ModelSourceError("\n".join(f"{self._shown()}: [{'.'.join(k)}] {msg}" for k, msg in problems))

    def run(self) -> None:
        """Stage, launch and supervise diffusion-pipe. A staged folder under `[train] cache_dir` is held in use
        (`lora_run_engines.stage.use`) from before it is staged until diffusion-pipe is done, the launcher inheriting
        the hold, so `remove_old_staging` in another run never removes it."""
        from lora_run_engines.stage import held

        assert self.ctx.run_dir is not None
        # diffusion-pipe's working folder is written by it from here to the end: what appears in it is the run's
        with held(self.layout().data if self.recipe.train.cache_dir else None) as lock, \
                self.ctx.run_dir.writing("diffusion-pipe"):
            self._run(lock)

    def _run(self, lock: int | None) -> None:
        ctx, recipe = self.ctx, self.recipe
        assert ctx.run_dir is not None
        checkout = self._require_checkout()
        launcher = self._require_launcher()
        self._check_model_files()
        layout = self.layout()
        self._check_disk_space(layout)
        commit, dirty = engines.git_state(checkout)
        tool = {"path": str(checkout), "commit": commit, "dirty": dirty, "launcher": str(launcher),
                "key_data_commit": keydata.SOURCE_COMMIT, "seed": translate.UNSEEDED.format(seed=recipe.train.seed)}
        # no seed: diffusion-pipe's training draws (LoRA init, noise, timesteps) are not seeded, so the recipe's seed
        # would be a reproducibility record of something that did not happen (playbook §10)
        ctx.run_dir.update_manifest(seed=None, external_tools={NAME: tool})
        if commit is not None and commit != keydata.SOURCE_COMMIT:
            ctx.echo(f"note: diffusion-pipe checkout is at {commit[:12]}{' (modified)' if dirty else ''}; this "
                     f"backend's key data was read at {keydata.SOURCE_COMMIT[:12]}")

        from .stage import stage

        key = translate.staging_key(recipe, self.options)
        counts = stage(self._staged_sets(), layout.data, key=key)
        ctx.run_dir.log(f"diffusion-pipe: staged {counts} in {layout.data}")
        if lock is not None and self.options.remove_old_staging:
            from lora_run_engines.stage import remove_earlier

            for name in remove_earlier(layout.data, key):
                ctx.echo(f"diffusion-pipe: removed {layout.data.parent / name}, staged by an earlier run of this recipe "
                         "and used by none ([backend.diffusion-pipe] remove_old_staging)")
        examples = self._examples()
        resume_from = None
        if ctx.resume:
            resume_from = collect.resumable_run(layout.output)
            if resume_from is None:
                raise OutputError(f"{ctx.run_dir.path}: nothing to resume: diffusion-pipe wrote no resumable "
                                  f"checkpoint in {layout.output} yet (it saves one "
                                  "every checkpoint interval and at the end); start again with --overwrite")
            self._remove_stale_quit(layout.output / resume_from)
        argv = self._argv(layout, resume_from)
        argv[0] = str(launcher)
        before = set(collect.run_folders(layout.output))
        buckets = self._buckets()
        empty = translate.empty_dataset_problem(recipe, self.options, buckets)
        if empty:           # the linted images: the lint may have left out more than `check` saw
            raise RecipeError([f"{ctx.loaded.shown if ctx.loaded else 'recipe'}: [{'.'.join(empty[0])}] {empty[1]}"])
        length = translate.training_length(recipe, self.options, examples, buckets)
        watcher = _Watcher(self, layout, before, resume_from, length[2], commit or "unknown")
        if resume_from is not None:
            resumed = layout.output / resume_from
            if self._collect_finished(resumed, watcher, length, commit or "unknown"):
                self._note_run_folder(resumed, tool, layout)
                return
        ctx.echo(f"diffusion-pipe: {' '.join(argv)}  (in {checkout}; log: {layout.log})")
        supervisor = Supervisor(
            argv, log_path=layout.log, name=NAME, cwd=checkout, env=translate.child_env(self.options),
            on_line=watcher.on_line, poll=watcher.tick, request_quit=watcher.request_quit,
            stall_seconds=self.options.stall_timeout or None, timeout_seconds=self.options.timeout,
            grace_seconds=10.0, quit_grace=self.options.interrupt_grace, echo=ctx.echo,
            pass_fds=() if lock is None else (lock,))
        watcher.supervisor = supervisor
        try:
            outcome = supervisor.run()
        finally:
            watcher.remove_unread_quit()
        watcher.tick(force=True)
        run_folder = watcher.run_folder
        self._note_run_folder(run_folder, tool, layout)
        tail = "\n".join(f"  | {line}" for line in list(supervisor.tail)[-30:])
        where = f"run folder kept: {ctx.run_dir.path}; full log: {layout.log}"
        finished = watcher.parser.completed and outcome.returncode == 0
        if outcome.interrupted and finished:     # the engine had saved its final LoRA and was exiting on its own
            ctx.echo("diffusion-pipe: the interrupt came after training had finished (TRAINING COMPLETE!); the run "
                     "is complete")
        elif outcome.interrupted:
            saved = collect.latest_checkpoint(run_folder) if run_folder else None
            resume = (f"resume with: {resume_command(ctx.loaded, ctx.run_dir.path)}" if saved
                      else "no resumable checkpoint was written yet")
            raise TrainingInterrupted(f"interrupted at step {watcher.parser.last_step}; {resume}")
        if outcome.stalled:
            raise BackendError(f"diffusion-pipe printed nothing for {self.options.stall_timeout:.0f} s and was "
                               f"stopped ([backend.diffusion-pipe] stall_timeout); last output:\n{tail}\n{where}")
        if outcome.timed_out:
            raise BackendError(f"diffusion-pipe ran longer than [backend.diffusion-pipe] timeout = "
                               f"{self.options.timeout:.0f} s and was stopped; last output:\n{tail}\n{where}")
        if outcome.returncode != 0:
            raise BackendError(f"diffusion-pipe failed (exit code {outcome.returncode})"
                               f"{engines.explain(supervisor.tail, HINTS)}; last output:\n{tail}\n{where}")
        saves = collect.saved_loras(run_folder, self.family)
        # the save diffusion-pipe makes at the end of training, never an earlier one (the newest save, step4/ of a
        # 5-step run whose step5/ is missing, was collected as the final LoRA)
        final = collect.final_save(saves, length[1], length[0])
        if not watcher.parser.completed or final is None:
            wanted = f"step{length[1]}" if length[1] is not None else f"epoch{length[0]}"
            what = ("no saved LoRA was found" if not saves else "it never printed TRAINING COMPLETE!"
                    if not watcher.parser.completed else f"its end-of-training save {wanted}/ is missing (the newest "
                    f"save, {saves[-1].name}/, is no final LoRA)")
            raise BackendError(f"diffusion-pipe exited normally but {what} (run folder: {run_folder}); last "
                               f"output:\n{tail}\n{where}")
        self._collect(final, watcher.save_step(final) or watcher.parser.last_step or None, watcher,
                      commit or "unknown")

    def _check_disk_space(self, layout: translate.Layout) -> None:
        """Before anything is staged or launched: what diffusion-pipe and lora-run will write (saves, DeepSpeed
        checkpoints, the final LoRA) against the run folder's free space; a run that cannot fit stops (exit 2)."""
        from lora_run_engines.disk import lora_parameters
        from lora_run_rundir.space import check_free_space

        parameters = lora_parameters(self.recipe, "all-linear")     # diffusion-pipe wraps every Linear of the blocks
        if parameters is None:
            return
        examples = self._examples()
        config, _ = self._configs(layout, examples)
        epochs, max_steps, steps = translate.training_length(self.recipe, self.options, examples, self._buckets())
        if max_steps is not None:
            epochs = math.ceil(steps / max(1, translate.steps_per_epoch(self.recipe, self.options, examples,
                                                                         self._buckets())))
        writes = translate.disk_writes(self.recipe, config, parameters, epochs)
        check_free_space(self.ctx.run_dir.path, writes, self.recipe.train.keep_last)  # type: ignore[union-attr]

    def _note_run_folder(self, run_folder: Path | None, tool: dict[str, Any], layout: translate.Layout) -> None:
        """Name diffusion-pipe's run folder and log in the manifest and the artifacts."""
        ctx = self.ctx
        assert ctx.run_dir is not None
        if run_folder is not None:
            tool["run_folder"] = str(run_folder)
            ctx.run_dir.update_manifest(external_tools={NAME: tool})
            ctx.artifacts["diffusion_pipe_run"] = str(run_folder)
        ctx.artifacts["train_log"] = str(layout.log)

    def _remove_stale_quit(self, run_folder: Path) -> None:
        """Remove a `save_quit` signal file from the run folder a --resume continues: diffusion-pipe reads it at the
        end of a step, so the resumed run would save and stop after one step. (lora-run before 2026-12-03 wrote it on
        a Ctrl-C that came after training had finished, and left it there.)"""
        stale = run_folder / "save_quit"
        if not stale.is_file():
            return
        try:
            stale.unlink()
        except OSError as exc:
            raise OutputError(f"{stale}: cannot remove this save_quit signal file ({exc.strerror}); remove it, or "
                              "the resumed diffusion-pipe stops after one step") from None
        self.ctx.echo(f"diffusion-pipe: removed a save_quit signal file left in {run_folder} (the resumed run would "
                      "have stopped after one step)")

    def _collect_finished(self, run_folder: Path, watcher: "_Watcher", length: tuple[int, int | None, int],
                          commit: str) -> bool:
        """--resume of a run whose latest DeepSpeed checkpoint is at or past its last step: diffusion-pipe would resume
        at the step after it and train one step beyond `max_steps` before it stopped (met on the GPU). Its final
        LoRA is collected from the run folder instead, without launching it; False when there are steps left.
        `length` is the run's (epochs, max_steps, total steps), `translate.training_length`."""
        epochs, max_steps, total = length
        tag = collect.latest_checkpoint(run_folder)
        at = collect.checkpoint_step(tag)
        if at is None or at < total:
            return False
        final = collect.final_save(collect.saved_loras(run_folder, self.family), max_steps, epochs)
        if final is None:
            wanted = f"step{max_steps}" if max_steps is not None else f"epoch{epochs}"
            assert self.ctx.run_dir is not None
            raise OutputError(f"{self.ctx.run_dir.path}: nothing to resume: diffusion-pipe's latest checkpoint {tag} "
                              f"in {run_folder} is at the end of training (step {at} of {total}), but that folder "
                              f"holds no final LoRA ({wanted}/) to collect; start again with --overwrite")
        self.ctx.echo(f"diffusion-pipe: nothing left to train: the latest checkpoint {tag} in {run_folder} is at step "
                      f"{at} of {total}; collecting its final LoRA {final.name} without launching diffusion-pipe")
        self._collect(final, watcher.save_step(final) or at, watcher, commit)
        return True

    def check_saved(self, saved: collect.SavedLora, log: Path) -> None:
        """Refuse a save whose LoRA is not a whole one of the run's family and rank (exit 1, named), before it is
        converted and reported: `lora_run_engines.output`."""
        collectable(saved.file, engine=NAME, family=self.family, layout=collect.LORA_LAYOUTS[self.family],
                    rank=self.recipe.lora.rank, log=log)

    def _collect(self, final: collect.SavedLora, steps: int | None, watcher: "_Watcher", commit: str) -> None:
        """Write the final LoRA into the run folder in our formats, and the run's artifacts."""
        ctx, recipe = self.ctx, self.recipe
        assert ctx.run_dir is not None
        self.check_saved(final, watcher.layout.log)
        with ctx.run_dir.writing(""):
            written = collect.write_formats(final, self.family, recipe, ctx.run_dir.path, steps=steps,
                                            examples=self._examples(), commit=commit)
        ctx.artifacts.update(written)
        ctx.artifacts["steps"] = steps
        watcher.forget(final.name)             # the final LoRA is in the run folder itself
        ctx.artifacts["checkpoints"] = watcher.checkpoint_records()
        ctx.run_dir.log(f"diffusion-pipe: collected {final.file} → {', '.join(written.values())}")


class _Watcher:
    """Turns output lines into hooks and progress; polls the output folder for the run folder and saves.

    Every save diffusion-pipe completes is converted at once into `<run>/checkpoints/<epochN|stepN>/` (our
    kohya/diffusers files) and reported through `checkpoint_saved` with that path; saves beyond
    `[train] keep_last` are deleted, oldest first (diffusion-pipe's folders and our copies)."""

    def __init__(self, backend: DiffusionPipeBackend, layout: translate.Layout, before: set[str],
                 resume_from: str | None, total: int, commit: str = "unknown"):
        self.backend, self.layout, self.before, self.commit = backend, layout, before, commit
        self.ctx = backend.ctx
        self.parser = LogParser()
        self.progress = Progress(self.ctx.echo, total)
        self.run_folder: Path | None = layout.output / resume_from if resume_from else None
        self.reported: set[str] = set()
        self.step_of: dict[str, int] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.earlier: set[str] = set()          # saves of the session a --resume continues
        self.training_started = False
        self.quit_file: Path | None = None     # the `save_quit` signal file lora-run wrote on Ctrl-C
        self.supervisor: Supervisor | None = None
        self.last_poll = -math.inf
        if self.run_folder is not None:        # saves of the interrupted session were reported back then
            for saved in collect.saved_loras(self.run_folder, backend.family):
                self.reported.add(saved.name)
                self.earlier.add(saved.name)
                folder = self._folder(saved.name)
                files = {key: str(folder / name) for key, name in self._names().items() if (folder / name).is_file()}
                if files:
                    self.records[saved.name] = self._record(saved, self.save_step(saved), files)

    def _folder(self, name: str) -> Path:
        assert self.ctx.run_dir is not None
        return self.ctx.run_dir.path / "checkpoints" / name

    def _names(self) -> dict[str, str]:
        name = self.backend.recipe.output.name
        return {"lora_kohya": f"{name}.safetensors", "lora_diffusers": f"{name}.diffusers.safetensors"}

    def save_step(self, saved: collect.SavedLora) -> int | None:
        """The training step of a save: N for a `step<N>` folder, always (diffusion-pipe names it by the step it
        saved at); for an `epoch<N>` folder the step the log had reached at its save line, None before that.

        The log is no clock for step saves: on the GPU (0.06 s a step) `step16/` was recorded as step 13, the
        last step lora-run had read when it found the folder."""
        return saved.number if saved.kind == "step" else self.step_of.get(saved.name)

    @staticmethod
    def _record(saved: collect.SavedLora, step: int | None, files: dict[str, str]) -> dict[str, Any]:
        return {"name": saved.name, "step": step, "epoch": saved.number if saved.kind == "epoch" else None,
                "path": files.get("lora_kohya") or files.get("lora_diffusers"), "source": str(saved.file), **files}

    def checkpoint_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r.get("path") and Path(r["path"]).is_file()]

    def forget(self, name: str) -> None:
        if self.records.pop(name, None) is not None:
            shutil.rmtree(self._folder(name), ignore_errors=True)

    def on_line(self, line: str) -> None:
        for event in self.parser.feed(line):
            if isinstance(event, StepEvent):
                self.training_started = True
                loss = event.loss
                if not math.isfinite(loss) and self.backend.options.stop_on_nan:
                    raise NonFiniteLoss(f"the loss became {loss} at step {event.step}; diffusion-pipe was stopped "
                                        f"({self.kept(event.step)}; log: {self.layout.log})")
                self.progress.step(event.step, event.metrics)
                self.ctx.hook.step_finished(run=self.ctx, step=event.step, metrics=dict(event.metrics))
            elif isinstance(event, SaveEvent):
                self.step_of.setdefault(event.name, self.parser.last_step)
            elif isinstance(event, PhaseEvent):
                self.progress.phase(event.text)

    def kept(self, bad_step: int) -> str:
        """What a run stopped at `bad_step` leaves to use: the LoRAs and resumable checkpoint saved before that
        step, or that there are none. (The real diffusion-pipe went NaN at step 2 of a FLUX.1 run, before its first
        save; "saved LoRAs and checkpoints are kept in …" then pointed at a folder of config copies.) A save
        written after the bad step, while the engine was being stopped, holds weights trained on the bad loss."""
        folder = self.run_folder or collect.new_run_folder(self.layout.output, self.before)
        saves = collect.saved_loras(folder, self.backend.family) if folder is not None else []

        def before(saved: collect.SavedLora) -> bool:
            if saved.name in self.earlier:
                return True
            step = self.save_step(saved)
            return step is not None and step < bad_step

        good = [s.name for s in saves if before(s)]
        late = [s.name for s in saves if not before(s)]
        tag = collect.latest_checkpoint(folder) if folder is not None else None
        at = collect.checkpoint_step(tag)
        checkpoint = tag if at is not None and at < bad_step else None
        if not good and checkpoint is None:
            text = "it had saved no LoRA and no checkpoint before it"
        else:
            parts = ([f"the LoRAs {', '.join(good)}"] if good else []) + \
                ([f"the resumable checkpoint {checkpoint}"] if checkpoint else [])
            text = f"{' and '.join(parts)} saved before it are kept in {folder}"
        if late:
            text += f"; {', '.join(late)} {'was' if len(late) == 1 else 'were'} saved after it (trained on the bad loss)"
        return text

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_poll < 1.0:
            return
        self.last_poll = now
        if self.run_folder is None:
            self.run_folder = collect.new_run_folder(self.layout.output, self.before)
        if self.run_folder is None:
            return
        backend, recipe = self.backend, self.backend.recipe
        fresh = [s for s in collect.saved_loras(self.run_folder, backend.family) if s.name not in self.reported]
        for saved in fresh:
            self.reported.add(saved.name)
            step = self.save_step(saved)
            if step is None:                   # an epoch save seen before its save line: the log's last step
                step = self.step_of[saved.name] = self.parser.last_step
            backend.check_saved(saved, self.layout.log)
            try:
                with self.ctx.run_dir.writing("checkpoints"):
                    files = collect.write_formats(saved, backend.family, recipe, self._folder(saved.name), steps=step,
                                                  examples=backend._examples(), commit=self.commit)
            except Exception as exc:  # noqa: BLE001 - an unreadable save is a failed run, with the reason
                raise BackendError(f"cannot convert diffusion-pipe's LoRA {saved.file}: {type(exc).__name__}: "
                                   f"{exc}") from exc
            self.records[saved.name] = self._record(saved, step, files)
            self.ctx.hook.checkpoint_saved(run=self.ctx, step=step, path=self.records[saved.name]["path"])
        if fresh:
            keep = recipe.train.keep_last
            collect.prune(self.run_folder, backend.family, keep)
            for name in list(self.records)[:-keep]:
                self.forget(name)

    def request_quit(self) -> bool | str:
        """Ctrl-C during training: create diffusion-pipe's `save_quit` file (at the end of the step it saves a
        resumable checkpoint and exits). After `TRAINING COMPLETE!` the engine has saved its final LoRA and is
        exiting on its own: it is only waited for (no `save_quit`, which it would never read)."""
        self.tick(force=True)
        if self.parser.completed:
            return "diffusion-pipe had already finished training; waiting for it to exit"
        if not self.training_started or self.run_folder is None:
            return False
        quit_file = self.run_folder / "save_quit"
        try:
            quit_file.write_text("", "utf-8")
        except OSError:
            return False
        self.quit_file = quit_file
        return True

    def remove_unread_quit(self) -> None:
        """Once diffusion-pipe has exited: remove the `save_quit` file lora-run wrote if the engine never acted on it
        (it deletes the file when it does), so that no later `--resume` finds it and stops after one step."""
        if self.quit_file is None or not self.quit_file.is_file():
            return
        try:
            self.quit_file.unlink()
        except OSError:
            return
        assert self.ctx.run_dir is not None
        self.ctx.run_dir.log(f"diffusion-pipe: removed {self.quit_file}, which lora-run wrote on Ctrl-C and "
                             "diffusion-pipe exited without reading")


#: submodule files diffusion-pipe imports at start-up, whatever the model (8f83dbf: models/base.py and
#: utils/dataset.py import ComfyUI's `comfy`, utils/patches.py HunyuanVideo's `hyvideo`), and per family
SUBMODULES = {None: ("submodules/ComfyUI/comfy/sd.py", "submodules/HunyuanVideo/hyvideo/__init__.py"),
              "hunyuan-image-2.1": ("submodules/HunyuanImage-2.1/hyimage/models/hunyuan/__init__.py",)}


@attrs.frozen
class RequiredImport:
    """Names diffusion-pipe imports from a module at start-up for a family: checked in its Python before launch,
    rather than met a minute into its start-up."""
    module: str
    names: tuple[str, ...]
    why: str        # who imports them
    fix: str        # how to get them


#: what diffusion-pipe imports at start-up per family. HunyuanImage-2.1 (its submodule's
#: hyimage/models/hunyuan/modules/flash_attn_no_pad.py, 8f83dbf) imports flash_attn_varlen_func from FlashAttention 3's
#: flash_attn_interface or else from flash_attn, and flash_attn_varlen_qkvpacked_func (and flash_attn.bert_padding)
#: from flash_attn: flash-attn 2 in any case. flash-attn-4 installs only flash_attn.cute, which makes flash_attn a
#: namespace package that imports but has none of these names (met on the GPU, 2026-12-03).
REQUIRED_IMPORTS = {"hunyuan-image-2.1": (RequiredImport(
    "flash_attn", ("flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func"),
    why="its HunyuanImage-2.1 model imports flash_attn_varlen_func and flash_attn_varlen_qkvpacked_func from "
        "flash_attn at start-up and has no other attention path",
    fix="install flash-attn 2 (the `flash-attn` package: pip install flash-attn --no-build-isolation) in that "
        "environment; flash-attn-4 alone does not provide them (it installs only flash_attn.cute)"),)}

#: run in the engine's Python: finds the module, imports it and lists the names it lacks (one JSON line)
_IMPORT_PROBE = """
import importlib, importlib.util, json, sys
module, names = sys.argv[1], sys.argv[2:]
try:
    found = importlib.util.find_spec(module) is not None
except (ImportError, ValueError):
    found = False
answer = {"missing": True}
if found:
    try:
        loaded = importlib.import_module(module)
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        answer = {"lacks": [name for name in names if not hasattr(loaded, name)],
                  "file": getattr(loaded, "__file__", None), "paths": list(getattr(loaded, "__path__", []))}
print("lora-run-probe " + json.dumps(answer))
"""


def engine_python(launcher: Path) -> str | None:
    """The interpreter of a launcher script (DeepSpeed's `deepspeed` is a Python console script), from its
    ``#!`` line; None for a launcher that is not a Python script (a shell wrapper: then nothing is checked)."""
    try:
        with open(launcher, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    words = first[2:].decode("utf-8", "replace").split() if first.startswith(b"#!") else []
    if words and Path(words[0]).name == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
        found = shutil.which(words[0]) if words else None
        words = [found] if found else []
    return words[0] if words and Path(words[0]).name.startswith("python") else None


def import_problem(python: str, wanted: RequiredImport, env: dict[str, str]) -> str | None:
    """What ``python`` cannot import of ``wanted`` ("cannot import flash_attn", "cannot import X from flash_attn (a
    namespace package …)", "importing flash_attn fails there (…)"), None when all is there. The module is imported,
    as diffusion-pipe will: a namespace package (no ``__init__.py``) is found by name but has no names. An
    interpreter that does not run, or takes too long, is left to the launch to report."""
    import json
    import subprocess

    try:
        done = subprocess.run([python, "-c", _IMPORT_PROBE, wanted.module, *wanted.names], env=env,
                              capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("lora-run-probe ")]
    if not lines:
        return None
    answer = json.loads(lines[-1].split(" ", 1)[1])
    if answer.get("missing"):
        return f"cannot import {wanted.module}"
    if "error" in answer:
        return f"importing {wanted.module} fails there ({answer['error'][:300]})"
    if not answer.get("lacks"):
        return None
    where = answer.get("file") or f"a namespace package, without __init__.py: {', '.join(answer.get('paths', []))}"
    return f"cannot import {', '.join(answer['lacks'])} from {wanted.module} ({where})"


#: failures of diffusion-pipe we can say more about (the first whose text occurs in the output's tail)
HINTS = (
    (("Found no NVIDIA driver", "Torch not compiled with CUDA", "No CUDA GPUs are available"),
     "diffusion-pipe needs an NVIDIA GPU with CUDA: ComfyUI's model management and DeepSpeed start on the GPU"),
    (("No module named 'flash_attn'",), "diffusion-pipe's HunyuanImage-2.1 model imports flash-attn (its "
     "HunyuanImage-2.1 submodule has no other attention path): install flash-attn in diffusion-pipe's environment"),
    (("cannot import name 'flash_attn_varlen_func' from 'flash_attn'",
      "cannot import name 'flash_attn_varlen_qkvpacked_func' from 'flash_attn'"),
     "diffusion-pipe's HunyuanImage-2.1 model imports it from flash-attn 2: install flash-attn 2 (the `flash-attn` "
     "package) in diffusion-pipe's environment; flash-attn-4 alone does not provide it"),
    (("No module named 'comfy", "No module named 'hyvideo'", "No module named 'hyimage'"),
     "a submodule of the diffusion-pipe checkout is missing: run `git submodule update --init --recursive` in it"),
    (("CUDA out of memory", "OutOfMemoryError"), "out of GPU memory: try [backend.diffusion-pipe] blocks_to_swap, "
     "[model] base_precision = \"fp8\" or a smaller [dataset] resolution"),
    (("ModuleNotFoundError", "No module named"), "a module is missing from diffusion-pipe's environment, the one "
     "its launcher runs in ([backend.diffusion-pipe] deepspeed)"),
)


def _checkout_problem(path: Path, family: str | None = None) -> str | None:
    if not path.is_dir():
        return f"{path} is not a folder"
    if not (path / "train.py").is_file():
        return f"{path} has no train.py: not a diffusion-pipe checkout"
    missing = [rel for key in (None, family) for rel in SUBMODULES.get(key, ()) if not (path / rel).is_file()]
    if missing:
        return (f"{path} lacks {', '.join(missing)}: diffusion-pipe imports its submodules at start-up; run "
                "`git submodule update --init --recursive` in it")
    return None


def _flux_transformer_problem(key: tuple, path: Path) -> list[tuple[tuple, str]]:
    """diffusion-pipe loads [model.files] transformer with diffusers' from_single_file, which reads BFL's layout
    (`double_blocks.N…`, as in flux1-dev.safetensors) only: a diffusers-layout file fails inside it with
    `IndexError: list index out of range` (met with the real diffusion-pipe 8f83dbf)."""
    try:
        keys = engines.safetensors_keys(path)
    except (OSError, ValueError) as exc:
        return [(key, f"{path} is not a readable .safetensors file ({exc})")]
    if not any(".double_blocks." in f".{k}" for k in keys):
        return [(key, f"{path} is not a FLUX.1 transformer in BFL's single-file layout (no double_blocks.* "
                      "tensors; a diffusers transformer file?): diffusion-pipe reads this file with diffusers' "
                      "from_single_file; give flux1-dev.safetensors, or leave it unset to load the transformer "
                      "from the [model] source folder")]
    return []
