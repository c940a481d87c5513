"""bench/perf.py on CPU: its row guard (a failing or overlong row becomes an error row, the next row runs),
the ratios it prints (a float8 row against the same plan in bf16), its kernel kinds and its five-bucket dataset. The GPU rows themselves run on the lead's GPU call."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import perf  # noqa: E402


def test_a_failing_or_overlong_row_becomes_an_error_row_and_the_next_runs(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert perf.guarded(out, "a", 5, lambda: {"median_s": 0.5}) == {"row": "a", "median_s": 0.5,
                                                                    "row_wall_s": pytest.approx(0.0, abs=0.5)}
    assert perf.guarded(out, "b", 5, lambda: 1 / 0) is None

    def slow():
        time.sleep(10)
        return {}

    started = time.perf_counter()
    assert perf.guarded(out, "c", 1, slow) is None
    assert time.perf_counter() - started < 5
    assert perf.guarded(out, "d", 5, lambda: {"ok": True})["ok"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[1]["error"].startswith("ZeroDivisionError") and "time limit 1 s" in rows[2]["error"]


def test_ratios_and_the_markdown_block():
    rows = [
        {"row": "reference", "resolution": 1024, "median_s": 0.6, "tflop": 171.8, "matmul_tflops": 780.0, "peak_gib": 47.0},
        {"row": "reference", "resolution": 512, "median_s": 0.4, "tflop": 45.7, "peak_gib": 31.0},
        {"row": "fa2", "resolution": 1024, "median_s": 0.42, "grad_rel_error": 4e-3, "plan": "speed, compiled"},
        {"row": "fa4", "resolution": 1024, "median_s": 0.30, "grad_rel_error": 5e-2, "plan": "speed, compiled"},
        {"row": "fa4", "resolution": 512, "median_s": 0.10, "grad_rel_error": 5e-3, "bf16_noise": 1e-3},
        {"row": "fa2", "resolution": 512, "median_s": 0.12, "grad_rel_error": 5e-3, "bf16_noise": 2e-3},
        {"row": "memory", "resolution": 1024, "error": "RowTimeout: row time limit 240 s"},
        {"row": "cli-fast", "steps": 40, "step_s": 0.13, "timing": {"cache_s": 10, "load_s": 20, "compile_s": 30,
                                                                   "samples_s": 8, "evaluate_s": 15}},
    ]
    summary = perf.analyse(rows)
    fa4 = rows[3]
    assert fa4["vs_reference"] == pytest.approx(2.0) and fa4["vs_fa2"] == pytest.approx(1.4)
    assert fa4["floor_fraction"] == pytest.approx(171.8 / 780.0 / 0.30)
    assert rows[2]["grad_ok"] is True and fa4["grad_ok"] is False          # the bound is enforced, not shown
    assert rows[4]["grad_bound"] == pytest.approx(3e-3) and rows[4]["grad_ok"] is False     # 3× the noise
    assert rows[5]["grad_bound"] == pytest.approx(6e-3) and rows[5]["grad_ok"] is True
    assert perf.grad_bound(1e-1) == 2e-2 and perf.grad_bound(1e-5) == 1e-3 and perf.grad_bound(None) == 1e-2
    cli = summary["cli"]
    assert cli["vs_isolated_512"] == pytest.approx(1.3) and cli["startup_s"] == 50      # vs the fastest 512² row
    assert cli["projected_1500_s"] == pytest.approx(10 + 20 + 30 + 1500 * 0.13 + 6 * 4 + 15, abs=0.1)
    text = perf.markdown({"gpu": "H200"}, rows, summary, "perf-x.json")
    assert "| fa4 | 1024 | speed, compiled | 0.300 |  | 2.00× | 1.40× | 73 | 5.0e-02 (≤ 1.0e-02: NO) |" in text
    assert "| memory | 1024 | | **failed**: RowTimeout" in text
    assert "| cli-fast | 40 | – | – | 0.130 | 1.30× | 10 | 20 | 30 | – | 8 | 15 | – | 50 | 294 s |" in text


def test_the_cli_dataset_has_five_aspect_buckets(tmp_path):
    from lora_run_native.data import choose_bucket, make_buckets

    folder = perf.make_dataset(tmp_path / "data", count=10)
    from PIL import Image

    buckets = make_buckets(512, 256, 768, 64, 16)
    chosen = {choose_bucket(Image.open(p).size, buckets, 64) for p in folder.glob("*.png")}
    assert len(chosen) == 5 and len(list(folder.glob("*.txt"))) == 10



def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.is_file() and state.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.parametrize("stops", [True, False])
def test_a_worker_killed_at_its_group_limit_takes_its_cli_run_with_it(tmp_path, monkeypatch, stops):
    """The CLI run a cli row starts has its own session; when the orchestrator kills the worker at the group's
    limit, the run's process group is stopped too (on 2026-12-03 it went on evaluating on the GPU into the next
    device call). The control (``stops=False``: the orchestrator's stop left out) leaves the run alive."""
    import argparse
    import os
    import signal

    pid_file = tmp_path / "run.pid"
    worker = tmp_path / "worker.py"        # stands in for a cli worker: starts a long "CLI run", notes its group
    worker.write_text(
        "import subprocess, time\n"
        "from pathlib import Path\n"
        "run = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        f"Path({str(perf.cli_pgid_file(tmp_path))!r}).write_text(str(run.pid))\n"
        f"Path({str(pid_file)!r}).write_text(str(run.pid))\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(perf, "__file__", str(worker))   # run_group starts `python <perf.__file__> --worker …`
    if not stops:
        monkeypatch.setattr(perf, "stop_cli_run", lambda work: None)
    # what the CLI run had written when it was stopped: its run.log (steps, a checkpoint round) and its output
    run_log = tmp_path / "runs" / "cli-fast" / "run.log"
    run_log.parent.mkdir(parents=True)
    run_log.write_text("05:52:30 lora-run 0.1.0: recipe.toml with backend native\n05:52:46 cache: latents 20 built\n"
                       "05:54:23 step 10/1500 loss 1.0\n05:54:38 step 110/1500 loss 0.2\n05:54:40 checkpoint step-000110\n"
                       "05:54:45 step 120/1500 loss 0.1\n05:55:00 step 220/1500 loss 0.1\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "cli-fast.log").write_text("step 220/1500 loss 0.1\neval: generating 60 images\n")
    args = argparse.Namespace(work=tmp_path, cli_steps=1, cli_every=None, row_timeout=1)
    perf.run_group("cli", ["cli-fast"], args, tmp_path / "rows.jsonl", limit=3)
    [row] = perf.read_rows(tmp_path / "rows.jsonl")
    assert row["error"] == "worker exit -9 (stopped at the group's limit of 3 s)"
    assert row["log_tail"].endswith("eval: generating 60 images")
    assert row["partial_timing"] == {"start_to_cache_s": 16.0, "last_step": 220, "cache_to_step10_s": 97.0,
                                     "steps_span_s": 37.0, "step_s": 0.15, "rounds_s": 5.5, "logged_s": 150.0}
    assert "what it measured: {'start_to_cache_s': 16.0" in perf.markdown({}, [row], {}, "perf-x.json")
    run = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _alive(run) is not stops
    finally:
        if _alive(run):
            os.killpg(run, signal.SIGKILL)


def test_a_worker_that_crashes_is_told_from_one_stopped_at_the_limit(tmp_path, monkeypatch):
    """A worker that dies by itself is recorded as crashed, with its exit code; only the orchestrator's own kill at
    the group's limit is recorded as a stop (on 2026-12-05 a row stopped at the limit read "crash or group time
    limit", and its run.log had to be read to tell)."""
    import argparse

    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(perf, "__file__", str(worker))
    args = argparse.Namespace(work=tmp_path, cli_steps=1, cli_every=None, row_timeout=1)
    perf.run_group("cli", ["cli-fast", "cli-fast-first"], args, tmp_path / "rows.jsonl", limit=30)
    assert perf.read_rows(tmp_path / "rows.jsonl") == [
        {"row": "cli-fast", "error": "worker exit 3 (crashed)"},
        {"row": "cli-fast-first", "error": "worker exit 3 (crashed)"}]


def test_kernel_names_fall_into_their_kinds():
    assert perf.kernel_kind("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "matmul fp8"
    assert perf.kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul bf16"
    assert perf.kernel_kind("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT") == "matmul fp8"
    assert perf.kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "matmul bf16"
    assert perf.kernel_kind("flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert perf.kernel_kind("triton_per_fused__to_copy_mul_0") == "fused (triton)"
    assert perf.kernel_kind("void at::native::vectorized_elementwise_kernel") == "other"
    assert perf.kernel_kind("dequant_e4m3_rows") == "dequant (fp8 storage)"   # not "matmul fp8" for its e4m3
    assert perf.kernel_kind("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert perf.kernel_kind("triton_poi_fused_cat_fp8_linear_gelu_permute_view_5") == "fused (triton)"


def test_a_float8_row_is_compared_with_its_own_plan_in_bf16():
    rows = [{"row": "memory", "resolution": 1024, "median_s": 0.55},
            {"row": "memory-fp8mm", "resolution": 1024, "median_s": 0.44},
            {"row": "fa4", "resolution": 1024, "median_s": 0.34},
            {"row": "fp8mm", "resolution": 1024, "median_s": 0.30},
            {"row": "fp8mm", "resolution": 512, "median_s": 0.20}]      # no bf16 row at 512²: no ratio
    perf.analyse(rows)
    assert rows[1]["vs_bf16_row"] == 0.55 / 0.44
    assert rows[3]["vs_bf16_row"] == 0.34 / 0.30
    assert "vs_bf16_row" not in rows[4] and "vs_bf16_row" not in rows[0]
    text = perf.markdown({}, rows, {}, "perf-x.json")
    assert "memory-fp8mm at 1024²: 1.25× the same plan without float8 matmuls" in text


def test_calls_of_one_run_are_joined_and_other_runs_refused(tmp_path):
    """`--merge`: the isolated rows of one device call and the whole CLI run of the next, same machine, commit and
    packages, become one table whose ratios span them (the CLI step against the isolated 512² step); a row measured
    again replaces the earlier one unless the repeat failed; a different commit is refused with exit 2."""
    env = {"gpu": "H200", "torch": "2.11", "cuda": "13.0", "diffusers": "0.42.1", "flash_attn_4": "4.0.0b36",
           "commit": "abc1234", "date": "2026-12-04 09:30 UTC"}
    first = {"env": env, "rows": [
        {"row": "reference", "resolution": 512, "median_s": 0.30, "vs_reference": 9.9},
        {"row": "graphs", "resolution": 512, "median_s": 0.10},
        {"row": "fa4", "resolution": 1024, "median_s": 0.34},
        {"row": "memory-fp8mm", "error": "worker exit -9 (crash or group time limit)"}]}
    second = {"env": {**env, "date": "2026-12-04 09:40 UTC"}, "rows": [
        {"row": "fa4", "resolution": 1024, "error": "skipped: the run's --budget was spent"},
        {"row": "reference", "resolution": 512, "median_s": 0.32},
        {"row": "cli-fast-graphs", "steps": 1500, "step_s": 0.147, "timing": {"load_s": 20, "compile_s": 196}},
        {"row": "memory-fp8mm", "resolution": 1024, "median_s": 0.38},
        {"row": "memory", "resolution": 1024, "median_s": 0.5}, {"row": "memory", "error": "skipped"}]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    merged_env, rows = perf.merge([a, b])
    by = {(r["row"], r.get("resolution")): r for r in rows}
    assert by[("reference", 512)]["median_s"] == 0.32 and "vs_reference" not in by[("reference", 512)]
    assert by[("fa4", 1024)]["median_s"] == 0.34                 # the failed repeat does not hide it
    # a row that failed before measuring anything (no resolution) is replaced by its later measurement, and a later
    # such failure does not hide one
    assert by[("memory-fp8mm", 1024)]["median_s"] == 0.38 and ("memory-fp8mm", None) not in by
    assert by[("memory", 1024)]["median_s"] == 0.5 and ("memory", None) not in by
    summary = perf.analyse(rows)
    assert summary["cli-fast-graphs"]["vs_isolated_512"] == pytest.approx(1.47)
    first_run = {"row": "cli-fast-first", "steps": 30, "step_s": 0.15, "sets": {"eval.enabled": False},
                 "timing": {"load_s": 20, "compile_s": 196, "evaluate_s": 0}}
    cold = perf.analyse([*rows, first_run])["cli-fast-first"]   # the cold start-up, and no whole run made up
    assert cold["startup_s"] == 216 and "projected_1500_s" not in cold
    line = next(x for x in perf.markdown({}, [first_run], {}, "x").splitlines() if x.startswith("| cli-fast-first"))
    assert line.endswith("| – | 216 | – |") and "None" not in line, line
    assert by[("graphs", 512)]["vs_reference"] == pytest.approx(3.2)
    assert merged_env["merged_from"] == ["a.json", "b.json"] and "09:30 UTC to 2026-12-04 09:40" in merged_env["date"]
    other = tmp_path / "c.json"
    other.write_text(json.dumps({**second, "env": {**second["env"], "commit": "fff0000"}}))
    with pytest.raises(ValueError, match="commit is 'fff0000'"):
        perf.merge([a, other])
    done = subprocess.run([sys.executable, perf.__file__, "--merge", str(a), str(other), "--out",
                                         str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "not one run" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, perf.__file__, "--merge", str(a), str(b), "--out",
                                         str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and "| cli-fast-graphs | 1500 |" in done.stdout and "1.47×" in done.stdout
    assert len(list(tmp_path.glob("perf-*-merged.json"))) == 1


def test_a_profiled_row_shows_its_split_and_the_idle_rest():
    """The kernel split of a profiled row, and the part of the median step no kernel ran (a host-bound step)."""
    rows = [{"row": "graphs", "resolution": 512, "median_s": 0.108,
             "profile": {"gpu_s": {"matmul bf16": 0.05, "attention": 0.02, "fused (triton)": 0.01}}}]
    text = perf.markdown({"gpu": "H200"}, rows, perf.analyse(rows), "perf-x.json")
    assert ("graphs at 512², GPU time of one step by kernel kind: matmul bf16 50 ms, attention 20 ms, "
            "fused (triton) 10 ms; kernels busy 80 of the step's 108 ms") in text


def test_the_recipe_rows_wrap_the_layers_lora_run_wraps():
    """The `recipe` group builds the reference model with lora-run's own all-linear preset: on a tiny FLUX the
    LoRA-wrapped layers are exactly the linear layers the native adapter's rule picks (a preset regex matching
    the whole name), and more than the attention preset's (planted: the attention preset gives another set)."""
    import re

    import torch

    import flux_step_reference as ref
    from lora_run_native.adapters.base import MMDIT_TARGET_PRESETS

    tiny = dict(ref.FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=16)

    def wrapped(preset: str) -> set[str]:
        ref.TARGETS[preset + "-test"] = MMDIT_TARGET_PRESETS[preset]
        try:
            model = ref.build_model(4, preset + "-test", config=tiny, device="cpu")
        finally:
            del ref.TARGETS[preset + "-test"]
        return {n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")}

    def picked(preset: str) -> set[str]:
        from diffusers import FluxTransformer2DModel

        plain = FluxTransformer2DModel(**tiny)
        patterns = [re.compile(p) for p in MMDIT_TARGET_PRESETS[preset]]
        return {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)
                and any(p.fullmatch(n) for p in patterns)}

    assert perf.RECIPE_TARGETS == "all-linear"
    assert wrapped("all-linear") == picked("all-linear")
    assert wrapped("attention") == picked("attention") != picked("all-linear")
    assert len(picked("all-linear")) == 20          # one double block (attention 8, MLP 4, modulation 2), one single (3+2+1)


def test_start_up_counts_the_graph_recording_steps_too():
    """The whole run of 2026-12-04 (bench/results/perf-20261204-115650.json): its first step per shape was 64.5 s
    over the steady step (compile_s), but its steps took 95 s more than 1500 steady steps — the CUDA graphs are
    recorded in the steps after the first of each shape, as its run.log shows (105 s from the cached data to step
    10). The start-up is the load and all of that; compile_s alone (planted) would say 76.6 s."""
    data = json.loads((BENCH / "results" / "perf-20261204-115650.json").read_text())
    [whole] = [r for r in data["rows"] if r["row"] == "cli-fast-graphs"]
    cli = perf.analyse([whole])["cli-fast-graphs"]
    t = whole["timing"]
    assert cli["warmup_s"] == pytest.approx(t["train_s"] - 1500 * t["step_s"], abs=0.1) == pytest.approx(95.2, abs=0.1)
    assert cli["startup_s"] == pytest.approx(t["load_s"] + cli["warmup_s"], abs=0.1)
    assert cli["startup_s"] != pytest.approx(t["load_s"] + t["compile_s"], abs=1)
    # the projection from a 1500-step row is the run itself, less the launch's own overhead
    assert cli["projected_1500_s"] == pytest.approx(whole["timing"]["cache_s"] + cli["startup_s"] + t["train_s"]
                                                    - cli["warmup_s"] + t["samples_s"] + t["checkpoints_s"]
                                                    + t["evaluate_s"] + t["finish_s"], abs=2)


def test_optimizer_kernels_are_their_own_kind_and_the_cli_step_meets_the_recipe_row():
    assert perf.kernel_kind("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>>") == "optimizer"
    assert perf.kernel_kind("void at::native::(anonymous)::fused_adam_kernel") == "optimizer"
    rows = [{"row": "graphs", "resolution": 512, "median_s": 0.10},
            {"row": "recipe-graphs", "resolution": 512, "median_s": 0.125},
            {"row": "cli-fast-graphs", "steps": 1500, "step_s": 0.14, "timing": {}}]
    cli = perf.analyse(rows)["cli-fast-graphs"]
    assert cli["vs_isolated_512"] == pytest.approx(1.4) and cli["vs_recipe_512"] == pytest.approx(1.12)
    assert "1.12× the isolated step with the recipe's LoRA" in perf.markdown({}, rows, {}, "x")


def test_the_trainer_reports_the_warm_up_beside_the_first_step_of_each_shape():
    """The manifest's timing: a shape's first step (compilation) and the slow steps after it (CUDA-graph recording)
    both count in warmup_s; compile_s keeps only the first. Planted: 10 s, then 5 s, then steady 0.1-s steps."""
    from types import SimpleNamespace

    from lora_run_native.train import Trainer

    a, b = ("a",), ("b",)
    steps = [(a, 10.0), (a, 5.0), *[(a, 0.1)] * 20, (b, 3.0), *[(b, 0.1)] * 20]
    trainer = SimpleNamespace(step_times=steps, checkpoint_seconds=2.0, checkpoint_write_seconds=3.0,
                              sample_rounds=[0.25, 0.75], round_marks=[])
    timing: dict = {}
    Trainer._record_step_times(trainer, timing, 30.0)
    assert timing["step_s"] == 0.1 and timing["shapes"] == 2 and timing["step_s_between_rounds"] == [0.1]
    assert timing["first_steps_s"] == {"('a',)": [10.0, 5.0, 0.1], "('b',)": [3.0, 0.1, 0.1]}
    assert timing["sample_rounds_s"] == [0.25, 0.75] and timing["samples_s"] == 1.0
    assert timing["checkpoints_s"] == 2.0 and timing["checkpoint_writes_s"] == 3.0   # the loop's part, the thread's
    assert timing["compile_s"] == pytest.approx(9.9 + 2.9)
    assert timing["warmup_s"] == pytest.approx(9.9 + 4.9 + 2.9)
    assert timing["train_s"] == pytest.approx(10 + 5 + 3 + 4.0)


def test_the_trainer_reports_the_steady_step_between_rounds():
    """`step_s_between_rounds`: the median step of each stretch between sample or checkpoint rounds, a shape's
    first step (compilation) left out, so a round that slows the steps after it shows. Planted: 0.10-s steps, a
    round, a new shape's 3-s first step and one 0.15-s step (with the first step counted, that stretch's median would
    be 1.575 s), a round marked twice (a checkpoint and samples at the same step), 0.12-s steps, and a round after
    the last step."""
    from types import SimpleNamespace

    from lora_run_native.train import Trainer

    a, b = ("a",), ("b",)
    steps = [(a, 4.0), *[(a, 0.1)] * 9, (b, 3.0), (a, 0.15), *[(b, 0.12)] * 10]
    trainer = SimpleNamespace(step_times=steps, checkpoint_seconds=0.0, checkpoint_write_seconds=0.0,
                              sample_rounds=[], round_marks=[])
    for mark in (10, 12, 12, 22):
        trainer.step_times = steps[:mark]
        Trainer._mark_round(trainer)
    assert trainer.round_marks == [10, 12, 22]
    trainer.step_times = steps
    timing: dict = {}
    Trainer._record_step_times(trainer, timing, 40.0)
    assert timing["step_s_between_rounds"] == [0.1, 0.15, 0.12]


def test_memory_saving_rows_are_given_as_a_multiple_of_the_speed_step():
    """Issue 19 states the memory targets as a multiple of the speed step's time: each memory or low-vram row gets
    it against the FA4 speed step at 1024² of the same run (FA2's where FA4 was not measured), and the float8
    variant of low-vram is compared with low-vram. Numbers from the eighteenth session's run."""
    rows = [{"row": "fa2", "resolution": 1024, "median_s": 0.418}, {"row": "fa4", "resolution": 1024, "median_s": 0.344},
            {"row": "memory", "resolution": 1024, "median_s": 0.495, "peak_gib": 23.17},
            {"row": "low-vram", "resolution": 1024, "median_s": 0.579, "peak_gib": 11.34},
            {"row": "low-vram-fp8mm", "resolution": 1024, "median_s": 0.463, "peak_gib": 11.4}]
    perf.analyse(rows)
    by = {r["row"]: r for r in rows}
    assert by["memory"]["times_speed"] == pytest.approx(1.439, abs=1e-3) and by["memory"]["speed_row"] == "fa4"
    assert by["low-vram"]["times_speed"] == pytest.approx(1.683, abs=1e-3)
    assert by["low-vram-fp8mm"]["vs_bf16_row"] == pytest.approx(0.579 / 0.463)
    assert "times_speed" not in by["fa4"] and "times_speed" not in by["fa2"]
    text = perf.markdown({}, rows, {}, "x")
    assert "low-vram at 1024²: 1.68× the speed step's time (fa4 at 1024²) in this run, 11.3 GiB" in text
    without_fa4 = [dict(r) for r in rows if r["row"] != "fa4"]
    perf.analyse(without_fa4)
    assert without_fa4[1]["times_speed"] == pytest.approx(0.495 / 0.418) and without_fa4[1]["speed_row"] == "fa2"


def test_step_clocks_lines_up_each_stretch_with_the_gpu_log(tmp_path):
    """bench/step_clocks.py: the run's stretches are split at its checkpoint and sample lines, and each gets the
    GPU samples of its own time span (a planted clock drop in the second stretch must show there, not in the first)."""
    import step_clocks

    log = "\n".join(["12:00:00 step 10/40 loss 1.0", "12:00:10 step 20/40 loss 1.0",
                     "12:00:11 checkpoint step-000020", "12:00:12 samples for step 20: 2 image(s) in x",
                     "12:00:13 step 30/40 loss 1.0", "12:00:33 step 40/40 loss 1.0"])
    csv_lines = ["timestamp, clocks.current.sm [MHz], power.draw [W], temperature.gpu, utilization.gpu [%], "
                 "clocks_event_reasons.active"]
    for tenth in range(0, 400, 5):              # 12:00:00.0 to 12:00:39.5, every 0.5 s
        second = tenth / 10
        clock = 1980 if second < 12 else 1500
        reasons = "0x0000000000000000" if second < 12 else "0x0000000000000020"
        csv_lines.append(f"2026/12/04 12:00:{second:04.1f}0, {clock}, 600.0, 60, 99, {reasons}")
    gpu = tmp_path / "gpu.csv"
    gpu.write_text("\n".join(csv_lines) + "\n")
    rows = step_clocks.summary(log, step_clocks.gpu_samples(gpu), [1.0, 2.0])
    assert [r["steps"] for r in rows] == ["10-20", "30-40"]
    assert rows[0]["s_per_step_log"] == 1.0 and rows[1]["s_per_step_log"] == 2.0
    assert rows[0]["sm_mhz"] == 1980.0 and rows[1]["sm_mhz"] == 1500.0
    assert rows[0]["reasons"] == "0x0" and rows[1]["reasons"] == "0x20"
    assert rows[1]["step_s_manifest"] == 2.0


def test_the_no_samples_row_moves_the_sample_rounds_past_the_run(monkeypatch, tmp_path):
    """``cli-fast-nosamples`` is ``cli-fast-first`` with its sample rounds moved past the run's last step, the
    checkpoints kept: the sets the CLI run gets (a planted ``every`` would move the checkpoints too)."""
    seen = {}
    monkeypatch.setenv("PERF_WORK", str(tmp_path))
    monkeypatch.setenv("PERF_CLI_STEPS", "500")
    monkeypatch.setenv("PERF_CLI_EVERY", "100")
    monkeypatch.setattr(perf, "cli_row", lambda work, steps, name, sets, every: seen.update(
        {name: (steps, sets, every)}) or {"row": name})
    monkeypatch.setattr(perf, "guarded", lambda out, row, timeout, fn: fn())
    import types
    monkeypatch.setitem(sys.modules, "flux_step_reference", types.ModuleType("flux_step_reference"))
    perf.worker("cli", ["cli-fast-first", "cli-fast-nosamples"], tmp_path / "rows.jsonl", 10)
    assert seen["cli-fast-first"] == (500, {"train.cuda_graphs": "on", "eval.enabled": False}, 100)
    steps, sets, every = seen["cli-fast-nosamples"]
    assert (steps, every) == (500, 100) and sets["sample.every_steps"] > steps and sets["eval.enabled"] is False
