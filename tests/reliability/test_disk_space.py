"""The disk-space check before the first step (native backend): a run whose checkpoints and final LoRA cannot fit
on the run folder's file system is refused before training (exit 2, one line naming `[output.dir]` and the
sizes), and the estimate it uses is checked against the files a real run writes."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.reliability.conftest import run_cli

pytestmark = pytest.mark.slow


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def _tensor_bytes(path: Path) -> int:
    """The tensor data of a safetensors file (its header excluded), from the header's offsets."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_the_checkpoint_estimate_matches_a_real_checkpoint(optimizer, tiny_recipe, tmp_path, capsys):
    """The estimate's tensor bytes equal what a real checkpoint holds (within the scalars an optimizer adds:
    AdamW's step counts), and the whole estimate, header room included, is not below the folder's real size.
    A planted mistake — the optimizer state or one format left out, fp32 counted as bf16 — misses by far more."""
    from safetensors import safe_open

    from lora_run_native import checkpoint as ckpt
    from lora_run_native.outputs import HEADER_BYTES

    run = tmp_path / "run"
    recipe = tiny_recipe()
    text = recipe.read_text()
    assert '[optimizer]\nname = "adamw"' in text
    recipe.write_text(text.replace('[optimizer]\nname = "adamw"', f'[optimizer]\nname = "{optimizer}"'))
    code, out = run_cli([str(recipe), "--output-dir", str(run)], capsys, never="error:")
    assert code == 0, out
    folder = run / "checkpoints" / "step-000004"
    with safe_open(str(folder / ckpt.TRAINABLE), "pt") as fh:
        shapes = [tuple(fh.get_slice(k).get_shape()) for k in fh.keys()]
    elements = sum(math.prod(s) for s in shapes)
    loras = [p for p in _files(folder) if "resume" not in p.parts]
    lora_bytes = sum(_tensor_bytes(p) for p in loras) + len(loras) * HEADER_BYTES
    estimate = ckpt.checkpoint_bytes(lora_bytes, shapes, optimizer)
    headers = (len(loras) + 3) * HEADER_BYTES + ckpt.RNG_BYTES
    data = sum(_tensor_bytes(p) for p in _files(folder) if p.name != "rng.safetensors")
    assert estimate - headers <= data <= (estimate - headers) + 4 * len(shapes), (estimate - headers, data)
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert on_disk <= estimate, (on_disk, estimate)
    # the optimizer's part alone: AdamW twice the fp32 elements, Adafactor far less
    state = ckpt.optimizer_state_bytes(optimizer, shapes)
    assert (state == 8 * elements) if optimizer == "adamw" else (0 < state < 4 * elements)


class _Usage:
    def __init__(self, free: int):
        self.total, self.used, self.free = 1 << 40, (1 << 40) - free, free


def test_a_run_that_cannot_fit_is_refused_before_training(tiny_recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(100 * 2**20))
    code, out = run_cli([str(tiny_recipe()), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 2, out
    line = [ln for ln in out.splitlines() if "[output.dir]" in ln]
    assert line and "nothing was trained" in line[0] and "100.0 MiB free" in line[0], out
    assert "[train.keep_last] = 2" in line[0] and "save(s) of" in line[0]
    assert "the run stopped before training" in out and not run.exists(), "a new run folder is not left behind"


def test_a_run_that_fits_is_not_refused(tiny_recipe, tmp_path, capsys, monkeypatch):
    """The control: the same run with room to spare trains (the check's threshold is not simply "refuse")."""
    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(400 * 2**20))
    code, out = run_cli([str(tiny_recipe()), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 0 and "[output.dir]" not in out, out
    assert (run / "tiny.safetensors").is_file()


def test_a_file_system_that_reports_no_size_is_not_refused(tiny_recipe, tmp_path, capsys, monkeypatch):
    """Some network and FUSE mounts report 0 bytes of 0: the size is unknown, not zero, and the run goes ahead."""
    run = tmp_path / "run"
    usage = _Usage(0)
    usage.total = 0
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    code, out = run_cli([str(tiny_recipe()), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 0 and "[output.dir]" not in out, out


def test_a_resume_refused_for_space_keeps_the_run_folder(tiny_recipe, tmp_path, capsys, monkeypatch):
    """`--resume` with more steps on a disk without room: refused before training (exit 2), and the run folder it
    found keeps its checkpoints and LoRA files byte for byte; the manifest records the refused attempt (status
    `failed`, the error) and still lists the LoRA."""
    run = tmp_path / "run"
    recipe = tiny_recipe()
    code, out = run_cli([str(recipe), "--output-dir", str(run)], capsys, never="Traceback")
    assert code == 0, out
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix == ".safetensors"}
    manifest = (run / "manifest.json").read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(100 * 2**20))
    code, out = run_cli([str(recipe), "--resume", "--output-dir", str(run), "--set", "train.steps=12"], capsys,
                        never="Traceback")
    assert code == 2 and "[output.dir]" in out and "nothing was trained" in out, out
    assert {p: p.read_bytes() for p in before} == before
    after = json.loads((run / "manifest.json").read_text())      # the attempt is recorded, its files kept
    assert after["status"] == "failed" and "[output.dir]" in after["error"]
    assert after["artifacts"]["lora_kohya"] == json.loads(manifest)["artifacts"]["lora_kohya"]
