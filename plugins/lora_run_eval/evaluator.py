"""The `identity` evaluator: the playbook's §7 protocol on one or more LoRA files.

For each LoRA (the run's final LoRA, and every kept checkpoint when `[eval] every_checkpoint`): generate
the grid prompts × strengths × seeds with the backend family's pipeline, embed every face, compute the
metrics (:mod:`.metrics`), then pick the best checkpoint and write `metrics.json` and `report.html`.
Used at the end of a run, by `lora-run eval RECIPE --lora FILE` and (without generation) by
`lora-run score`.
"""
from __future__ import annotations

import os
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs

from lora_run.errors import BackendError, DatasetError, LoraRunError, OutputError, PluginError, RecipeError
from lora_run.files import FileProblem, GiB, check_input_file, printable, read_limited, resolved, shown
from lora_run_formats import lora_file_problem
from lora_run_rundir import atomic_write_text
from lora_run_rundir import JSON_LIMIT, parse_json
from lora_run_rundir.atomic import TEMP_FILE, make_folder
from lora_run_rundir.output import folder_problem, input_problems, refuse_empty_output_dir
from lora_run_rundir.record import EVALUATION, OUTPUT_RECORD, recorded_output, unrecorded

from . import metrics as M
from .faces import Embedder
from .losslog import LOSS_FILE, log_for
from .report import is_report, render

#: The size limit (bytes) of a LoRA file given to `lora-run eval`.
LORA_LIMIT = 8 * GiB
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


# ------------------------------------------------------------------------------------------- embedders
def make_embedder(plugins: Any, name: str, raw: dict[str, Any], base: Path | None = None,
                  where: tuple = ("eval", "embedder_options")) -> Embedder:
    """Build the named embedder plugin with its options table (paths resolved against `base`)."""
    from lora_run.run import structure_options

    reg = plugins.get("embedder", name, "eval.embedder")
    raw = dict(raw)
    for key in ("model", "detector"):
        value = raw.get(key)
        if isinstance(value, str) and value and base is not None and not Path(value).expanduser().is_absolute():
            raw[key] = str(resolved(base / value))
        elif isinstance(value, str) and value:
            raw[key] = str(Path(value).expanduser())
    try:
        options = structure_options(reg, raw, where)
    except Exception as exc:  # noqa: BLE001 - cattrs validation error tree
        from lora_run.recipe import collect_errors, format_key

        lines = [f"[{format_key(problem.path)}] {problem.message}" for problem in collect_errors(exc, where)]
        raise RecipeError(lines or [f"[{format_key(where)}] invalid: {exc}"]) from None
    return reg.factory(options)


# ------------------------------------------------------------------------------------------------ grid
def job_name(prompt_index: int, strength: float, seed: int) -> str:
    return f"p{prompt_index}-s{strength:g}-seed{seed}"


def grid_jobs(recipe: Any) -> list[dict[str, Any]]:
    """The §7 grid: every prompt × strength × seed; `{trigger}` replaced; a prompt without the token (neither
    `{trigger}` nor the trigger written out, ``section.is_control``) is a control prompt."""
    from .section import expand_prompt, is_control

    ev = recipe.eval
    trigger = recipe.dataset.trigger
    jobs = []
    for pi, template in enumerate(ev.prompts):
        control = is_control(template, trigger)
        prompt = expand_prompt(template, trigger)
        for strength in ev.strengths:
            for seed in ev.seeds:
                jobs.append({"name": job_name(pi, strength, seed), "prompt": prompt, "prompt_index": pi,
                             "control": control, "seed": seed, "strength": float(strength), "steps": ev.steps,
                             "guidance": ev.guidance, "width": ev.width, "height": ev.height})
    return jobs


def expanded_prompts(recipe: Any) -> list[str]:
    from .section import expand_prompt

    return [expand_prompt(p, recipe.dataset.trigger) for p in recipe.eval.prompts]


def find_generator(plugins: Any, recipe: Any) -> Callable[..., Any]:
    """`generate_images(recipe, lora_path, jobs, out_dir, device=None)`: the recipe backend's registered
    `generate` if it has one, else the first installed backend's."""
    reg = plugins.registry["backend"].get(recipe.backend.name)
    if reg is not None and reg.generate is not None:
        return reg.generate
    for other in plugins.registry["backend"].values():
        if other.generate is not None:
            return other.generate
    raise PluginError("image generation for the evaluation grid needs a backend that registers `generate` "
                      "(the native backend does; install lora-run with the [train] extra)")


def takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (or any keyword)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def generate_grid(generate: Callable[..., Any], recipe: Any, lora: Path, out_dir: Path,
                  echo: Callable[[str], None], on_image: Callable[[str], None] | None = None) -> list[M.Sample]:
    """The grid's images for ``lora``; ``on_image(path)`` is told of each as it is written, where ``generate`` takes
    ``on_image`` (docs/hooks/register_backends.md)."""
    jobs = grid_jobs(recipe)
    wire = [{k: j[k] for k in ("name", "prompt", "seed", "strength", "steps", "guidance", "width", "height")}
            for j in jobs]
    echo(f"eval: generating {len(jobs)} images for {lora.name} ({len(recipe.eval.prompts)} prompts × "
         f"{len(recipe.eval.strengths)} strengths × {len(recipe.eval.seeds)} seeds)")
    started = time.monotonic()
    try:
        told = {"on_image": lambda job: on_image(job["path"])} if on_image and takes_keyword(generate, "on_image") \
            else {}
        try:
            done = generate(recipe, str(lora), wire, str(out_dir), **told)
        except TypeError as exc:    # a wrapper taking any keyword around a generator without `on_image`: refused
            if not told or "on_image" not in str(exc):     # at the call, before any image: called again without it
                raise
            done = generate(recipe, str(lora), wire, str(out_dir))
    except LoraRunError:
        raise
    except Exception as exc:  # noqa: BLE001 - a pipeline failure is reported with the LoRA it was for
        raise BackendError(f"{lora}: generating the evaluation grid failed: {type(exc).__name__}: {exc} "
                           "(--debug shows the traceback)") from exc
    took = time.monotonic() - started
    calls = [d.get("seconds") for d in done or []]
    if calls and all(isinstance(c, (int, float)) for c in calls):      # the generator timed its calls
        echo(f"eval: {len(jobs)} images in {took:.1f} s: the pipeline calls {sum(calls):.1f} s, the rest (the "
             f"pipeline's load) {took - sum(calls):.1f} s")
    else:
        echo(f"eval: {len(jobs)} images in {took:.1f} s (the pipeline's load included)")
    paths = {d["name"]: d.get("path") for d in done or []}
    samples = []
    for j in jobs:
        path = paths.get(j["name"]) or str(out_dir / f"{j['name']}.png")
        samples.append(M.Sample(path=str(path), name=j["name"], prompt_index=j["prompt_index"], prompt=j["prompt"],
                                control=j["control"], strength=j["strength"], seed=j["seed"]))
    return samples


# ------------------------------------------------------------------------------------------ checkpoints
_STEP = re.compile(r"(\d+)(?!.*\d)")


