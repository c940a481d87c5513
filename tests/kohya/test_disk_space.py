"""The disk-space check before sd-scripts is launched: a run that cannot fit is refused (exit 2, nothing launched,
the new run folder removed), one that fits runs, and the saves the generated config implies match the files the
real sd-scripts wrote (tests/kohya/fixtures/sd-scripts-48d368f)."""
from __future__ import annotations

import json
import re
import shutil

import attrs
import pytest

from lora_run.recipe import load_recipe
from lora_run_kohya import KohyaOptions
from lora_run_kohya.translate import Paths, disk_writes, translate
from tests.reliability.conftest import run_cli
from tests.reliability.test_disk_space import _Usage

from .conftest import RECORDED


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_launch(kohya_recipe, fake_checkout, tmp_path, capsys, monkeypatch):
    record = tmp_path / "args.json"
    monkeypatch.setenv("FAKE_KOHYA_RECORD", str(record))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(100 * 2**20))
    run = tmp_path / "run"
    code, out = run_cli([str(kohya_recipe(sd_scripts=fake_checkout)), "--output-dir", str(run)], capsys,
                        never="Traceback")
    assert code == 2, out
    line = [ln for ln in out.splitlines() if "[output.dir]" in ln]
    assert line and "sd-scripts run" in line[0] and "nothing was trained" in line[0], out
    assert "100.0 MiB free" in line[0] and "3 save(s)" in line[0] and "[train.keep_last] = 2" in line[0]
    assert not record.exists(), "sd-scripts was launched"
    assert "the run stopped before training" in out and not run.exists(), "a new run folder is not left behind"


@pytest.mark.slow
def test_a_run_that_fits_is_not_refused(kohya_recipe, fake_checkout, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(64 * 2**30))
    run = tmp_path / "run"
    code, out = run_cli([str(kohya_recipe(sd_scripts=fake_checkout)), "--output-dir", str(run)], capsys,
                        never="Traceback")
    assert code == 0 and "[output.dir]" not in out, out
    assert (run / "ohwx.safetensors").is_file()


@pytest.mark.parametrize("mistake", [None, "last step not saved", "one save more kept"])
def test_the_saves_match_what_the_real_sd_scripts_wrote(kohya_recipe, tmp_path, monkeypatch, mistake):
    """The recorded run (steps 6, save_every_steps 2, keep_last 2, a sample every 3 steps) saved at steps 2, 4 and
    6, left the newest 2 step LoRAs and states, the final LoRA and its state, and 2 sample images. The estimate's
    counts from the generated config are the same; a planted mistake (the save at the last step left out, one
    save more kept than save_last_n_steps keeps) makes them differ."""
    import lora_run_engines.disk as disk

    log = (RECORDED / "flux_train.log").read_text()
    layout = json.loads((RECORDED / "flux_output_layout.json").read_text())
    files = [e["path"] for e in layout["entries"] if not e["dir"]]
    saved = re.findall(r"saving checkpoint: .*-step(\d{8})\.safetensors", log)
    left = [f for f in files if re.fullmatch(r"cpuproof-step\d{8}\.safetensors", f)]
    states = {f.split("/")[0] for f in files if re.match(r"cpuproof-step\d{8}-state/", f)}
    samples = [f for f in files if f.startswith("sample/")]
    assert (len(saved), len(left), len(states), len(samples)) == (3, 2, 2, 2)
    assert any(f.startswith("cpuproof-state/") for f in files) and "cpuproof.safetensors" in files

    if mistake == "last step not saved":
        monkeypatch.setattr(disk, "multiples", lambda every, total: (total - 1) // every if every else 0)
    recipe = load_recipe(kohya_recipe()).recipe
    recipe = attrs.evolve(recipe, output=attrs.evolve(recipe.output, formats=["kohya", "diffusers"]))  # as recorded
    config = translate(recipe, KohyaOptions(), Paths(tmp_path, "<sd-scripts>", "python", tmp_path / "data")).config
    if mistake == "one save more kept":
        config["saving"]["save_last_n_steps"] = recipe.train.keep_last * recipe.train.save_every_steps
    writes, kept = disk_writes(recipe, config, 6, 1)
    s = recipe.sample
    found = (writes.saves, kept, kept, dict(writes.others).get("2 sample image(s)", 0) // (s.width * s.height * 3))
    lora, state = disk.lora_file_bytes(disk.lora_parameters(recipe), "bf16"), \
        disk.state_bytes(disk.lora_parameters(recipe), recipe.optimizer.name)
    assert writes.save == lora + state and writes.final >= lora + state        # each save and the end: LoRA + state
    assert (found == (len(saved), len(left), len(states), len(samples))) is (mistake is None), found
