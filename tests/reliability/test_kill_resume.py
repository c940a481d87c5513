"""SIGKILL at 20 points of a run (mid-step, torn cache/checkpoint/LoRA writes, just before atomic renames);
every resume completes and its final LoRA is bitwise equal to the uninterrupted run's (CPU). After each kill,
every file under its final name parses completely: a torn file only ever exists under a temporary name, and
the resume continues from the newest complete checkpoint.

All 41 runs go through one worker process (fault_worker.py) that imports torch once and forks a child per
run, so the suite costs the runs, not 41 interpreter start-ups."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fault_worker.py")


def run_jobs(jobs: list[dict], tmp: Path, timeout: int = 900) -> list[int]:
    spec, results = tmp / f"jobs-{os.getpid()}-{len(jobs)}.json", tmp / f"results-{len(jobs)}.json"
    spec.write_text(json.dumps(jobs), encoding="utf-8")
    results.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(WORKER), str(spec), str(results)], env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results.read_text())


def lora_files(run: Path) -> dict[str, Path]:
    return {"kohya": run / "tiny.safetensors", "diffusers": run / "diffusers" / "tiny.safetensors"}


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def complete_checkpoint_steps(run: Path) -> list[int]:
    from lora_run_native import checkpoint as ckpt

    return [step for step, _ in ckpt.complete_checkpoints(run / "checkpoints")]


def torn_files_under_final_names(run: Path) -> list[str]:
    """Every *.safetensors / *.json whose name is not a temporary one must parse completely."""
    from safetensors import safe_open

    bad = []
    for path in run.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(run).parts):
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        fh.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text("utf-8"))
        except Exception as exc:  # noqa: BLE001 - any failure is a torn file under a real name
            bad.append(f"{path}: {exc}")
    return bad


def not_the_runs(run: Path) -> list[str]:
    """What `--overwrite` of ``run`` would refuse to delete as no run's (its check, without running it)."""
    from lora_run_rundir.folder import RunDir, foreign_entries, unrecorded_files

    manifest = RunDir(run).read_manifest()
    existing = [e for e in run.iterdir() if not e.name.startswith(".")]
    return [e.name for e in foreign_entries(run, existing, manifest)] + unrecorded_files(run, manifest)


def pick_kill_points(trace: list[dict], run: str) -> list[tuple[str, dict]]:
    """20 points spread over the phases, chosen from the uninterrupted run's own event trace."""
    def where(e: dict) -> str:
        p = e["path"]
        if e["event"] == "step":
            return "step"
        if "/cache/" in p:
            return "cache"
        if "/checkpoints/" in p:
            return "checkpoint"
        if p.endswith("tiny.safetensors") or ".tiny.safetensors." in p or p.endswith("manifest.json"):
            return "output"
        return "other"

    by: dict[tuple[str, str], list[dict]] = {}
    for e in trace:
        by.setdefault((where(e), e["event"]), []).append(e)

    def spread(key: tuple[str, str], k: int) -> list[dict]:
        items = by.get(key, [])
        assert len(items) >= k, (key, len(items))
        idx = sorted({round(i * (len(items) - 1) / max(1, k - 1)) for i in range(k)})
        return [items[i] for i in idx]

    wanted = {("cache", "write"): 3, ("cache", "replace"): 3, ("step", "step"): 4,
              ("checkpoint", "write"): 4, ("checkpoint", "replace"): 3, ("output", "write"): 2,
              ("output", "replace"): 1}
    points = []
    for key, k in wanted.items():
        for e in spread(key, k):
            points.append((key[0], {"kind": e["event"], "at": e["n"], "path": e["path"]}))
    return points


