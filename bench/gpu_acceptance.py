"""GPU acceptance: every row runs the real CLI (`lora-run RECIPE --set …`) on one CUDA GPU.

    python bench/gpu_acceptance.py [--groups tiny full budget hunyuan whole] [--jobs 6] [--work /tmp/acc]
                                   [--out bench/results] [--doc docs/gpu-acceptance.md] [--only ID …]

Rows (ids are stable; `tests/gpu/test_acceptance.py` runs the tiny rows under pytest):

* ``tiny``: the tiny FLUX.1-dev, HunyuanImage-2.1 and Hunyuan-DiT models (built offline) × memory_mode
  speed with CUDA graphs, speed without, memory, low-vram and auto, bf16, with the whole feature set in the
  same run: a dataset in at least three aspect-ratio buckets, regularisation images, caption dropout,
  text-encoder training (FLUX: CLIP-L LoRA at the playbook's LR ratio, frozen after half the steps),
  samples every 4 steps, checkpoints, the identity evaluation at the end (dlib embedder) and both LoRA
  formats. Plus: SIGKILL mid-run then ``--resume`` against an uninterrupted run, Ctrl-C (exit 130, resumable
  state, ``--resume`` completes), and both LoRA formats reloaded through diffusers on CUDA.
* ``full``: the full-size FLUX.1-dev transformer (random weights, saved and loaded as a diffusers folder)
  in each mode for a few steps; speed mode at 512² with samples every 4 steps (CUDA graphs).
* ``budget``: smaller GPUs emulated with ``[train] gpu_memory_gib`` = 24, 16, 12 at 512² and 1024² (and 8 at
  1024²: T5-XXL is then streamed from host memory for caching), full-size
  transformer *and* full-size CLIP-L + T5-XXL (caching must fit the budget too), ``memory_mode = "auto"``;
  the measured peak (allocator's reserved maximum, caching included) must stay inside the budget.
* ``hunyuan``: the full-size Hunyuan-DiT v1.2 transformer in each mode (HunyuanImage-2.1 with ``--only``).
* ``flux2``: the full-size FLUX.2 [klein] 4B and [dev] transformers (``bench/flux2_fullsize.py``) in each mode at
  1024², and [dev] in 24 and 80 GiB budgets ([dev]'s folder needs 65 GB of disk).
* ``recipes``: every other shipped recipe (FLUX.1 high-fidelity, Hunyuan-DiT, HunyuanImage-2.1, FLUX.2 [klein]
  fast and high-fidelity) as a user runs it, default ``memory_mode = "auto"``, on its family's full-size model at
  its own resolution and buckets, with regularisation images, samples and checkpoints, for 8 steps.
* ``whole``: the shipped fast recipe (``recipes/flux/identity-fast.toml``) on the full-size transformer,
  timed and split into load, caching, compilation, steps, samples and evaluation; 100-step rows with and without
  CUDA graphs; and the whole run in two parts that each fit one device call (``-noeval``: the 1500 steps,
  ``-evalonly``: one step, then the default evaluation grid).

Writes ``bench/results/gpu-acceptance-<time>.json`` (raw) and the table in ``docs/gpu-acceptance.md``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO / "core", REPO / "plugins", HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

FAMILIES = {"flux": "flux.1-dev", "image": "hunyuan-image-2.1", "dit": "hunyuan-dit-1.2", "klein": "flux.2-klein",
            "dev": "flux.2-dev"}
MODES = {"speed-graphs": ("speed", "on"), "speed": ("speed", "off"), "memory": ("memory", "auto"),
         "low-vram": ("low-vram", "auto"), "auto": ("auto", "auto")}


# ------------------------------------------------------------------------------------------------- rows
def _row(id: str, group: str, family: str, sets: dict[str, Any], kind: str = "run", model: str = "tiny",
         timeout: int = 600, **extra: Any) -> dict[str, Any]:
    return {"id": id, "group": group, "family": family, "sets": sets, "kind": kind, "model": model,
            "timeout": timeout, **extra}


def tiny_rows() -> list[dict[str, Any]]:
    rows = []
    for fam in ("flux", "image", "dit"):
        for label, (mode, graphs) in MODES.items():
            rows.append(_row(f"tiny-{fam}-{label}", "tiny", fam,
                             {"train.memory_mode": mode, "train.cuda_graphs": graphs},
                             eval=(label == "auto")))
    for label in ("speed-graphs", "auto"):     # FLUX.2 [klein]: the fastest and the default plan, evaluation on auto
        mode, graphs = MODES[label]
        rows.append(_row(f"tiny-klein-{label}", "tiny", "klein",
                         {"train.memory_mode": mode, "train.cuda_graphs": graphs}, eval=(label == "auto")))
    rows.append(_row("tiny-flux-kill-resume", "tiny", "flux", {"train.memory_mode": "speed",
                                                               "train.cuda_graphs": "on"}, kind="kill-resume"))
    rows.append(_row("tiny-flux-ctrl-c", "tiny", "flux", {"train.memory_mode": "memory"}, kind="ctrl-c"))
    rows.append(_row("tiny-flux-formats", "tiny", "flux", {"train.memory_mode": "auto"}, kind="formats"))
    for fam in ("flux", "image"):      # `[train] fp8_matmul` (opt-in float8 GEMMs), with CUDA graphs
        rows.append(_row(f"tiny-{fam}-fp8mm", "tiny", fam, {"train.memory_mode": "speed", "train.cuda_graphs": "on",
                                                           "train.fp8_matmul": True}))
    return rows


def full_rows() -> list[dict[str, Any]]:
    rows = [_row("full-flux-512-speed-samples", "full", "flux",
                 {"train.memory_mode": "speed", "train.steps": 12, "sample.every_steps": 4}, model="flux-full-encoders",
                 resolution=512, timeout=240, gib=34)]
    for mode, gib in (("speed", 46), ("memory", 35), ("low-vram", 16)):
        rows.append(_row(f"full-flux-1024-{mode}", "full", "flux", {"train.memory_mode": mode, "train.steps": 8},
                         model="flux-full-encoders", resolution=1024, timeout=240, gib=gib))
    rows.append(_row("full-flux-1024-fp8mm", "full", "flux", {"train.memory_mode": "speed", "train.steps": 8,
                                                              "train.fp8_matmul": True},
                     model="flux-full-encoders", resolution=1024, timeout=240, gib=36))
    return rows


def budget_rows() -> list[dict[str, Any]]:
    rows = []
    for res, gib in ((1024, 24), (1024, 12), (512, 16), (1024, 16), (512, 24), (512, 12), (1024, 8)):
        rows.append(_row(f"budget-flux-{res}-{gib}gib", "budget", "flux",
                         {"train.memory_mode": "auto", "train.gpu_memory_gib": float(gib), "train.steps": 6},
                         model="flux-full-encoders", resolution=res, budget=gib, timeout=300, gib=gib,
                         eval=(res, gib) == (1024, 24)))
    return rows


def hunyuan_rows() -> list[dict[str, Any]]:
    rows = []
    for mode in ("speed", "memory", "low-vram", "auto"):
        rows.append(_row(f"full-dit-1024-{mode}", "hunyuan", "dit", {"train.memory_mode": mode, "train.steps": 6},
                         model="dit-full", resolution=1024, timeout=300, gib=20))
    for mode in ("speed", "memory"):
        rows.append(_row(f"full-image-1024-{mode}", "hunyuan-image", "image",
                         {"train.memory_mode": mode, "train.steps": 4}, model="image-full", resolution=1024,
                         timeout=360, gib=100 if mode == "speed" else 60))
    return rows


def whole_rows(steps: int) -> list[dict[str, Any]]:
    fast = "flux/identity-fast.toml"
    return [_row("whole-flux-fast-recipe", "whole", "flux", {"train.steps": steps}, kind="whole",
                 model="flux-full-encoders", recipe=fast, timeout=580, gib=139),
            _row("whole-flux-fast-recipe-short", "whole", "flux", {"train.steps": 100}, kind="whole",
                 model="flux-full-encoders", recipe=fast, timeout=480, gib=139,
                 whole_sets={"eval.seeds": [1], "train.cuda_graphs": "on"},
                 # the ~43 s each token count cost to record: is any of it recompilation?
                 env={"TORCH_LOGS": "recompiles,perf_hints"}),
            # the same steps without CUDA graphs, for the ratio the graphs buy on the recipe's bucket shapes
            # (`auto` leaves graphs off for 100 steps over 3 token counts: recording costs more than they save)
            _row("whole-flux-fast-recipe-short-nographs", "whole", "flux", {"train.steps": 100}, kind="whole",
                 model="flux-full-encoders", recipe=fast, timeout=300, gib=139,
                 whole_sets={"train.cuda_graphs": "off", "eval.enabled": False}),
            # The whole run in two parts that each fit one device call (a background run did not survive from one
            # call to the next on 2026-12-03): the 1500 steps with their samples and checkpoints but no
            # evaluation, and the evaluation's default grid after one step (its `evaluate_s` is the part to add)
            _row("whole-flux-fast-recipe-noeval", "whole", "flux", {"train.steps": 1500}, kind="whole",
                 model="flux-full-encoders", recipe=fast, timeout=560, gib=139,
                 whole_sets={"eval.enabled": False}),
            _row("whole-flux-fast-recipe-evalonly", "whole", "flux", {"train.steps": 1}, kind="whole",
                 model="flux-full-encoders", recipe=fast, timeout=560, gib=139,
                 whole_sets={"train.cuda_graphs": "off"})]


#: Every shipped recipe but the fast FLUX.1 one (the ``whole`` row), its full-size model and resolution.
SHIPPED = (("flux/identity-hifi.toml", "flux", "flux-full-encoders", 768),
           ("hunyuan-dit/identity.toml", "dit", "dit-full", 1024),
           ("hunyuan-image/identity.toml", "image", "image-full", 1024),
           ("flux2/identity-fast.toml", "klein", "klein-4b-full", 512),
           ("flux2/identity-hifi.toml", "klein", "klein-4b-full", 768))


def recipe_rows() -> list[dict[str, Any]]:
    """Each shipped recipe as a user runs it (its own LoRA, optimizer, schedule, buckets and default
    ``memory_mode = "auto"``) on its family's full-size model: a few steps with samples and checkpoints. This is
    the issue's "the default plan on CUDA completes every shipped recipe's run shape"."""
    return [_row(f"recipe-{path.split('.')[0].replace('/', '-')}", "recipes", fam,
                 {"train.steps": 8, "sample.every_steps": 4},
                 kind="recipe", model=model, resolution=res, recipe=path, timeout=480,
                 gib=100 if fam == "image" else 50) for path, fam, model, res in SHIPPED]


