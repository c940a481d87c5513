"""Loss collection through the plugin's lifecycle hooks: every step on disk as it is reported, resume keeps earlier
steps."""
from __future__ import annotations

import json
from types import SimpleNamespace

import lora_run_eval as plugin
from lora_run_rundir import RunDir


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_step_is_on_disk_as_soon_as_it_is_reported(tmp_path):
    run = SimpleNamespace(run_dir=RunDir(tmp_path))
    loss_file = tmp_path / "eval" / "loss.jsonl"
    plugin.step_finished(run, 1, {"loss": 1.0, "lr": 0.1, "it_per_s": float("nan")})
    assert rows(loss_file) == [{"step": 1, "loss": 1.0, "lr": 0.1}]          # a non-finite value is left out
    plugin.step_finished(run, 2, {"loss": float("inf")})
    assert len(rows(loss_file)) == 2 and rows(loss_file)[-1]["loss"] is None
    plugin.checkpoint_saved(run, 2, tmp_path / "checkpoints" / "step-000002")
    plugin.step_finished(run, 3, {"lr": 0.1})          # no loss: ignored
    plugin.step_finished(run, 4, {"loss": 0.25})
    assert [r["step"] for r in rows(loss_file)] == [1, 2, 4]
    plugin.run_finished(run)
    assert [r["step"] for r in rows(loss_file)] == [1, 2, 4]
    assert not list((tmp_path / "eval").glob(".*tmp"))


def test_a_run_killed_before_its_checkpoints_hook_keeps_every_step(tmp_path):
    """The log was rewritten only every 50 steps and by the `checkpoint_saved` hook: a run killed after a checkpoint
    was renamed into place and before that hook ran (the pruning of old checkpoints, the manifest, other plugins'
    hooks in between) lost the rows since the last rewrite, and the resume, continuing from that checkpoint, left
    them out for good (steps 1, 2, 5, 6 … after a kill at the step-4 checkpoint)."""
    loss_file = tmp_path / "eval" / "loss.jsonl"
    first = SimpleNamespace(run_dir=RunDir(tmp_path))
    for step in range(1, 6):
        plugin.step_finished(first, step, {"loss": 1.0 / step})
        if step == 2:
            plugin.checkpoint_saved(first, 2, tmp_path / "checkpoints" / "step-000002")
    from lora_run_eval import losslog
    losslog._LOGS.clear()            # SIGKILLed at step 5, after the step-4 checkpoint, before its hook
    resumed = SimpleNamespace(run_dir=RunDir(tmp_path))
    for step in range(5, 7):         # resumed from step-000004: steps 5 and 6 (again)
        plugin.step_finished(resumed, step, {"loss": 0.5 / step})
    assert [(r["step"], r["loss"]) for r in rows(loss_file)] == [
        *((s, 1.0 / s) for s in range(1, 5)), (5, 0.1), (6, 0.5 / 6)]
    plugin.run_finished(resumed)
    assert [r["step"] for r in rows(loss_file)] == [1, 2, 3, 4, 5, 6]


def test_after_a_failed_append_the_rows_wait_for_a_whole_rewrite(tmp_path, monkeypatch):
    from lora_run_eval import losslog

    run = SimpleNamespace(run_dir=RunDir(tmp_path))
    loss_file = tmp_path / "eval" / "loss.jsonl"
    plugin.step_finished(run, 1, {"loss": 1.0})
    real_open = losslog.open_append

    def full(path, *a, **kw):      # the append's open (lora_run_rundir.open_append) meets a full disk
        if str(path) == str(loss_file):
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(losslog, "open_append", full)
    plugin.step_finished(run, 2, {"loss": 0.5})
    monkeypatch.setattr(losslog, "open_append", real_open)
    plugin.step_finished(run, 3, {"loss": 0.25})         # not appended after a torn line: kept for the rewrite
    assert [r["step"] for r in rows(loss_file)] == [1]
    for step in range(4, 4 + losslog.FLUSH_EVERY):
        plugin.step_finished(run, step, {"loss": 0.1})
    assert len(rows(loss_file)) >= losslog.FLUSH_EVERY
    plugin.run_finished(run)
    assert [r["step"] for r in rows(loss_file)] == list(range(1, 4 + losslog.FLUSH_EVERY))


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
