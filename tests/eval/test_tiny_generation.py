"""Generation with the tiny models: the demo's run ends with the evaluation report, and `lora-run eval`
generates the §7 grid through the native backend's pipeline for a LoRA file and its checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lora_run.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    done = cli("demo", "--output-dir", folder, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder / "run", done


def test_the_demo_run_ends_with_the_report(demo_run):
    run, done = demo_run
    assert f"eval: report {run / 'eval' / 'report.html'}" in done.stdout
    data = json.loads((run / "eval" / "metrics.json").read_text())
    final = data["results"][data["final"]]
    # the demo draws cartoon faces on a random model: "no face" is the reported result, not a crash
    assert [f["name"] for f in final["failures"]][:2] == ["no subject face", "no face"]
    grid = final["images"]
    assert len(grid) == 2 * 2 * 1 and all(Image.open(r["path"]).size == (64, 64) for r in grid)
    assert {r["control"] for r in grid} == {False, True}
    rows = [json.loads(line) for line in (run / "eval" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["artifacts"]["eval_report"].endswith("report.html")


def test_eval_command_generates_the_grid_for_a_lora_and_its_checkpoints(demo_run, tmp_path):
    run, _ = demo_run
    final = run / "tiny-flux-demo.safetensors"
    checkpoints = sorted((run / "checkpoints").glob("step-*/tiny-flux-demo-step*.safetensors"))
    assert final.is_file() and checkpoints
    out = tmp_path / "eval"
    done = cli("eval", run / "recipe.toml", "--lora", checkpoints[-1], "--lora", final, "--output-dir", out,
               "--set", "eval.seeds=[1, 2]", "--set", "eval.strengths=[1.0]", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data["ok"] and data["output_dir"] == str(out)
    assert [e["label"] for e in data["loras"]] == [checkpoints[-1].stem, final.stem]
    assert data["loras"][0]["step"] == int(checkpoints[-1].stem.rsplit("step", 1)[1])
    assert data["best"]["label"] is None and "none can be ranked" in data["best"]["reason"]
    for label in (checkpoints[-1].stem, final.stem):
        images = sorted((out / "images" / label).glob("*.png"))
        assert [p.name for p in images] == ["p0-s1-seed1.png", "p0-s1-seed2.png", "p1-s1-seed1.png",
                                            "p1-s1-seed2.png"]
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()
    again = cli("eval", run / "recipe.toml", "--lora", final, "--output-dir", out, cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_eval_refuses_a_subject_photo_that_does_not_decode(demo_run, tmp_path):
    """`eval` compared the grid with the subject photos the dataset lint kept, leaving out unseen one that does not
    decode; it is refused as in `score` (exit 2, one line naming the file), before any model loads or anything is
    written. The control: the same command with the photo removed evaluates."""
    import shutil

    run, _ = demo_run
    data = tmp_path / "subject"
    shutil.copytree(run.parent / "assets" / "data" / "subject", data)
    (data / "broken.png").write_text("not a picture", encoding="utf-8")
    (data / "broken.txt").write_text("ohwx, a cartoon face", encoding="utf-8")
    args = ("eval", run / "recipe.toml", "--lora", run / "tiny-flux-demo.safetensors", "--output-dir",
            tmp_path / "eval", "--set", f'dataset.path="{data}"', "--set", "eval.prompts=['{trigger}']",
            "--set", "eval.strengths=[1.0]")
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[dataset.path]" in done.stderr and "broken.png: cannot be scored: not an image Pillow can read" \
        in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "generating" not in done.stdout and not (tmp_path / "eval").exists()
    (data / "broken.png").unlink()
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