def flux2_rows() -> list[dict[str, Any]]:
    """FLUX.2 full size (bench/flux2_fullsize.py): [klein] 4B and [dev] 32 B in each mode at 1024², [dev] in 24
    and 80 GiB budgets. [dev]'s folder is 65 GB: its rows need a machine with that much free disk (or
    ``$LORA_RUN_BENCH_SPILL``)."""
    import flux2_fullsize

    return [{**r, "gib": r.get("budget") or (100 if r["family"] == "dev" else 40)} for r in flux2_fullsize.rows()]


def all_rows(whole_steps: int = 200) -> list[dict[str, Any]]:
    return (tiny_rows() + full_rows() + budget_rows() + hunyuan_rows() + flux2_rows() + recipe_rows()
            + whole_rows(whole_steps))


# ---------------------------------------------------------------------------------------------- assets
def build_assets(work: Path, models: set[str]) -> dict[str, Path]:
    from lora_run_native.demo import build_dataset

    assets: dict[str, Path] = {}
    data = work / "data"
    if not (data / "subject").is_dir():
        build_dataset(data)
    assets["subject"], assets["reg"] = data / "subject", data / "reg"
    for base in (512, 768, 1024):
        big = work / f"data-{base}"
        if not big.is_dir():
            _scaled_dataset(data / "subject", big, base)
        assets[f"subject-{base}"] = big
        reg = work / f"reg-{base}"
        if not reg.is_dir():
            _scaled_dataset(data / "reg", reg, base)
        assets[f"reg-{base}"] = reg
    if "tiny" in models:
        from lora_run_devtools.testing import build_tiny

        for key in ("flux", "image", "dit", "klein"):
            folder = work / "models" / f"tiny-{key}"
            if not (folder / "model_index.json").is_file():
                build_tiny(FAMILIES[key], folder)
            assets[f"tiny-{key}"] = folder
    import fullsize

    import flux2_fullsize

    FAMILIES.update(flux2_fullsize.FAMILIES)
    builders = {**flux2_fullsize.builders(), "flux-full": lambda f: fullsize.build_flux(f, "tiny"),
                "flux-full-encoders": lambda f: fullsize.build_flux(f, "full"),
                "dit-full": fullsize.build_hunyuan_dit, "image-full": fullsize.build_hunyuan_image}
    for key, builder in builders.items():
        if key in models:
            started = time.perf_counter()
            try:
                assets[key] = builder(work / "models" / key)
            except (Exception, SystemExit) as exc:     # its rows fail with this; the other models' rows still run
                shutil.rmtree(work / "models" / key, ignore_errors=True)     # the disk it filled, for the others
                assets[key] = NotBuilt(f"model {key} not built: {type(exc).__name__}: {str(exc)[:300]}")
                print(assets[key].why, flush=True)
                continue
            print(f"built {key} in {time.perf_counter() - started:.0f} s", flush=True)
    return assets


