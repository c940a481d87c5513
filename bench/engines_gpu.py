"""The real engines on one GPU: lora-run's `kohya` and `diffusion-pipe` backends driving sd-scripts and
diffusion-pipe, next to the `native` backend, on the shipped FLUX fast recipe (and the HunyuanImage recipe
when its files are given). See bench/engines_gpu.md for the wheels, the checkouts and the exact command.

    python bench/engines_gpu.py --sd-scripts engines/sd-scripts --diffusion-pipe engines/diffusion-pipe \
        --site-sd-scripts engines/site-sd-scripts --site-diffusion-pipe engines/site-diffusion-pipe \
        [--rows kohya-flux dpipe-flux native-flux] [--steps 24] [--size reduced|full] [--work /tmp/engines]
        [--hunyuan-files DIR]   # real HunyuanImage-2.1 files (dit, vae, qwen, byt5) for the *-hunyuan rows

Per row: build random-weight model files in the layout the engine loads (sd-scripts: BFL single files from
its own classes via bench/engine_models.py; diffusion-pipe and native: a diffusers FluxPipeline folder),
run `lora-run recipes/flux/identity-fast.toml --set backend.name=…` for ``--steps`` steps with checkpoints
and samples, sample the GPU's memory with nvidia-smi, then a second run that gets SIGINT mid-way (exit 130,
resumable state) and its `--resume`, and two error runs (a truncated model file; an option the engine
rejects). Writes ``bench/results/engines-gpu-<time>.json`` (raw) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "flux" / "identity-fast.toml"
HUNYUAN_RECIPE = ROOT / "recipes" / "hunyuan-image" / "identity.toml"
#: the progress lines lora-run prints: `step 3/24  loss 0.41  2.10 it/s …` (kohya, native) and
#: `diffusion-pipe: step 3/24 (12%)  loss 0.4100  lr 1.00e-04  0.48 s/it  ETA …` (diffusion-pipe, every ~10 s)
STEP = re.compile(r"^(?:diffusion-pipe: )?step (\d+)/(\d+)(?: \(\d+%\))?(?:\s+loss ([\d.naif]+))?(?:\s+lr \S+)?"
                  r"(?:\s+([\d.]+) (it/s|s/it))?")


def _steps(text: str) -> list[tuple[int, float | None, float | None]]:
    """(step, loss, it/s) of every progress line in lora-run's output."""
    out = []
    for m in (STEP.match(line.strip()) for line in text.splitlines()):
        if m:
            rate = float(m[4]) if m[4] else None
            if rate and m[5] == "s/it":
                rate = 1.0 / rate
            out.append((int(m[1]), float(m[3]) if m[3] else None, rate))
    return out


class GpuMemory(threading.Thread):
    """Peak `memory.used` of GPU 0 (MiB) while a row runs: the engine is another process, so nvidia-smi."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.baseline = self._read()
        self._halt = threading.Event()

    @staticmethod
    def _read() -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return 0

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.peak = max(self.peak, self._read())

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(5)
        return {"peak_used_gib": round(self.peak / 1024, 2), "baseline_gib": round(self.baseline / 1024, 2)}


def lora_run(args: list[str], env: dict[str, str], log: Path, *, interrupt_at: int | None = None,
             timeout: float = 3600) -> dict[str, Any]:
    """Run the lora-run CLI (optionally SIGINT once it reports step `interrupt_at` or later); time it."""
    cmd = [sys.executable, "-m", "lora_run.cli", *args]
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        interrupted = None
        while proc.poll() is None and time.monotonic() - started < timeout:
            time.sleep(1)
            if interrupt_at and interrupted is None and any(
                    step >= interrupt_at for step, _, _ in _steps(log.read_text("utf-8", "replace"))):
                proc.send_signal(signal.SIGINT)
                interrupted = time.monotonic()
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    text = log.read_text("utf-8", "replace")
    steps = _steps(text)
    return {"rc": rc, "seconds": round(time.monotonic() - started, 1), "log": str(log),
            "stopped_after_sigint_s": round(time.monotonic() - interrupted, 1) if interrupted else None,
            "steps": steps, "last_lines": text.splitlines()[-12:]}


def make_dataset(folder: Path, n: int = 8, size: int = 512) -> Path:
    from PIL import Image
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (size, size) if i % 2 else (size, size * 3 // 4)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"ohwx, a photo number {i}\n", "utf-8")
    return folder


def build_flux_single_files(a: argparse.Namespace, work: Path) -> dict[str, str]:
    out = work / f"flux-single-{a.size}"
    if (out / "layout.json").is_file():
        return json.loads((out / "layout.json").read_text())
    double, single, t5 = (19, 38, 24) if a.size == "full" else (2, 4, 2)
    env = engine_env(a.site_sd_scripts, t5_layers=None)
    subprocess.run([sys.executable, str(ROOT / "bench" / "engine_models.py"), "flux", "--sd-scripts",
                    str(a.sd_scripts), "--out", str(out), "--double", str(double), "--single", str(single),
                    "--t5-layers", str(t5)], check=True, env=env)
    return json.loads((out / "layout.json").read_text())


def build_hunyuan_files(a: argparse.Namespace, work: Path) -> dict:
    """Random-weight HunyuanImage-2.1 files for sd-scripts (bench/engine_models.py): reduced = 1 double +
    1 single DiT block and Qwen2.5-VL with 2 language layers + 1 vision block (full width); full = the
    engine's sizes (about 17B + 8B parameters: some 50 GB of bf16 files)."""
    out = work / f"hunyuan-sd-scripts-{a.size}"
    if (out / "layout.json").is_file():
        return json.loads((out / "layout.json").read_text())
    sizes = ("0", "0", "0", "0") if a.size == "full" else ("1", "1", "2", "1")
    subprocess.run([sys.executable, str(ROOT / "bench" / "engine_models.py"), "hunyuan", "--sd-scripts",
                    str(a.sd_scripts), "--out", str(out), "--double", sizes[0], "--single", sizes[1],
                    "--qwen-layers", sizes[2], "--qwen-vision", sizes[3]], check=True, env=engine_env(a.site_sd_scripts, None))
    return json.loads((out / "layout.json").read_text())


