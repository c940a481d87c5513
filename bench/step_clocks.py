"""Line up a training run's stretches between rounds with the GPU's clocks, power and temperature.

    python bench/step_clocks.py RUN_LOG GPU_CSV [--manifest MANIFEST]

RUN_LOG is a run folder's ``run.log`` (a ``step N/M`` line every few steps, ``checkpoint step-…`` and ``samples for
step N`` lines, each with its time of day); GPU_CSV is what ``bench/perf.py --gpu-log`` wrote (nvidia-smi, every
0.5 s). For each stretch of steps between two rounds it prints the steps per second from the log's step lines, the
steady step from the manifest's ``step_s_between_rounds`` when given, and the GPU's mean SM clock, mean power,
highest temperature and the clock-event reasons seen (a bit mask, OR-ed: 0x1 idle, 0x4 software power cap, 0x20
software thermal slowdown, 0x40 hardware thermal slowdown, 0x8 hardware slowdown). A stretch slower than the first
with a lower clock is the GPU; at the same clock it is the host or the code."""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path

STEP = re.compile(r"^(\d\d:\d\d:\d\d) step (\d+)/\d+")
ROUND = re.compile(r"^(\d\d:\d\d:\d\d) (checkpoint step-|samples for step )")


def seconds_of_day(stamp: str) -> int:
    h, m, s = (int(x) for x in stamp.split(":"))
    return 3600 * h + 60 * m + s


def stretches(log: str) -> list[list[tuple[int, int]]]:
    """The run's (time of day in s, step) lines, split at each round."""
    out: list[list[tuple[int, int]]] = [[]]
    for line in log.splitlines():
        if m := STEP.match(line):
            out[-1].append((seconds_of_day(m.group(1)), int(m.group(2))))
        elif ROUND.match(line) and out[-1]:
            out.append([])
    return [s for s in out if len(s) >= 2]


def gpu_samples(path: Path) -> list[dict[str, float]]:
    rows = []
    with path.open() as f:
        reader = csv.reader(f)
        header = [h.strip().split(" ")[0] for h in next(reader)]
        for rec in reader:
            if len(rec) != len(header) or rec[0].strip() == "timestamp":
                continue
            row = dict(zip(header, (x.strip() for x in rec)))
            try:
                when = datetime.strptime(row["timestamp"], "%Y/%m/%d %H:%M:%S.%f")
            except ValueError:
                continue
            sample = {"t": (when - when.replace(hour=0, minute=0, second=0, microsecond=0)) / timedelta(seconds=1)}
            for keys, name in ((("clocks.current.sm", "clocks.sm"), "sm_mhz"), (("power.draw",), "power_w"),
                               (("temperature.gpu",), "temp_c"), (("utilization.gpu",), "util")):
                value = next((row[k] for k in keys if k in row), None)      # nvidia-smi names the SM clock
                try:                                                         # clocks.current.sm in its header
                    sample[name] = float(value) if value is not None else None
                except ValueError:
                    pass
                if sample.get(name) is None:
                    sample.pop(name, None)
            reasons = row.get("clocks_event_reasons.active")
            if reasons:
                try:
                    sample["reasons"] = int(reasons, 16)
                except ValueError:
                    pass
            rows.append(sample)
    return rows


def summary(log: str, gpu: list[dict[str, float]], windows: list[float] | None) -> list[dict[str, object]]:
    out = []
    for index, stretch in enumerate(stretches(log)):
        (t0, s0), (t1, s1) = stretch[0], stretch[-1]
        inside = [g for g in gpu if t0 <= g["t"] <= t1]
        row: dict[str, object] = {"steps": f"{s0}-{s1}", "s_per_step_log": round((t1 - t0) / (s1 - s0), 4)
                                  if s1 > s0 else None}
        if windows and index < len(windows):
            row["step_s_manifest"] = windows[index]
        for name in ("sm_mhz", "power_w", "util"):
            vals = [g[name] for g in inside if name in g]
            row[name] = round(sum(vals) / len(vals), 1) if vals else None
        temps = [g["temp_c"] for g in inside if "temp_c" in g]
        row["temp_max_c"] = max(temps) if temps else None
        reasons = 0
        for g in inside:
            reasons |= int(g.get("reasons", 0))
        row["reasons"] = hex(reasons)
        row["gpu_samples"] = len(inside)
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_log", type=Path)
    ap.add_argument("gpu_csv", type=Path)
    ap.add_argument("--manifest", type=Path)
    args = ap.parse_args()
    windows = None
    if args.manifest:
        timing = (json.loads(args.manifest.read_text()).get("artifacts") or {}).get("timing") or {}
        windows = timing.get("step_s_between_rounds")
    rows = summary(args.run_log.read_text(errors="replace"), gpu_samples(args.gpu_csv), windows)
    keys = ["steps", "s_per_step_log", "step_s_manifest", "sm_mhz", "power_w", "util", "temp_max_c", "reasons",
            "gpu_samples"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