class NotBuilt(NamedTuple):
    """A model whose builder failed (a full disk, say): why, for each row that needs it."""
    why: str


def _scaled_dataset(source: Path, out: Path, base: int) -> None:
    """The demo's drawings scaled to `base`-pixel buckets (three aspect ratios), captions kept."""
    from PIL import Image

    out.mkdir(parents=True)
    for image in sorted(source.glob("*.png")):
        with Image.open(image) as im:
            w, h = im.size
            scale = base / 96
            im.resize((int(w * scale), int(h * scale)), Image.BICUBIC).save(out / image.name)
        shutil.copy(image.with_suffix(".txt"), out / image.with_suffix(".txt").name)


# --------------------------------------------------------------------------------------------- recipes
def model_key_of(row: dict[str, Any]) -> str:
    """The key of a row's model among the built assets: its family's tiny model, or the full-size one it names."""
    return f"tiny-{row['family']}" if row["model"] == "tiny" else row["model"]


def recipe_for(row: dict[str, Any], assets: dict[str, Path]) -> dict[str, Any]:
    fam = row["family"]
    model_key = model_key_of(row)
    res = row.get("resolution", 96)
    tiny = row["model"] == "tiny"
    step = 16 if fam in ("flux", "klein", "dev") else 32
    subject = assets["subject"] if tiny else assets[f"subject-{res}"]
    recipe: dict[str, Any] = {
        "model": {"family": FAMILIES[fam], "source": str(assets[model_key]), "offline": True},
        # tiny: three aspect-ratio buckets (96², 96×80 / 80×96 or 96×64 / 64×96); full size: one square bucket
        "dataset": {"path": str(subject), "trigger": "ohwx", "resolution": res, "min_images": 4,
                    "bucket_min": 64 if tiny else res, "bucket_max": 128 if tiny else res,
                    "bucket_step": step if tiny else 64, "caption_dropout": 0.1},
        "lora": {"rank": 4 if tiny else 32, "alpha": 4.0 if tiny else 32.0,
                 "targets": "all-linear" if tiny else "attention"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"name": "constant"},
        "train": {"steps": 12, "batch_size": 2 if tiny else 1, "mixed_precision": "bf16", "seed": 7,
                  "save_every_steps": 4, "keep_last": 2},
        "sample": {"prompts": ["a photo of {trigger}"], "seeds": [1], "strengths": [1.0],
                   "every_steps": 4 if tiny else None, "steps": 4, "width": 64 if tiny else res,
                   "height": 64 if tiny else res},
        "eval": {"enabled": bool(row.get("eval")), "prompts": ["a portrait of {trigger}", "a portrait"],
                 "strengths": [0.5, 1.0], "seeds": [1], "steps": 4, "width": 64, "height": 64},
        "output": {"name": row["id"], "formats": ["kohya", "diffusers"]},
        "backend": {"name": "native", "native": {"progress_bar": False, "tensorboard": False}},
    }
    if tiny:
        recipe["dataset"]["regularization"] = [{"path": str(assets["reg"]), "weight": 1.0}]
    if fam == "flux":
        recipe["backend"]["native"]["text_max_length"] = 32 if tiny else 128
        if tiny:
            recipe["text_encoder"] = {"train": True, "lr_ratio": 0.4, "train_fraction": 0.5}
    if recipe["sample"]["every_steps"] is None:
        del recipe["sample"]["every_steps"]
    return recipe


def set_args(sets: dict[str, Any]) -> list[str]:
    import tomli_w

    out = []
    for key, value in sets.items():
        rendered = tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
        out += ["--set", f"{key}={rendered}"]
    return out


