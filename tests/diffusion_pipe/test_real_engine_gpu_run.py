"""The diffusion-pipe backend against the first run of the real diffusion-pipe 8f83dbf to completion (one H200).

fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261203/README.md says what ran (bench/engines_gpu.py, 24 steps of a tiny
random FLUX.1, a save every 8 steps, keep_last = 2) and what each file is. The engine's own train.log did not come
back, so the stand-in train.py prints its run (the real engine's lines, recorded on 2026-12-02, with this run's
numbers) and the tests hold lora-run's side to what lora-run printed and left on the GPU, where that was right, and
to the fixed behaviour where it was not. Every run goes through the whole backend: launch, supervisor, parser,
watcher, collection.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from lora_run_diffusion_pipe.backend import HINTS
from lora_run_engines import explain

from .conftest import RECORDED_RUN, hunyuan_recipe
from .test_run import interrupted_cli, printed, run_recipe

#: the recorded run's settings (bench/engines_gpu.py --steps 24: save every 8 steps, keep the last 2)
SETS = ("train.steps=24", "train.save_every_steps=8", "train.keep_last=2", "output.name=subject_fast")
CLI_SETS = tuple(word for item in SETS for word in ("--set", item))


def console(name: str) -> list[str]:
    return (RECORDED_RUN / name).read_text("utf-8").splitlines()


def layout(key: str) -> list[dict]:
    return json.loads((RECORDED_RUN / "flux_run_layouts.json").read_text("utf-8"))[key]


def names_in(entries: list[dict], pattern: str) -> list[str]:
    """The recorded paths matching `pattern` (a run folder's timestamp written as <ts>)."""
    found = []
    for entry in entries:
        path = re.sub(r"/\d{8}_\d{2}-\d{2}-\d{2}(/|$)", r"/<ts>\1", entry["path"])
        if re.fullmatch(pattern, path):
            found.append(path)
    return sorted(found)


def files_in(folder: Path, pattern: str) -> list[str]:
    return names_in([{"path": str(p.relative_to(folder))} for p in folder.rglob("*")], pattern)


def test_the_main_run_completes_with_both_formats_and_its_checkpoint_at_step_16(dp_recipe, plugins_with, tmp_path,
                                                                                   fake_env):
    """On the GPU the manifest recorded diffusion-pipe's `step16` save as step 13: the watcher took the step from the
    log, which lagged the output folder (0.06 s a step). The stand-in prints each step's lines 8 steps late, so
    lora-run finds `step8/` and `step16/` before it has read their steps, as there."""
    fake_env(output_lag=8, step_delay=0.2)
    out = tmp_path / "run"
    ctx, rec, lines = run_recipe(dp_recipe(), plugins_with, out, *SETS)
    assert rec.finished == ["completed"]
    saved = [(step, name) for step, name, _file, _exists in rec.checkpoints]
    assert saved == [(8, "step8"), (16, "step16"), (24, "step24")]
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    (checkpoint,) = manifest["artifacts"]["checkpoints"]
    assert (checkpoint["name"], checkpoint["step"], checkpoint["epoch"]) == ("step16", 16, None)
    # what lora-run left on the GPU: both formats of the final LoRA, the step-16 save converted, step8 pruned
    recorded = layout("main")
    ours = [{"path": str(p.relative_to(out))} for p in out.rglob("*")]
    for pattern in (r"subject_fast\..*safetensors", r"checkpoints/.*\.safetensors",
                    r"diffusion-pipe/output/<ts>/(step\d+|global_step\d+|latest)"):
        assert names_in(ours, pattern) == names_in(recorded, pattern), pattern
    assert ctx.artifacts["lora_kohya"] == str(out / "subject_fast.safetensors")
    assert ctx.artifacts["lora_diffusers"] == str(out / "subject_fast.diffusers.safetensors")
    # lora-run's own lines, as printed on the GPU (numbers aside)
    shape = [re.sub(r"  loss .*", "", line) for line in console("flux_console.log")
             if line.startswith("diffusion-pipe: ")]
    assert [re.sub(r"  loss .*", "", line) for line in lines if line.startswith("diffusion-pipe: ")][1:] == shape[1:]
    assert shape[1:] == ["diffusion-pipe: caching latents and text embeddings", "diffusion-pipe: step 1/24 (4%)",
                         "diffusion-pipe: step 24/24 (100%)", "diffusion-pipe: training complete"]


@pytest.mark.slow
def test_a_ctrl_c_after_training_complete_lets_the_run_complete(dp_recipe, tmp_path, fake_env):
    """The recorded Ctrl-C came after `TRAINING COMPLETE!` (24 steps at 0.06 s); lora-run wrote `save_quit`, which the
    finished engine never read, and exited 130 "interrupted at step 24". Now it waits for the engine, which is
    exiting on its own, and completes with the final LoRA."""
    recorded = console("flux_ctrl_c_console.log")
    assert recorded[-3] == "diffusion-pipe: training complete"                 # the interrupt came after this line
    assert recorded[-2].startswith("interrupt: asked diffusion-pipe to save a resumable checkpoint and stop")
    assert recorded[-1].startswith("error: interrupted at step 24; resume with: ")
    fake_env(exit_delay=8)    # the real train.py took seconds to end after TRAINING COMPLETE! (8: the Ctrl-C lands
    #                           before the fake engine ends on a loaded machine too; 3 s flaked under a full suite)
    out = tmp_path / "run"
    code, stdout, stderr = interrupted_cli(dp_recipe(), out, printed("diffusion-pipe: training complete"), tmp_path,
                                           *CLI_SETS)
    assert code == 0, stderr
    shown = stdout.splitlines()
    at = shown.index("diffusion-pipe: training complete")
    assert shown[at + 1:at + 3] == [
        "interrupt: diffusion-pipe had already finished training; waiting for it to exit (waiting up to 600 s; "
        "Ctrl-C again to stop now)",
        "diffusion-pipe: the interrupt came after training had finished (TRAINING COMPLETE!); the run is complete"]
    assert "lora_kohya: " + str(out / "subject_fast.safetensors") in stdout and "error:" not in stderr
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["status"] == "completed"
    assert [(c["name"], c["step"]) for c in manifest["artifacts"]["checkpoints"]] == [("step16", 16)]
    (run_folder,) = (out / "diffusion-pipe" / "output").iterdir()
    assert not (run_folder / "save_quit").exists()
    # on the GPU the step24 save stayed a checkpoint (never collected as the final LoRA); now it is the LoRA itself
    assert "checkpoints/step24" in [e["path"] for e in layout("ctrl_c")]
    assert not (out / "checkpoints" / "step24").exists()
    assert Path(manifest["artifacts"]["lora_diffusers"]).is_file()


def interrupted_in_the_last_step(recipe: Path, out: Path, cwd: Path, fake_env, launches: Path) -> Path:
    """A run whose latest checkpoint is at the last step, as the recorded Ctrl-C run's was, made by a Ctrl-C during
    step 24 (diffusion-pipe saves step24/ and global_step24, then quits): lora-run exits 130 with the recorded error.
    Then the `save_quit` the late Ctrl-C left on the GPU is put back. Returns diffusion-pipe's run folder."""
    fake_env(record=launches, await_quit_at=24)
    log = out / "diffusion-pipe" / "train.log"
    code, _stdout, stderr = interrupted_cli(recipe, out, lambda _: log.is_file() and "steps: 23 loss" in
                                            log.read_text("utf-8"), cwd, *CLI_SETS)
    assert code == 130 and "error: interrupted at step 24; resume with: " in stderr, stderr
    assert console("flux_ctrl_c_console.log")[-1].startswith("error: interrupted at step 24; resume with: ")
    (run_folder,) = (out / "diffusion-pipe" / "output").iterdir()
    assert (run_folder / "latest").read_text() == "global_step24" and (run_folder / "step24").is_dir()
    (run_folder / "save_quit").write_text("")
    return run_folder


@pytest.mark.slow
def test_resume_at_the_end_collects_the_final_lora_without_launching(dp_recipe, run_cli, tmp_path, fake_env):
    """The recorded --resume of the Ctrl-C run: its latest checkpoint, global_step24, was at the last step;
    diffusion-pipe resumed "at step 25", trained a step beyond max_steps, met the stale `save_quit` and quit without TRAINING
    COMPLETE!, and lora-run failed. Now the stale file is removed and the final LoRA collected, nothing launched."""
    recorded = console("flux_resume_console.log")
    assert "diffusion-pipe: resumed at step 25" in recorded
    assert any(line.startswith("diffusion-pipe: step 25/24 (104%)") for line in recorded)
    assert any("exited normally but it never printed TRAINING COMPLETE!" in line for line in recorded)
    launches, out = tmp_path / "launch.jsonl", tmp_path / "run"
    run_folder = interrupted_in_the_last_step(dp_recipe(), out, tmp_path, fake_env, launches)

    resumed = run_cli(dp_recipe(), *CLI_SETS, "--resume", "--output-dir", out)
    assert resumed.returncode == 0, resumed.stderr
    assert len(launches.read_text().splitlines()) == 1       # diffusion-pipe was not launched again
    assert (f"diffusion-pipe: removed a save_quit signal file left in {run_folder} (the resumed run would have "
            "stopped after one step)\n"
            f"diffusion-pipe: nothing left to train: the latest checkpoint global_step24 in {run_folder} is at step 24 "
            "of 24; collecting its final LoRA step24 without launching diffusion-pipe\n") in resumed.stdout
    assert not (run_folder / "save_quit").exists()
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["status"] == "completed" and manifest["artifacts"]["steps"] == 24
    assert [(c["name"], c["step"]) for c in manifest["artifacts"]["checkpoints"]] == [("step16", 16)]
    assert not (out / "checkpoints" / "step24").exists()        # the final LoRA is the run's own now
    for key in ("lora_kohya", "lora_diffusers"):
        assert Path(manifest["artifacts"][key]).is_file()


@pytest.mark.slow
def test_launched_as_before_the_stand_in_does_what_the_real_engine_did(dp_recipe, run_cli, tmp_path, fake_env,
                                                                       fake_checkout):
    """Planted-mistake control: resumed by launching diffusion-pipe as lora-run did, the stand-in resumes at step 25,
    meets the stale `save_quit`, quits without TRAINING COMPLETE! and leaves the run folder as the GPU's was; a
    --resume from there (latest global_step25, past the end) collects step24."""
    launches, out = tmp_path / "launch.jsonl", tmp_path / "run"
    run_folder = interrupted_in_the_last_step(dp_recipe(), out, tmp_path, fake_env, launches)
    argv = json.loads(launches.read_text().splitlines()[0])["argv"] + ["--resume_from_checkpoint", run_folder.name]
    engine = subprocess.run(argv, cwd=fake_checkout, capture_output=True, text=True, timeout=120)
    assert engine.returncode == 0, engine.stderr
    recorded = [line.removeprefix("error:   | ") for line in console("flux_resume_console.log")]
    for line in ("Resuming training from checkpoint. Resuming at epoch: ", "steps: 25 loss: ", "Manually quitting"):
        assert any(x.startswith(line) for x in recorded) and line in engine.stdout, line
    assert "TRAINING COMPLETE!" not in engine.stdout and "step: 25\n" in engine.stdout
    pattern = r"diffusion-pipe/output/<ts>/(step\d+|global_step\d+|latest|save_quit)"
    assert files_in(out, pattern) == names_in(layout("ctrl_c"), pattern)

    launched = launches.read_text()             # lora-run's launch and the one above
    resumed = run_cli(dp_recipe(), *CLI_SETS, "--resume", "--output-dir", out)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"diffusion-pipe: nothing left to train: the latest checkpoint global_step25 in {run_folder} is at step 25 "
            "of 24; collecting its final LoRA step24 without launching diffusion-pipe") in resumed.stdout
    assert launches.read_text() == launched


