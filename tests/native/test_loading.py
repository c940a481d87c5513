"""Model sources: diffusers folder, single files (BFL/LDM/ComfyUI layouts), clear errors, no download offline."""
from __future__ import annotations

import socket

import pytest

from lora_run_training import ModelSourceError

FILES = """
[model.files]
transformer = "{transformer}"
vae = "{vae}"
clip_l = "{clip_l}"
t5xxl = "{t5xxl}"
"""


def _files_recipe(flux_recipe, files, source, **override):
    paths = {k: str(v) for k, v in files.items()}
    paths.update(override)
    extra = FILES
    for key, value in paths.items():
        extra = extra.replace("{" + key + "}", value)
    return flux_recipe(extra, model=source)


def _adapter(path, sets=()):
    from lora_run.recipe import load_recipe
    from lora_run_native.adapters import adapter_class

    loaded = load_recipe(path, list(sets))
    return adapter_class("flux.1-dev")(loaded.recipe, device="cpu", shown=loaded.shown)


def test_single_files_load_the_same_model_as_the_diffusers_folder(flux_recipe, tiny_flux, tiny_single_files):
    import torch

    folder = _adapter(flux_recipe())
    single = _adapter(_files_recipe(flux_recipe, tiny_single_files, tiny_single_files["tokenizers"]))
    assert single.check_sources() == []
    for adapter in (folder, single):
        adapter.load_encoders()
    pixels = torch.rand(1, 3, 64, 80) * 2 - 1
    assert torch.equal(folder.encode_images(pixels), single.encode_images(pixels))
    a, b = folder.encode_captions(["ohwx, a photo"]), single.encode_captions(["ohwx, a photo"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = folder.load_transformer(), single.load_transformer()
    assert ta.config.num_layers == tb.config.num_layers and tuple(ta.config.axes_dims_rope) == tuple(tb.config.axes_dims_rope)
    noisy = torch.randn(1, 16, 8, 10)
    sigma = torch.tensor([0.4])
    with torch.no_grad():
        pa, pb = folder.predict(ta, noisy, sigma, a, 1.0), single.predict(tb, noisy, sigma, b, 1.0)
    assert float((pa - pb).abs().max()) < 1e-5     # same weights; only memory layout differs


def test_training_from_single_files(flux_recipe, run_recipe, tiny_single_files):
    ctx = run_recipe(_files_recipe(flux_recipe, tiny_single_files, tiny_single_files["tokenizers"]), ["train.steps=2"])
    assert ctx.artifacts["lora_kohya"].endswith("tiny.safetensors")


def test_wrong_file_names_the_key_and_file(flux_recipe, tiny_single_files):
    path = _files_recipe(flux_recipe, tiny_single_files, tiny_single_files["tokenizers"],
                         transformer=str(tiny_single_files["vae"]))
    with pytest.raises(ModelSourceError, match=r"\[model\.files\.transformer\] ae\.safetensors does not look like a "
                                               r"FLUX transformer"):
        _adapter(path).load_transformer()


def test_missing_files_and_folders_fail_check_with_exit_2(flux_recipe, tiny_single_files, tmp_path, run_cli):
    missing = _files_recipe(flux_recipe, tiny_single_files, tiny_single_files["tokenizers"],
                            clip_l=str(tmp_path / "nope" / "clip_l.safetensors"))
    result = run_cli("check", missing)
    assert result.returncode == 2
    assert "[model.files.clip_l] file not found" in result.stderr and "nope/clip_l.safetensors" in result.stderr
    assert "Traceback" not in result.stderr

    no_folder = flux_recipe(model=tmp_path / "no-such-model", name="r2.toml")
    result = run_cli("check", no_folder)
    assert result.returncode == 2 and "[model.source] folder not found" in result.stderr
    result = run_cli("check", no_folder, "--set", 'model.source=""')
    assert result.returncode == 2 and "[model.source] is empty" in result.stderr and "Traceback" not in result.stderr

    not_flux = tmp_path / "not-flux"
    (not_flux / "vae").mkdir(parents=True)
    result = run_cli("check", flux_recipe(model=not_flux, name="r3.toml"))
    assert result.returncode == 2 and "has no transformer/ folder" in result.stderr

    result = run_cli(flux_recipe(model=not_flux, name="r4.toml"), "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "[model.source]" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
@pytest.mark.parametrize("how", ["recipe", "environment"])
def test_offline_hub_id_is_refused_without_any_download(flux_recipe, tmp_path, monkeypatch, no_network, how, run_cli):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    if how == "recipe":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        sets = ["model.offline=true"]
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        sets = ["model.offline=false"]
    path = flux_recipe(name="hub.toml")
    adapter = _adapter(path, ["model.source=\"black-forest-labs/FLUX.1-dev\"", *sets])
    problems = adapter.check_sources()
    assert problems and problems[0][0] == ("model", "source") and "not in the local Hugging Face cache" in problems[0][1]
    with pytest.raises(ModelSourceError, match=r"\[model\.source\]"):
        adapter.load_encoders()
    with pytest.raises(ModelSourceError, match=r"\[model\.source\]"):
        adapter.load_transformer()
    assert no_network == [], "no connection was attempted"
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")}
    result = run_cli("check", path, "--set", "model.source=\"black-forest-labs/FLUX.1-dev\"", "--set", "model.offline=true",
                     env=env)
    assert result.returncode == 2 and "[model.source]" in result.stderr


def test_single_files_without_a_source_need_cached_tokenizers(flux_recipe, tiny_single_files, tmp_path, monkeypatch,
                                                              no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    extra = FILES
    for key in ("transformer", "vae", "clip_l", "t5xxl"):
        extra = extra.replace("{" + key + "}", str(tiny_single_files[key]))
    path = flux_recipe(extra)
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("source = ")]
    path.write_text("\n".join(lines), encoding="utf-8")
    adapter = _adapter(path)
    assert adapter.check_sources() == []
    with pytest.raises(ModelSourceError, match=r"\[model\.source\] is not set, so the CLIP-L text encoder's tokenizer"):
        adapter.load_encoders()
    assert no_network == []


def test_an_unreachable_hub_is_reported_in_seconds(flux_recipe, tmp_path, monkeypatch, unreachable_hub, run_cli):
    """A hub id, downloads allowed, no network: `check` and the run say so at once, and how to proceed."""
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    sets = ["model.source=\"black-forest-labs/FLUX.1-dev\"", "model.offline=false"]
    adapter = _adapter(flux_recipe(name="hub.toml"), sets)
    started = time.monotonic()
    problems = adapter.check_sources()
    assert [p[0] for p in problems] == [("model", "source")]
    assert "cannot be reached" in problems[0][1] and unreachable_hub in problems[0][1]
    assert "offline = true" in problems[0][1] and "hf download black-forest-labs/FLUX.1-dev" in problems[0][1]
    with pytest.raises(ModelSourceError, match=r"\[model\.source\] .*cannot be reached"):
        adapter.load_encoders()
    with pytest.raises(ModelSourceError, match=r"cannot be reached"):
        adapter.load_transformer()
    assert time.monotonic() - started < 30
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
           "HF_ENDPOINT": unreachable_hub, "HF_HUB_OFFLINE": ""}
    for command in (["check"], ["run", "--output-dir", tmp_path / "run"]):
        started = time.monotonic()
        result = run_cli(command[0], flux_recipe(name="hub.toml"), *(a for s in sets for a in ("--set", s)),
                         *command[1:], env=env, timeout=120)
        assert result.returncode == 2 and "cannot be reached" in result.stderr and "Traceback" not in result.stderr
        assert "Retrying" not in result.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()


def test_a_hub_probe_that_gets_no_answer_gives_up_in_time(monkeypatch):
    """A server that accepts the connection but never answers: the probe is bounded by its timeout."""
    import socket
    import time

    from lora_run_native.adapters import base

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        base._HUB_PROBES.clear()
        started = time.monotonic()
        reason = base.hub_unreachable(timeout=1.0)
        assert reason and time.monotonic() - started < 3
    base._HUB_PROBES.clear()


def test_an_unreachable_hub_with_the_model_cached_loads_from_the_cache(flux_recipe, tmp_path, monkeypatch,
                                                                      unreachable_hub, capsys):
    cache = tmp_path / "hf-home" / "hub"
    snapshot = cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--black-forest-labs--FLUX.1-dev" / "refs").mkdir()
    (cache / "models--black-forest-labs--FLUX.1-dev" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))   # read at import otherwise
    adapter = _adapter(flux_recipe(name="hub.toml"), ["model.source=\"black-forest-labs/FLUX.1-dev\"",
                                                      "model.offline=false"])
    assert adapter.check_sources() == []             # cached: nothing to report, the hub is not needed
    assert adapter.source_kwargs()["local_files_only"] is True
    assert "cannot be reached" in capsys.readouterr().err and adapter.hub_down