_STATE_FILES = {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors"}


def _lora_file(path: Path) -> Path | None:
    """A LoRA file, or the LoRA inside a checkpoint folder: the one its `state.json` names (kohya format
    first), else the first `.safetensors` that is not training state."""
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for state in (path / "state.json", path / "resume" / "state.json"):
        try:
            named = parse_json(state.read_text("utf-8")).get("loras") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for fmt in sorted(named, key=lambda f: (f != "kohya", f)):
            for base in (state.parent, path):
                candidate = base / str(named[fmt])
                if candidate.is_file():
                    return candidate
    files = sorted(f for f in path.rglob("*.safetensors")
                   if f.name not in _STATE_FILES and "resume" not in f.relative_to(path).parts)
    files.sort(key=lambda f: (len(f.relative_to(path).parts), f.name))
    return files[0] if files else None


def normalise_checkpoints(items: Sequence[Any]) -> list[tuple[str, int | None, Path]]:
    """Checkpoint records as backends store them (paths, or dicts with `step` and a LoRA path) →
    [(label, step, LoRA file)] for the ones still on disk, step-ordered."""
    out: dict[str, tuple[str, int | None, Path]] = {}
    for item in items or []:
        step: int | None = None
        if isinstance(item, dict):
            step = item.get("step") if isinstance(item.get("step"), int) else None
            raw = next((item[k] for k in ("lora_kohya", "lora", "lora_diffusers", "lora_comfyui", "path", "dir") if item.get(k)),
                       None)
        else:
            raw = item
        if raw is None:
            continue
        found = _lora_file(Path(str(raw)))
        if found is None:
            continue
        if step is None:
            match = _STEP.search(Path(str(raw)).name) or _STEP.search(found.stem)
            step = int(match.group(1)) if match else None
        label = f"step {step}" if step is not None else found.stem
        out[str(found.resolve())] = (label, step, found)
    return sorted(out.values(), key=lambda t: (t[1] is None, t[1] or 0, t[0]))


# ------------------------------------------------------------------------------------------- evaluation
class Evaluation:
    """Evaluates LoRAs (or ready images) against one subject and writes metrics.json + report.html."""

    def __init__(self, embedder: Embedder, subject_paths: Sequence[Path], out_dir: Path, *,
                 echo: Callable[[str], None] = print, title: str = "Identity evaluation", source: str = "",
                 text_encoder_trained: bool | None = None):
        self.embedder = embedder
        self.out_dir = out_dir
        self.echo = echo
        self.title = title
        self.source = source
        self.text_encoder_trained = text_encoder_trained
        self.subject_paths = list(subject_paths)
        self._subject: M.Subject | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.entries: list[dict[str, Any]] = []
        self.samples: dict[str, list[M.Sample]] = {}
        #: what embeds the images: the embedder, or while ``evaluate_loras`` runs, its pool of worker processes, which
        #: has embedded most of them by the time they are asked for (``faces.EmbeddingPool``)
        self.embedding: Any = embedder

    @property
    def subject(self) -> M.Subject:
        if self._subject is None:
            self._subject = M.embed_subject(self.embedding, self.subject_paths)
            _refuse_unreadable(self._subject.results, DatasetError, "subject photo")
            s = self._subject
            self.echo(f"eval: subject: {len(s.faces)} faces in {len(s.results)} photos "
                      f"(embedder {self.embedder.name})")
        return self._subject

    def add(self, label: str, step: int | None, path: str, samples: list[M.Sample]) -> dict[str, Any]:
        started = time.monotonic()
        M.embed_samples(self.embedding, samples)
        _refuse_unreadable([s.result for s in samples], BackendError, "image to score")
        result = M.analyze(samples, self.subject, self.embedder, text_encoder_trained=self.text_encoder_trained)
        self.echo(f"eval: {label}: {len(samples)} images scored in {time.monotonic() - started:.1f} s")
        self.results[label] = result
        self.samples[label] = samples
        self.entries.append(M.summary_entry(label, step, path, result))
        ident = result["identity"]
        self.echo(f"eval: {label}: identity {_f(ident['score'])}, faces {_p(ident['face_rate'])}, leakage "
                  f"{_p(result['leakage']['leak_rate'])}, carbon copies "
                  f"{_p(result['diversity']['carbon_copy_rate'])}; "
                  + (", ".join(f["name"] for f in result["failures"]) or "no failure signal"))
        return result

    def subject_records(self) -> list[dict[str, Any]]:
        subject = self.subject
        faces = subject.faces
        out = []
        for r in subject.results:
            rec = {"name": Path(r.path).name, "path": r.path, "face": r.face is not None, "note": r.note,
                   "score": None, "match": False, "control": False, "seed": None}
            if r.face is not None and len(faces) > 1:
                d = [self.embedder.distance(r.face.embedding, f.embedding) for f in faces if f is not r.face]
                score = M.score_from_distance(sum(d) / len(d), self.embedder.threshold)
                rec.update(score=round(score, 4), match=score > M.MATCH_SCORE)
            out.append(rec)
        return out

    def finish(self, *, final: str | None, prompts: Sequence[str] = (), strengths: Sequence[float] = (),
               seeds: Sequence[int] = (), loss_history: Sequence[tuple[int, float]] = (),
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        entries = sorted(self.entries, key=lambda e: (e["step"] is None, e["step"] or 0))
        final = final or (entries[-1]["label"] if entries else None)
        overfit = M.overfit_signal(list(loss_history), entries) if len(entries) > 1 else {}
        if final in self.results and overfit.get("flagged"):
            r = self.results[final]
            r["failures"] = M.diagnose(r, text_encoder_trained=self.text_encoder_trained, overfit=overfit)
            for e in entries:
                if e["label"] == final:
                    e["failures"] = [f["name"] for f in r["failures"]]
        best = M.pick_best(entries) if len(entries) > 1 else {}
        data = {
            "title": self.title,
            "source": self.source,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "embedder": self.embedder.describe(),
            "subject_photos": len(self.subject_paths),
            "prompts": list(prompts),
            "strengths": list(strengths),
            "seeds": list(seeds),
            "final": final,
            "loras": entries,
            "best": best,
            "overfit": overfit,
            "strength_notes": {k: M.strength_notes(v) for k, v in self.results.items()},
            "results": self.results,
            "loss_history": [list(p) for p in loss_history],
            "subject_images": self.subject_records(),
            **(extra or {}),
        }
        self.write(data)
        return data

    def write(self, data: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / METRICS_FILE, json.dumps(data, indent=2, default=str) + "\n")
        atomic_write_text(self.out_dir / REPORT_FILE, render(data))


def _refuse_unreadable(results: Sequence[Any], error: type[LoraRunError], what: str) -> None:
    """A file that does not decode is never scored as an image without a face (it would lower the face rate and
    the identity verdict unseen): the error names each one. (`score` and `eval` refuse the files they are given
    before any model loads, ``unreadable_images``; this is the last guard, for the images a generator wrote.)"""
    bad = [f"{shown(r.path)}: the {what} cannot be scored: {r.note.removeprefix('unreadable image: ')}"
           for r in results if r is not None and not r.readable]
    if bad:
        raise error(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _p(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def image_folders(images_root: Path, labels: Sequence[str]) -> list[Path]:
    """One folder under ``images_root`` per LoRA label, named after it with safe characters: never "", "." or ".."
    (it stays inside), and never one name for two labels, also where the file system ignores letter case (`x y` and
    `x-y` both make `x-y`, `Step` and `step` are one folder on macOS): a later LoRA's images would replace an earlier
    one's, which the report then shows under the earlier label."""
    taken: set[str] = set()
    out = []
    for n, label in enumerate(labels, 1):
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
        name = name if name.strip(".") else f"lora-{n}"
        unique, k = name, 1
        while unique.casefold() in taken:
            k += 1
            unique = f"{name}-{k}"
        taken.add(unique.casefold())
        out.append(images_root / unique)
    return out


def evaluate_loras(evaluation: Evaluation, generate: Callable[..., Any], recipe: Any,
                   loras: Sequence[tuple[str, int | None, Path]], images_root: Path) -> None:
    """Generate and score each LoRA's grid. Where the embedder has a ``pool``, its worker processes embed each image
    as the generator writes it, while the GPU makes the next ones; they start at the first image, with the subject
    photos, so that they do not compete with the pipeline's load."""
    make_pool = getattr(evaluation.embedder, "pool", None)
    photos = list(evaluation.subject_paths)
    pool = make_pool(len(photos) + len(grid_jobs(recipe)) * len(loras)) if make_pool else None

    def hand_over(image: str) -> None:
        assert pool is not None
        while photos:
            pool.submit(photos.pop(0))
        pool.submit(image)
    try:
        if pool is not None:
            evaluation.embedding = pool
        for folder, (label, step, path) in zip(image_folders(images_root, [label for label, _, _ in loras]), loras):
            samples = generate_grid(generate, recipe, path, folder, evaluation.echo,
                                    hand_over if pool is not None else None)
            evaluation.add(label, step, str(path), samples)
    finally:
        if pool is not None:
            evaluation.embedding = evaluation.embedder
            pool.close()


def grid_extra(recipe: Any) -> dict[str, Any]:
    ev = recipe.eval
    return {"trigger": recipe.dataset.trigger, "steps": ev.steps, "guidance": ev.guidance,
            "size": [ev.width, ev.height], "family": recipe.model.family, "about": recipe.description}


# ------------------------------------------------------------------------------------------ in a run
class IdentityEvaluator:
    """`factory(ctx)` of the `identity` evaluator: runs at the end of a run when `[eval] enabled`."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def loras(self) -> tuple[list[tuple[str, int | None, Path]], str | None]:
        art = self.ctx.artifacts
        found: list[tuple[str, int | None, Path]] = []
        final_label = None
        final = next((Path(str(art[k])) for k in ("lora_kohya", "lora_diffusers", "lora_comfyui", "lora") if art.get(k)), None)
        log = log_for(self.ctx)
        if self.ctx.recipe.eval.every_checkpoint:
            recorded = [{"step": c["step"], "path": c["path"]} for c in (log.checkpoints if log else [])]
            found = normalise_checkpoints([*(art.get("checkpoints") or []), *recorded])
        if final is not None and final.is_file():
            steps = self.ctx.artifacts.get("steps") or self.ctx.artifacts.get("final_step")
            step = steps if isinstance(steps, int) else max([s for _, s, _ in found if s is not None], default=None)
            found = [f for f in found if f[2].resolve() != final.resolve()]
            if step is not None and any(s == step for _, s, _ in found):
                found = [f for f in found if f[1] != step]      # the final LoRA is that step's checkpoint
            final_label = "final" if step is None else f"final (step {step})"
            found.append((final_label, step, final))
        return found, final_label

    def evaluate(self) -> None:
        ctx = self.ctx
        recipe = ctx.recipe
        out = ctx.run_dir.file("eval")
        log = log_for(ctx)
        if log is not None:
            log.flush()
        loras, final = self.loras()
        if not loras:
            ctx.echo("eval: skipped: the backend recorded no LoRA file in the run's artifacts")
            return
        try:
            base = ctx.loaded.path.resolve().parent if ctx.loaded is not None else None
            embedder = make_embedder(ctx.plugins, recipe.eval.embedder, recipe.eval.embedder_options, base)
            generate = find_generator(ctx.plugins, recipe)
            subject = [i.image for i in ctx.items if not i.is_reg]
            ev = Evaluation(embedder, subject, out, echo=ctx.echo, title=f"Identity evaluation: {recipe.output.name}",
                            source=str(ctx.run_dir.path), text_encoder_trained=recipe.text_encoder.train)
            evaluate_loras(ev, generate, recipe, loras, out / "images")
            history = M.read_loss(out / LOSS_FILE)
            data = ev.finish(final=final, prompts=expanded_prompts(recipe), strengths=recipe.eval.strengths,
                             seeds=recipe.eval.seeds, loss_history=history, extra=grid_extra(recipe))
        except Exception as exc:  # noqa: BLE001 - a failed evaluation must not turn a finished training into a failure
            if ctx.debug:
                raise
            if not isinstance(exc, LoraRunError):
                exc = f"{type(exc).__name__}: {exc}"
            ctx.echo(f"warning: evaluation failed: {exc} (the LoRA files are fine; evaluate later with "
                     f"`lora-run eval {ctx.run_dir.path / 'recipe.toml'} --lora FILE`)")
            ctx.artifacts["eval_error"] = str(exc)
            return
        ctx.artifacts["eval_report"] = str(out / REPORT_FILE)
        ctx.artifacts["eval_metrics"] = str(out / METRICS_FILE)
        best = data.get("best") or {}
        if best.get("label"):
            ctx.artifacts["best_checkpoint"] = best.get("path")
            ctx.echo(f"eval: best: {best['label']}: {best['reason']}")
        elif best:
            ctx.echo(f"eval: best: none: {best['reason']}")
        for f in data["results"][data["final"]]["failures"]:
            ctx.echo(f"eval: {f['name']}: {'; '.join(f['evidence'])} — fix: {f['fix']}")
        ctx.echo(f"eval: report {out / REPORT_FILE}")
        ctx.run_dir.log(f"evaluation written to {out}")


# ------------------------------------------------------------------------------------------ commands
def _run_dir_of(lora: Path) -> Path | None:
    for folder in (lora.parent, *list(lora.parents)[1:3]):
        if (folder / "manifest.json").is_file():
            return folder
    return None


#: What an evaluation writes in its folder: ``--overwrite`` replaces a folder holding these alone (and the record,
#: ``lora_run_rundir.record.OUTPUT_RECORD``, that lists them).
IMAGES = "images"
OWN_ENTRIES = (METRICS_FILE, REPORT_FILE, IMAGES)


def _check_output(path: Path, overwrite: bool) -> None:
    unusable = folder_problem(path)
    if unusable:
        raise OutputError(f"--output-dir {shown(path)}: {unusable}")
    images = path / IMAGES
    if os.path.islink(images) or (os.path.lexists(images) and not images.is_dir()):   # images would go through it
        raise OutputError(f"--output-dir {shown(path)}: {shown(images)} is a link or not a folder, where the "
                          "evaluation writes its images; move it away (nothing was touched)")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputError(f"{shown(path)}: the output folder is not empty; use --overwrite to replace its evaluation "
                              "or --output-dir for a new folder")
        if not _is_evaluation(path):
            raise OutputError(f"{shown(path)}: --overwrite replaces only an earlier evaluation (a folder with the "
                              f"{METRICS_FILE} or {REPORT_FILE} lora-run wrote); this folder holds other files and is "
                              "left alone")
        others = sorted(e.name for e in path.iterdir() if e.name not in (*OWN_ENTRIES, OUTPUT_RECORD)
                        and not (TEMP_FILE.match(e.name) and e.is_file() and not e.is_symlink()))
        # inside images/: what the evaluation's record does not list (a picked image, a user's notes) is not its own
        others += [n for n in unrecorded(path, EVALUATION) or [] if "/" in n]
        if others:
            raise OutputError(f"{shown(path)}: --overwrite would delete the earlier evaluation beside "
                              f"{len(others)} entr{'y' if len(others) == 1 else 'ies'} it did not write "
                              f"({', '.join(shown(n) for n in others[:8])}{', …' if len(others) > 8 else ''}); move "
                              "them out, or choose another --output-dir")


def _is_evaluation(path: Path) -> bool:
    """An earlier evaluation's folder: its report page as lora-run writes it, or its metrics (a JSON object with the
    evaluation's own keys), or its record (written first, so an evaluation cut short is one too); a file merely named
    so (a web page's report.html) is not one."""
    if is_report(path / REPORT_FILE) or unrecorded(path, EVALUATION) is not None:
        return True
    metrics = path / METRICS_FILE
    try:
        data = parse_json(read_limited(metrics, "json", JSON_LIMIT))
    except (OSError, ValueError, FileProblem):
        return False
    return isinstance(data, dict) and {"results", "loras", "final", "subject_images"} <= data.keys()


def _clear_output(path: Path, overwrite: bool) -> None:
    if path.is_dir() and overwrite and _is_evaluation(path):
        for name in (METRICS_FILE, REPORT_FILE):
            (path / name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(path / "images", ignore_errors=True)


def cmd_eval(args: Any, plugins: Any) -> int:
    """`lora-run eval RECIPE --lora FILE [--lora FILE ...] [--output-dir D] [--overwrite] [--json]`."""
    from lora_run.recipe import load_recipe
    from lora_run.run import lint, scan_dataset, validate

    refuse_empty_output_dir(args.output_dir)    # not the default folder next to the LoRA
    loaded = load_recipe(args.recipe, args.sets, getattr(args, "unsets", ()), plugins)
    loras = []
    for raw in args.lora:
        path = resolved(Path(raw).expanduser())
        try:
            check_input_file(path, "lora", LORA_LIMIT)
        except FileProblem as exc:
            raise RecipeError(f"--lora {shown(raw)}: " + ("no such file" if str(exc).startswith("not found")
                                                          else str(exc))) from None
        match = _STEP.search(path.stem)
        step = int(match.group(1)) if match and len(args.lora) > 1 else None
        loras.append((path.stem if len(args.lora) > 1 else "lora", step, path))
    if len({label for label, _, _ in loras}) != len(loras):
        loras = [(f"{label} ({n})", step, path) for n, (label, step, path) in enumerate(loras, 1)]
    out = resolved(Path(args.output_dir).expanduser()) if args.output_dir else \
        loras[0][2].parent / f"eval-{loras[0][2].stem}"
    from lora_run_commands.arguments import NAME_MAX

    # a LoRA named up to the limit: its default folder's name would be over it ("File name too long")
    if not args.output_dir and len(os.fsencode(out.name)) > NAME_MAX:
        raise OutputError(f"--lora {shown(args.lora[0])}: the evaluation's default folder next to it, eval-<its name>, "
                          f"would have a name of {len(os.fsencode(out.name))} bytes, over the {NAME_MAX} a folder name "
                          "may have; give --output-dir")
    _check_output(out, args.overwrite)
    for raw, (_, _, path) in zip(args.lora, loras):
        not_lora = lora_file_problem(path)
        if not_lora:     # before any model loads: a model's weights or another file given by mistake
            raise RecipeError(f"--lora {shown(raw)}: not a LoRA file: {not_lora}")
    recipe = validate(loaded, plugins).recipe
    for raw, (_, _, path) in zip(args.lora, loras):
        misfit = lora_model_problem(recipe, path, loaded.shown)
        if misfit:       # before any model loads: matrices the wrong way round, a LoRA of another model size
            raise RecipeError(f"--lora {shown(raw)}: {misfit}")
    overlap = input_problems(recipe, out, f"--output-dir {shown(out)}", "evaluation folder")
    if overlap:     # --overwrite would delete the recipe's dataset with the earlier evaluation's images
        raise OutputError("\n".join(overlap))
    items = scan_dataset(recipe, plugins)
    report = lint(recipe, plugins, items)
    subject = [i.image for i in report.usable if not i.is_reg]
    unreadable = undecoded_subject_photos(items, report, f"{loaded.shown}: [dataset.path]")  # not left out unseen
    if unreadable:
        raise DatasetError("\n".join(unreadable))
    if not subject:
        raise RecipeError(f"{loaded.shown}: [dataset.path] has no usable subject photos to compare against")
    echo = (lambda _m: None) if args.json else print

    def prepare() -> None:     # under the folder's lock: another evaluation may have written there since the check
        _check_output(out, args.overwrite)
        _clear_output(out, args.overwrite)
    # before anything goes in: the record that this folder is lora-run's evaluation and what it holds, by which the run
    # folder's `run --overwrite` knows an `eval-*` folder as a run's (it never reads this plugin's files); taken back
    # when the evaluation stops before its first output (a LoRA that does not fit the model: nothing left behind). The
    # folder is locked until the evaluation ends: a second `lora-run eval` into it is refused (its --overwrite deleted
    # the first one's images while it scored them)
    with recorded_output(out, EVALUATION, OWN_ENTRIES, prepare):
        embedder = make_embedder(plugins, recipe.eval.embedder, recipe.eval.embedder_options,
                                 loaded.path.resolve().parent)
        generate = find_generator(plugins, recipe)
        ev = Evaluation(embedder, subject, out, echo=echo, title=f"Identity evaluation: {loras[0][2].name}",
                        source=loaded.shown, text_encoder_trained=recipe.text_encoder.train)
        evaluate_loras(ev, generate, recipe, loras, out / "images")
        run_dir = _run_dir_of(loras[0][2])
        history = M.read_loss(run_dir / "eval" / LOSS_FILE) if run_dir else []
        data = ev.finish(final=loras[-1][0], prompts=expanded_prompts(recipe), strengths=recipe.eval.strengths,
                         seeds=recipe.eval.seeds, loss_history=history, extra=grid_extra(recipe))
    return _print_result(data, out, args.json)


def lora_model_problem(recipe: Any, path: Path, recipe_shown: str = "recipe.toml") -> str | None:
    """Why the LoRA file ``path`` does not fit the recipe's model, read from headers before anything loads (the
    family's native adapter's ``lora_problem``: modules that do not form LoRAs, or do not fit the layers they name),
    or None; None too where no native adapter declares the family (its generator's load names what does not fit)."""
    try:
        from lora_run_native.adapters import adapter_class

        adapter = adapter_class(recipe.model.family)
    except (ImportError, KeyError):
        return None
    return adapter(recipe, shown=recipe_shown).lora_problem(path)


def _print_result(data: dict[str, Any], out: Path | None, as_json: bool) -> int:
    if as_json:
        slim = {k: v for k, v in data.items() if k not in ("loss_history",)}
        print(json.dumps({"ok": True, "output_dir": str(out) if out else None, **slim}, indent=2, default=str))
        return 0
    final = data["results"].get(data["final"]) if data.get("final") else None
    if final is not None:
        ident, leak, div = final["identity"], final["leakage"], final["diversity"]
        print(f"identity score: {_f(ident['score'])} (faces {_p(ident['face_rate'])}, match rate "
              f"{_p(ident['match_rate'])}; subject vs itself {_f(final['subject']['self_score'])})")
        if leak["faces"] and leak["leak_rate"] is None:
            print(f"leakage: not measured (no subject face to compare the {leak['faces']} control faces with)")
        elif leak["faces"]:
            print(f"leakage: {_p(leak['leak_rate'])} of {leak['faces']} control faces match the subject")
        elif leak["images"]:
            print(f"leakage: no face in the {leak['images']} control images")
        else:
            print("leakage: not measured (no control images; `score --control DIR` adds them)")
        print(f"diversity: carbon copies {_p(div['carbon_copy_rate'])} of {div['pairs']} pairs, 1 − SSIM "
              f"{_f(div['ssim_distance'])}, face spread {_f(div['embedding_distance'])}")
        for key, kind in (("memorised", "trigger"), ("memorised_control", "control")):
            if div.get(f"{key}_compared"):
                print(f"copies of training photos: {len(div[key])} of {div[f'{key}_compared']} {kind} images "
                      f"({_p(div[f'{key}_rate'])})")
        for f in final["failures"]:
            print(f"{f['name']}: {'; '.join(f['evidence'])}\n  fix: {f['fix']}")
        if not final["failures"]:
            print("no failure signal")
    best = data.get("best") or {}
    if best:
        print(f"best: {best['label'] or 'none'}: {best['reason']}")
    if out is not None:
        print(f"report: {out / REPORT_FILE}")
    return 0


def _cannot_be_scored(flag: str, path: Path | str, why: Any) -> str:
    return f"{flag} {shown(path)}: cannot be scored: {why}; replace it, or move it out of the folder"


def unreadable_images(paths: Sequence[Path], flag: str) -> list[str]:
    """A line naming each file of ``paths`` that does not decode as an image (a text file named `.png`, a truncated
    or empty one), found before any model loads: scored, it would count as an image without a face."""
    from lora_run_folder.images import ImageProblem, open_rgb

    bad = []
    for path in paths:
        try:
            open_rgb(path)
        except ImageProblem as exc:
            bad.append(_cannot_be_scored(flag, path, exc))
    return bad


def undecoded_subject_photos(items: Sequence[Any], report: Any, flag: str) -> list[str]:
    """``unreadable_images`` for the subject photos of the dataset, from the lint of those ``items``: its findings for
    a file that cannot be read or decode (``lora_run_folder.lint.NOT_DECODED``) name the file and why; the items say
    which are subject photos (nothing is read or decoded again)."""
    from lora_run_folder.lint import NOT_DECODED

    why = {f.file: f.message for f in report.findings if f.code in NOT_DECODED}
    return [_cannot_be_scored(flag, i.image, why[str(i.image)]) for i in items if not i.is_reg and str(i.image) in why]


def _folder_images(given: str, flag: str) -> list[Path]:
    """The images of a folder given to `score`: its files with an image extension (captions, JSON and other files
    beside them are neither scored nor counted; each must decode, ``unreadable_images``)."""
    from lora_run_folder.images import IMAGE_EXTENSIONS

    if not str(given).strip():      # Path("") is the current folder: never score that by accident
        raise RecipeError(f"{flag}: an empty path; give the folder of images")
    folder = Path(given).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"{flag} {shown(folder)}: not a folder")
    # a link that leads nowhere (dangling, or a loop), a FIFO, a device or a socket under an image's name is named by
    # ``unreadable_images`` like a file that does not decode, never left out unseen; a folder (or a link to one) is no
    # image file
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                   and not p.is_dir())
    if not files:
        raise RecipeError(f"{flag} {shown(folder)}: no images (.jpg, .jpeg, .png, .webp, .bmp)")
    return files


def _check_report(path: Path, overwrite: bool, subject: Path) -> None:
    """Where `score --report` may write (OutputError, exit 2, naming the path, before any model loads): not among the
    subject's photos (a dataset folder: lora-run never writes into one), over an existing file only with --overwrite
    and only over a report page lora-run wrote (``is_report``), never through a dangling link; its folder is made here,
    so a folder the system refuses is said before any model loads."""
    if subject == path or subject in path.parents:
        raise OutputError(f"--report {shown(path)}: lies in the --subject folder {shown(subject)}; lora-run never "
                          "writes among the subject's photos (a dataset folder): give a report path outside it")
    if path.exists() and not overwrite:
        raise OutputError(f"--report {shown(path)}: exists; use --overwrite to replace it")
    if path.exists() and not path.is_file():
        raise OutputError(f"--report {shown(path)}: exists and is not a regular file; it is never replaced")
    if path.exists() and not is_report(path):
        raise OutputError(f"--report {shown(path)}: --overwrite replaces only a report lora-run wrote; this file "
                          "is something else and is left alone")
    unusable = folder_problem(path.parent)
    if unusable:
        raise OutputError(f"--report {shown(path)}: {shown(path.parent)} {unusable}")
    if os.path.islink(path) and not path.exists():
        raise OutputError(f"--report {shown(path)}: is a dangling link or a symlink loop")
    make_folder(path.parent, f"--report {shown(path)}", f"folder {shown(path.parent)}")


def cmd_score(args: Any, plugins: Any) -> int:
    """`lora-run score --subject DIR --images DIR [--control DIR] [--embedder NAME] [--model F] [--json]`."""
    from lora_run.recipe import did_you_mean

    embedders = plugins.registry["embedder"]
    if args.embedder not in embedders:     # named by its option: score reads no recipe, there is no [eval.embedder]
        raise PluginError(f"--embedder {printable(args.embedder)}: unknown embedder{did_you_mean(args.embedder, embedders, chr(34))}; "
                          f"available: {', '.join(sorted(embedders)) or 'none installed'}")
    subject = _folder_images(args.subject, "--subject")
    images = _folder_images(args.images, "--images")
    control = _folder_images(args.control, "--control") if args.control is not None else []
    unreadable = [line for flag, files in (("--subject", subject), ("--images", images), ("--control", control))
                  for line in unreadable_images(files, flag)]
    if unreadable:
        raise RecipeError(unreadable)
    raw: dict[str, Any] = {}
    def option_keys(reg: Any) -> set[str]:
        return set(attrs.fields_dict(reg.options)) if reg.options is not None and attrs.has(reg.options) else set()

    takes = option_keys(plugins.get("embedder", args.embedder, "eval.embedder"))
    for flag, key in (("--model", "model"), ("--detector", "detector")):
        value = getattr(args, key)
        if value is not None and key not in takes:   # e.g. dlib: its models come with it
            users = sorted(name for name, r in plugins.registry["embedder"].items() if key in option_keys(r))
            raise RecipeError(f"{flag} applies only with --embedder {' or '.join(users) or 'onnx'} (the "
                              f"{args.embedder} embedder takes no {key} file)")
        if value is not None:
            raw[key] = value
    if args.embedder == "onnx" and not args.model:
        raise RecipeError("--embedder onnx needs --model FILE (an ArcFace ONNX model)")
    report_path = resolved(Path(args.report).expanduser()) if args.report else None
    if report_path is not None:
        _check_report(report_path, args.overwrite, resolved(Path(args.subject).expanduser()))
    embedder = make_embedder(plugins, args.embedder, raw, Path.cwd(), where=("--embedder-options",))
    echo = (lambda _m: None) if args.json else print
    samples = [M.Sample(str(p), p.stem) for p in images] + [M.Sample(str(p), p.stem, control=True) for p in control]
    out_dir = report_path.parent if report_path else None
    ev = Evaluation(embedder, subject, out_dir or Path.cwd(), echo=echo,
                    title=f"Identity score: {Path(args.images).name}", source=f"subject {args.subject}")
    ev.add("images", None, str(args.images), samples)
    entries = ev.entries
    data = {"title": ev.title, "source": ev.source, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "embedder": embedder.describe(), "subject_photos": len(subject), "final": "images", "loras": entries,
            "best": {}, "overfit": {}, "strength_notes": {}, "results": ev.results, "loss_history": [],
            "subject_images": ev.subject_records(), "prompts": [], "strengths": [], "seeds": []}
    if report_path is not None:
        try:
            atomic_write_text(report_path, render(data))
        except OSError as exc:      # the folder became unwritable (a full disk is the writer's DiskFullError already)
            raise OutputError(f"--report {shown(report_path)}: cannot be written ({exc.strerror or exc})") from None
        if not args.json:
            print(f"report: {report_path}")
        data["report"] = str(report_path)      # --json: where the report went (an agent reads it back)
    return _print_result(data, None, args.json)
