"""The engine rows in the docs are what the recorded GPU runs measured (fixtures/engines-gpu-h200-20261202.json).

Each figure the docs give is computed here again from the recording, so a doc edit that misquotes a row, or a
re-recorded fixture with other numbers, fails.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ROWS = json.loads((HERE / "fixtures" / "engines-gpu-h200-20261202.json").read_text("utf-8"))["rows"]


def section(page: str, heading: str) -> str:
    text = (ROOT / "docs" / page).read_text("utf-8")
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


ENGINES = section("performance.md", "## Engines: sd-scripts and diffusion-pipe on the same GPU")
KOHYA = section("backend-kohya.md", "### On a GPU (one H200, 2026-12-02)")
DPIPE = section("backend-diffusion-pipe.md", "### On a GPU (one H200, 2026-12-02)")


def elapsed(row: str, run: str = "main") -> dict[int, float]:
    """Each step's elapsed time on sd-scripts' bar: tqdm with smoothing=0 shows steps ÷ elapsed as `it/s`."""
    steps = ROWS[row][run]["steps"]
    first = steps[0][0] - 1
    return {step: (step - first) / rate for step, _, rate in steps}


def test_the_kohya_flux_step_time_is_the_bars_time_from_step_2_to_23():
    t = elapsed("kohya-flux@202040")
    per_step = (t[23] - t[2]) / 21
    assert f"{per_step:.2f}" == "0.15"
    assert f"{t[24] / 24:.2f}" == "0.26" and f"{t[1]:.1f}" == "2.6"
    # planted-mistake control: bench's own summary figure (the median of the running rates) is another number
    assert ROWS["kohya-flux@202040"]["step_time_s"] == 0.356 != round(per_step, 3)
    assert "| 0.15 s (steps 2–23) |" in ENGINES and "**0.15 s** (steps 2–23" in KOHYA
    assert "0.26 s averaged over all 24, the first took 2.6 s" in KOHYA


def test_the_kohya_hunyuan_bound_rests_on_a_bar_that_stopped_counting():
    t = elapsed("kohya-hunyuan@202552")
    assert t[23] - t[2] < 0.05             # 21 steps added no time: each was shorter than tqdm's 0.1 s redraw
    assert t[2] == pytest.approx(2.47, abs=0.01)
    assert ROWS["kohya-hunyuan@202552"]["main"]["steps"][-1][2] == 9.36
    assert "under 0.1 s (steps 3–23" in ENGINES and "**under 0.1 s** (steps 3–23" in KOHYA
    assert "stayed at 2.5 s from step 2 to step 23" in KOHYA and "9.36 it/s" in KOHYA


def test_the_native_row_first_step_and_the_rest():
    lines = ROWS["native-flux@202040"]["main"]["last_lines"]
    first = next(line for line in lines if " 1/24 [" in line)
    last = next(line for line in lines if " 24/24 [" in line)
    assert re.search(r"1/24 \[00:36<[^,]*, 36\.41s/step", first) and "24/24 [00:37<" in last
    # 23 steps between 36.41 s and at most 37.99 s
    assert (38 - 36.41) / 23 < 0.07
    assert "first step 36.4 s (compile), then under 0.07 s" in ENGINES
    assert "first step 36.4 s (torch.compile), the other 23 in under 1.6 s (< 0.07 s each)" in KOHYA


@pytest.mark.parametrize("row, run, seconds", [
    ("kohya-flux@202040", "main", 66), ("kohya-hunyuan@202552", "main", 63), ("native-flux@202040", "main", 74),
    ("dpipe-flux@203345", "main", 84), ("dpipe-flux@233107", "main", 79), ("dpipe-hunyuan@203345", "main", 60)])
def test_the_wall_times(row, run, seconds):
    assert ROWS[row][run]["seconds"] == seconds
    assert f"| {seconds} s" in ENGINES


def test_the_diffusion_pipe_rows():
    fp8, bf16 = ROWS["dpipe-flux@203345"], ROWS["dpipe-flux@233107"]
    assert fp8["main"]["steps"] == [[1, 1.5028, pytest.approx(1 / 1.24)]]
    assert bf16["main"]["steps"][0][:2] == [1, 1.5152] and bf16["step_time_s"] == 1.76
    for row in (fp8, bf16):
        assert row["main"]["last_lines"][-1].startswith("error: the loss became nan at step 2;")
        assert row["ctrl_c"]["rc"] == 1 and row["ctrl_c"]["stopped_after_sigint_s"] is None  # NaN before Ctrl-C
        assert row["resume"]["rc"] == 2
    # the only memory figure of one process: the bf16 run had the GPU to itself
    assert bf16["memory"] == {"peak_used_gib": 3.28, "baseline_gib": 0.0} and fp8["memory"]["baseline_gib"] > 40
    assert "| 3.28 GiB (GPU otherwise empty) |" in ENGINES and "**3.28 GiB**, the GPU otherwise empty" in DPIPE
    assert "1.240 s, 0.909 s (steps 1, 2), then **NaN at step 2**" in ENGINES
    hunyuan = ROWS["dpipe-hunyuan@203345"]["engine_limit"][0]
    assert "No module named 'flash_attn'" in hunyuan and "no flash-attn" in ENGINES


def test_shared_gpu_memory_is_not_given_as_a_measurement():
    """Rows measured while other processes held most of the GPU are not quoted as peaks."""
    for row in ("kohya-flux@202040", "native-flux@202040", "kohya-hunyuan@202552", "dpipe-flux@203345"):
        assert ROWS[row]["memory"]["baseline_gib"] > 40
        assert f"{ROWS[row]['memory']['peak_used_gib']} GiB |" not in ENGINES
    assert ENGINES.count("not measured alone") == 3
