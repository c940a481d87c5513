"""Checkpoints are written on a thread of their own while training goes on (``checkpoint.Writing``): what lands on
disk is the state of the checkpoint's own step, whatever the steps after it change meanwhile, and a failed write is
still reported on the training thread."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lora_run.hookspecs import hookimpl

from .conftest import lora_tensors

SETS = ["train.steps=6", "train.save_every_steps=2", "train.keep_last=5", "optimizer.name=\"adamw\"",
        "optimizer.lr=5e-2", "lora.dropout=0.1"]


class Events:
    def __init__(self):
        self.seen = []

    @hookimpl
    def step_finished(self, step):
        self.seen.append(("step", step))

    @hookimpl
    def checkpoint_saved(self, step, path):
        self.seen.append(("checkpoint", step))


def slow_writes(monkeypatch, seconds):
    """Every checkpoint's write waits ``seconds`` on its thread before it starts: the steps after it run first."""
    from lora_run_native import checkpoint

    real = checkpoint.save

    def save(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save", save)


def inline_writes(monkeypatch):
    """The reference: each checkpoint written on the training thread before the next step (the old behaviour)."""
    from lora_run_native import checkpoint

    class Inline(checkpoint.Writing):
        def __init__(self, step, write):
            self.step, self.seconds, self._error = step, 0.0, None
            self._result = write()

        def done(self):
            return True

        def wait(self):
            return self._result
    monkeypatch.setattr(checkpoint, "Writing", Inline)


def contents(folder):
    """A checkpoint's tensors (resumable state and LoRA files) and its state's values, less the files' records
    (the LoRA files' metadata name the run's start time)."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in lora_tensors(path).items():
            out[f"{path.relative_to(folder)}:{key}"] = value
    state = json.loads((folder / "resume" / "state.json").read_text())
    state.pop("files")
    return out, state


def differences(a, b):
    (ta, sa), (tb, sb) = a, b
    out = sorted(set(ta) ^ set(tb))
    out += [k for k in sorted(set(ta) & set(tb)) if not (ta[k].dtype == tb[k].dtype and bool((ta[k] == tb[k]).all()))]
    out += [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return out


def run(run_recipe, recipe, out, sets=SETS):
    events = Events()
    ctx = run_recipe(recipe, sets, extra_plugins=[events], output=out)
    return ctx, events.seen


@pytest.mark.slow
def test_a_checkpoint_written_while_training_goes_on_holds_its_own_step(flux_recipe, run_recipe, tmp_path,
                                                                        monkeypatch):
    from lora_run_native import checkpoint

    recipe = flux_recipe()
    with monkeypatch.context() as m:
        inline_writes(m)
        reference, order = run(run_recipe, recipe, tmp_path / "inline")
    assert order.index(("checkpoint", 2)) < order.index(("step", 3))

    with monkeypatch.context() as m:
        slow_writes(m, 1.0)
        threaded, order = run(run_recipe, recipe, tmp_path / "thread")
    # the steps after a checkpoint ran while it was written; each is recorded once it is on disk, in order
    assert order.index(("step", 3)) < order.index(("checkpoint", 2)) < order.index(("checkpoint", 4))
    assert threaded.artifacts["timing"]["checkpoint_writes_s"] >= 2.0      # the writes' own time, on their thread
    for step in (2, 4):
        name = f"checkpoints/step-{step:06d}"
        assert differences(contents(tmp_path / "inline" / name), contents(tmp_path / "thread" / name)) == [], name
    for fmt in ("lora_kohya", "lora_diffusers"):
        a, b = lora_tensors(reference.artifacts[fmt]), lora_tensors(threaded.artifacts[fmt])
        assert all(bool((a[k] == b[k]).all()) for k in a) and a.keys() == b.keys(), fmt
    manifest = json.loads((tmp_path / "thread" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["artifacts"]["checkpoints"]] == [2, 4]
    assert not list((tmp_path / "thread" / "checkpoints").glob(".step-*"))

    # planted: the state handed to the thread is the live tensors, not copies; the steps during the write change it
    with monkeypatch.context() as m:
        slow_writes(m, 1.0)
        m.setattr(checkpoint, "cpu_copy", lambda value: value)
        run(run_recipe, recipe, tmp_path / "planted")
    planted = differences(contents(tmp_path / "inline" / "checkpoints/step-000002"),
                          contents(tmp_path / "planted" / "checkpoints/step-000002"))
    assert any(k.startswith("resume/trainable.safetensors:") for k in planted), planted


@pytest.mark.slow
def test_a_write_that_fails_on_its_thread_fails_the_run_naming_the_file(flux_recipe, tmp_path, monkeypatch, capsys):
    """The disk fills during checkpoint 4's write, on its thread: the run fails with the file named, exit code 1, at
    a later step's look at the write; checkpoint 2 stays intact and recorded, no half folder is left."""
    import errno

    import safetensors.torch as st

    from lora_run.cli import main

    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        if "step-000004" in str(filename):
            time.sleep(0.5)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(st, "save_file", save_file)
    out = tmp_path / "run"
    args = [str(flux_recipe()), "--output-dir", str(out)]
    for s in SETS:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "step-000004/resume/trainable.safetensors: No space left" in line[0], err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [c["step"] for c in manifest["artifacts"]["checkpoints"]] == [2]
    assert (out / "checkpoints" / "step-000002" / "resume" / "state.json").is_file()
    assert not (out / "checkpoints" / "step-000004").exists()
    assert not list((out / "checkpoints").glob(".step-*"))


@pytest.mark.slow
def test_the_runs_end_does_not_read_the_checkpoints_lora_files_again(flux_recipe, run_recipe, tmp_path, monkeypatch):
    """The manifest's `lora_files` record (size, SHA-256, tensors' SHA-256) of each checkpoint's LoRA files comes from
    the read its writing thread made for the checkpoint's own record (the fast recipe's run end spent 11 s reading
    five checkpoints' 4.4 GB again). The record equals digests computed afresh; control: with the kept digests
    forgotten before the run's end, the same count sees every checkpoint file read twice."""
    from lora_run_rundir import folder as rundir_folder
    from lora_run_rundir import provenance

    def counted(out, forget):
        reads = []
        real = provenance.file_digests

        def counting(path):
            st = Path(path).stat()
            known = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) in provenance._DIGESTS
            if not known and "checkpoints" in str(path):
                reads.append(Path(path).name)
            return real(path)
        with monkeypatch.context() as m:
            m.setattr(provenance, "file_digests", counting)
            m.setattr(checkpoint_module(), "file_digests", counting)
            if forget:
                real_finish = rundir_folder.RunDir.finish

                def finish(self, *a, **k):
                    provenance._DIGESTS.clear()
                    return real_finish(self, *a, **k)
                m.setattr(rundir_folder.RunDir, "finish", finish)
            run(run_recipe, flux_recipe(), out)
        return reads

    reads = counted(tmp_path / "kept", forget=False)
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    recorded = {k: v for k, v in manifest["lora_files"].items() if k.startswith("checkpoints/")}
    assert len(recorded) == 4 and sorted(reads) == sorted(Path(k).name for k in recorded)       # each read once
    provenance._DIGESTS.clear()
    assert recorded == {k: provenance.file_digests(tmp_path / "kept" / k) for k in recorded}
    assert len(counted(tmp_path / "forgotten", forget=True)) == 2 * len(recorded)