def cli() -> list[str]:
    exe = shutil.which("lora-run")
    return [exe] if exe else [sys.executable, "-m", "lora_run.cli"]


# ------------------------------------------------------------------------------------------------ runs
def _launch(row: dict[str, Any], assets: dict[str, Path], work: Path, recipe_path: Path | None = None,
            extra: list[str] | None = None, out: Path | None = None, sets: dict[str, Any] | None = None,
            resume: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    import tomli_w

    out = out or work / "runs" / row["id"]
    if recipe_path is None:
        recipe_path = work / "recipes" / f"{row['id']}.toml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(tomli_w.dumps(recipe_for(row, assets)))
    args = [*cli(), str(recipe_path), "--output-dir", str(out), *set_args({**row["sets"], **(sets or {})})]
    args += ["--resume"] if resume else ["--overwrite"]
    args += extra or []
    log = work / "logs" / f"{row['id']}{'-resume' if resume else ''}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **row.get("env", {})}
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work,
                            start_new_session=True)
    return proc, out, log


#: ``--deadline``: the time (``time.monotonic()``) by which every row must have ended, so that a device call's own
#: limit never kills the bench before it has written what a stopped row measured (None: no deadline)
DEADLINE: float | None = None
DEADLINE_MARGIN_S = 20.0


def _limit(timeout: float) -> float:
    """A row's timeout cut to what the deadline leaves (minus a margin for writing its result)."""
    if DEADLINE is None:
        return timeout
    return max(0.0, min(timeout, DEADLINE - time.monotonic() - DEADLINE_MARGIN_S))


#: per row (each row runs in one thread): whether ``--deadline``, not the row's own limit, stopped one of its runs
_ROW = threading.local()
DEADLINE_STOP = "stopped by --deadline (the device call's time, not the row's limit): not a result"


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    limit = _limit(timeout)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if limit < timeout:
            _ROW.deadline_stop = True
        return -9


def manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def tail(log: Path, lines: int = 12) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) (.*)$")
_STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


