"""The `kohya` backend object: check(), plan() and run() around sd-scripts.

- ``check()`` and ``plan()`` never touch sd-scripts (``lora-run plan`` works without a checkout) and never
  import torch; ``check()`` verifies the checkout only when one is configured.
- ``run()``: verify the checkout and its interpreter → stage the dataset view → launch ``accelerate launch``
  without a shell in its own process group → stream and parse its output → collect the LoRA.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from lora_run import __version__
from lora_run.dataset import Item
from lora_run.errors import BackendError, RecipeError, TrainingInterrupted
from lora_run_rundir import atomic_write_text, parse_json
from lora_run_rundir.space import check_free_space
from lora_run.recipe import resume_command
from lora_run.run import Plan
import lora_run_engines as engines
from lora_run_training import NonFiniteLoss
from lora_run_engines import borrowed_memory_estimate, commented, dataset_key, tomlfile
from lora_run_engines.stage import (Sets, Staged, cache_owner, content_digest, held, linted, publish, remove_earlier,
                                    staged_files, staged_stems, upscale_note)
from lora_run_engines.output import collectable, lora_problem
from lora_run_engines.supervise import Supervisor
from lora_run_folder import training_caption

from . import REASONS, checkout, spec
from .supervise import Progress, finite, training_progress
from .translate import (FAMILIES, FLUX, Paths, Translation, bucket_of, buckets, disk_writes, option_conflicts,
                        problems, resume_schedule_args, steps_per_epoch, subset_name, translate)

#: Run in sd-scripts' Python: accelerate's version (the first line; the import fails there without it), then the
#: versions of the packages that decide what sd-scripts computes, as one JSON line (for the manifest).
_VERSIONS_SCRIPT = (
    "import accelerate, json, platform\n"
    "from importlib import metadata\n"
    "print(accelerate.__version__)\n"
    "out = {'python': platform.python_version()}\n"
    "for name in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'safetensors', 'bitsandbytes',\n"
    "             'huggingface-hub', 'numpy'):\n"
    "    try:\n"
    "        out[name] = metadata.version(name)\n"
    "    except Exception:\n"
    "        pass\n"
    "print(json.dumps(out))\n")

CONFIG, DATASET, PROMPTS, LOG = "kohya/config.toml", "kohya/dataset.toml", "kohya/sample_prompts.txt", \
    "kohya/train.log"
#: options the backend owns; `extra_args` may not set them (they would break the run's layout or launch)
RESERVED = {"config_file", "dataset_config", "output_config", "resume", "train_data_dir", "reg_data_dir", "in_json",
            "sample_prompts", "output_dir", "output_name", "network_module", "save_model_as", "logging_dir"}
TAIL_LINES = 30
#: generated options that hold a recipe value as it is written (the key a problem with it names)
RECIPE_KEYS = {"output_name": ("output", "name"), "metadata_title": ("output", "name"),
               "metadata_trigger_phrase": ("dataset", "trigger")}
#: generated options that hold a path in the run folder (`[output] dir`, or `--output-dir`)
RUN_FOLDER_OPTIONS = ("output_dir", "sample_prompts", "logging_dir")


def _toml(config: dict[str, Any], header: str) -> str:
    return commented(header, tomlfile.dumps(config))


class KohyaBackend:
    def __init__(self, ctx: Any):
        from . import KohyaOptions

        self.ctx = ctx
        self.recipe = ctx.recipe
        self.options = ctx.options if ctx.options is not None else KohyaOptions()
        raw = self.recipe.backend.options.get(getattr(ctx.backend, "name", "kohya"), {})
        if self.recipe.train.gpus > 1 and "num_processes" not in raw:   # [train] gpus / --gpus feed it
            self.options = attrs.evolve(self.options, num_processes=self.recipe.train.gpus)
        self.family = FAMILIES.get(self.recipe.model.family)
        self._sets: Sets | None = None

    # ---------------------------------------------------------------------------------------------- basics
    @property
    def base(self) -> Path:
        loaded = self.ctx.loaded
        return loaded.path.resolve().parent if loaded is not None else Path.cwd()

    @property
    def shown(self) -> str:
        return self.ctx.loaded.shown if self.ctx.loaded is not None else "recipe"

    def python(self) -> str:
        value = self.options.python
        if not value:
            return sys.executable
        if os.sep in value or "/" in value:
            return str(engines.resolve_path(value, self.base))
        return value  # a bare command name, found on PATH by Popen

    def run_path(self) -> Path:
        if self.ctx.run_dir is not None:
            return Path(self.ctx.run_dir.path).resolve()
        from lora_run_rundir import output_path

        return output_path(self.recipe, None)

    def paths(self, sd_scripts: Path | None = None, *, content: bool = True) -> Paths:
        run = self.run_path()
        if sd_scripts is None:
            configured, _ = checkout.configured_path(self.options.sd_scripts, self.base)
            sd_scripts = configured
        data = self.data_dir(content) if self.recipe.train.cache_dir else run / "kohya" / "data"
        return Paths(run, str(sd_scripts) if sd_scripts else "<sd-scripts>", self.python(), data)

    def data_dir(self, content: bool = True) -> Path:
        """The staged view under `[train] cache_dir` that later runs share: `<cache_dir>/kohya-data/dataset-<hash>`,
        the hash covering everything the folder holds and sd-scripts caches beside the images: what is staged
        (`content_digest`: each file's name, which carries a hash of the image bytes and caption, what it is made
        from and each caption's text), the `[dataset]` table, the model family, source and files, the precisions
        the latents and text-encoder outputs are cached with and `extra_args` (`lora_run_engines.dataset_key`,
        diffusion-pipe's key too). Recipes that stage anything different never share a folder. ``content=False`` (`check()`, before the
        dataset is linted) leaves the staged content out: a name of the same form, for checking the generated
        files, not a folder any run stages."""
        digest = content_digest(self.staged_sets()) if content else ""
        return Path(self.recipe.train.cache_dir) / "kohya-data" / dataset_key(self.recipe, *self._cache_settings(),
                                                                              digest)

    def _cache_settings(self) -> tuple[Any, ...]:
        """What sd-scripts' caches depend on besides the staged files and the `[dataset]` table: the model files, the
        precisions they are cached with, and `extra_args` (sd-scripts' own options, `apply_t5_attn_mask` or
        `t5xxl_max_token_length` among them)."""
        m = self.recipe.model
        return m.files, m.base_precision, self.recipe.train.mixed_precision, dict(self.options.extra_args)

    def cache_key(self) -> str:
        """The staged folder's key without the staged content (`lora_run_engines.stage.MARKER`): folders of one key
        differ in what is staged alone, so a cache of an image and caption staged in both serves both."""
        return dataset_key(self.recipe, *self._cache_settings())

    def staged_sets(self) -> Sets:
        """What the run stages (`wanted_sets`), from the linted items and the lint's digests; `lora-run plan` (no lint
        yet) lints here, so it names the folder the run stages."""
        if self._sets is None:
            items, report = linted(self.ctx)
            self._sets = wanted_sets(items, self.recipe, report)
        return self._sets

    def translation(self, sd_scripts: Path | None = None, *, content: bool = True) -> Translation:
        return translate(self.recipe, self.options, self.paths(sd_scripts, content=content), version=__version__,
                         recipe_path=str(self.ctx.loaded.path.resolve()) if self.ctx.loaded is not None else "")

    # ---------------------------------------------------------------------------------------------- check
    def check(self) -> list[tuple[tuple, str]]:
        if self.family is None:  # the capability check already refused the family
            return []
        out = problems(self.recipe, self.options)
        tr = self.translation(content=False)        # no lint before `check`: the staged folder's name is not checked
        out.extend(self._validate(tr))
        in_dataset = dataset_file_keys(tr.dataset)
        for key in self.options.extra_args:
            where = ("backend", "kohya", "extra_args", key)
            if key in RESERVED or any(key in table for name, table in tr.config.items() if name != "extra"):
                out.append((where, "is set by lora-run from the recipe (or by the backend's layout) and cannot be "
                            "overridden here"))
            elif DATASET_NAMES.get(key, key) in in_dataset:
                named = DATASET_NAMES.get(key, key)
                out.append((where, f"is set in the generated dataset file ({DATASET}"
                            + (f", as `{named}`" if named != key else "") + "), whose values sd-scripts takes over its "
                            "options, so this one would be ignored; set it through the recipe's [dataset] and [train] "
                            "keys"))
            elif any(other in table for other in OVERRIDES.get(key, ()) for name, table in tr.config.items()
                     if name != "extra"):
                other = next(o for o in OVERRIDES[key] if any(o in t for n, t in tr.config.items() if n != "extra"))
                out.append((where, f"would override or conflict with `{other}`, which lora-run sets from the recipe "
                            "(sd-scripts does not warn); set it through the recipe"))
            elif key in DATASET_OVERRIDES:
                out.append((where, DATASET_OVERRIDES[key]))
            elif key in IGNORED_OPTIONS:
                group = IGNORED_OPTIONS[key]
                like = "" if key == group else f"like --{group}, which it belongs with, --{key} changes nothing: "
                out.append((where, f"{like}{REASONS[group]}; lora-run refuses it here as it refuses the recipe key"
                            + ("" if key == group else f" `train.{group}`")))
        out.extend(option_conflicts(tr, dict(self.options.extra_args), self.recipe))
        formats = self.recipe.output.formats
        converted = [f for f in formats if f == "diffusers" or (f == "comfyui" and self.family.name != FLUX)]
        if converted:
            missing = [m for m in ("torch", "safetensors") if importlib.util.find_spec(m) is None]
            if missing:
                out.append((("output", "formats"), f"\"{converted[0]}\" needs {' and '.join(missing)} in lora-run's own "
                            "environment to convert sd-scripts' kohya file (pip install 'lora-run[train]'), or use "
                            "formats = [\"kohya\"]"))
            if self.family.name != FLUX and importlib.util.find_spec("lora_run_formats.hunyuan_image") is None:
                out.append((("output", "formats"), f"no kohya → diffusers converter for {self.family.name} is "
                            "installed (lora_run_formats.hunyuan_image); use formats = [\"kohya\"]"))
        path, origin = checkout.configured_path(self.options.sd_scripts, self.base)
        if path is not None:
            try:
                checkout.verify(path, origin, self.family.script, self.family.network_module)
            except checkout.CheckoutError as exc:
                out.append((("backend", "kohya", "sd_scripts"), str(exc)))
        if self.options.python and os.sep in self.options.python and not Path(self.python()).is_file():
            out.append((("backend", "kohya", "python"), f"{self.python()} does not exist"))
        return out

    def _validate(self, tr: Translation) -> list[tuple[tuple, str]]:
        out: list[tuple[tuple, str]] = []
        for message in spec.check_config(tr.family.script, tr.config):
            where = ("backend", "kohya", "extra_args") if message.startswith("[extra]") else ("backend", "kohya")
            out.append((where, f"generated {CONFIG}: {message}"))
        for message in spec.check_dataset(tr.dataset):
            out.append((("dataset",), f"generated {DATASET}: {message}"))
        # one problem per recipe key (output_name and metadata_title both come from [output] name)
        keys = {**RECIPE_KEYS, **{option: ("model", "files", slot) for slot, option in tr.family.files.items()},
                **dict.fromkeys(RUN_FOLDER_OPTIONS, ("output", "dir")),
                "tokenizer_cache_dir": ("backend", "kohya", "tokenizer_cache_dir"),
                # the staged view: under [train] cache_dir when set, else in the run folder
                "image_dir": ("train", "cache_dir") if self.recipe.train.cache_dir else ("output", "dir")}

        def key_of(rel: str, path: tuple) -> tuple:
            if path[0] == "extra":
                return ("backend", "kohya", "extra_args", path[1])
            return keys.get([p for p in path if isinstance(p, str)][-1],
                            ("dataset",) if rel == DATASET else ("backend", "kohya"))

        for where, rel, path, why in tomlfile.misread_at(((CONFIG, tr.config), (DATASET, tr.dataset)), key_of):
            shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
            out.append((where, f"generated {rel}: [{path[0]}]{shown}: {why}"))
        return out

    # ---------------------------------------------------------------------------------------------- plan
    def steps(self) -> int:
        t = self.recipe.train
        if t.steps is not None:
            return int(t.steps)
        return int(t.epochs) * steps_per_epoch(self.recipe, *self._image_counts(), self.options.num_processes)

    def epochs(self) -> int:
        """The epochs sd-scripts runs: [train] epochs, or enough epochs for [train] steps (an estimate)."""
        t = self.recipe.train
        if t.epochs is not None:
            return int(t.epochs)
        per_epoch = steps_per_epoch(self.recipe, *self._image_counts(), self.options.num_processes)
        return math.ceil(int(t.steps) / per_epoch) if per_epoch else 1

    def _items(self) -> list[Any]:
        """The dataset's items: the run's linted ones, or for the plan the scanned ones."""
        items = self.ctx.items
        if not items:
            try:
                from lora_run.run import scan_dataset

                items = scan_dataset(self.recipe, self.ctx.plugins)
            except Exception:  # noqa: BLE001 - an unreadable dataset is the lint's job, not the plan's
                items = []
        return list(items)

    def _image_counts(self) -> tuple[int, int]:
        """(subject images, regularisation images) of the dataset."""
        items = self._items()
        return sum(1 for i in items if not i.is_reg), sum(1 for i in items if i.is_reg)

    def files(self, tr: Translation) -> dict[str, str]:
        """The generated files (run-dir relative path → text), the same in `lora-run plan` and in the run."""
        header = (f"sd-scripts {tr.family.script} --config_file, generated by lora-run {__version__} from "
                  f"{self.shown}.\nChecked against sd-scripts' option list; sections are flattened by sd-scripts.")
        files = {CONFIG: _toml(tr.config, header),
                 DATASET: _toml(tr.dataset, f"sd-scripts --dataset_config, generated by lora-run {__version__}.\n"
                                "image_dir folders are staged by lora-run at run time (links + captions).")}
        if tr.sample_prompts is not None:
            files[PROMPTS] = tr.sample_prompts
        return files

    def plan(self) -> Plan:
        tr = self.translation()
        unreadable = self._validate(tr)      # check() saw [output] dir; a run folder from --output-dir is seen here
        if unreadable:
            raise RecipeError([f"{self.shown}: [{'.'.join(map(str, k))}] {m}" for k, m in unreadable])
        files = self.files(tr)
        paths = self.paths()
        name = self.recipe.output.name
        outputs = []
        if "kohya" in self.recipe.output.formats:
            outputs.append(str(paths.run_dir / f"{name}.safetensors"))
        if "diffusers" in self.recipe.output.formats:
            outputs.append(str(paths.run_dir / f"{name}.diffusers.safetensors"))
        if "comfyui" in self.recipe.output.formats and self.family.name != FLUX:
            outputs.append(str(paths.run_dir / f"{name}.comfyui.safetensors"))
        outputs.append(str(paths.output_dir) + "/ (sd-scripts' checkpoints, states and samples)")
        notes = list(tr.notes)
        grid = buckets(self.recipe)
        upscaled = upscale_note("sd-scripts", self._items(), lambda w, h: bucket_of(grid, w, h),
                                self.recipe.dataset.bucket_min, "the bucket of the nearest aspect ratio in its grid "
                                "from dataset.bucket_min/max/step, which it scales an image to cover")
        if upscaled:
            notes.append(upscaled)
        if "comfyui" in self.recipe.output.formats and self.family.name == FLUX:
            notes.append("output format comfyui skipped: ComfyUI loads FLUX.1's kohya and diffusers files directly")
        if paths.sd_scripts == "<sd-scripts>":
            notes.append(f"no sd-scripts checkout configured yet: set [backend.kohya] sd_scripts or "
                         f"${checkout.ENV} before running")
        memory = borrowed_memory_estimate(self.recipe, self.ctx.plugins, self.options.blocks_to_swap or 0)
        notes.append("memory: see sd-scripts' own table (docs/flux_train_network.md): 24 GB fits batch 2 with "
                     "fp8; 16 GB batch 1 with blocks_to_swap; 12 GB blocks_to_swap 16 + AdamW8bit"
                     + ("; the estimate above is lora-run's, not sd-scripts'" if memory else ""))
        return Plan(backend="kohya", family=self.recipe.model.family, steps=self.steps(), files=files,
                    commands=[tr.argv], memory_estimate_gib=memory[0] if memory else None, memory_mode=None,
                    memory_source=memory[1] if memory else None, outputs=outputs, notes=notes,
                    details={"sd_scripts": None if paths.sd_scripts == "<sd-scripts>" else paths.sd_scripts,
                             "script": tr.family.script})

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        """Stage, launch and supervise sd-scripts. A staged folder under `[train] cache_dir` is held in use
        (`lora_run_engines.stage.use`) from before it is staged until sd-scripts is done, sd-scripts inheriting the
        hold, so `remove_old_staging` in another run never removes it."""
        assert self.ctx.run_dir is not None
        # sd-scripts' working folder is written by sd-scripts from here to the end: what appears in it is the run's
        with held(self.data_dir() if self.recipe.train.cache_dir else None) as lock, \
                self.ctx.run_dir.writing("kohya"):
            self._run(lock)

    def _run(self, lock: int | None) -> None:
        ctx, recipe = self.ctx, self.recipe
        assert ctx.run_dir is not None and self.family is not None
        tr0 = self.translation()
        needed = [k for name, table in tr0.config.items() for k in table] + ["config_file", "dataset_config"]
        try:
            co = checkout.locate(self.options.sd_scripts, self.base, self.family.script, self.family.network_module,
                                 needed)
        except checkout.CheckoutError as exc:
            raise RecipeError(f"{self.shown}: [backend.kohya.sd_scripts] {exc}") from None
        accelerate_version = self._check_python()
        tr = self.translation(co.path)
        problems_now = self._validate(tr)
        if problems_now:  # the same check ran in validate(); this guards files changed since
            raise RecipeError([f"{self.shown}: [{'.'.join(map(str, k))}] {m}" for k, m in problems_now])
        writes = disk_writes(recipe, tr.config, self.steps(), self.epochs())
        if writes is not None:       # before anything is staged or launched: a refused run leaves nothing behind
            check_free_space(self.run_path(), *writes)
        paths = self.paths(co.path)
        run_dir = ctx.run_dir
        for rel, text in self.files(tr).items():
            run_dir.write_text(rel, text)
        counts = stage_dataset(self.staged_sets(), paths, key=self.cache_key(),
                               shared=bool(recipe.train.cache_dir))
        if lock is not None and self.options.remove_old_staging:
            for name in remove_earlier(paths.data_dir, self.cache_key()):
                ctx.echo(f"kohya: removed {paths.data_dir.parent / name}, staged by an earlier run of this recipe and "
                         "used by none ([backend.kohya] remove_old_staging)")
        argv = list(tr.argv)
        resume_from = None
        offset, finished = 0, False
        if ctx.resume:
            resume_from = latest_state(paths.output_dir, recipe.output.name)
            if resume_from is None:
                ctx.echo(f"note: no sd-scripts state in {paths.output_dir} to resume from (states are saved with each "
                         "checkpoint); training starts from the beginning")
            else:
                saved = state_step(resume_from)
                ctx.echo(f"kohya: resuming from sd-scripts' state {resume_from.name}"
                         + (f" (step {saved})" if saved is not None else ""))
                finished = self._finished(paths, resume_from, saved)
                if not finished:
                    resume_from, extra_argv, offset = self._resume_segment(paths, resume_from, saved)
                    argv += ["--resume", str(resume_from), *extra_argv]
        run_dir.update_manifest(external_tools={"sd-scripts": {**co.manifest(), "accelerate": accelerate_version,
                                                               "packages": getattr(self, "engine_packages", {}),
                                                               "argv": argv,
                                                               "resumed_from": str(resume_from) if resume_from
                                                               else None}})
        run_dir.log(f"kohya: sd-scripts {co.commit or '(not a git checkout)'}"
                    f"{' (dirty)' if co.dirty else ''} at {co.path}; staged {counts}")
        if finished:    # stopped after sd-scripts had finished: its final LoRA is collected, nothing is launched
            ctx.echo(f"kohya: nothing left to train: sd-scripts' state {resume_from.name} is at the run's last step "
                     f"({recipe.train.steps}) and its final LoRA was written after it; collecting that LoRA without "
                     "launching sd-scripts")
            with run_dir.writing(""):
                self._collect(paths, co, tr)
            return
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        earlier = _identity(paths.output_dir / f"{recipe.output.name}.safetensors")    # an earlier segment's final LoRA
        watcher = Watcher(ctx, paths.output_dir, recipe.output.name, offset=offset,
                          check=lambda path: lora_problem(path, family=recipe.model.family, layout="kohya",
                                                          rank=recipe.lora.rank))
        display = Display(ctx.echo)
        log_path = run_dir.file(LOG)
        # sd-scripts logs through rich, which wraps at 80 columns without a terminal (paths split over lines)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        env.setdefault("COLUMNS", "200")
        if recipe.model.offline:
            env["HF_HUB_OFFLINE"] = "1"
        elif env.get("HF_HUB_OFFLINE", "").strip().lower() in ("", "0", "false", "no", "off"):
            reason = _hub_unreachable()
            if reason:  # sd-scripts fetches its tokenizers from the hub: use the cache at once, not after retries
                env["HF_HUB_OFFLINE"] = "1"
                ctx.echo(f"warning: the Hugging Face hub cannot be reached ({reason}); sd-scripts runs with "
                         "HF_HUB_OFFLINE=1 and uses the tokenizers in the local cache (or "
                         "[backend.kohya] tokenizer_cache_dir)")

        # seconds per step on lora-run's own clock, averaged since the first step it reported: sd-scripts' bar
        # rate leaves out every step shorter than its 0.1 s redraw interval (train_network.py calls
        # progress_bar.unpause() after each step, which drops the time since the last redraw): on the GPU its
        # elapsed time stood still for 21 HunyuanImage-2.1 steps. Each step is timed when the bar first draws it
        # (the step has just ended), not when it is reported: the supervisor reports a step once the next one is
        # drawn (or at the end, after sd-scripts saved and exited), so the report's time would put one step's time
        # on the one before and leave the last step only the time of the saving (the real sd-scripts on CPU:
        # 16.4 s steps shown as 0.43 it/s on the last step)
        clock: dict[str, float] = {}
        drawn: dict[int, float] = {}        # sd-scripts' step → when its bar first drew it

        def progress(line: str) -> Progress | None:
            parsed = training_progress(line)
            if parsed is not None:
                drawn.setdefault(parsed.step, time.monotonic())
            return parsed

        def on_progress(p: Progress) -> None:
            now = drawn.get(p.step, time.monotonic())
            for step in [s for s in drawn if s <= p.step]:
                del drawn[step]
            p = attrs.evolve(p, step=p.step + offset, total=p.total + offset)
            if not clock:
                clock.update(at=now, step=p.step)
            between = (now - clock["at"]) / (p.step - clock["step"]) if p.step > clock["step"] else None
            watcher.step = p.step
            loss = p.loss
            if not finite(loss):
                watcher.poll(final=True)
                # the last *good* checkpoint: one sd-scripts saved after the bad step (it runs on until it is
                # stopped) already holds weights trained on a non-finite loss
                good = [c for c in watcher.checkpoints if c["step"] < p.step]
                last_good = max(good, key=lambda c: c["step"])["path"] if good else "none"
                raise NonFiniteLoss(f"sd-scripts reported a non-finite loss ({loss}) at step {p.step}; it was "
                                    f"stopped. Last good checkpoint: {last_good}; lower the "
                                    f"learning rate ([optimizer] lr = {recipe.optimizer.lr}) or check the data")
            metrics: dict[str, float] = {k: v for k, v in p.values.items()}
            if loss is not None:
                metrics["loss"] = loss
            if p.it_per_s is not None:
                metrics["it_per_s"] = p.it_per_s
            if between is not None:
                metrics["step_seconds"] = between
            metrics["total_steps"] = float(p.total)
            ctx.hook.step_finished(run=ctx, step=p.step, metrics=metrics)
            display.show(p, between)

        def on_line(line: str) -> None:
            if re.match(r"^\s*epoch \d+/\d+", line):
                display.echo(line.strip())

        stall = self.options.stall_minutes * 60 if self.options.stall_minutes else None
        timeout = self.options.timeout_hours * 3600 if self.options.timeout_hours else None
        sup = Supervisor(argv, log_path=log_path, name="sd-scripts", cwd=co.path, env=env, on_line=on_line,
                         progress=progress, on_progress=on_progress, stall_seconds=stall,
                         timeout_seconds=timeout, poll=watcher.poll, pass_fds=() if lock is None else (lock,))
        ctx.echo(f"kohya: launching sd-scripts {tr.family.script} ({co.commit[:10] if co.commit else 'no git'}); "
                 f"log: {log_path}")
        try:
            sup.start()
        except OSError as exc:
            raise BackendError(f"cannot launch {argv[0]}: {exc.strerror or exc} ([backend.kohya] python)") from None
        try:
            outcome = sup.run()
        except NonFiniteLoss:
            display.done()
            self._record(watcher, paths, log_path)
            raise
        code = outcome.returncode
        if outcome.interrupted:
            display.done()
            watcher.poll(final=True)
            self._record(watcher, paths, log_path)
            state = latest_state(paths.output_dir, recipe.output.name)
            saved = state_step(state) if state else None
            raise TrainingInterrupted(
                f"interrupted: sd-scripts was stopped after step {watcher.step}; "
                + (f"its last saved state is {state}" + (f" (step {saved})" if saved is not None else "") + "; "
                   if state else "no state was saved yet; ")
                + f"resume with: {resume_command(self.ctx.loaded, run_dir.path)}")
        if outcome.stalled or outcome.timed_out:
            display.done()
            self._record(watcher, paths, log_path)
            what = (f"printed nothing for {self.options.stall_minutes:g} minutes ([backend.kohya] stall_minutes)"
                    if outcome.stalled else
                    f"ran longer than {self.options.timeout_hours:g} hours ([backend.kohya] timeout_hours)")
            raise BackendError(f"sd-scripts {what} and was stopped.\n{self._tail(sup, log_path)}")
        display.done()
        watcher.poll(final=True)
        self._record(watcher, paths, log_path)
        if code != 0:
            raise BackendError(f"sd-scripts exited with code {code}{engines.explain(sup.tail, HINTS)}.\n"
                               f"{self._tail(sup, log_path)}")
        with run_dir.writing(""):        # the LoRA files at the top of the run folder
            self._collect(paths, co, tr, earlier)

    def _check_python(self) -> str:
        python = self.python()
        try:
            done = subprocess.run([python, "-c", _VERSIONS_SCRIPT],
                                  capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RecipeError(f"{self.shown}: [backend.kohya.python] cannot run {python}: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise RecipeError(f"{self.shown}: [backend.kohya.python] {python} cannot import accelerate ({last}); set "
                              "it to the Python of sd-scripts' environment (where `pip install -r requirements.txt` "
                              "was run)")
        lines = done.stdout.strip().splitlines() or [""]
        try:     # the versions of sd-scripts' own environment, for the manifest (the first line: accelerate's)
            self.engine_packages = json.loads(lines[-1]) if len(lines) > 1 else {}
        except ValueError:
            self.engine_packages = {}
        return lines[0].strip()

    def _finished(self, paths: Paths, state: Path, saved: int | None) -> bool:
        """Whether sd-scripts had finished the run when it was stopped (Ctrl-C while lora-run collected the LoRA, or a
        failure after sd-scripts' end): its newest ``state`` is at the recipe's last step and its final LoRA was
        written after that state (sd-scripts saves the last state, then the LoRA). A final LoRA older than the state
        is an earlier segment's, never this one's (``_resume_segment`` then says there is nothing left to do)."""
        steps, final = self.recipe.train.steps, paths.output_dir / f"{self.recipe.output.name}.safetensors"
        if steps is None or saved is None or saved < int(steps) or not final.is_file():
            return False
        newest = max((p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()), default=state.stat().st_mtime_ns)
        return final.stat().st_mtime_ns >= newest

    def _resume_segment(self, paths: Paths, state: Path, saved: int | None) -> tuple[Path, list[str], int]:
        """How to continue from an sd-scripts state: (state folder, extra options, step offset).

        sd-scripts (checked at 48d368f) restores the LoRA weights, optimizer, LR scheduler and RNG from
        ``--resume`` but restarts its step counter at 0; from ``current_step`` it only derives the epoch to start
        from, so a step-based run would train past ``train.steps`` and name its new checkpoints from step 1 again
        (over the earlier ones). For a step-based recipe lora-run therefore passes ``--initial_step 0`` (the
        state's step is then not used to skip epochs) and ``--max_train_steps <steps left>``, moves the earlier
        segment's step checkpoints and states into ``kohya/output/before-step<N>/`` (nothing is overwritten) and
        adds N to the steps sd-scripts reports. A decaying LR schedule is given its totals on the command line
        (`translate.resume_schedule_args`): built from the steps left, it would not continue the run's schedule."""
        t = self.recipe.train
        if t.steps is None or saved is None:  # epoch-based: sd-scripts starts at the saved epoch, as it should
            return state, [], 0
        if saved >= int(t.steps):
            raise RecipeError(f"{self.shown}: [train.steps] the sd-scripts state {state} is at step {saved}, so a "
                              f"run of {t.steps} steps has nothing left to do; raise train.steps to train further")
        keep = paths.output_dir / f"before-step{saved:08d}"
        keep.mkdir(parents=True, exist_ok=True)
        name = re.escape(self.recipe.output.name)
        moved = state
        for entry in sorted(paths.output_dir.iterdir()):
            if re.match(name + r"-step\d{8}(?:-state|\.safetensors)$", entry.name) or \
                    re.match(name + r"-state$", entry.name) or entry.name == SEGMENT:
                target = keep / entry.name
                if target.exists():
                    continue
                os.replace(entry, target)
                if entry == state:
                    moved = target
        atomic_write_text(paths.output_dir / SEGMENT, json.dumps({"offset": saved, "resumed_from": str(moved)}) + "\n")
        return moved, ["--initial_step", "0", "--max_train_steps", str(int(t.steps) - saved),
                       *resume_schedule_args(self.recipe, self.options)], saved

    def _tail(self, sup: Supervisor, log_path: Path) -> str:
        lines = list(sup.tail)[-TAIL_LINES:]
        body = "\n".join(f"  | {line}" for line in lines) or "  | (no output)"
        return (f"last {len(lines)} lines of {log_path}:\n{body}\n(run folder kept: {self.run_path()}; "
                f"config: {self.run_path() / CONFIG})")

    def _record(self, watcher: Watcher, paths: Paths, log_path: Path) -> None:
        arts = self.ctx.artifacts
        arts["kohya_log"] = str(log_path)
        arts["kohya_output_dir"] = str(paths.output_dir)
        existing = [c for c in watcher.checkpoints if Path(c["path"]).is_file()]
        if existing:
            arts["checkpoints"] = existing
        if watcher.samples:
            arts["samples"] = [s for s in watcher.samples if Path(s).is_file()]
        state = latest_state(paths.output_dir, self.recipe.output.name)
        if state is not None:
            arts["kohya_state"] = str(state)

    def _collect(self, paths: Paths, co: checkout.Checkout, tr: Translation,
                 earlier: tuple[int, ...] | None = None) -> None:
        """Collect sd-scripts' final LoRA; ``earlier``: the identity (`_identity`) of the file under its name before
        the launch (a resumed run's earlier segment wrote one), which is never collected as this launch's."""
        from lora_run_formats import copy_with_metadata, read_metadata

        recipe, ctx = self.recipe, self.ctx
        name = recipe.output.name
        produced = paths.output_dir / f"{name}.safetensors"
        if not produced.is_file():
            raise BackendError(f"sd-scripts finished but wrote no {produced}; see {self.run_path() / LOG}")
        if earlier is not None and _identity(produced) == earlier:
            raise BackendError(f"sd-scripts finished but wrote no new {produced}: the file there is the one an earlier "
                               f"run of this folder left, not this run's final LoRA; see {self.run_path() / LOG}")
        collectable(produced, engine="sd-scripts", family=recipe.model.family, layout="kohya", rank=recipe.lora.rank,
                    log=self.run_path() / LOG)
        wrong = unexpected_modules(produced, recipe)
        if wrong:
            raise BackendError(f"{produced} holds LoRA modules the recipe did not ask for ({', '.join(wrong[:4])}"
                               f"{', …' if len(wrong) > 4 else ''}): this sd-scripts ignored part of the generated "
                               f"network_args ({self.run_path() / CONFIG}); nothing was collected")
        extra = {"lora_run.version": __version__, "lora_run.backend": "kohya", "lora_run.family": recipe.model.family,
                 "lora_run.sd_scripts_commit": co.commit or "", "lora_run.trigger": recipe.dataset.trigger,
                 "lora_run.recipe": str(self.run_path() / "recipe.toml")}
        if "kohya" in recipe.output.formats:
            target = copy_with_metadata(produced, paths.run_dir / f"{name}.safetensors", extra)
            ctx.artifacts["lora_kohya"] = str(target)
        if "diffusers" in recipe.output.formats:
            target = paths.run_dir / f"{name}.diffusers.safetensors"
            convert_to_diffusers(produced, target, recipe.model.family,
                                 {**extra, "lora_run.converted_from": "kohya",
                                  "ss_network_dim": read_metadata(produced).get("ss_network_dim", "")})
            ctx.artifacts["lora_diffusers"] = str(target)
        if "comfyui" in recipe.output.formats and recipe.model.family != "flux.1-dev":
            target = paths.run_dir / f"{name}.comfyui.safetensors"
            convert_to_comfy(produced, target, {**extra, "lora_run.converted_from": "kohya"})
            ctx.artifacts["lora_comfyui"] = str(target)
        written = [str(ctx.artifacts[k]) for k in ("lora_kohya", "lora_diffusers", "lora_comfyui") if k in ctx.artifacts]
        ctx.echo(f"kohya: LoRA written: {', '.join(written)}")


def _identity(path: Path) -> tuple[int, ...] | None:
    """A file's identity (device, inode, size, modification time), or None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def unexpected_modules(path: Path, recipe: Any) -> list[str]:
    """kohya modules in sd-scripts' file that the recipe excludes (read from the header, no torch): modulation
    layers under `attention+mlp`, text-encoder modules when the text encoder is not trained."""
    from .translate import MODULATION

    keys = engines.safetensors_keys(path)
    modules = sorted({k.split(".", 1)[0] for k in keys})
    out = []
    if recipe.lora.targets == "attention+mlp":
        out += [m for m in modules if m.startswith("lora_unet_") and MODULATION.search(m)]
    if not recipe.text_encoder.train:
        out += [m for m in modules if m.startswith("lora_te")]
    return out


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (the native backend's bounded probe), or None."""
    try:
        from lora_run_native.adapters.base import hub_unreachable
    except ImportError:  # pragma: no cover - native is a built-in plugin of the same distribution
        return None
    return hub_unreachable()


def convert_to_comfy(source: Path, target: Path, metadata: dict[str, str]) -> Path:
    """sd-scripts' HunyuanImage LoRA → ComfyUI's layout (`diffusion_model.` keys, alpha/rank folded in)."""
    from lora_run_formats import load_lora, save_lora
    from lora_run_formats.hunyuan_image import kohya_to_comfy

    tensors, _meta = load_lora(source)
    try:
        converted = kohya_to_comfy(tensors)
    except ValueError as exc:
        raise BackendError(f"cannot convert {source} to ComfyUI's layout: {exc}") from None
    return save_lora(target, converted, {"format": "pt", **metadata})


def convert_to_diffusers(source: Path, target: Path, family: str, metadata: dict[str, str]) -> Path:
    """sd-scripts' kohya LoRA → a diffusers-format file (alpha folded in), via lora_run_formats."""
    from lora_run_formats import load_lora, save_lora

    tensors, _meta = load_lora(source)
    if family == FLUX:
        from lora_run_formats.flux import kohya_to_diffusers
    else:
        from lora_run_formats.hunyuan_image import kohya_to_diffusers  # type: ignore[import-not-found,no-redef]
    try:
        converted = kohya_to_diffusers(tensors)
    except ValueError as exc:
        raise BackendError(f"cannot convert {source} to diffusers format: {exc}") from None
    return save_lora(target, converted, {k: v for k, v in metadata.items() if v != ""})


#: sd-scripts options its FLUX.1 and HunyuanImage trainers accept and then ignore, with the capability whose reason
#: (`REASONS`) says so: through `extra_args` they would be a setting that changes nothing, as the recipe keys would.
#: The noise offset's companions (random strength, adaptive scale, multi-resolution noise) shape the noise these
#: trainers do not use (plain randn); the loss weightings beside Min-SNR-γ are applied in the `post_process_loss`
#: these trainers replace by one that returns the loss unchanged (research notes on sd-scripts, §2)
IGNORED_OPTIONS = {"noise_offset": "noise_offset", "noise_offset_random_strength": "noise_offset",
                   "adaptive_noise_scale": "noise_offset", "multires_noise_iterations": "noise_offset",
                   "multires_noise_discount": "noise_offset",
                   "min_snr_gamma": "min_snr_gamma", "debiased_estimation_loss": "min_snr_gamma",
                   "scale_v_pred_loss_like_noise_pred": "min_snr_gamma", "v_pred_like_loss": "min_snr_gamma"}
#: sd-scripts options that make it ignore values the generated dataset file sets from the recipe
DATASET_OVERRIDES = {"bucket_no_upscale": "makes sd-scripts ignore min_bucket_reso and max_bucket_reso (lora-run's "
                                          "dataset.bucket_min / bucket_max) and size each image's bucket from the "
                                          "image, so a wide image trains past bucket_max; the buckets come from the "
                                          "recipe's [dataset] keys"}
#: sd-scripts options whose value the dataset file gives under another name (`config_util`'s
#: ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME; `caption_extention`, the old spelling, becomes `caption_extension`)
DATASET_NAMES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats",
                 "caption_extention": "caption_extension"}
#: sd-scripts options that replace (or are replaced by) another option lora-run sets: `max_train_epochs` overrides
#: `max_train_steps`, `save_every_n_epochs` / `sample_every_n_epochs` override their `_steps` forms (train_util),
#: `lr_scheduler_type` replaces `lr_scheduler`, `unet_lr` replaces `learning_rate` for the transformer's LoRA
OVERRIDES = {"max_train_epochs": ("max_train_steps",), "max_train_steps": ("max_train_epochs",),
             "save_every_n_epochs": ("save_every_n_steps",), "save_every_n_steps": ("save_every_n_epochs",),
             "sample_every_n_epochs": ("sample_every_n_steps",), "lr_scheduler_type": ("lr_scheduler",),
             "unet_lr": ("learning_rate",)}


def dataset_file_keys(dataset: dict[str, Any]) -> set[str]:
    """Every option name the generated dataset file sets, at any level (`[general]`, a dataset, a subset)."""
    keys: set[str] = set()
    for table in (dataset.get("general") or {}, *(dataset.get("datasets") or [])):
        keys.update(k for k in table if k != "subsets")
        for subset in table.get("subsets") or []:
            keys.update(subset)
    return keys


# -------------------------------------------------------------------------------------------------- staging
def _subset_index(item: Item) -> int:
    if not item.is_reg:
        return 0
    match = re.search(r"\[(\d+)\]", item.subset)
    return int(match.group(1)) + 1 if match else 1


def _caption(item: Item, recipe: Any) -> str:
    return " ".join(training_caption(item, recipe.dataset).split()) + "\n"     # sd-scripts reads the first line


def wanted_sets(items: list[Item], recipe: Any, lint: Any) -> Sets:
    """The dataset view sd-scripts reads, per subset folder (`subject`, `reg0`, …; only those with a usable image):
    a link to each usable image (a converted PNG where the lint converted it: EXIF rotation, CMYK, 16-bit, alpha)
    and a ``.txt`` caption holding exactly the caption lora-run trains with (trigger policy and default captions
    applied, one line), named ``<stem>_<hash of image bytes and caption>`` (`lora_run_engines.stage.staged_files`):
    sd-scripts names its latent and text-encoder caches after the image and checks neither against an edited image or
    caption, so edited content gets a new name and is cached afresh; an image added or removed renames no other."""
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(_subset_index(item), []).append(item)
    return {subset_name(index): staged_files(members, lambda item: _caption(item, recipe), lint=lint)
            for index, members in sorted(groups.items())}


def _removable(wanted: dict[str, Staged]) -> Callable[[Path], bool]:
    """Staged images and captions no longer wanted, and sd-scripts' caches beside them (``<stem>_….npz``) of an
    image no longer staged; the caches of the images staged are kept (a resume or rerun reuses them)."""
    from lora_run_folder.images import IMAGE_EXTENSIONS

    stems = staged_stems(wanted)

    def removable(entry: Path) -> bool:
        suffix = entry.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix == ".txt":
            return True
        return suffix == ".npz" and cache_owner(entry.name, stems) is None
    return removable


#: sd-scripts' caches after a staged image's stem and ``_`` (`library/strategy_flux.py`,
#: `strategy_hunyuan_image.py`): the latents, named with the image file's own size, and the text-encoder outputs
LATENTS_CACHE = re.compile(r"\d{4}x\d{4}_(?:flux|hi)\.npz")
TE_CACHE = re.compile(r"(?:flux|hi)_te\.npz")


def _complete(path: Path) -> bool:
    """A cache file sd-scripts has finished writing: a regular file holding a whole zip (``np.savez`` writes the zip's
    directory last, so a file being written, or cut short, is none)."""
    import zipfile

    try:
        if path.is_symlink() or not path.is_file():
            return False
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _link(source: Path, target: Path) -> bool:
    """``target`` becomes a hard link to ``source`` (a copy where the file system has none); False when ``target``
    exists already."""
    from lora_run_rundir import atomic_path

    if target.exists() or target.is_symlink():
        return False
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return True


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def carry_caches(into: Path, sets: Sets, sources: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Link into ``into/<set>/`` the sd-scripts caches of ``sources`` (folders staged with the same key: the same
    `[dataset]` table, model files, precisions and `extra_args`; `lora_run_engines.stage.publish`) that are valid
    there, where ``into`` has none yet; returns the names linked. sd-scripts checks neither the image nor the caption
    a cache was made from, so a cache is carried only where that is proven:

    - latents (`<stem>_<W>x<H>_flux.npz`) of a source image of the same set whose marker records the same SHA-256 of
      the image bytes and the same kind (a link to the image, or lora-run's converted PNG, byte for byte the same as
      ours);
    - text-encoder outputs (`<stem>_flux_te.npz`) of a source image of the same set whose caption file holds the very
      bytes of ours;
    - only a whole cache (``np.savez`` finished writing it), a regular file.

    Hard links: sd-scripts rewrites a cache in place only when it finds it missing or lacking what its settings need,
    and with the same key it finds what it found in the folder the cache came from."""
    carried: list[str] = []
    for name, wanted in sets.items():
        folder = into / name
        ours = {file.rsplit(".", 1)[0]: (file, s) for file, s in wanted.items() if s.kind != "text"}
        have: dict[str, set[str]] = {"latents": set(), "te": set()}
        for entry in os.listdir(folder):
            owner = cache_owner(entry, ours)
            if owner is not None:
                rest = entry[len(owner) + 1:]
                if LATENTS_CACHE.fullmatch(rest):
                    have["latents"].add(owner)
                elif TE_CACHE.fullmatch(rest):
                    have["te"].add(owner)
        for source, marker in sources:
            theirs: dict[str, dict[str, str]] = marker["sets"].get(name) or {}
            src = source / name
            try:
                entries = os.listdir(src)
            except OSError:
                continue
            caches: dict[str, list[tuple[str, str]]] = {}        # their stem -> [(form, cache file name)]
            for entry in entries:
                owner = cache_owner(entry, theirs)
                if owner is not None:
                    rest = entry[len(owner) + 1:]
                    form = "latents" if LATENTS_CACHE.fullmatch(rest) else "te" if TE_CACHE.fullmatch(rest) else ""
                    if form:
                        caches.setdefault(owner, []).append((form, entry))
            by_image: dict[tuple[str, str], list[str]] = {}
            for stem, facts in theirs.items():
                if stem in caches:
                    by_image.setdefault((facts["image"], facts["kind"]), []).append(stem)
            by_caption: dict[bytes, str] = {}
            for stem in caches:
                if any(form == "te" for form, _ in caches[stem]):
                    try:
                        by_caption.setdefault((src / f"{stem}.txt").read_bytes(), stem)
                    except OSError:
                        continue
            for stem, (file, staged) in ours.items():
                if stem not in have["latents"] and staged.sha:
                    for other in by_image.get((staged.sha, staged.kind), []):
                        if staged.kind == "png" and not _same_bytes(src / theirs[other]["file"], folder / file):
                            continue
                        for form, entry in caches[other]:
                            if form == "latents" and _complete(src / entry) and \
                                    _link(src / entry, folder / f"{stem}_{entry[len(other) + 1:]}"):
                                carried.append(f"{name}/{stem}_{entry[len(other) + 1:]}")
                                have["latents"].add(stem)
                        if stem in have["latents"]:
                            break
                if stem not in have["te"]:
                    try:
                        other_te = by_caption.get((folder / f"{stem}.txt").read_bytes())
                    except OSError:
                        other_te = None
                    for form, entry in caches.get(other_te, []) if other_te is not None else []:
                        if form == "te" and _complete(src / entry) and \
                                _link(src / entry, folder / f"{stem}_{entry[len(other_te) + 1:]}"):
                            carried.append(f"{name}/{stem}_{entry[len(other_te) + 1:]}")
                            have["te"].add(stem)
    return carried


def stage_dataset(sets: Sets, paths: Paths, *, key: str = "", shared: bool = False) -> dict[str, int]:
    """Make ``paths.data_dir`` hold ``sets`` (`lora_run_engines.stage.publish`: a new folder is staged aside and
    renamed into place whole; an existing one, this run folder's earlier attempt or a ``shared`` folder of this
    content, is only checked, nothing written where a file is as wanted), with the sd-scripts caches that are valid
    there carried from the folders staged before with the same ``key`` (`carry_caches`); returns the images per subset
    folder."""
    if not sets.get("subject"):
        raise BackendError("no usable subject image to train on (see the dataset lint above)")
    return publish(sets, paths.data_dir, _removable, key=key, carry=carry_caches, shared=shared)


SEGMENT = "lora-run-segment.json"


def state_step(state: Path) -> int | None:
    """The run's optimizer step an sd-scripts state folder was saved at: its ``train_state.json``
    ``current_step`` (counted from the segment's start: sd-scripts restarts at 0 after a resume) plus the steps
    of the earlier segments, which lora-run records in ``lora-run-segment.json`` beside the state."""
    try:
        value = parse_json((state / "train_state.json").read_text("utf-8")).get("current_step")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, int):
        return None
    try:
        offset = int(parse_json((state.parent / SEGMENT).read_text("utf-8")).get("offset", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        offset = 0
    return value + offset


def latest_state(output_dir: Path, name: str) -> Path | None:
    """The newest sd-scripts state folder (`<name>-step00000100-state`, `<name>-000002-state`, `<name>-state`)."""
    if not output_dir.is_dir():
        return None
    folders = [output_dir] + [p for p in output_dir.glob("before-step*") if p.is_dir()]
    states = [p for folder in folders for p in folder.iterdir()
              if p.is_dir() and p.name.startswith(name) and p.name.endswith("-state")]
    return max(states, key=lambda p: p.stat().st_mtime_ns) if states else None


# -------------------------------------------------------------------------------------------------- watching
class Watcher:
    """Finds new checkpoints and sample images in sd-scripts' output folder and calls the lifecycle hooks.

    A file is reported once its size and modification time stayed the same between two looks (sd-scripts
    writes in place), or when the process has ended, and only when it is a whole LoRA of the run's family and rank
    (`lora_run_engines.output.lora_problem`): one cut off by a stop while sd-scripts wrote it, or broken, is named in
    a warning at the end instead, never reported as a checkpoint.
    """

    def __init__(self, ctx: Any, output_dir: Path, name: str, every: float = 2.0, offset: int = 0,
                 check: Callable[[Path], str | None] | None = None):
        self.ctx, self.output_dir, self.name, self.every = ctx, output_dir, name, every
        self.check = check      # why a checkpoint file is not a whole LoRA of the run, or None
        self.offset = offset    # steps done before this segment (sd-scripts counts from 0 after a resume)
        self.step = 0
        self.checkpoints: list[dict[str, Any]] = []
        self.samples: list[str] = []
        self.last_checkpoint: str | None = None
        self._seen: set[str] = set()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._broken: dict[str, tuple[tuple[int, int] | None, str]] = {}   # path -> (size and time, problem)
        self._last = 0.0
        self._pattern = re.compile(re.escape(name) + r"-(?:step(?P<step>\d{8})|(?P<epoch>\d{6}))\.safetensors$")
        if output_dir.is_dir():  # files of an earlier segment (before --resume) were reported by that run
            self._seen.update(str(p) for p in output_dir.glob(f"{name}-*.safetensors"))
            self._seen.update(str(p) for p in (output_dir / "sample").glob("*.png"))

    def _stable(self, path: Path, final: bool) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        key = (st.st_size, st.st_mtime_ns)
        previous = self._sizes.get(str(path))
        self._sizes[str(path)] = key
        return final or previous == key

    def _refused(self, path: Path, final: bool) -> bool:
        """Whether the checkpoint at ``path`` is not a whole LoRA of the run (checked once per size and time); at the
        final look such a file is named in a warning, once."""
        if self.check is None:
            return False
        key = self._sizes.get(str(path))
        known = self._broken.get(str(path))
        if known is None or known[0] != key:
            problem = self.check(path)
            if problem is None:
                self._broken.pop(str(path), None)
                return False
            known = self._broken[str(path)] = (key, problem)
        if final:
            self._seen.add(str(path))
            self.ctx.echo(f"warning: kohya: {path} is not reported as a checkpoint: {known[1]}")
        return True

    def poll(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every:
            return
        self._last = now
        if not self.output_dir.is_dir():
            return
        for path in sorted(self.output_dir.glob(f"{self.name}-*.safetensors")):
            match = self._pattern.match(path.name)
            if not match or str(path) in self._seen or not self._stable(path, final) or self._refused(path, final):
                continue
            self._seen.add(str(path))
            step = int(match["step"]) + self.offset if match["step"] else self.step
            entry = {"step": step, "path": str(path), "format": "kohya"}
            if match["epoch"]:
                entry["epoch"] = int(match["epoch"])
            self.checkpoints.append(entry)
            self.last_checkpoint = str(path)
            self.ctx.echo(f"kohya: checkpoint at step {step}: {path.name}")
            self.ctx.hook.checkpoint_saved(run=self.ctx, step=step, path=path)
        new: dict[int, list[Path]] = {}
        for path in sorted((self.output_dir / "sample").glob("*.png")):
            if str(path) in self._seen or not self._stable(path, final):
                continue
            self._seen.add(str(path))
            # sd-scripts names samples <output_name>_<step:06d>_<index:02d>_<timestamp>[_<seed>].png
            # (`e<epoch:06d>` instead of the step for per-epoch samples)
            match = re.match(re.escape(self.name) + r"_(e?)(\d{6})_\d{2}_", path.name)
            step = int(match.group(2)) + self.offset if match and not match.group(1) else self.step
            new.setdefault(step, []).append(path)
        for step, paths in sorted(new.items()):
            self.samples.extend(str(p) for p in paths)
            self.ctx.hook.samples_written(run=self.ctx, step=step, paths=paths)


class Display:
    """Progress on the terminal: one rewritten line on a TTY, otherwise a line every ~5% of the steps."""

    def __init__(self, echo: Any):
        self.echo_fn = echo
        self.tty = sys.stderr.isatty()
        self.last_shown = -1
        self.active = False

    def show(self, p: Progress, step_seconds: float | None = None) -> None:
        """``step_seconds``: lora-run's own mean time per step, shown instead of the rate of sd-scripts' bar
        (the bar leaves out steps shorter than its 0.1 s redraw, so its rate stands still on fast steps)."""
        loss = f"  loss {p.loss:.4f}" if p.loss is not None and math.isfinite(p.loss) else ""
        rate = 1.0 / step_seconds if step_seconds else p.it_per_s
        speed = f"  {rate:.2f} it/s" if rate else ""
        text = f"step {p.step}/{p.total}{loss}{speed}  elapsed {p.elapsed}  left {p.remaining}"
        if self.tty:
            sys.stderr.write("\r" + text.ljust(78))
            sys.stderr.flush()
            self.active = True
            return
        every = max(1, p.total // 20)
        if p.step == p.total or p.step // every != self.last_shown // every or self.last_shown < 0:
            self.echo_fn(text)
            self.last_shown = p.step

    def echo(self, text: str) -> None:
        self.done()
        self.echo_fn(text)

    def done(self) -> None:
        if self.active:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.active = False


#: failures of sd-scripts we can say more about (the first whose text occurs in the output's tail)
HINTS = (
    (("CUDA out of memory", "OutOfMemoryError"), "out of GPU memory: try [backend.kohya] blocks_to_swap, [model] "
     "base_precision = \"fp8\" or a smaller [dataset] resolution"),
    (("ModuleNotFoundError", "No module named"), "a module is missing: is [backend.kohya] python the interpreter of "
     "sd-scripts' environment?"),
    (("extra keys not allowed",), "sd-scripts rejected the dataset config"),
)
