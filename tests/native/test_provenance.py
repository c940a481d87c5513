"""The manifest records what reproduces a run (the playbook's §10 "always record"): the versions of the packages
that train, the base model's files by SHA-256, the command and the folder it ran in, the LoRA files' digests; two
runs of one recipe and seed train the same tensors (another seed does not); a resume under other versions is
allowed, said and recorded; a resumed run's LoRA keeps the run's start time."""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from .conftest import lora_tensors


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata() or {}


def test_manifest_records_versions_model_command_and_lora_digests(flux_recipe, run_recipe, tiny_flux, tmp_path):
    recipe = flux_recipe()
    out = tmp_path / "run"
    run_recipe(recipe, ["train.steps=2", "train.save_every_steps=1"], output=out)
    m = _manifest(out)
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        assert m["packages"][name] == metadata.version(name), name
    assert m["hardware"]["torch"] and m["hardware"]["python"]
    weights = next(Path(tiny_flux, "transformer").glob("*.safetensors"))
    assert m["model"]["source"] == str(tiny_flux)
    assert m["model"]["files"][str(weights.resolve())]["sha256"] == _sha(weights)
    assert m["invocations"][0]["cwd"] and m["invocations"][0]["command"][0] == "lora-run"
    finals = {Path(m["artifacts"][fmt]) for fmt in ("lora_kohya", "lora_diffusers")}
    recorded = {out / rel: entry for rel, entry in m["lora_files"].items()}
    assert finals <= set(recorded)
    assert any("checkpoints" in str(p) for p in recorded)
    for path, entry in recorded.items():
        assert entry["sha256"] == _sha(path) and entry["size"] == path.stat().st_size