def test_a_flash_attn_4_only_environment_is_refused_before_launch(dp_recipe, run_cli, tmp_path, monkeypatch, fake_env,
                                                                  hunyuan_files, flash_attn_4_site, flash_attn_site):
    """On the GPU flash-attn-4 was installed without flash-attn 2: `flash_attn` was a namespace package, the
    pre-launch check (does flash_attn import?) passed, and diffusion-pipe failed 88 s later on `from flash_attn
    import flash_attn_varlen_func`. Now the names are checked: exit 2 before launch, naming flash-attn 2."""
    recorded = console("hunyuan_image_flash_attn_4_console.log")
    assert recorded[0].startswith("error: diffusion-pipe failed (exit code 1): ImportError: cannot import name "
                                  "'flash_attn_varlen_func' from 'flash_attn' (unknown location)")
    recipe = dp_recipe(hunyuan_recipe(hunyuan_files))
    fake_env(record=tmp_path / "launch.jsonl")
    monkeypatch.setenv("PYTHONPATH", str(flash_attn_4_site))
    for command in (["check", recipe], [recipe, "--output-dir", tmp_path / "run"]):
        out = run_cli(*command)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        line = next(ln for ln in out.stderr.splitlines() if "flash_attn" in ln)
        assert "[backend.diffusion-pipe.deepspeed] diffusion-pipe's Python (" in line
        assert ("cannot import flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func from flash_attn (a namespace "
                f"package, without __init__.py: {flash_attn_4_site / 'flash_attn'}): ") in line
        assert "install flash-attn 2 (the `flash-attn` package: pip install flash-attn --no-build-isolation)" in line
        assert "flash-attn-4 alone does not provide them" in line
    assert not (tmp_path / "launch.jsonl").exists()
    # control: flash-attn 2 beside flash-attn-4 (flash_attn/__init__.py with the names) passes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(flash_attn_site), str(flash_attn_4_site)]))
    assert run_cli("check", recipe).returncode == 0