@pytest.mark.slow
def test_twenty_kills_each_resume_is_bitwise_equal_to_the_uninterrupted_run(tiny_recipe, tmp_path, figures):
    recipe = tiny_recipe()
    ref = tmp_path / "ref"
    log = tmp_path / "ref.log"
    [code] = run_jobs([{"argv": [str(recipe), "--output-dir", str(ref)], "log": str(log),
                        "fault": {"kind": "trace"}}], tmp_path)
    assert code == 0, log.read_text()[-3000:]
    trace = json.loads(Path(str(log) + ".trace.json").read_text())
    reference = {fmt: tensors(p) for fmt, p in lora_files(ref).items()}
    points = pick_kill_points(trace, str(ref))
    assert len(points) == 20

    jobs = []
    for n, (_phase, fault) in enumerate(points):
        run = tmp_path / f"cut{n:02d}"
        jobs.append({"argv": [str(recipe), "--output-dir", str(run)], "log": str(tmp_path / f"cut{n:02d}.log"),
                     "fault": {"kind": fault["kind"], "at": fault["at"]}})
        jobs.append({"argv": [str(recipe), "--resume", "--output-dir", str(run)],
                     "log": str(tmp_path / f"resume{n:02d}.log"), "fault": None, "inspect": str(run)})
    # run the kills first, inspect each killed folder, then the resumes (two worker runs)
    kills = run_jobs(jobs[0::2], tmp_path)
    after_kill = []
    for n, ((phase, fault), code) in enumerate(zip(points, kills)):
        run = tmp_path / f"cut{n:02d}"
        assert code == -signal.SIGKILL, (phase, fault, code, (tmp_path / f"cut{n:02d}.log").read_text()[-2000:])
        note = json.loads(Path(jobs[2 * n]["log"] + ".fault.json").read_text())
        assert Path(note["path"]).name == Path(fault["path"]).name.replace("ref", run.name) or phase in ("step",) \
            or "tmp" in note["path"] or note["path"].endswith(Path(fault["path"]).name), (note, fault)
        assert not torn_files_under_final_names(run), torn_files_under_final_names(run)
        # the killed run's record (written ahead of each write) accounts for all it left: --overwrite would take
        # everything, and a file a user adds there afterwards is no run's
        assert not_the_runs(run) == [], (phase, fault, not_the_runs(run))
        mine = run / "samples" / "mine.txt"
        made = not mine.parent.exists()
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("the user's")
        # named itself, or by the folder the user made for it where a run's `samples/` cannot be told from a user's
        # (a run killed before its first manifest)
        assert not_the_runs(run) in ([["samples"], ["samples/mine.txt"]] if made else [["samples/mine.txt"]]), \
            (phase, fault, not_the_runs(run))
        mine.unlink()
        if made:
            mine.parent.rmdir()
        after_kill.append(complete_checkpoint_steps(run))
    resumes = run_jobs(jobs[1::2], tmp_path)
    survived = lost = 0
    for n, ((phase, fault), code) in enumerate(zip(points, resumes)):
        run = tmp_path / f"cut{n:02d}"
        text = (tmp_path / f"resume{n:02d}.log").read_text()
        assert code == 0, (phase, fault, text[-3000:])
        newest = after_kill[n][-1] if after_kill[n] else None
        if newest:
            assert re.search(rf"resumed from \S*step-{newest:06d} \(step {newest} of 6\)", text), (phase, fault, text)
        else:
            assert "no complete checkpoint yet; starting from step 0" in text, (phase, fault, text)
        for fmt, path in lora_files(run).items():
            got = tensors(path)
            same = got.keys() == reference[fmt].keys() and all(
                got[k].dtype == reference[fmt][k].dtype and bool((got[k] == reference[fmt][k]).all()) for k in got)
            lost += not same
            assert same, f"kill {n} ({phase} {fault}): the resumed {fmt} LoRA differs from the uninterrupted run's"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest.get("resumed_at")
        assert not_the_runs(run) == [], (phase, fault, not_the_runs(run))     # --overwrite may replace it all
        assert not torn_files_under_final_names(run)
        survived += 1
    phases = sorted({p for p, _ in points})
    print(f"\nkill/resume: {len(points)} SIGKILLs over {phases}, {survived} resumes bitwise equal, data lost {lost}")
    figures("kill-resume", cases=len(points), faults=survived, lost=lost)