def test_same_seed_same_tensors_other_seed_differs(flux_recipe, run_recipe, tmp_path):
    recipe = flux_recipe()
    sets = ["train.steps=2", "dataset.caption_dropout=0.5"]
    digests = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_recipe(recipe, [*sets, f"train.seed={seed}"], output=tmp_path / name)
        files = _manifest(tmp_path / name)["lora_files"]
        digests.append({rel: e["tensors_sha256"] for rel, e in files.items()})
        assert all(files.values())
    assert digests[0] == digests[1], "the same recipe and seed trained other tensors"
    a, b = lora_tensors(tmp_path / "a" / "tiny.safetensors"), lora_tensors(tmp_path / "b" / "tiny.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert all(digests[0][k] != digests[2][k] for k in digests[0]), "another seed trained the same tensors"


def test_resume_under_other_versions_is_said_and_recorded(flux_recipe, tmp_path):
    from lora_run.plugins import load_plugins
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    recipe, out = flux_recipe(), tmp_path / "run"
    sets = ["train.steps=2", "train.save_every_steps=1"]
    execute(load_recipe(recipe, sets), load_plugins(), output_dir=str(out), echo=lambda *_: None)
    m = _manifest(out)
    m["lora_run_version"] = "0.0.1"
    m["packages"]["torch"] = "1.0.0"
    (out / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    said: list[str] = []
    execute(load_recipe(recipe, ["train.steps=3", "train.save_every_steps=1"]), load_plugins(), output_dir=str(out),
            resume=True, echo=said.append)
    warning = next(line for line in said if "other versions" in line)
    assert "lora-run 0.0.1 → " in warning and "torch 1.0.0 → " in warning
    after = _manifest(out)
    assert after["started_with_lora_run_version"] == "0.0.1"
    assert after["started_with_packages"]["torch"] == "1.0.0"
    assert after["resumed_with_other_versions"][0]["changes"] and after["status"] == "completed"
    assert len(after["invocations"]) == 2
    # the LoRA says when the run started, not when it was resumed
    assert _metadata(out / "tiny.safetensors")["ss_training_started_at"] == after["started_at"]


def test_large_model_files_are_identified_by_their_safetensors_header(tmp_path, monkeypatch):
    """A run's start must not read tens of GB: files over the limit get the digest of their header alone."""
    import struct

    import attrs
    import torch
    from safetensors.torch import save_file

    from lora_run_rundir import provenance

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    weights = folder / "transformer" / "w.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(weights))
    (folder / "transformer" / "config.json").write_text('{"num_layers": 2}')
    (folder / "transformer" / "w.bin").write_bytes(b"\0" * 4096)

    @attrs.frozen
    class Model:
        source: str
        revision: str | None = None
        files: dict = attrs.Factory(dict)

    monkeypatch.setattr(provenance, "FULL_DIGEST_LIMIT", 1024)
    files = provenance.model_identity(Model(str(folder)))["files"]
    config, big, other = (files[str((folder / "transformer" / n).resolve())] for n in ("config.json", "w.safetensors",
                                                                                          "w.bin"))
    assert config["sha256"] == _sha(folder / "transformer" / "config.json")
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert big["header_sha256"] == hashlib.sha256(raw[:8 + length]).hexdigest() and "sha256" not in big
    assert set(other) == {"size", "mtime_ns"}          # no header to digest: size and time alone
    save_file({"a": torch.zeros(64, 32)}, str(weights))   # another shape: another header
    again = provenance.model_identity(Model(str(folder)))["files"][str(weights.resolve())]
    assert again["header_sha256"] != big["header_sha256"]
    monkeypatch.setattr(provenance, "FULL_DIGEST_LIMIT", 1 << 30)        # control: small files are read whole
    whole = provenance.model_identity(Model(str(folder)))["files"][str(weights.resolve())]
    assert whole["sha256"] == _sha(weights) and "header_sha256" not in whole


def test_lora_file_digests_read_once_equal_independent_ones(tmp_path):
    """``file_digests`` maps the file once for both digests: the SHA-256 is the file's, and the tensors' digest is
    the one computed from the tensors as safetensors loads them, the same whatever the metadata (control: another
    tensor value changes it)."""
    import json as _json

    import torch
    from safetensors.torch import load_file, save_file

    from lora_run_rundir.provenance import file_digests

    def independent(path: Path) -> str:
        digest = hashlib.sha256()
        raw = path.read_bytes()
        header = _json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, tensor in sorted(load_file(str(path)).items()):
            digest.update(_json.dumps([name, header[name]["dtype"], list(tensor.shape)]).encode() + b"\0")
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    tensors = {"b.lora_up.weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
               "a.lora_down.weight": torch.ones(4, 2), "a.alpha": torch.tensor(8.0)}
    first, second, other = tmp_path / "1.safetensors", tmp_path / "2.safetensors", tmp_path / "3.safetensors"
    save_file(tensors, str(first), metadata={"ss_training_started_at": "1"})
    save_file(tensors, str(second), metadata={"ss_training_started_at": "2"})
    save_file({**tensors, "a.alpha": torch.tensor(4.0)}, str(other), metadata={"ss_training_started_at": "1"})
    one, two, three = (file_digests(p) for p in (first, second, other))
    assert one["sha256"] == _sha(first) and one["size"] == first.stat().st_size
    assert one["tensors_sha256"] == independent(first) == two["tensors_sha256"] and one["sha256"] != two["sha256"]
    assert three["tensors_sha256"] != one["tensors_sha256"]


def test_file_digests_are_read_once_for_an_unchanged_file(tmp_path, monkeypatch):
    """A file's digests are computed once while it stays the same file (renamed too: a checkpoint's LoRA hashed in
    its temp folder); a file written anew is read again and gets its new digests."""
    import torch
    from safetensors.torch import save_file

    from lora_run_rundir import provenance

    reads = []
    real = provenance._tensors_sha256
    monkeypatch.setattr(provenance, "_tensors_sha256", lambda data: reads.append(len(data)) or real(data))
    first = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(3)}, str(first))
    one = provenance.file_digests(first)
    moved = tmp_path / "b.safetensors"
    first.rename(moved)
    assert provenance.file_digests(moved) == one and len(reads) == 1
    fresh = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(3)}, str(fresh))          # the same size, another file
    os.replace(fresh, moved)
    two = provenance.file_digests(moved)
    assert len(reads) == 2 and two["tensors_sha256"] != one["tensors_sha256"] and two["sha256"] == _sha(moved)