def run_log_phases(path: Path) -> dict[str, Any]:
    """What a run's ``run.log`` says about its phases when the run did not finish (the manifest's ``timing`` is
    written at the end): seconds from the start to the written cache, from there to the 10th logged step
    (load, compilation and CUDA-graph recording), the logged steps' span and the sample/checkpoint rounds inside
    it, the steady step time (steps between two progress lines with no round in between) and when the final LoRA
    was written. Times are the log's whole seconds, so each figure is good to about a second."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    events: list[tuple[float, str]] = []
    day = 0.0
    for line in lines:
        m = _LOG_LINE.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + day
        if events and t < events[-1][0]:         # past midnight
            day += 86400.0
            t += 86400.0
        events.append((t, m[4]))
    if not events:
        return {}
    start = events[0][0]
    out: dict[str, Any] = {}
    steps = [(t, int(m[1])) for t, text in events if (m := _STEP_LINE.match(text))]
    cache = next((t for t, text in events if text.startswith("cache:")), None)
    if cache is not None:
        out["start_to_cache_s"] = cache - start
    if steps:
        out["last_step"] = steps[-1][1]
        first = next(((t, n) for t, n in steps if n >= 10), steps[0])
        if cache is not None:
            out["cache_to_step10_s"] = first[0] - cache
        out["steps_span_s"] = steps[-1][0] - first[0]
        rounds = sorted(t for t, text in events if text.startswith(("checkpoint ", "samples for step ")))
        steady = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(steps, steps[1:])
                  if b[1] > a[1] and not any(a[0] <= r <= b[0] for r in rounds)]
        if steady:
            per_step = sum(steady) / len(steady)
            out["step_s"] = round(per_step, 4)
            stepped = out["steps_span_s"]
            out["rounds_s"] = round(stepped - per_step * (steps[-1][1] - first[1]), 1)
    written = next((t for t, text in events if text.startswith("LoRA written")), None)
    if written is not None:
        out["to_lora_written_s"] = written - start
    out["logged_s"] = events[-1][0] - start
    return out


def _summary(row: dict[str, Any], rc: int, out: Path, log: Path, wall: float) -> dict[str, Any]:
    m = manifest(out)
    art = m.get("artifacts") or {}
    timing = art.get("timing") or {}
    result = {"id": row["id"], "group": row["group"], "family": FAMILIES[row["family"]], "sets": row["sets"],
              "exit": rc, "status": m.get("status"), "wall_s": round(wall, 1), "step_s": timing.get("step_s"),
              "peak_gib": timing.get("peak_reserved_gib"), "peak_allocated_gib": timing.get("peak_allocated_gib"),
              "plan": (art.get("gpu_plan") or {}).get("plan"), "estimate_gib": (art.get("gpu_plan") or {}).get(
                  "estimate_gib"), "timing": timing, "problems": []}
    if rc != 0 or m.get("status") != "completed":
        result["problems"].append(f"exit {rc}, status {m.get('status')}: {m.get('error') or tail(log, 6)}")
        result["partial_timing"] = run_log_phases(out / "run.log")   # what a stopped run measured
    return result


def _expect_outputs(result: dict[str, Any], row: dict[str, Any], out: Path) -> None:
    """The feature set of a completed run: LoRA files, checkpoints, samples, evaluation."""
    m = manifest(out)
    art = m.get("artifacts") or {}
    formats = row.get("formats") or (("kohya", "diffusers") if row["family"] != "dit" else ("diffusers",))
    for fmt in formats:       # Hunyuan-DiT: diffusers only; a shipped recipe: the formats it lists
        if not art.get(f"lora_{fmt}") or not Path(art[f"lora_{fmt}"]).is_file():
            result["problems"].append(f"no {fmt} LoRA file")
    if row["sets"].get("train.steps", 12) > 4 and not art.get("checkpoints"):
        result["problems"].append("no checkpoint kept")
    every = row["sets"].get("sample.every_steps", 4 if row["model"] == "tiny" else None)
    if every and not art.get("samples"):
        result["problems"].append("no samples written")
    if row.get("eval"):
        if not (out / "eval" / "metrics.json").is_file() or not (out / "eval" / "report.html").is_file():
            result["problems"].append("no evaluation report")
    if "budget" in row and result.get("peak_gib") is not None and result["peak_gib"] > row["budget"]:
        result["problems"].append(f"peak {result['peak_gib']} GiB exceeds the {row['budget']} GiB budget")


def run_row(row: dict[str, Any], assets: dict[str, Path], work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    _ROW.deadline_stop = False
    if _limit(row["timeout"]) < min(60.0, row["timeout"]):
        return {"id": row["id"], "group": row["group"], "family": FAMILIES[row["family"]], "sets": row["sets"],
                "exit": None, "wall_s": 0.0, "passed": False, "stopped": DEADLINE_STOP,
                "problems": ["not started: under a minute of --deadline left"]}
    model = assets.get(model_key_of(row))
    if isinstance(model, NotBuilt):
        return {"id": row["id"], "group": row["group"], "family": FAMILIES[row["family"]], "sets": row["sets"],
                "exit": None, "wall_s": 0.0, "passed": False, "problems": [model.why]}
    try:
        if row["kind"] == "kill-resume":
            result = _kill_resume(row, assets, work)
        elif row["kind"] == "ctrl-c":
            result = _ctrl_c(row, assets, work)
        elif row["kind"] in ("recipe", "whole"):      # a shipped recipe as a user runs it, with this machine's paths
            res = row.get("resolution", 512)
            sets = {"model.source": str(assets[row["model"]]), "model.offline": True,
                    "dataset.path": str(assets[f"subject-{res}"]), "output.name": row["id"],
                    "backend.native.progress_bar": False}
            extra = []
            if row["kind"] == "whole":      # the recipe's own schedule of samples and checkpoints, scaled to its steps
                every = max(1, row["sets"]["train.steps"] // 6)
                sets.update({"train.save_every_steps": every, "sample.every_steps": every, **row.get("whole_sets", {})})
            else:
                sets.update({"train.save_every_steps": 4, "eval.enabled": False})
                extra = ["--set", f'dataset.regularization=[{{path = "{assets[f"reg-{res}"]}", weight = 1.0}}]']
            recipe_path = REPO / "recipes" / row["recipe"]
            proc, out, log = _launch(row, assets, work, recipe_path=recipe_path, sets=sets, extra=extra)
            rc = _wait(proc, row["timeout"])
            result = _summary(row, rc, out, log, time.perf_counter() - started)
            if rc == 0:
                import tomllib

                listed = tomllib.loads(recipe_path.read_text()).get("output", {}).get("formats")
                evaluated = row["kind"] == "whole" and row.get("whole_sets", {}).get("eval.enabled", True)
                _expect_outputs(result, {**row, "formats": listed or ("diffusers",), "eval": evaluated},
                                out)
        else:
            proc, out, log = _launch(row, assets, work)
            rc = _wait(proc, row["timeout"])
            result = _summary(row, rc, out, log, time.perf_counter() - started)
            if rc == 0:
                _expect_outputs(result, row, out)
                if row["kind"] == "formats":
                    result.update(_formats_check(row, assets, out))
        if row["kind"] not in ("kill-resume", "ctrl-c"):
            # checkpoints (about 2 GiB each for an all-linear FLUX LoRA with its optimizer state) filled the lent
            # machine's 64 GiB disk during one session: the row has been measured, its logs and files stay
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
        result = {"id": row["id"], "group": row["group"], "family": FAMILIES[row["family"]], "sets": row["sets"],
                  "exit": None, "problems": [f"{type(exc).__name__}: {exc}"]}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["passed"] = not result["problems"]
    if _ROW.deadline_stop and not result["passed"]:
        result["stopped"] = DEADLINE_STOP
    return result


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    target = out / "checkpoints" / f"step-{step:06d}"
    while time.time() < deadline and proc.poll() is None:
        if target.is_dir():
            return True
        time.sleep(0.05)
    return False


def lora_difference(a: Path, b: Path) -> float:
    """‖a − b‖ / ‖b‖ over all tensors of two LoRA files (same keys required)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise ValueError(f"{a} and {b} hold different keys")
    num = sum(float((ta[k].double() - tb[k].double()).pow(2).sum()) for k in ta)
    den = sum(float(tb[k].double().pow(2).sum()) for k in tb)
    return (num / den) ** 0.5 if den else float(num > 0)


#: A resumed GPU run is held to this relative L2 distance from an uninterrupted one. CUDA kernels are not
#: bitwise deterministic (atomics in attention backward, split-K matmuls), so two *uninterrupted* runs
#: already differ by a small amount; the row measures that floor too and reports both.
RESUME_TOLERANCE = 2e-3