def test_the_recorded_flash_attn_4_failure_gets_the_flash_attn_2_hint():
    """Should the engine still meet it (a launcher whose Python is not checked), its error is explained; the recorded
    run got only the generic "a module is missing" hint (from the FlashAttention-3 fallback's error, earlier in
    the tail than what came back)."""
    recorded = console("hunyuan_image_flash_attn_4_console.log")
    assert "(a module is missing from diffusion-pipe's environment" in recorded[0]
    tail = [line.removeprefix("error:   | ") for line in recorded[2:-1]]
    why = explain(tail, HINTS)
    assert why.startswith(": ImportError: cannot import name 'flash_attn_varlen_func' from 'flash_attn'")
    assert why.endswith("install flash-attn 2 (the `flash-attn` package) in diffusion-pipe's environment; "
                        "flash-attn-4 alone does not provide it)")
    earlier = [hint for hint in HINTS if "flash-attn-4" not in hint[1]]        # planted mistake: the hints of then
    assert "flash-attn 2" not in explain(tail, earlier)


def test_the_fixture_readme_names_the_commit_gpu_date_and_command():
    readme = (RECORDED_RUN / "README.md").read_text("utf-8")
    for fact in ("8f83dbf25d03219df705570ec03e62be04bc402f", "H200", "2026-12-03", "18:49 UTC",
                 "bash bench/engines_device.sh dpipe",
                 "bench/engines_gpu.py --steps 24 --size reduced --rows dpipe-flux dpipe-hunyuan", "random"):
        assert fact in readme, fact
    for name in sorted(p.name for p in RECORDED_RUN.iterdir() if p.name != "README.md"):
        assert f"`{name}`" in readme, f"{name} is not described in the README"
    for path in RECORDED_RUN.iterdir():       # local paths are replaced everywhere
        assert not re.search(r"/(tmp|work|opt|root|home)/", path.read_text("utf-8")), path.name
