"""Loss collection through the plugin's lifecycle hooks: atomic rewrites, resume keeps earlier steps."""
from __future__ import annotations

import json
from types import SimpleNamespace

import lora_run_eval as plugin
from lora_run_rundir import RunDir
from lora_run_eval.losslog import FLUSH_EVERY


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_steps_are_flushed_periodically_at_checkpoints_and_at_the_end(tmp_path):
    run = SimpleNamespace(run_dir=RunDir(tmp_path))
    loss_file = tmp_path / "eval" / "loss.jsonl"
    for step in range(1, FLUSH_EVERY):
        plugin.step_finished(run, step, {"loss": 1.0, "lr": 0.1, "it_per_s": float("nan")})
    assert not loss_file.exists()
    plugin.step_finished(run, FLUSH_EVERY, {"loss": float("inf")})
    assert len(rows(loss_file)) == FLUSH_EVERY and rows(loss_file)[-1]["loss"] is None
    assert "it_per_s" not in rows(loss_file)[0]
    plugin.step_finished(run, FLUSH_EVERY + 1, {"loss": 0.5})
    plugin.checkpoint_saved(run, FLUSH_EVERY + 1, tmp_path / "checkpoints" / "step-000051")
    assert rows(loss_file)[-1] == {"step": FLUSH_EVERY + 1, "loss": 0.5}
    plugin.step_finished(run, FLUSH_EVERY + 2, {"lr": 0.1})          # no loss: ignored
    plugin.step_finished(run, FLUSH_EVERY + 3, {"loss": 0.25})
    plugin.run_finished(run)
    assert len(rows(loss_file)) == FLUSH_EVERY + 2
    assert not list((tmp_path / "eval").glob(".*tmp"))


def test_resume_keeps_the_history_before_the_step_it_continues_from(tmp_path):
    loss_file = tmp_path / "eval" / "loss.jsonl"
    loss_file.parent.mkdir()
    loss_file.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)))
    run = SimpleNamespace(run_dir=RunDir(tmp_path))
    plugin.step_finished(run, 9, {"loss": 0.01})                     # resumed from the step-8 checkpoint
    plugin.run_finished(run)
    assert [r["step"] for r in rows(loss_file)] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert rows(loss_file)[-1]["loss"] == 0.01


def test_no_run_dir_no_file():
    plugin.step_finished(SimpleNamespace(run_dir=None), 1, {"loss": 1.0})
    plugin.run_finished(SimpleNamespace(run_dir=None))
