"""The evaluator inside a real `execute()` run: a test backend that trains nothing but calls the lifecycle
hooks, saves checkpoint folders shaped like the native backend's, and generates the grid (its `generate`
registration meta) from real faces. Checks loss collection, checkpoint evaluation, the best-checkpoint
pick, metrics.json and the report — and renders that report in headless Chromium."""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_run_training.capabilities import FEATURES
from lora_run.hookspecs import hookimpl
from lora_run.recipe import load_recipe
from lora_run.run import Plan, execute

from .conftest import astronaut_scene, face_free, other_person

STEPS = 12


def fake_generate(recipe, lora_path, jobs, out_dir):
    """Checkpoint 4: other people (weak identity); checkpoint 8: the subject in varied pictures (healthy);
    final: one picture for everything and the subject in the control prompt (sameface + leakage)."""
    name = Path(lora_path).name
    out = []
    for n, job in enumerate(jobs):
        control = "ohwx" not in job["prompt"]
        if "step000004" in name:
            image = face_free()["coffee"] if control else other_person(n)
        elif "step000008" in name:
            image = other_person(30 + n) if control else astronaut_scene(n)
        else:
            image = astronaut_scene(1) if control else astronaut_scene(0)
        path = Path(out_dir) / f"{job['name']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        out.append({**job, "path": str(path)})
    return out


class FakeBackend:
    def __init__(self, ctx):
        self.ctx = ctx

    def plan(self):
        return Plan(backend="fake-gen", family=self.ctx.recipe.model.family, steps=STEPS)

    def run(self):
        ctx = self.ctx
        kept = []
        for step in range(1, STEPS + 1):
            ctx.hook.step_finished(run=ctx, step=step, metrics={"loss": 1.0 / step, "lr": 1e-4})
            if step in (4, 8):
                folder = ctx.run_dir.file("checkpoints", f"step-{step:06d}")
                folder.mkdir(parents=True)
                (folder / "trainable.safetensors").write_bytes(b"state")
                (folder / f"identity-lora-step{step:06d}.safetensors").write_bytes(b"lora")
                (folder / "state.json").write_text(json.dumps(
                    {"step": step, "loras": {"kohya": f"identity-lora-step{step:06d}.safetensors"}}))
                kept.append(str(folder))
                ctx.artifacts["checkpoints"] = list(kept)
                ctx.hook.checkpoint_saved(run=ctx, step=step, path=folder)
        final = ctx.run_dir.file("identity-lora.safetensors")
        final.write_bytes(b"lora")
        ctx.artifacts["lora_kohya"] = str(final)
        ctx.artifacts["steps"] = STEPS


class FakeGenPlugin:
    @hookimpl
    def register_backends(self, register):
        features = {f.name for f in FEATURES} | {"loss:mse", "timestep_sampling:sigmoid"}
        register("fake-gen", FakeBackend, capabilities={"flux.1-dev": features}, generate=fake_generate)


RECIPE = """
backend = "fake-gen"
[model]
source = "black-forest-labs/FLUX.1-dev"
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[train]
steps = 12
[eval]
prompts = ["a portrait photo of {trigger}", "a photo of {trigger} in a city", "a portrait photo of a person"]
strengths = [0.8, 1.0]
seeds = [1, 2]
every_checkpoint = true
"""


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, subject_dir):
    from lora_run.plugins import load_plugins

    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.replace("{dataset}", str(subject_dir)), encoding="utf-8")
    lines = []
    ctx = execute(load_recipe(recipe), load_plugins(extra=[FakeGenPlugin()]), output_dir=str(folder / "out"),
                  echo=lines.append)
    return folder / "out", ctx, lines


def test_the_run_ends_with_the_evaluation(evaluated_run):
    out, ctx, lines = evaluated_run
    assert (out / "eval" / "report.html").is_file() and (out / "eval" / "metrics.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["artifacts"]["eval_report"] == str(out / "eval" / "report.html")
    assert any(line.startswith("eval: best: step 8") for line in lines), lines
    assert not [p for p in (out / "eval").rglob("*.tmp")]


def test_the_evaluation_says_what_its_generation_and_scoring_took(evaluated_run):
    _, _, lines = evaluated_run
    timed = [line for line in lines if re.fullmatch(r"eval: (12 images in|.*: 12 images scored in) [0-9.]+ s.*", line)]
    generated = [line for line in timed if "scored" not in line]
    scored = [line.split(":")[1].strip() for line in timed if "scored" in line]
    assert len(generated) == 3 and scored == ["step 4", "step 8", "final (step 12)"], lines


def test_a_generator_that_times_its_calls_splits_the_generation_from_the_load(tmp_path, subject_dir):
    """With `seconds` on every job the line splits the calls from the rest (the load); planted: a generator whose
    calls take 0.3 s of a 0.5-s generation must show about 0.3 s of calls and 0.2 s of rest."""
    import time as clock

    from lora_run_eval.evaluator import generate_grid

    def timed(recipe, lora_path, jobs, out_dir):
        clock.sleep(0.2)                               # "the load"
        out = []
        for job in jobs:
            clock.sleep(0.3 / len(jobs))
            out.append({**job, "path": str(Path(out_dir) / f"{job['name']}.png"), "seconds": 0.3 / len(jobs)})
        return out

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.replace("{dataset}", str(subject_dir)), encoding="utf-8")
    recipe = load_recipe(path).recipe
    lines: list[str] = []
    generate_grid(timed, recipe, tmp_path / "x.safetensors", tmp_path / "images", lines.append)
    match = re.fullmatch(r"eval: 12 images in ([0-9.]+) s: the pipeline calls ([0-9.]+) s, the rest \(the "
                         r"pipeline's load\) ([0-9.]+) s", lines[-1])
    assert match, lines
    total, calls, rest = map(float, match.groups())
    assert calls == pytest.approx(0.3, abs=0.01) and rest == pytest.approx(total - calls, abs=0.1) and rest >= 0.15