def _kill_resume(row: dict[str, Any], assets: dict[str, Path], work: Path) -> dict[str, Any]:
    ref_row = {**row, "id": row["id"] + "-reference"}
    ref2_row = {**row, "id": row["id"] + "-reference-2"}
    started = time.perf_counter()
    results = {}
    for r in (ref_row, ref2_row):
        proc, out, log = _launch(r, assets, work)
        rc = _wait(proc, row["timeout"])
        results[r["id"]] = (_summary(r, rc, out, log, time.perf_counter() - started), out)
    proc, out, log = _launch(row, assets, work)
    hit = _wait_for_checkpoint(out, proc, 4, row["timeout"])
    time.sleep(0.5)                              # into the next steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc, out, log = _launch(row, assets, work, out=out, resume=True)
    rc = _wait(proc, row["timeout"])
    result = _summary(row, rc, out, log, time.perf_counter() - started)
    if not hit:
        result["problems"].append("the run ended before its first checkpoint; nothing was killed")
    ref, ref_out = results[ref_row["id"]]
    ref2, ref2_out = results[ref2_row["id"]]
    result["problems"] += ref["problems"] + ref2["problems"]
    if not result["problems"]:
        name = f"{row['id']}.safetensors"
        diff = lora_difference(out / name, ref_out / name.replace(row["id"], ref_row["id"]))
        floor = lora_difference(ref2_out / name.replace(row["id"], ref2_row["id"]),
                                ref_out / name.replace(row["id"], ref_row["id"]))
        result.update(resume_vs_uninterrupted=diff, uninterrupted_vs_uninterrupted=floor,
                      tolerance=RESUME_TOLERANCE)
        if diff > RESUME_TOLERANCE:
            result["problems"].append(f"resumed LoRA differs by {diff:.2e} (> {RESUME_TOLERANCE:g}; two "
                                      f"uninterrupted runs differ by {floor:.2e})")
    return result


def _ctrl_c(row: dict[str, Any], assets: dict[str, Path], work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc, out, log = _launch(row, assets, work, sets={"train.steps": 40, "train.save_every_steps": 100})
    deadline = time.time() + row["timeout"]
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if "GPU plan" in text and (out / "run.log").is_file() and "step 10/" in (out / "run.log").read_text():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    rc = _wait(proc, 300)
    result = _summary(row, rc, out, log, time.perf_counter() - started)
    result["problems"] = []
    if rc != 130:
        result["problems"].append(f"Ctrl-C exit {rc}, expected 130: {tail(log, 4)}")
    if not list((out / "checkpoints").glob("step-*")):
        result["problems"].append("Ctrl-C left no resumable checkpoint")
    proc, out, log = _launch(row, assets, work, out=out, resume=True,
                             sets={"train.steps": 40, "train.save_every_steps": 100})
    rc = _wait(proc, row["timeout"])
    resumed = _summary(row, rc, out, log, time.perf_counter() - started)
    result["problems"] += resumed["problems"]
    result.update(step_s=resumed["step_s"], peak_gib=resumed["peak_gib"], plan=resumed["plan"])
    return result


def _formats_check(row: dict[str, Any], assets: dict[str, Path], out: Path) -> dict[str, Any]:
    """Both LoRA files reloaded through diffusers on CUDA: each changes the image, and they agree."""
    import numpy as np

    from lora_run.recipe import load_recipe
    from lora_run_native.generate import generate_images

    recipe = load_recipe(out / "recipe.toml").recipe
    art = manifest(out)["artifacts"]
    job = {"prompt": "a photo of ohwx", "seed": 3, "strength": 1.0, "steps": 4, "guidance": 3.5, "width": 64,
           "height": 64}
    images = {}
    for label, lora in (("base", None), ("kohya", art["lora_kohya"]), ("diffusers", art["lora_diffusers"])):
        [done] = generate_images(recipe, lora, [{**job, "name": label}], out / "formats-check", device="cuda")
        from PIL import Image

        images[label] = np.asarray(Image.open(done["path"]), dtype=np.float64)
    change = {k: float(np.abs(images[k] - images["base"]).mean()) for k in ("kohya", "diffusers")}
    agree = float(np.abs(images["kohya"] - images["diffusers"]).mean())
    problems = [f"{k} LoRA does not change the image" for k, v in change.items() if v < 0.5]
    if agree > 0.25 * min(change.values()):
        problems.append(f"kohya and diffusers images differ by {agree:.2f} (changes {change})")
    return {"formats": {"change_vs_base": change, "kohya_vs_diffusers": agree}, "problems": problems}


# ------------------------------------------------------------------------------------------------ main
def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "diffusers", "peft", "transformers", "accelerate", "flash-attn-4"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
            "commit": os.environ.get("LORA_RUN_COMMIT") or _git_commit(),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "python": platform.python_version(), **versions}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """A row's step time and peak as table cells, and its mark when it shared the GPU."""
    step = f"{r['step_s']:.3f}" if isinstance(r.get("step_s"), float) else "–"
    peak = f"{r['peak_gib']:.1f}" if isinstance(r.get("peak_gib"), (int, float)) else "–"
    return step, peak, "*" if r.get("shared_gpu") else ""