def checkpoint_module():
    from lora_run_native import checkpoint

    return checkpoint


@pytest.mark.slow
def test_a_file_added_to_checkpoints_while_one_is_written_stays_the_users(flux_recipe, run_recipe, tmp_path,
                                                                           monkeypatch, capsys):
    """While a checkpoint is written on its thread (here: a second longer, so the steps after it run meanwhile), the
    run folder records the two paths that write makes (`checkpoints/step-NNNNNN` and its temp folder) as being
    written, not the whole `checkpoints/` folder: a file the user adds there meanwhile is not taken as the run's, and
    `--overwrite` refuses to delete it. Control: with `checkpoints/` recorded as being written, the file is taken."""
    from lora_run.cli import main
    from lora_run_native.train import Trainer
    from lora_run_rundir import folder as rundir_folder

    def notes_at_step_3(m, out):
        real = Trainer._micro_step

        def micro(self, state, batch, step, *a, **kw):
            if step + 1 == 3:
                (out / "checkpoints").mkdir(exist_ok=True)
                (out / "checkpoints" / "notes.txt").write_text("mine")
            return real(self, state, batch, step, *a, **kw)
        m.setattr(Trainer, "_micro_step", micro)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        slow_writes(m, 1.0)
        notes_at_step_3(m, out)
        run(run_recipe, flux_recipe(), out)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert "checkpoints/step-000002/resume/state.json" in files and "checkpoints/notes.txt" not in files
    code = main([str(flux_recipe()), "--output-dir", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "notes.txt" in err and (out / "checkpoints" / "notes.txt").read_text() == "mine", err

    planted = tmp_path / "planted"
    with monkeypatch.context() as m:
        slow_writes(m, 1.0)
        notes_at_step_3(m, planted)
        real_writing = rundir_folder.RunDir.writing

        def wide(self, *folders):
            return real_writing(self, *{"checkpoints" if f.startswith("checkpoints/") else f for f in folders})
        m.setattr(rundir_folder.RunDir, "writing", wide)
        run(run_recipe, flux_recipe(), planted)
    assert "checkpoints/notes.txt" in json.loads((planted / "manifest.json").read_text())["files"]


def test_a_checkpoint_being_written_when_the_run_stopped_is_known_as_the_runs(tmp_path):
    """`recorded_checkpoints`: a checkpoint path the manifest lists as being written (a run killed after the rename,
    before its record) is the run's, unless something was there when that writing began (the user's)."""
    from lora_run_native.checkpoint import recorded_checkpoints

    being = {"writing": ["checkpoints/.step-000004.tmp-77", "checkpoints/step-000004"], "writing_found": [],
             "artifacts": {"checkpoints": [{"step": 2, "dir": str(tmp_path / "checkpoints" / "step-000002")}]}}
    assert recorded_checkpoints(being) == {"step-000002", "step-000004"}
    theirs = {**being, "writing_found": ["checkpoints/step-000004"]}
    assert recorded_checkpoints(theirs) == {"step-000002"}
    assert recorded_checkpoints({"writing": ["samples/step-000004", "checkpoints"]}) == set()
