"""The GPU acceptance bench's own logic that runs without a GPU: reading a stopped run's phases from its
``run.log`` (checked on the real log of the 1500-step run a device call's limit stopped on 2026-12-03) and the
``--deadline`` that cuts each row's timeout so a stopped row is still recorded."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STOPPED_LOG = ROOT / "bench" / "results" / "logs-20261203-0905" / "whole-flux-fast-recipe-noeval.run.log"


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_acceptance_under_test", ROOT / "bench" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phases_of_the_stopped_whole_run(bench):
    p = bench.run_log_phases(STOPPED_LOG)
    # 09:05:01 start, 09:05:19 cache, 09:08:04 step 10, 09:13:02 step 1500, 09:13:04 LoRA written
    assert p["start_to_cache_s"] == 18 and p["cache_to_step10_s"] == 165
    assert p["last_step"] == 1500 and p["steps_span_s"] == 298 and p["to_lora_written_s"] == 483
    # ten steps between progress lines; the five sample/checkpoint rounds (about 12 s each) are not steps
    assert 0.14 <= p["step_s"] <= 0.17
    assert 50 <= p["rounds_s"] <= 75


def test_rounds_are_not_counted_as_steps(bench, tmp_path):
    """Planted: a 30-s round between steps 20 and 30. Counted as steps it would make them 3.1 s each."""
    log = tmp_path / "run.log"
    def at(sec):
        return f"10:{sec // 60:02d}:{sec % 60:02d}"

    lines = [f"{at(0)} lora-run 0.1.0: r.toml with backend native", f"{at(5)} cache: latents 1 built"]
    t = 65
    for n in range(10, 60, 10):
        if n == 30:
            lines.append(f"{at(t)} checkpoint step-000020")
            t += 30
        lines.append(f"{at(t)} step {n}/50 loss 0.1 lr 1e-4")
        t += 1
    log.write_text("\n".join(lines) + "\n")
    p = bench.run_log_phases(log)
    assert p["start_to_cache_s"] == 5 and p["cache_to_step10_s"] == 60
    assert p["step_s"] == pytest.approx(0.1)
    assert p["rounds_s"] == pytest.approx(30.0, abs=1)
    assert bench.run_log_phases(tmp_path / "missing.log") == {}


def test_deadline_cuts_row_timeouts(bench):
    bench.DEADLINE = time.monotonic() + 100
    assert bench._limit(600) == pytest.approx(100 - bench.DEADLINE_MARGIN_S, abs=1)
    assert bench._limit(30) == 30
    bench.DEADLINE = time.monotonic() + 70           # a row given less than a minute is not started
    row = {"id": "r", "group": "whole", "family": "flux", "sets": {}, "timeout": 300}
    result = bench.run_row(row, {}, Path("."))
    assert not result["passed"] and "not started" in result["problems"][0] and result["stopped"]
    bench.DEADLINE = None
    assert bench._limit(600) == 600


def test_a_row_past_the_deadline_is_stopped(bench):
    bench.DEADLINE = time.monotonic() + bench.DEADLINE_MARGIN_S + 1
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    started = time.monotonic()
    bench._ROW.deadline_stop = False
    assert bench._wait(proc, 600) == -9
    assert time.monotonic() - started < 10
    assert bench._ROW.deadline_stop              # the deadline stopped it, not the row's own limit
    bench.DEADLINE = None
    bench._ROW.deadline_stop = False            # control: the row's own limit stops it: a real failure
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    assert bench._wait(proc, 1) == -9 and not bench._ROW.deadline_stop


def _run_file(path, date, commit, rows):
    path.write_text(json.dumps({"environment": {"date": date, "commit": commit}, "rows": rows}))
    return str(path)


def test_latest_keeps_each_rows_newest_result(bench, tmp_path):
    """Planted: an older pass and a newer failure of the same row; the newest (the failure) must win, whatever
    the order the files are given in. Rows no run measured are listed; an unreadable file is passed over."""
    old = _run_file(tmp_path / "a.json", "2026-12-01 10:00 UTC", "aaaaaaa1",
                    [{"id": "tiny-flux-speed", "passed": True, "step_s": 0.05, "peak_gib": 0.1, "problems": []},
                     {"id": "tiny-flux-memory", "passed": True, "step_s": 0.07, "peak_gib": 0.1, "problems": []}])
    new = _run_file(tmp_path / "b.json", "2026-12-02 10:00 UTC", "bbbbbbb2",
                    [{"id": "tiny-flux-speed", "passed": False, "problems": ["exit 1: out of memory"]}])
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    for order in ([old, new, str(broken)], [str(broken), new, old]):
        table, open_rows = bench.latest(order)
        rows = {line.split(" | ")[0].strip("| *"): line for line in table.splitlines()[2:] if line.startswith("|")}
        assert "FAIL" in rows["tiny-flux-speed"] and "bbbbbbb" in rows["tiny-flux-speed"]
        assert "out of memory" in rows["tiny-flux-speed"]
        assert "pass" in rows["tiny-flux-memory"] and "aaaaaaa" in rows["tiny-flux-memory"]
        assert "not measured" in rows["whole-flux-fast-recipe"]
        assert set(rows) == {r["id"] for r in bench.all_rows()}
        assert open_rows == len(rows) - 1          # only tiny-flux-memory passes


def test_a_row_the_deadline_stopped_does_not_hide_a_result(bench, tmp_path):
    """A newer row stopped by `--deadline` measured nothing: the older pass stays the row's result; a row only ever
    stopped shows `stopped`, not a failure or a pass; a real newer failure still wins (planted beside it)."""
    old = _run_file(tmp_path / "a.json", "2026-12-01 10:00 UTC", "aaaaaaa1",
                    [{"id": "tiny-flux-kill-resume", "passed": True, "problems": []},
                     {"id": "tiny-flux-memory", "passed": True, "problems": []}])
    new = _run_file(tmp_path / "b.json", "2026-12-02 10:00 UTC", "bbbbbbb2",
                    [{"id": "tiny-flux-kill-resume", "passed": False, "stopped": bench.DEADLINE_STOP,
                      "problems": ["exit -9, status running"]},
                     {"id": "tiny-flux-memory", "passed": False, "problems": ["exit 1: out of memory"]},
                     {"id": "tiny-flux-ctrl-c", "passed": False, "stopped": bench.DEADLINE_STOP,
                      "problems": ["not started: under a minute of --deadline left"]}])
    for order in ([old, new], [new, old]):
        table, _ = bench.latest(order)
        rows = {line.split(" | ")[0].strip("| *"): line for line in table.splitlines()[2:] if line.startswith("|")}
        assert "| pass |" in rows["tiny-flux-kill-resume"] and "aaaaaaa" in rows["tiny-flux-kill-resume"]
        assert "| FAIL |" in rows["tiny-flux-memory"] and "bbbbbbb" in rows["tiny-flux-memory"]
        assert "| stopped |" in rows["tiny-flux-ctrl-c"]


def test_the_docs_table_is_the_recorded_results(bench):
    """docs/gpu-acceptance.md shows `--latest` over the repository's results, exactly."""
    table, _ = bench.latest(sorted(map(str, (ROOT / "bench" / "results").glob("gpu-acceptance-*.json"))))
    assert table in (ROOT / "docs" / "gpu-acceptance.md").read_text()


