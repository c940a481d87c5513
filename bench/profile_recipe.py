"""Where the shipped fast recipe's step time goes, on the full-size FLUX.1-dev transformer (random weights).

    python bench/profile_recipe.py [--work /tmp/lora-run-profile] [--steps 40] [--profile 30 34] [--out DIR]

Runs ``recipes/flux/identity-fast.toml`` through ``lora_run.run.execute`` (the CLI's path) on a diffusers folder
built by ``bench/fullsize.py`` (tiny encoders of FLUX's widths: only the transformer matters here), 512² images
in three aspect-ratio buckets, samples and evaluation off. A plugin registered for this run alone records the
wall time of every step through ``step_finished`` and runs ``torch.profiler`` over the steps named by
``--profile``; it writes the per-step times, the recompilation counters and the profiler's tables (sorted by
CUDA time and by CPU time) to ``--out``. What it answers: is the real loop bound by the GPU's kernels (their
sum per step) or by the host (wall time per step well above the kernel sum), and which ops dominate.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for extra in (REPO / "core", REPO / "plugins", HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from lora_run.hookspecs import hookimpl  # noqa: E402


class StepProfiler:
    def __init__(self, first: int, last: int, out: Path):
        self.first, self.last, self.out = first, last, out
        self.times: list[tuple[int, float]] = []
        self.prof = None
        self.summary: dict | None = None

    @hookimpl
    def step_finished(self, run, step, metrics):  # noqa: ARG002 - hook signature
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append((step, time.perf_counter()))
        if step == self.first:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif step == self.last and self.prof is not None:
            self.prof.__exit__(None, None, None)
            steps = self.last - self.first
            events = self.prof.key_averages()
            (self.out / "profile-cuda.txt").write_text(
                f"{steps} steps\n" + events.table(sort_by="self_cuda_time_total", row_limit=45))
            (self.out / "profile-cpu.txt").write_text(
                f"{steps} steps\n" + events.table(sort_by="cpu_time_total", row_limit=45))
            kernels = sum(e.self_device_time_total for e in events) / 1e6 / steps
            launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel",
                                                                           "cudaGraphLaunch"))) / steps
            self.summary = {"kernel_s_per_step": round(kernels, 4), "launch_calls_per_step": launches}
            self.prof = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/lora-run-profile")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--profile", type=int, nargs=2, default=(30, 34))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--tiny", action="store_true", help="the tiny FLUX model (a CPU smoke test of this script)")
    args = ap.parse_args()
    import torch

    import fullsize
    from gpu_acceptance import _scaled_dataset
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute
    from lora_run_native.demo import build_dataset

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (work / "data" / "subject").is_dir():
        build_dataset(work / "data")
    if not (work / "data-512").is_dir():
        _scaled_dataset(work / "data" / "subject", work / "data-512", 512)
    started = time.perf_counter()
    if args.tiny:
        from lora_run_native.tiny import build_tiny_flux

        model = work / "models" / "tiny-flux"
        if not (model / "model_index.json").is_file():
            build_tiny_flux(model)
    else:
        model = fullsize.build_flux(work / "models" / "flux-full", "tiny")
    built = time.perf_counter() - started
    sets = [f'model.source="{model}"', "model.offline=true", f'dataset.path="{work / "data-512"}"',
            f"train.steps={args.steps}", "train.save_every_steps=1000", "sample.every_steps=1000",
            "eval.enabled=false", "backend.native.progress_bar=false", 'output.name="profile"', *args.sets]
    loaded = load_recipe(REPO / "recipes" / "flux" / "identity-fast.toml", sets)
    profiler = StepProfiler(*args.profile, out)
    plugins = load_plugins(extra=[profiler])
    started = time.perf_counter()
    execute(loaded, plugins, output_dir=str(work / "run"), overwrite=True)
    total = time.perf_counter() - started
    from torch._dynamo.utils import counters

    steps = profiler.times
    gaps = [round(b[1] - a[1], 4) for a, b in zip(steps, steps[1:])]
    result = {"model_build_s": round(built, 1), "execute_s": round(total, 1), "step_gaps_s": gaps,
              "first_step_at_s": round(steps[0][1] - started, 1) if steps else None,
              "median_step_s": sorted(gaps)[len(gaps) // 2] if gaps else None,
              "profile": profiler.summary,
              "dynamo": {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "recompiles")},
              "sets": sets, "torch": torch.__version__}
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    result["plan"] = manifest.get("plan") or manifest.get("backend")
    result["timing"] = manifest.get("artifacts", {}).get("timing")
    (out / "profile-recipe.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "step_gaps_s"}, indent=2, default=str))
    print("step gaps:", gaps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