def markdown(env: dict[str, Any], results: list[dict[str, Any]]) -> str:
    calls = env.get("invocations") or [env["date"]]
    head = (f"Run of `bench/gpu_acceptance.py` at commit {env.get('commit') or '(unknown)'}, started {env['date']}"
            f"{f' ({len(calls)} invocations: ' + ', '.join(calls) + ')' if len(calls) > 1 else ''}: "
            f"{env['gpu']} ({env['gpu_memory_gib']} GiB), "
            f"Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
            f"transformers {env['transformers']}, accelerate {env['accelerate']}"
            f"{', flash-attn-4 ' + env['flash-attn-4'] if env.get('flash-attn-4') else ''}. Rows marked * shared "
            "the GPU with other rows (peaks are per process and exact; their step and wall times are not "
            "isolated timings: docs/performance.md has those).")
    lines = [head, "", "| row | configuration | result | step s | peak GiB | wall s | plan / notes |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        conf = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.get("sets", {}).items())
        notes = r.get("plan") or ""
        if "resume_vs_uninterrupted" in r:
            notes += (f"; resumed vs uninterrupted {r['resume_vs_uninterrupted']:.1e}, two uninterrupted runs "
                      f"{r['uninterrupted_vs_uninterrupted']:.1e} (tolerance {r['tolerance']:g})")
        if "formats" in r:
            f = r["formats"]
            notes += (f"; image change vs base: kohya {f['change_vs_base']['kohya']:.1f}, diffusers "
                      f"{f['change_vs_base']['diffusers']:.1f}; kohya vs diffusers {f['kohya_vs_diffusers']:.2f}")
        if r.get("group") == "whole" and r.get("timing"):
            t = r["timing"]
            split = ("load_s", "cache_s", "compile_s", "warmup_s", "train_s", "samples_s", "checkpoints_s",
                     "checkpoint_writes_s", "finish_s", "evaluate_s")
            notes += "; split: " + ", ".join(f"{k} {t[k]}" for k in split if k in t)
        if r["problems"]:
            notes += "; " + " | ".join(p.replace("\n", " ")[:300] for p in r["problems"])
        step, peak, star = _cells(r)
        verdict = "pass" if r["passed"] else ("stopped" if r.get("stopped") else "FAIL")
        lines.append(f"| {r['id']}{star} | {r.get('family', '')}: {conf} | {verdict} | "
                     f"{step} | {peak} | {r.get('wall_s', '–')} | {notes.strip('; ')} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: Path, doc: str | None) -> int:
    """One run measured in several invocations (the device's per-call limit): rows joined, invocations listed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    commits = {p["environment"].get("commit") for p in parts}
    if len(commits) != 1:
        print(f"gpu_acceptance --merge: the files were measured at different commits {sorted(map(str, commits))}",
              file=sys.stderr)
        return 2
    env = dict(parts[0]["environment"])
    env["invocations"] = [d for p in parts for d in p["environment"].get("invocations", [p["environment"]["date"]])]
    rows: dict[str, dict[str, Any]] = {}
    for p in parts:
        rows.update({r["id"]: r for r in p["rows"]})
    order = {r["id"]: i for i, r in enumerate(all_rows())}
    results = sorted(rows.values(), key=lambda r: order.get(r["id"], len(order)))
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"gpu-acceptance-{env['date'].replace('-', '').replace(':', '').replace(' ', '-')[:13]}.json"
    target.write_text(json.dumps({"environment": env, "rows": results}, indent=2, default=str))
    if doc:
        Path(doc).write_text(markdown(env, results))
    print(f"{len(results)} rows from {len(parts)} invocations -> {target}")
    return 0 if all(r["passed"] for r in results) else 1


def latest(paths: list[str]) -> tuple[str, int]:
    """Every row of the suite with its newest recorded result across the given runs (no GPU needed): date,
    commit, result, step time, peak and what failed, and the rows no run has measured yet. Returns the markdown
    table and how many rows lack a passing newest result."""
    newest: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            env, rows = data["environment"], data["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for r in rows:
            stamp = env.get("date", "")
            if not r.get("id") or (r.get("stopped") and r["id"] in newest):
                continue        # a row the call's time stopped measured nothing: an earlier result stands
            if r["id"] not in newest or stamp > newest[r["id"]][0] or newest[r["id"]][2].get("stopped"):
                newest[r["id"]] = (stamp, env, r)
    lines = ["| row | newest result | date (UTC) | commit | step s | peak GiB | notes |", "|---|---|---|---|---|---|---|"]
    open_rows = 0
    for row in all_rows():
        if row["id"] not in newest:
            open_rows += 1
            lines.append(f"| {row['id']} | not measured | | | | | |")
            continue
        stamp, env, r = newest[row["id"]]
        passed = bool(r.get("passed"))
        open_rows += not passed
        step, peak, star = _cells(r)
        notes = " | ".join(p.replace("\n", " ")[:160] for p in r.get("problems") or [])
        if r.get("partial_timing"):
            notes += f" (partial timing: {r['partial_timing']})"
        verdict = "pass" if passed else ("stopped" if r.get("stopped") else "FAIL")
        lines.append(f"| {row['id']}{star} | {verdict} | {stamp.replace(' UTC', '')} | "
                     f"{(env.get('commit') or '?')[:7]} | {step} | {peak} | {notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n" + environments([newest[r["id"]] for r in all_rows() if r["id"] in newest]), open_rows


ENVIRONMENT_KEYS = ("gpu", "gpu_memory_gib", "python", "torch", "diffusers", "peft", "transformers", "accelerate",
                    "flash-attn-4")


def environments(results: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    """Under the `--latest` table: the machine and package versions the results were measured with, one line per
    distinct environment, with how many rows and which dates it covers."""
    groups: dict[tuple, list[str]] = {}
    for stamp, env, _ in results:
        groups.setdefault(tuple(env.get(key) for key in ENVIRONMENT_KEYS), []).append(stamp.replace(" UTC", ""))
    lines = []
    for values, stamps in groups.items():
        v = dict(zip(ENVIRONMENT_KEYS, values))
        if not any(values):
            lines.append(f"- {len(stamps)} row(s): environment not recorded ({min(stamps)} to {max(stamps)} UTC)")
            continue
        lines.append(f"- {len(stamps)} row(s), {min(stamps)} to {max(stamps)} UTC: {v['gpu']} ({v['gpu_memory_gib']} "
                     f"GiB), Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, "
                     f"transformers {v['transformers']}, accelerate {v['accelerate']}, "
                     f"flash-attn-4 {v['flash-attn-4'] or 'not installed'}")
    return "\nMeasured with:\n\n" + "\n".join(lines) + "\n" if lines else ""


class GpuPool:
    """Full-size rows share the GPU when their memory (``gib``) fits together: a row waits until the sum of
    the running rows' shares stays within ``capacity`` GiB and fewer than ``jobs`` run. Each process measures
    its own peak, so the memory columns stay exact; step times of rows that overlapped are marked."""

    def __init__(self, capacity: float, jobs: int):
        self.capacity, self.jobs, self.used, self.running = capacity, jobs, 0.0, 0
        self.cond = threading.Condition()

    CONTEXT_GIB = 1.0    # a process's CUDA context and kernels: memory outside the allocator's peak

    def run(self, row: dict[str, Any], fn) -> dict[str, Any]:
        need = min(float(row.get("gib", self.capacity)) + self.CONTEXT_GIB, self.capacity)
        with self.cond:
            self.cond.wait_for(lambda: self.running < self.jobs and self.used + need <= self.capacity)
            self.used += need
            self.running += 1
        try:
            result = fn(row)
        finally:
            with self.cond:
                self.used -= need
                self.running -= 1
                self.cond.notify_all()
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", nargs="+", default=["tiny", "full", "budget", "hunyuan", "flux2", "recipes", "whole"])
    ap.add_argument("--only", nargs="*", default=None, help="row ids (overrides --groups)")
    ap.add_argument("--jobs", type=int, default=6, help="tiny rows run this many at a time")
    ap.add_argument("--full-jobs", type=int, default=1,
                    help="full-size rows run this many at a time when their memory fits (1: one at a time)")
    ap.add_argument("--overlap", action="store_true", help="full-size rows start while the tiny rows run")
    ap.add_argument("--whole-steps", type=int, default=200)
    ap.add_argument("--whole-timeout", type=int, default=580,
                    help="seconds the whole row may run (a 1500-step run outlasts one device call: start it with "
                         "bench/device_bg.sh and a longer limit)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="every row ends within this many seconds of the bench's start (a row is stopped in time to "
                         "record what its run.log measured; one that would get under a minute is not started): give "
                         "a device call's limit less its set-up")
    ap.add_argument("--work", default="/tmp/lora-run-acceptance")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--doc", default=None, help="write the table here (e.g. docs/gpu-acceptance.md)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no GPU needed: join the JSON files of several invocations of one run (same commit) into "
                         "one JSON under --out and one table (--doc)")
    ap.add_argument("--latest", nargs="*", default=None, metavar="JSON",
                    help="no GPU needed: every row's newest result across these runs (default: every "
                         "bench/results/gpu-acceptance-*.json), and the rows not measured yet")
    args = ap.parse_args()
    if args.latest is not None:
        table, open_rows = latest(args.latest or sorted(map(str, (HERE / "results").glob("gpu-acceptance-*.json"))))
        print(table, end="")
        return 0 if open_rows == 0 else 1
    global DEADLINE
    DEADLINE = None if args.deadline is None else time.monotonic() + args.deadline
    if args.merge:
        return merge(args.merge, Path(args.out), args.doc)
    import torch

    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA GPU", file=sys.stderr)
        return 2
    rows = [{**r, "timeout": args.whole_timeout} if r["id"] == "whole-flux-fast-recipe" else r
            for r in all_rows(args.whole_steps)]
    rows = [r for r in rows if r["id"] in args.only] if args.only else [r for r in rows if r["group"] in args.groups]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    results: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"gpu-acceptance-{time.strftime('%Y%m%d-%H%M%S')}.json"
    lock = threading.Lock()

    def record(result: dict[str, Any]) -> None:
        """Print the row and rewrite the JSON and the table (a run cut short keeps what it measured)."""
        with lock:
            results.append(result)
            print(f"{result['id']}: {'pass' if result['passed'] else 'FAIL ' + str(result['problems'])[:400]} "
                  f"step {result.get('step_s')} peak {result.get('peak_gib')} wall {result.get('wall_s')}", flush=True)
            json_path.write_text(json.dumps({"environment": env, "rows": results}, indent=2, default=str))
            if args.doc:
                Path(args.doc).write_text(markdown(env, results))

    tiny = [r for r in rows if r["model"] == "tiny"]
    big = [r for r in rows if r["model"] != "tiny" and r["group"] != "whole"]
    if args.full_jobs > 1:   # rows sharing the machine's CPUs (compilation, caching, offload copies) run longer:
        # at 4 at a time three full-size rows overran their own limits and finished when re-run 3 at a time
        stretch = 1 + 0.5 * (args.full_jobs - 1)
        big = [{**r, "timeout": int(r["timeout"] * stretch)} for r in big]
    whole = [r for r in rows if r["group"] == "whole"]
    assets = build_assets(work, {"tiny"} if tiny else set())

    def tiny_part() -> None:
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for result in pool.map(lambda r: run_row(r, assets, work), tiny):
                record({**result, "shared_gpu": args.jobs > 1 or bool(args.overlap and big)})

    tiny_thread = threading.Thread(target=tiny_part)
    tiny_thread.start()
    if not args.overlap:
        tiny_thread.join()
    assets.update(build_assets(work, {r["model"] for r in big + whole}))
    # Tiny rows running alongside hold about 1.5 GiB each (context, compiled kernels, caches): the first shared
    # run, without this, put two full-size rows out of memory.
    alongside = 1.5 * min(max(1, args.jobs), len(tiny)) if args.overlap else 0.0
    # What is free now, not the card's size: building the full-size models leaves memory in this process (on an
    # H100 its 32 GiB put two of three rows sharing the rest out of memory, 2026-12-05)
    gc.collect()
    torch.cuda.empty_cache()
    gpu = GpuPool(capacity=torch.cuda.mem_get_info(0)[0] / 2**30 - 8 - alongside, jobs=max(1, args.full_jobs))
    with cf.ThreadPoolExecutor(max_workers=max(1, args.full_jobs)) as pool:
        for future in [pool.submit(gpu.run, r, lambda r: run_row(r, assets, work)) for r in big]:
            record({**future.result(), "shared_gpu": args.full_jobs > 1 or bool(args.overlap and tiny)})
    tiny_thread.join()
    for row in whole:          # alone on the GPU: its times are what a user gets
        record(run_row(row, assets, work))
    print(markdown(env, results))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
