"""The engine backends ran none of the native backend's checks of what a `[model.files]` file or the `[model] source`
folder is: `vae = "ae.safetensors"` under HunyuanImage-2.1, `ae.safetensors` as FLUX.1's transformer, CLIP-G as
CLIP-L, or a HunyuanImage-2.1 folder as diffusion-pipe's FLUX.1 source passed `lora-run check`, and the engine met
the file minutes later, with its own traceback. `check` and the run now refuse them for kohya and diffusion-pipe as
for native: the same line at the same key (one check, `ModelAdapter.single_file_problems` /
`source_folder_problems`), exit 2, before the engine's checkout is even looked for and before anything is written.
The files hold only the released files' headers (`lora_run_devtools.testing.MODEL_FILES`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_run.cli import main
from lora_run_devtools.testing import MODEL_FILES, SLOT_FILES, header_only_weights

BACKENDS = ("native", "kohya", "diffusion-pipe")

RECIPE = """\
[model]
family = "{family}"
offline = true
{source}
[model.files]
{files}
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 1
bucket_min = 256
bucket_step = 64
[lora]
rank = 4
alpha = 4
targets = "all-linear"
[optimizer]
name = "adamw"
[scheduler]
warmup_steps = 2
[train]
steps = 2
[eval]
enabled = false
[output]
name = "subject"
formats = ["kohya"]
[backend]
name = "{backend}"
"""


@pytest.fixture(autouse=True)
def _no_engine(monkeypatch, tmp_path):
    """No engine checkout or launcher is configured or found (the check must not need one)."""
    for name in ("LORA_RUN_SD_SCRIPTS", "LORA_RUN_DIFFUSION_PIPE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: header_only_weights(root / f"{kind}.safetensors", tensors) for kind, tensors in MODEL_FILES.items()}


def _recipe(tmp_path: Path, dataset: Path, family: str, backend: str, files: dict[str, Path],
            source: Path | None = None) -> Path:
    path = tmp_path / f"{backend}-{family}.toml"
    path.write_text(RECIPE.format(family=family, backend=backend, dataset=dataset,
                                  source=f'source = "{source}"' if source else "",
                                  files="\n".join(f'{k} = "{v}"' for k, v in files.items())), "utf-8")
    return path


def _errors(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "unexpected" not in captured.err, captured.err[-2000:]
    return code, [line for line in captured.err.splitlines() if line.startswith("error:")]


def _at(lines: list[str], key: str) -> list[str]:
    """The messages at ``[key]`` (the recipe file's name before it left out)."""
    return [line.split(f"[{key}] ", 1)[1] for line in lines if f"[{key}] " in line]


def _refused_alike(tmp_path, dataset, family, files, key, capsys, source=None) -> str:
    """Every backend's `check` and run refuse the recipe with one and the same message at ``key`` (exit 2, the run
    folder never made); the message."""
    said = {}
    for backend in BACKENDS:
        recipe = _recipe(tmp_path, dataset, family, backend, files, source)
        out = tmp_path / f"run-{backend}"
        for argv in (["check", str(recipe)], [str(recipe), "--output-dir", str(out)]):
            code, lines = _errors(argv, capsys)
            assert code == 2 and len(_at(lines, key)) == 1, (backend, argv[0], lines)
            said.setdefault(backend, _at(lines, key)[0])
            assert said[backend] == _at(lines, key)[0]
        assert not out.exists(), backend
    assert len(set(said.values())) == 1, said
    return said["native"]


def _files(released, family: str, **wrong: str) -> dict[str, Path]:
    return {slot: released[wrong.get(slot, kind)] for slot, kind in SLOT_FILES[family].items()}


def test_flux1s_ae_as_hunyuan_images_vae_is_refused_by_every_backend(released, subject_dataset, tmp_path, capsys):
    files = _files(released, "hunyuan-image-2.1")
    for backend in ("kohya", "diffusion-pipe"):               # the released files: no [model.files] line (control)
        code, lines = _errors(["check", str(_recipe(tmp_path, subject_dataset, "hunyuan-image-2.1", backend, files))],
                              capsys)
        assert not [line for line in lines if "[model.files" in line] and code == 0, (backend, lines)
    said = _refused_alike(tmp_path, subject_dataset, "hunyuan-image-2.1", {**files, "vae": released["ae"]},
                          "model.files.vae", capsys)
    assert said == (f"{released['ae']} is a FLUX.1 autoencoder (LDM layout, 16 latent channels, as ae.safetensors), "
                    "not a HunyuanImage-2.1 autoencoder (32×, 64 latent channels, as "
                    "hunyuan_image_2.1_vae_fp16.safetensors)")


@pytest.mark.parametrize("slot, kind, says", [
    ("transformer", "ae", "is a FLUX.1 autoencoder (LDM layout, 16 latent channels, as ae.safetensors), not a FLUX.1 "
                          "transformer (BFL layout, as flux1-dev.safetensors)"),
    ("clip_l", "clip_g", "is 1280 wide (CLIP-G's), but the transformer {transformer} is built for 768 (CLIP-L's; its "
                         "vector_in.in_layer.weight is [3072, 768])"),
])
def test_a_flux1_file_of_another_kind_or_width_is_refused_by_kohya_as_by_native(slot, kind, says, released,
                                                                                subject_dataset, tmp_path, capsys):
    """kohya reads all four FLUX.1 files (native with them and no source); diffusion-pipe reads FLUX.1's components
    from the source folder and refuses `[model.files]` but the transformer, so it is left out here."""
    files = _files(released, "flux.1-dev", **{slot: kind})
    said = {}
    for backend in ("native", "kohya"):
        recipe = _recipe(tmp_path, subject_dataset, "flux.1-dev", backend, files)
        code, lines = _errors(["check", str(recipe)], capsys)
        assert code == 2 and len(_at(lines, f"model.files.{slot}")) == 1, (backend, lines)
        said[backend] = _at(lines, f"model.files.{slot}")[0]
    assert said["native"] == said["kohya"]
    assert said["kohya"].startswith(f"{released[kind]} {says.format(transformer=files['transformer'])}")


def test_diffusion_pipes_flux_transformer_and_source_are_checked_as_natives(released, subject_dataset, tmp_path,
                                                                           capsys):
    """diffusion-pipe's FLUX.1: the transformer file is of the slot's kind (a FLUX.2 transformer is named as
    native names it), and the source folder is FLUX.1's (a HunyuanImage-2.1 folder is named with the family to
    set, before its configs are compared with FLUX.1's)."""
    flux = tmp_path / "FLUX.1-dev"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for backend in ("native", "diffusion-pipe"):
        recipe = _recipe(tmp_path, subject_dataset, "flux.1-dev", backend,
                         {"transformer": released["flux-2-klein-4b"]}, source=flux)
        code, lines = _errors(["check", str(recipe)], capsys)
        assert _at(lines, "model.files.transformer") == [
            f"{released['flux-2-klein-4b']} is a FLUX.2 transformer, not a FLUX.1 transformer (BFL layout, as "
            "flux1-dev.safetensors)"], (backend, lines)
    hunyuan = tmp_path / "HunyuanImage-2.1"
    hunyuan.mkdir()
    (hunyuan / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanImagePipeline"}))
    said = {}
    for backend in ("native", "diffusion-pipe"):
        recipe = _recipe(tmp_path, subject_dataset, "flux.1-dev", backend, {}, source=hunyuan)
        code, lines = _errors(["check", str(recipe)], capsys)
        assert code == 2, (backend, lines)
        said[backend] = _at(lines, "model.source")
    assert said["diffusion-pipe"][0] == said["native"][0] == (
        f"{hunyuan} is a hunyuan-image-2.1 model (its model_index.json names HunyuanImagePipeline), not a flux.1-dev "
        "one: set [model] family = \"hunyuan-image-2.1\", or [model] source to a flux.1-dev folder or hub id")
