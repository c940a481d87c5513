"""Ctrl-C / SIGTERM, disk full, non-finite losses, bad datasets and "no code execution from data"."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import zlib
from pathlib import Path

import pytest

from lora_run.errors import LoraRunError
from lora_run.hookspecs import hookimpl

from .test_kill_resume import lora_files, run_jobs, tensors

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_a_resumable_state_and_say_how_to_resume(tiny_recipe, tmp_path, figures):
    recipe = tiny_recipe()
    runs = {k: tmp_path / k for k in ("ref", "term", "int", "abort")}
    jobs = [{"argv": [str(recipe), "--output-dir", str(runs["ref"])], "log": str(tmp_path / "ref.log")},
            {"argv": [str(recipe), "--output-dir", str(runs["term"])], "log": str(tmp_path / "term.log"),
             "fault": {"kind": "signal", "at": 3, "signal": "SIGTERM"}},
            {"argv": [str(recipe), "--output-dir", str(runs["int"])], "log": str(tmp_path / "int.log"),
             "fault": {"kind": "signal", "at": 5, "signal": "SIGINT"}},
            {"argv": [str(recipe), "--output-dir", str(runs["abort"])], "log": str(tmp_path / "abort.log"),
             "fault": {"kind": "signal", "at": 3, "signal": "SIGINT", "twice": True}},
            {"argv": [str(recipe), "--resume", "--output-dir", str(runs["term"])], "log": str(tmp_path / "r1.log")},
            {"argv": [str(recipe), "--resume", "--output-dir", str(runs["int"])], "log": str(tmp_path / "r2.log")},
            {"argv": [str(recipe), "--output-dir", str(tmp_path / "hup")], "log": str(tmp_path / "hup.log"),
             "fault": {"kind": "signal", "at": 4, "signal": "SIGHUP"}}]   # the terminal or SSH session closed
    codes = run_jobs(jobs, tmp_path)
    logs = [Path(j["log"]).read_text() for j in jobs]
    assert codes[0] == 0, logs[0][-2000:]
    for n, step in ((1, 3), (2, 5)):
        assert codes[n] == 130, logs[n][-2000:]
        assert f"interrupted at step {step}/6" in logs[n] and "a resumable state is in" in logs[n]
        assert re.search(r"resume with: lora-run \S+ --resume --output-dir \S+", logs[n]), logs[n][-1500:]
        assert "Traceback" not in logs[n]
        run = runs["term" if n == 1 else "int"]
        assert (run / "checkpoints" / f"step-{step:06d}" / "resume" / "state.json").is_file()
        assert "run interrupted" in (run / "run.log").read_text()   # (the manifest is "completed" after the resume)
    # a second Ctrl-C aborts at once: still exit 130, with what is left to resume from
    assert codes[3] == 130 and "aborted" in logs[3] and "Traceback" not in logs[3], logs[3][-1500:]
    assert codes[4] == 0 and codes[5] == 0, (logs[4][-1500:], logs[5][-1500:])
    assert codes[6] == 130 and "interrupted at step 4/6" in logs[6], logs[6][-1500:]
    assert (tmp_path / "hup" / "checkpoints" / "step-000004" / "resume" / "state.json").is_file()
    reference = {fmt: tensors(p) for fmt, p in lora_files(runs["ref"]).items()}
    for name in ("term", "int"):
        for fmt, path in lora_files(runs[name]).items():
            got = tensors(path)
            assert all(bool((got[k] == reference[fmt][k]).all()) for k in reference[fmt]), (name, fmt)
    figures("signals", cases=4, faults=4)


def test_sighup_is_an_interrupt_unless_nohup_ignores_it():
    """SIGHUP (the terminal closed) ends the run as SIGTERM does, from ``term()`` on; under `nohup` (SIGHUP ignored)
    it stays ignored."""
    import os

    from lora_run.run import Signals

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        signals = Signals()
        signals.term()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
        assert signals.arrived
        signals.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)          # nohup
        signals = Signals()
        signals.term()
        os.kill(os.getpid(), signal.SIGHUP)                    # ignored: nothing raised
        assert not signals.arrived and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signals.restore()
    finally:
        signal.signal(signal.SIGHUP, before)


# ---------------------------------------------------------------------------------- disk full
class DiskFullAfter:
    """Every safetensors write after the first checkpoint fails with ENOSPC (the disk filled up)."""

    def __init__(self, monkeypatch):
        import safetensors.torch as st

        real = st.save_file
        self.failed = []

        def save_file(tensors, filename, metadata=None):
            if "step-000004" in str(filename) or Path(filename).name.startswith(".tiny."):
                self.failed.append(str(filename))
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
            return real(tensors, filename, metadata=metadata)
        monkeypatch.setattr(st, "save_file", save_file)


@pytest.mark.slow
def test_disk_full_is_a_clear_error_and_earlier_checkpoints_stay_intact(tiny_recipe, tmp_path, monkeypatch, figures,
                                                                       capsys):
    from lora_run.cli import main

    full = DiskFullAfter(monkeypatch)
    run = tmp_path / "run"
    code = main([str(tiny_recipe()), "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and full.failed, err
    assert "No space left on device" in err and str(run) in err and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "step-000004/resume/trainable.safetensors: No space left" in line[0], err
    assert "needs about" in line[0] and "free now" in line[0], err    # the file and the space it needs
    assert not list((run / "checkpoints").glob(".step-*")), "the half-written temp folder is removed"
    ckpt = run / "checkpoints" / "step-000002"
    from safetensors import safe_open

    for f in (ckpt / "resume").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            assert list(fh.keys())
    assert json.loads((ckpt / "resume" / "state.json").read_text())["step"] == 2
    assert not (run / "checkpoints" / "step-000004").exists(), "no half checkpoint under its final name"
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    figures("disk-full", cases=1, faults=1)


def test_read_only_output_is_refused_before_anything_runs(tiny_recipe, tmp_path, monkeypatch, capsys):
    """CI runs as root (chmod does not stop root): the write probe of the run folder is made to fail."""
    import lora_run_rundir.folder as rundir
    from lora_run.cli import main

    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if os.path.basename(path) == ".write-test":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    code = main([str(tiny_recipe()), "--output-dir", str(tmp_path / "ro")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to the output folder (Read-only file system)" in err, err
    assert rundir  # the probe lives in RunDir.prepare


# ------------------------------------------------------------------------------------- NaN / inf
class InfLoss:
    @hookimpl
    def register_losses(self, register):
        def factory(_options=None):
            def loss(prediction, target, step=0, **_info):
                per_sample = ((prediction - target) ** 2).flatten(1).mean(1)
                return per_sample * (float("inf") if step >= 2 else 1.0)
            return loss
        register("inf-after-2", factory)


@pytest.mark.slow
def test_infinite_loss_stops_keeps_the_checkpoint_and_prints_the_playbook_advice(tiny_recipe, tmp_path, monkeypatch,
                                                                                 capsys, figures):
    import lora_run.plugins as plugins_mod
    from lora_run.cli import main

    real = plugins_mod.load_plugins

    def with_inf(*a, **kw):  # a loss from another plugin: the native backend takes any registered loss
        return real(*a, extra=[InfLoss()])
    monkeypatch.setattr(plugins_mod, "load_plugins", with_inf)
    run = tmp_path / "run"
    code = main([str(tiny_recipe()), "--output-dir", str(run), "--set", "train.loss=\"inf-after-2\""])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the loss became inf at step 3" in err and "lower the learning rate" in err and "bf16" in err, err
    assert "step-000002" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-000002" / "resume" / "state.json").is_file()
    assert not (run / "tiny.safetensors").exists()
    figures("non-finite", cases=1, faults=1)


# ---------------------------------------------------------------------------------- bad datasets
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature + IHDR claiming a huge image (a decompression bomb; no pixel data needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """name -> expected outcome: "converted" (handled, reported), "error" (named before any model loads)."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def rgb(w=96, h=80):
        return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))

    def caption(name, text="ohwx, a photo"):
        (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")

    expect = {}
    for n, fmt in enumerate(("JPEG", "PNG", "WEBP")):
        buf = io.BytesIO()
        rgb().save(buf, format=fmt)
        data = buf.getvalue()
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        (folder / f"trunc{n}.{ext}").write_bytes(data[: len(data) // 2])
        (folder / f"corrupt{n}.{ext}").write_bytes(data[:20] + bytes(rng.integers(0, 256, 300, dtype="uint8")))
        caption(f"trunc{n}.{ext}")
        caption(f"corrupt{n}.{ext}")
        expect[f"trunc{n}.{ext}"] = expect[f"corrupt{n}.{ext}"] = "error"
    (folder / "empty.png").write_bytes(b"")
    caption("empty.png")
    expect["empty.png"] = "error"
    _png_header_only(folder / "bomb.png", 40000, 40000)
    caption("bomb.png")
    expect["bomb.png"] = "error"
    (folder / "notimage.jpg").write_text("this is a text file, not a JPEG", encoding="utf-8")
    caption("notimage.jpg")
    expect["notimage.jpg"] = "error"
    rgb().convert("CMYK").save(folder / "cmyk.jpg")
    caption("cmyk.jpg")
    Image.fromarray((rng.random((80, 96)) * 65535).astype("uint16")).save(folder / "sixteen.png")
    caption("sixteen.png")
    rgb().convert("P").save(folder / "palette.png")
    caption("palette.png")
    rgb().convert("RGBA").save(folder / "alpha.png")
    caption("alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb().save(folder / "rotated.jpg", exif=exif)
    caption("rotated.jpg")
    rgb().save(folder / "ünïcode 名前 with space.png")
    caption("ünïcode 名前 with space.png")
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "alpha.png", "rotated.jpg"):
        expect[name] = "converted"
    expect["ünïcode 名前 with space.png"] = "usable"
    rgb().save(folder / "badcaption.png")
    (folder / "badcaption.txt").write_bytes(b"ohwx \xff\xfe\xfa not utf-8")
    rgb().save(folder / "emptycaption.png")
    (folder / "emptycaption.txt").write_text("", encoding="utf-8")
    expect["badcaption.png"] = expect["emptycaption.png"] = "named"
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "dirloop").symlink_to(folder)
    expect["loop_a.png"] = expect["loop_b.png"] = "error"
    return expect


def test_bad_dataset_corpus_is_named_before_any_model_loads(tiny_recipe, tmp_path, capsys, figures):
    import sys

    from lora_run.cli import main

    corpus = tmp_path / "bad data"
    expect = make_bad_corpus(corpus)
    recipe = tiny_recipe(data=corpus)
    code = main(["check", "--json", str(recipe)])
    out = capsys.readouterr().out
    assert code == 2, out[-2000:]
    report = json.loads(out)
    text = json.dumps(report, ensure_ascii=False)
    for name, outcome in expect.items():
        assert outcome == "usable" or name in text or Path(name).with_suffix(".txt").name in text, f"{name} ({outcome}) is not named in the lint report"
    # the real run stops at the lint: DatasetError, nothing written, no model loaded
    torch_loaded_before = "lora_run_flux.adapter" in sys.modules
    run = tmp_path / "run"
    code = main([str(recipe), "--output-dir", str(run)])
    captured = capsys.readouterr()
    assert code == 2 and "[dataset] has" in captured.err and "Traceback" not in captured.err, captured.err[-2000:]
    assert not run.exists(), "nothing is written before the dataset is fixed"
    if not torch_loaded_before:
        assert "lora_run_flux.adapter" not in sys.modules
    # only the handled kinds left: the lint passes and reports each conversion
    for name, outcome in expect.items():
        if outcome in ("error", "named"):
            for p in (corpus / name, (corpus / name).with_suffix(".txt")):
                if p.is_symlink() or p.exists():
                    p.unlink()
    (corpus / "dirloop").unlink()
    code = main(["check", "--json", str(recipe)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert "6" in json.dumps(report.get("lint", {}).get("counts", report)), report  # 5 converted + the unicode path
    notes = json.dumps(report, ensure_ascii=False)
    for word in ("CMYK", "16-bit", "palette", "alpha", "EXIF"):
        assert word in notes, word
    figures("bad-datasets", cases=len(expect) + 1, faults=len(expect) + 1)


# --------------------------------------------------------------------- no code execution from data
SOURCES = [p for root in ("core", "plugins") for p in (REPO / root).rglob("*.py")]


def test_no_shell_no_os_system_no_unpickling_in_the_code_base():
    offenders = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(|pickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(", code):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert len(SOURCES) > 30


@pytest.mark.parametrize("key, value", [("backend.name", "os:system"), ("backend.name", "lora_run.run"),
                                        ("train.loss", "torch.nn.functional:mse_loss"),
                                        ("train.loss", "builtins.eval"), ("dataset.type", "subprocess.Popen")])
def test_recipes_cannot_name_import_paths(tiny_recipe, key, value, monkeypatch):
    import importlib

    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import validate

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with pytest.raises(LoraRunError) as info:
        validate(load_recipe(tiny_recipe(), [f'{key}="{value}"']), load_plugins())
    assert info.value.exit_code == 2 and f"[{key}]" in str(info.value)
    assert value.split(":")[0].split(".")[0] not in {n.split(".")[0] for n in imported if n in (value,)}