def build_flux_diffusers(a: argparse.Namespace, work: Path) -> Path:
    """A FluxPipeline folder (diffusion-pipe and native read the configs): tiny, or the full-size transformer."""
    out = work / f"flux-diffusers-{a.size}"
    if (out / "model_index.json").is_file():
        return out
    code = ("import sys; from lora_run_native.tiny import build_tiny_flux; build_tiny_flux(sys.argv[1])"
            if a.size != "full" else
            "import sys; sys.path.insert(0, 'bench'); from fullsize import build_flux; build_flux(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=engine_env(a.site_diffusion_pipe, None),
                   cwd=ROOT)
    return out


#: what a wrapper exports besides PYTHONPATH (the shim's variables and the offline hub cache)
WRAPPER_VARS = ("LORA_RUN_T5_LAYERS", "LORA_RUN_HY_BLOCKS", "LORA_RUN_QWEN_LAYERS", "HF_HUB_CACHE", "HF_HUB_OFFLINE")


def engine_env(site: Path | None, t5_layers: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that needs the engine's packages (``site`` first on PYTHONPATH);
    ``extra``: the shim's variables and HF_HUB_CACHE of a reduced HunyuanImage-2.1 layout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    parts = [str(site)] if site else []
    parts += [str(ROOT / "core"), str(ROOT / "plugins")]
    if t5_layers:
        env["LORA_RUN_T5_LAYERS"] = str(t5_layers)
    env.update(extra or {})
    if any(k.startswith("LORA_RUN_") for k in (extra or {})) or t5_layers:
        parts.append(str(ROOT / "bench" / "engine_shim"))
    env["PYTHONPATH"] = os.pathsep.join(parts + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def lora_run_env() -> dict[str, str]:
    """lora-run itself runs with the machine's packages (the engines get theirs through the wrappers below)."""
    return engine_env(None, None)


def wrapper(work: Path, name: str, site: Path | None, t5_layers: int | None, module: str | None = None,
            extra: dict[str, str] | None = None) -> Path:
    """An executable that runs the machine's Python with an engine's packages first on PYTHONPATH: lora-run
    launches it as `[backend.kohya] python` or `[backend.diffusion-pipe] deepspeed`, so only the engine sees
    its pinned transformers/accelerate/diffusers."""
    env = engine_env(site, t5_layers, extra)
    path = work / name
    exports = "".join(f"export {k}={json.dumps(env[k])}\n" for k in ("PYTHONPATH", *WRAPPER_VARS) if k in env)
    run = f'exec {sys.executable} -m {module} "$@"' if module else f'exec {sys.executable} "$@"'
    path.write_text(f"#!/bin/sh\n{exports}{run}\n", "utf-8")
    path.chmod(0o755)
    return path


def row_sets(row: str, a: argparse.Namespace, work: Path, data: Path) -> tuple[list[str], dict[str, str]]:
    steps = a.steps
    common = ["--set", f"dataset.path={data}", "--set", f"train.steps={steps}",
              "--set", f"train.save_every_steps={max(2, steps // 3)}", "--set", "train.keep_last=2",
              "--set", "train.noise_offset=0", "--set", "scheduler.warmup_steps=2", "--set", "model.offline=true",
              "--set", "eval.enabled=false"]
    for assignment in a.extra_set:   # e.g. model.base_precision=bf16: a row's variant
        common += ["--set", assignment]
    if row.startswith("dpipe"):
        # diffusion-pipe samples nothing during training, has no Adafactor, no module list and forces alpha =
        # rank: the settings of the shipped recipes it cannot honour (lora-run check refuses them with the
        # reason) are changed here
        import tomllib

        recipe = tomllib.loads((HUNYUAN_RECIPE if row.endswith("hunyuan") else RECIPE).read_text("utf-8"))
        rank = 4 if a.resolution != 512 else recipe.get("lora", {}).get("rank", 16)
        common += ["--unset", "sample.every_steps", "--set", "optimizer.name=adamw", "--set", "lora.targets=all-linear",
                   "--set", f"lora.alpha={float(rank)}"]
    elif row == "kohya-hunyuan" and a.resolution != 512:
        # sd-scripts' HunyuanImage sampling (hunyuan_image_minimal_inference.generate_body) feeds bf16 latents
        # to the DiT; with fp32 training (the CPU smoke run) the first sample stops the run, so none there
        common += ["--unset", "sample.every_steps"]
    else:
        common += ["--set", f"sample.every_steps={max(2, steps // 2)}", "--set", "sample.steps=4"]
        if row.endswith("hunyuan") and a.resolution == 512:
            common += ["--set", "sample.width=512", "--set", "sample.height=512"]
    if row.endswith("hunyuan") and a.resolution == 512:   # the recipe trains at 1024²; the bench rows at 512²
        common += ["--set", "dataset.resolution=512", "--set", "dataset.bucket_min=256", "--set", "dataset.bucket_max=1024"]
    if a.resolution != 512:   # a CPU smoke run: smaller images (the shipped recipe trains at 512)
        common += ["--set", f"dataset.resolution={a.resolution}", "--set", f"dataset.bucket_min={a.resolution // 2}",
                   "--set", f"dataset.bucket_max={a.resolution * 2}", "--set", "train.mixed_precision=no",
                   "--set", "model.base_precision=bf16", "--set", "lora.rank=4"]
        if not row.startswith("dpipe") and row != "kohya-hunyuan":
            common += ["--set", f"sample.width={a.resolution}", "--set", f"sample.height={a.resolution}"]
    dpipe = ["--set", "backend.name=diffusion-pipe", "--set", f"backend.diffusion-pipe.path={a.diffusion_pipe}",
             "--set", f"backend.diffusion-pipe.deepspeed="
                      f"{wrapper(work, 'deepspeed-dpipe', a.site_diffusion_pipe, None, module='deepspeed.launcher.runner')}"]
    if row == "kohya-flux":
        files = build_flux_single_files(a, work)
        t5 = None if files["t5_layers"] == 24 else files["t5_layers"]
        python = wrapper(work, "python-sd-scripts", a.site_sd_scripts, t5)
        sets = ["--set", "backend.name=kohya", "--set", f"backend.kohya.sd_scripts={a.sd_scripts}",
                "--set", f"backend.kohya.python={python}",
                "--set", f"backend.kohya.tokenizer_cache_dir={files['tokenizers']}"]
        for key in ("transformer", "vae", "clip_l", "t5xxl"):
            sets += ["--set", f"model.files.{key}={files[key]}"]
        return common + sets, lora_run_env()
    if row == "dpipe-flux":
        # diffusion-pipe loads FLUX.1 from a diffusers folder (the transformer too, no [model.files] transformer)
        return common + dpipe + ["--set", f"model.source={build_flux_diffusers(a, work)}"], lora_run_env()
    if row == "native-flux":
        folder = build_flux_diffusers(a, work)
        return common + ["--set", f"model.source={folder}"], engine_env(a.site_diffusion_pipe, None)
    if row in ("kohya-hunyuan", "dpipe-hunyuan"):
        extra = None
        if a.hunyuan_files:
            h = Path(a.hunyuan_files)
        elif row == "kohya-hunyuan":
            layout = build_hunyuan_files(a, work)
            h = Path(layout["transformer"]).parent
            extra = dict(layout["env"], HF_HUB_CACHE=layout["hf_cache"])
        elif row == "dpipe-hunyuan":
            # no HunyuanImage-2.1 files: empty placeholders pass lora-run's existence check, and diffusion-pipe
            # stops before it reads them (its HunyuanImage model imports flash-attn at start-up): this row then
            # records that limit with the engine's own message
            h = work / "hunyuan-placeholders"
            h.mkdir(parents=True, exist_ok=True)
            for name in ("dit", "vae", "qwen", "byt5"):
                (h / f"{name}.safetensors").touch()
        sets = ["--set", f"model.files.transformer={h / 'dit.safetensors'}", "--set", f"model.files.vae={h / 'vae.safetensors'}",
                "--set", f"model.files.qwen={h / 'qwen.safetensors'}", "--set", f"model.files.byt5={h / 'byt5.safetensors'}"]
        if row == "kohya-hunyuan":
            python = wrapper(work, "python-sd-scripts-hunyuan", a.site_sd_scripts, None, extra=extra)
            sets += ["--set", "backend.name=kohya", "--set", f"backend.kohya.sd_scripts={a.sd_scripts}",
                     "--set", f"backend.kohya.python={python}"]
            if not a.hunyuan_files:
                sets += ["--set", f"backend.kohya.tokenizer_cache_dir={h / 'tokenizers'}"]
            return common + sets, lora_run_env()
        return common + sets + dpipe, lora_run_env()
    raise SystemExit(f"unknown row {row}")


def run_row(row: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = make_dataset(work / f"data-{a.resolution}", size=a.resolution)
    sets, env = row_sets(row, a, work, data)
    recipe = str(HUNYUAN_RECIPE if row.endswith("hunyuan") else RECIPE)
    runs = work / "runs" / row
    if runs.exists():   # this script's own output from an earlier invocation
        import shutil

        shutil.rmtree(runs)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"row": row, "recipe": recipe, "size": a.size, "steps": a.steps}
    mem = GpuMemory()
    mem.start()
    main = lora_run([recipe, *sets, "--output-dir", str(runs / "main")], env, logs / f"{row}-main.log")
    result["memory"] = mem.stop()
    result["main"] = main
    times = [1.0 / r for _, _, r in main["steps"] if r]
    result["step_time_s"] = round(sorted(times)[len(times) // 2], 3) if times else None
    manifest = runs / "main" / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        result["artifacts"] = {k: m.get("artifacts", {}).get(k) for k in ("lora_kohya", "lora_diffusers", "checkpoints",
                                                                          "samples", "kohya_state")}
        result["external_tools"] = m.get("external_tools")
    if row.startswith("native"):
        return result
    if row == "dpipe-hunyuan" and not a.hunyuan_files:   # the probe: the engine's own start-up error
        text = Path(main["log"]).read_text("utf-8", "replace").splitlines()
        result["engine_limit"] = [line for line in text if line.startswith("error:") and not line.startswith("error:   |")]
        return result
    # diffusion-pipe's steps on the reduced model take 0.06 s: 24 of them ended before this script, which reads the
    # log once a second, could interrupt (2026-12-03), so its Ctrl-C run trains --ctrlc-steps and stops half-way
    total = max(a.steps, a.ctrlc_steps) if row.startswith("dpipe") else a.steps
    longer = ["--set", f"train.steps={total}"] if total != a.steps else []
    half = max(3, total // 2)
    stopped = lora_run([recipe, *sets, *longer, "--output-dir", str(runs / "ctrlc")], env, logs / f"{row}-ctrlc.log",
                       interrupt_at=half)
    resumed = lora_run([recipe, *sets, *longer, "--resume", "--output-dir", str(runs / "ctrlc")], env,
                       logs / f"{row}-resume.log")
    result["ctrl_c"] = stopped
    result["resume"] = resumed
    result["resume_ok"] = stopped["rc"] == 130 and resumed["rc"] == 0 and bool(resumed["steps"]) and \
        resumed["steps"][-1][0] == total and resumed["steps"][0][0] > 1 and stopped["steps"][-1][0] < total
    if row == "dpipe-flux":   # a diffusers-layout transformer file: refused before launch (diffusers crashes on it)
        folder = build_flux_diffusers(a, work)
        result["error_diffusers_transformer"] = lora_run(
            [recipe, *sets, "--set", f"model.files.transformer={folder / 'transformer' / 'diffusion_pytorch_model.safetensors'}",
             "--output-dir", str(runs / "err1")], env, logs / f"{row}-err1.log")
    if row.startswith("kohya"):   # the engine's own errors: a truncated model file, an option it rejects at run time
        vae = build_flux_single_files(a, work)["vae"] if row == "kohya-flux" else \
            (str(Path(a.hunyuan_files) / "vae.safetensors") if a.hunyuan_files else build_hunyuan_files(a, work)["vae"])
        broken = work / f"broken-vae-{row}.safetensors"
        with open(vae, "rb") as fh:
            broken.write_bytes(fh.read(4096))
        result["error_truncated_file"] = lora_run([recipe, *sets, "--set", f"model.files.vae={broken}",
                                                   "--output-dir", str(runs / "err1")], env, logs / f"{row}-err1.log")
        result["error_bad_option"] = lora_run([recipe, *sets, "--set", "backend.kohya.blocks_to_swap=99",
                                               "--output-dir", str(runs / "err2")], env, logs / f"{row}-err2.log")
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| row | size | steps | step time (s, median) | peak GPU memory (GiB) | checkpoints | samples | Ctrl-C → resume |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        arts = r.get("artifacts") or {}
        lines.append(f"| {r['row']} | {r['size']} | {r['steps']} | {r.get('step_time_s')} | "
                     f"{r.get('memory', {}).get('peak_used_gib')} | {len(arts.get('checkpoints') or [])} | "
                     f"{len(arts.get('samples') or [])} | {'ok' if r.get('resume_ok') else ('—' if 'resume_ok' not in r else 'FAILED')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd-scripts", type=Path, default=ROOT / "engines" / "sd-scripts")
    ap.add_argument("--diffusion-pipe", type=Path, default=ROOT / "engines" / "diffusion-pipe")
    ap.add_argument("--site-sd-scripts", type=Path, default=ROOT / "engines" / "site-sd-scripts")
    ap.add_argument("--site-diffusion-pipe", type=Path, default=ROOT / "engines" / "site-diffusion-pipe")
    ap.add_argument("--rows", nargs="+", default=["kohya-flux", "dpipe-flux", "native-flux"])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--ctrlc-steps", type=int, default=300, help="steps of the diffusion-pipe rows' Ctrl-C run and its "
                    "--resume (SIGINT once half are reported; its steps are too short to interrupt 24)")
    ap.add_argument("--size", choices=["reduced", "full"], default="reduced")
    ap.add_argument("--hunyuan-files", type=Path)
    ap.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more --set for every row's runs (a variant of the rows, e.g. model.base_precision=bf16)")
    ap.add_argument("--resolution", type=int, default=512, help="training resolution; below 512 also switches to "
                    "fp32 and rank 4 (a CPU smoke run of this script)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/engines-gpu"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = a.out / f"engines-gpu-{stamp}.json"
    results = []
    for row in a.rows:
        try:
            results.append(run_row(row, a, a.work))
        except (subprocess.CalledProcessError, SystemExit) as exc:
            results.append({"row": row, "size": a.size, "steps": a.steps, "error": str(exc)})
        print(json.dumps(results[-1], default=str)[:2000], flush=True)
        # written after every row (a `run` call that hits its time limit keeps what is done) with the logs
        # that become test fixtures: lora-run's output, the engine's own log and the output folder's layout
        raw.write_text(json.dumps({"results": results, "argv": sys.argv}, indent=1, default=str))
        keep_logs(row, a.work, a.out / f"engines-gpu-{stamp}-logs")
    print(table(results))
    print(f"raw: {raw}")
    return 0 if all("error" not in r for r in results) else 1


def keep_logs(row: str, work: Path, dest: Path) -> None:
    """Copy a row's small text outputs (≤ 2 MiB each) and list its run folders' files, for fixtures."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for log in sorted((work / "logs").glob(f"{row}-*.log")):
        shutil.copy2(log, dest / log.name)
    for run in sorted((work / "runs" / row).glob("*")):
        listing = []
        for p in sorted(run.rglob("*")):
            rel = p.relative_to(run)
            if "data" in rel.parts[:2] and p.suffix.lower() in (".png", ".jpg", ".txt"):
                continue
            listing.append({"path": str(rel), "dir": p.is_dir(), "size": None if p.is_dir() else p.stat().st_size})
            if p.is_file() and p.suffix in (".log", ".toml", ".json", ".txt") and p.stat().st_size <= 2 * 2**20:
                target = dest / f"{row}-{run.name}" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
        (dest / f"{row}-{run.name}-layout.json").write_text(json.dumps(listing, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