def test_latest_names_the_environment_of_each_result(bench, tmp_path):
    """Under the table: one line per distinct machine/version set the newest results were measured with, counting
    only the rows whose newest result it holds. Planted: an older run on torch 2.10 superseded for one of its two rows
    by a run on torch 2.11, and a file without versions."""
    h200 = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "python": "3.12.3", "diffusers": "0.42.1",
            "peft": "0.21.0", "transformers": "5.17.0", "accelerate": "1.15.0", "flash-attn-4": None}
    for name, date, torch, rows in (("a", "2026-12-01 10:00 UTC", "2.10.0", ["tiny-flux-speed", "tiny-flux-memory"]),
                                    ("b", "2026-12-02 10:00 UTC", "2.11.0", ["tiny-flux-speed"])):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"environment": {**h200, "date": date, "commit": "c" * 7, "torch": torch},
             "rows": [{"id": r, "passed": True, "problems": []} for r in rows]}))
    bare = _run_file(tmp_path / "c.json", "2026-12-03 10:00 UTC", "ddddddd", [{"id": "tiny-dit-speed", "passed": True}])
    table, _ = bench.latest([str(tmp_path / "a.json"), str(tmp_path / "b.json"), bare])
    measured = table.split("Measured with:")[1].strip().splitlines()
    assert len(measured) == 3
    assert any(line.startswith("- 1 row(s), 2026-12-01 10:00") and "torch 2.10.0" in line for line in measured)
    assert any(line.startswith("- 1 row(s), 2026-12-02 10:00") and "torch 2.11.0" in line
               and "flash-attn-4 not installed" in line and "NVIDIA H200 (139.8 GiB)" in line for line in measured)
    assert any("environment not recorded" in line for line in measured)


def test_a_model_that_cannot_be_built_fails_its_rows_not_the_bench(bench, tmp_path, monkeypatch):
    """On 2026-12-05 the flux2 group's [dev] build filled the H100 machine's disk and the bench stopped with a
    traceback: no row of any model was recorded. Now the model's rows fail with the builder's reason, its partial
    folder is removed (its disk is the other models'), and the bench goes on to the other models' rows."""
    import flux2_fullsize

    def full_disk(folder):
        (Path(folder) / "transformer").mkdir(parents=True)
        (Path(folder) / "transformer" / "shard.safetensors").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flux2_fullsize, "builders", lambda: {"dev-full": full_disk})
    assets = bench.build_assets(tmp_path, {"dev-full"})
    assert isinstance(assets["dev-full"], bench.NotBuilt) and "No space left on device" in assets["dev-full"].why
    assert not (tmp_path / "models" / "dev-full").exists()
    row = next(r for r in bench.flux2_rows() if r["model"] == "dev-full")
    result = bench.run_row(row, assets, tmp_path)
    assert not result["passed"] and result["problems"] == [assets["dev-full"].why]