def test_checkpoints_are_evaluated_and_the_best_is_picked(evaluated_run):
    out, ctx, _ = evaluated_run
    data = json.loads((out / "eval" / "metrics.json").read_text())
    assert [e["label"] for e in data["loras"]] == ["step 4", "step 8", "final (step 12)"]
    by = {e["label"]: e for e in data["loras"]}
    assert "weak identity" in by["step 4"]["failures"]
    assert by["step 8"]["failures"] == []
    assert "sameface" in by["final (step 12)"]["failures"] and by["final (step 12)"]["leak_rate"] == 1.0
    assert data["best"]["label"] == "step 8" and "highest quality" in data["best"]["reason"]
    assert ctx.artifacts["best_checkpoint"].endswith("identity-lora-step000008.safetensors")
    grid = data["results"]["final (step 12)"]["images"]
    assert len(grid) == 3 * 2 * 2 and {r["strength"] for r in grid} == {0.8, 1.0}
    assert data["prompts"][0] == "a portrait photo of ohwx"
    assert data["overfit"]["measured"]                  # loss history + checkpoints with faces


def test_the_loss_is_collected_from_step_finished(evaluated_run):
    out, _, _ = evaluated_run
    rows = [json.loads(line) for line in (out / "eval" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[1]["loss"] == pytest.approx(0.5) and rows[1]["lr"] == 1e-4


def test_the_report_is_one_self_contained_file(evaluated_run):
    out, _, _ = evaluated_run
    html = (out / "eval" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "http://" not in html and "https://" not in html and "src=\"file:" not in html
    # the final grid (12 images), the best checkpoint's grid (12) and the 3 subject photos, all embedded
    assert html.count('src="data:image/jpeg;base64,') == 12 + 12 + 3
    assert html.count("<svg") >= 3                                   # loss, identity per checkpoint, strength
    assert "Training loss" in html and "Identity per checkpoint" in html and "Identity vs LoRA strength" in html
    assert "Best: step 8" in html and "sameface" in html
    # the page of its formulas is named as every install has it (a wheel has no docs/ folder)
    assert "<code>lora-run docs evaluation</code>" in html and "docs/evaluation.md" not in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_report_renders_in_headless_chromium(evaluated_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the report was not rendered")
    out, _, _ = evaluated_run
    shot = tmp_path / "report.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1280,2000", (out / "eval" / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]
    assert shot.stat().st_size > 30_000
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.resize((320, 500)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 500           # text, plots and photographs, not a blank page
    grey = np.asarray(image.convert("L"))
    assert (grey < 80).sum() > 5_000                              # dark text and lines on the page …
    assert (grey[:120] < 80).sum() > 500                          # … starting with the title at the top
    assert grey.std() > 20                                        # not a uniform page
    keep = Path(out / "eval" / "report-screenshot.png")
    shutil.copy(shot, keep)                                       # kept next to the report for inspection


@pytest.mark.parametrize("layout", ["flat", "resume"])
def test_checkpoint_folders_give_their_lora_file(tmp_path, layout):
    from lora_run_eval.evaluator import normalise_checkpoints

    step = tmp_path / "checkpoints" / "step-000006"
    state = step / "resume" if layout == "resume" else step
    state.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        (state / name).write_bytes(b"state")
    (step / "diffusers").mkdir()
    (step / "diffusers" / "x-step000006.safetensors").write_bytes(b"lora")
    (step / "x-step000006.safetensors").write_bytes(b"lora")
    assert normalise_checkpoints([str(step)]) == [("step 6", 6, step / "x-step000006.safetensors")]
    (state / "state.json").write_text(json.dumps({"loras": {"diffusers": "diffusers/x-step000006.safetensors"}}))
    found = normalise_checkpoints([{"step": 6, "path": str(step)}, str(tmp_path / "gone")])
    assert found == [("step 6", 6, step / "diffusers" / "x-step000006.safetensors")]


def test_the_report_says_what_the_run_is():
    """The recipe's description heads the report: the demo's says it is a demo on cartoons."""
    from lora_run.recipe import load_recipe
    from lora_run_eval.report import render

    demo = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "demo" / "tiny-flux.toml").recipe
    data = {"results": {}, "embedder": {"name": "dlib", "metric": "L2", "threshold": 0.6}, "about": demo.description}
    html = render(data)
    assert "demo" in demo.description and "cartoon" in demo.description and "expected" in demo.description
    assert 'class="card about"' in html and "cartoon drawings" in html
    assert 'class="card about"' not in render({**data, "about": ""})


def test_metrics_json_has_exactly_the_documented_keys(evaluated_run):
    """docs/evaluation.md's schema is the file's: every top-level key and every per-LoRA result key, no more, no
    fewer (a key renamed or added in the code and not on the page fails here)."""
    out, _, _ = evaluated_run
    page = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    block = page.split("## `metrics.json`", 1)[1].split("```", 2)[1]
    documented = set(re.findall(r'"([a-z_]+)"', block))
    inner = re.search(r'"results": \{label: \{([^}]*?)failures:', block, re.S).group(1)
    result_keys = {k.strip() for k in inner.replace("\n", " ").split(",") if k.strip()} | {"failures"}
    data = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(data) == documented
    for result in data["results"].values():
        assert set(result) == result_keys


def _run_with_generator(folder: Path, subject_dir: Path, generate, monkeypatch) -> tuple[list[str], dict]:
    """A run whose backend's `generate` is ``generate``; the order in which images were written (``write NAME``,
    appended by the generator) and handed to the embedding pool (``submit NAME``), and the metrics written."""
    from lora_run.plugins import load_plugins
    from lora_run_eval import faces

    events: list[str] = []
    submit = faces.EmbeddingPool.submit

    def spied(self, path):
        events.append(f"submit {Path(path).stem}")
        return submit(self, path)
    monkeypatch.setattr(faces.EmbeddingPool, "submit", spied)

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            features = {f.name for f in FEATURES} | {"loss:mse", "timestep_sampling:sigmoid"}
            register("fake-gen", FakeBackend, capabilities={"flux.1-dev": features},
                     generate=functools.partial(generate, events))     # its signature: generate's

    folder.mkdir()
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.replace("{dataset}", str(subject_dir)).replace("every_checkpoint = true",
                                                                            "every_checkpoint = false"))
    execute(load_recipe(recipe), load_plugins(extra=[Plugin()]), output_dir=str(folder / "out"),
            echo=lambda _line: None)
    return events, json.loads((folder / "out" / "eval" / "metrics.json").read_text())


def test_the_images_are_scored_while_the_next_ones_are_generated(tmp_path, subject_dir, monkeypatch):
    """A generator that takes `on_image` tells the evaluation of each image as it writes it, and the evaluation hands
    it to the embedding pool at once, before the next image is made; the metrics are those of the same images scored
    after the generation. Control: a generator without `on_image` has its images handed over after it returns."""
    def reporting(events, recipe, lora_path, jobs, out_dir, on_image=None):
        done = []
        for job in fake_generate(recipe, lora_path, jobs, out_dir):
            events.append(f"write {job['name']}")
            on_image(job)
            done.append(job)
        return done

    def silent(events, recipe, lora_path, jobs, out_dir):
        done = fake_generate(recipe, lora_path, jobs, out_dir)
        events.extend(f"write {job['name']}" for job in done)
        return done

    events, metrics = _run_with_generator(tmp_path / "a", subject_dir, reporting, monkeypatch)
    writes = [e.split()[1] for e in events if e.startswith("write")]
    assert len(writes) == 12 and [e.split()[1] for e in events if e.startswith("submit")][:3] == ["a0", "a1", "a2"]
    for name, after in zip(writes, writes[1:]):
        assert events.index(f"submit {name}") < events.index(f"write {after}"), events
    control, control_metrics = _run_with_generator(tmp_path / "b", subject_dir, silent, monkeypatch)
    last_write = max(i for i, e in enumerate(control) if e.startswith("write"))
    assert all(control.index(f"submit {name}") > last_write for name in writes)
    same = json.dumps(metrics["results"]).replace(str(tmp_path / "a"), "RUN")
    assert same == json.dumps(control_metrics["results"]).replace(str(tmp_path / "b"), "RUN")

    def wrapped(events, *args, **kwargs):     # takes any keyword, passes them to one that refuses `on_image`
        return silent(events, *args, **kwargs)

    retried, retried_metrics = _run_with_generator(tmp_path / "c", subject_dir, wrapped, monkeypatch)
    assert sum(e.startswith("write") for e in retried) == 12
    assert json.dumps(retried_metrics["results"]).replace(str(tmp_path / "c"), "RUN") == same
