"""Hostile binary files lora-run reads on a user's behalf: a model's single files and diffusers folder (weights,
config.json, model_index.json, tokenizer files), a LoRA given to `lora-run eval`, and the latent/text cache. Each
damaged, lying or misplaced file ends in one line naming the file or its recipe key, exit 2, before anything is
written where possible; never a traceback, a crash (exit 1), a hang or a silently wrong result."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from .conftest import run_cli


# ------------------------------------------------------------------------------------------- hostile variants
def _parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _assemble(header, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _largest(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def _hostile(kind: str, source: Path, target: Path) -> Path:
    """``target`` as a hostile variant of the valid safetensors file ``source``."""
    raw = source.read_bytes()
    header, data = _parts(source)
    (n,) = struct.unpack("<Q", raw[:8])
    big = _largest(header)
    if kind == "zero bytes":
        target.write_bytes(b"")
    elif kind == "five bytes":
        target.write_bytes(raw[:5])
    elif kind == "truncated data":
        target.write_bytes(raw[:len(raw) // 2])
    elif kind == "truncated header":
        target.write_bytes(raw[:8 + n // 2])
    elif kind == "header length 2**63":
        target.write_bytes(struct.pack("<Q", 2 ** 63) + raw[8:])
    elif kind == "header past the end":
        target.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    elif kind == "header not JSON":
        target.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe\x00garbage!garbag" + data)
    elif kind == "header a JSON list":
        target.write_bytes(_assemble([1, 2], data))
    elif kind == "offset out of range":
        header[big]["data_offsets"][1] += 10 ** 6
        target.write_bytes(_assemble(header, data))
    elif kind == "offsets overlap":
        first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
        header[second] = dict(header[first])
        target.write_bytes(_assemble(header, data))
    elif kind == "unknown dtype":
        header[big]["dtype"] = "Q99"
        target.write_bytes(_assemble(header, data))
    elif kind == "shape of other size":
        header[big]["shape"] = [math.prod(header[big]["shape"]) * 2]
        target.write_bytes(_assemble(header, data))
    elif kind == "metadata not strings":
        header["__metadata__"] = {"a": 1}
        target.write_bytes(_assemble(header, data))
    elif kind == "FIFO":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    elif kind == "link to /dev/zero":
        target.symlink_to("/dev/zero")
    elif kind == "link loop":
        target.symlink_to(target)
    elif kind == "dangling link":
        target.symlink_to(target.parent / "nowhere.safetensors")
    else:
        raise ValueError(kind)
    return target


#: variant -> what the one line says about it
DAMAGE = {"zero bytes": "too short to be a safetensors file (0 bytes)",
          "five bytes": "too short to be a safetensors file (5 bytes)",
          "truncated data": "truncated: its tensors need",
          "truncated header": "header claims",
          "header length 2**63": "header claims 9223372036854775808 bytes",
          "header past the end": "header claims",
          "header not JSON": "its header is not JSON",
          "header a JSON list": "its header is not a JSON object",
          "offset out of range": "do not hold a F32 tensor",
          "offsets overlap": "tensors overlap or leave a gap",
          "unknown dtype": "unknown dtype 'Q99'",
          "shape of other size": "do not hold a F32 tensor",
          "metadata not strings": "__metadata__ is not a table of strings",
          "FIFO": "is a FIFO (named pipe), not a regular file",
          "folder": "is a folder, not a regular file",
          "link to /dev/zero": "is a character device, not a regular file",
          "link loop": "cannot be read (Too many levels of symbolic links)",
          "dangling link": "not found (a dangling link)"}


@pytest.fixture(scope="module")
def single_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from lora_run_flux.tiny import write_single_files

    return write_single_files(tiny_model, tmp_path_factory.mktemp("single"))


def _with_source(recipe: Path, source: Path, extra: str = "") -> Path:
    """``recipe`` with ``[model] source`` set to ``source`` (and ``extra`` appended)."""
    body = re.sub(r'(?m)^source = ".*"$', lambda _m: f'source = "{source}"', recipe.read_text(), count=1)
    recipe.write_text(body + extra, encoding="utf-8")
    return recipe


def _files_recipe(tiny_recipe, files: dict[str, Path], name: str = "recipe.toml") -> Path:
    """The tiny recipe loading the model from its single files (the tokenizers from their folder)."""
    slots = "".join(f'{k} = "{files[k]}"\n' for k in ("transformer", "vae", "clip_l", "t5xxl"))
    return _with_source(tiny_recipe(name=name), files["tokenizers"], "\n[model.files]\n" + slots)


def _adapter(recipe: Path):
    from lora_run.recipe import load_recipe
    from lora_run_native.adapters import adapter_class

    loaded = load_recipe(recipe, [])
    return adapter_class("flux.1-dev")(loaded.recipe, device="cpu", shown=loaded.shown)


def _line(text: str, needle: str) -> str:
    return next((ln for ln in text.splitlines() if needle in ln), "")


# ----------------------------------------------------------------------------------------------- the header check
def test_the_header_check_agrees_with_the_safetensors_library(single_files, tmp_path, figures):
    """`lora_run_formats.read_header` refuses exactly the files the safetensors library cannot open, naming why,
    without torch and reading only the header (a FIFO is never opened: it would block)."""
    from safetensors import safe_open

    from lora_run_formats import safetensors_problem

    assert safetensors_problem(single_files["transformer"]) is None
    for n, (kind, message) in enumerate(DAMAGE.items()):
        path = _hostile(kind, single_files["transformer"], tmp_path / f"{n}.safetensors")
        problem = safetensors_problem(path)
        assert problem is not None and message in problem, (kind, problem)
        if kind not in ("FIFO", "link to /dev/zero"):
            with pytest.raises(Exception):   # noqa: B017, PT011 - the library's own refusal, whatever its type
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        fh.get_tensor(key)
    figures("hostile weights", cases=len(DAMAGE) + 1, faults=len(DAMAGE))


# ------------------------------------------------------------------------------------ [model.files] single files
def test_damaged_single_model_files_are_named_by_check_and_the_run(single_files, tiny_recipe, tmp_path, capsys,
                                                                     figures):
    """A damaged `[model.files]` file passed `check` and the run failed after caching the dataset, with the
    library's terse reason; a FIFO, a folder, `/dev/zero` or a link loop was "file not found"."""
    intact = _files_recipe(tiny_recipe, single_files)
    code, text = run_cli(["check", str(intact)], capsys, never="error:")
    assert code == 0, text
    for n, (kind, message) in enumerate(DAMAGE.items()):
        files = dict(single_files)
        files["transformer"] = _hostile(kind, single_files["transformer"], tmp_path / f"{n}.safetensors")
        recipe = _files_recipe(tiny_recipe, files, name=f"r{n}.toml")
        code, text = run_cli(["check", str(recipe)], capsys, never="unexpected")
        line = _line(text, "[model.files.transformer]")
        assert code == 2 and message in line and f"/{n}.safetensors" in line, (kind, text[-1500:])
    out = tmp_path / "run"
    code, text = run_cli([str(recipe), "--output-dir", str(out)], capsys, never="unexpected")
    assert code == 2 and "[model.files.transformer]" in text and not out.exists(), text[-1500:]
    figures("hostile weights", cases=len(DAMAGE) + 2, faults=len(DAMAGE) + 1)


def test_a_model_file_or_lora_whose_path_is_not_utf8_is_named(single_files, tiny_recipe, tmp_path, capsys):
    """safetensors opens UTF-8 paths only: a `[model.files]` file under a name with other bytes passed `check` and
    crashed the run ("UnicodeEncodeError: surrogates not allowed", exit 1); `eval --lora` said the library's
    "Path … is not valid UTF-8" as if the LoRA were damaged. Both name the file and why (exit 2)."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    folder.mkdir()
    transformer = Path(shutil.copy(single_files["transformer"], folder / "flux1-dev.safetensors"))
    recipe = _files_recipe(tiny_recipe, single_files)
    given = ["--set", f'model.files.transformer="{transformer}"']
    for argv in (["check", str(recipe), *given], [str(recipe), *given, "--output-dir", str(tmp_path / "run")]):
        code, text = run_cli(argv, capsys, never="unexpected")
        assert code == 2 and "[model.files.transformer]" in text and "its path is not valid UTF-8" in text, text
    assert not (tmp_path / "run").exists()
    lora = Path(shutil.copy(single_files["clip_l"], folder / "lora.safetensors"))
    code, text = run_cli(["eval", str(recipe), "--lora", str(lora)], capsys, never="unexpected")
    assert code == 2 and "its path is not valid UTF-8" in text, text


def test_a_single_file_of_another_layout_is_named(single_files, tiny_recipe, tmp_path):
    """A CLIP-L file whose tensor has another shape crashed the config inference (`ValueError: not enough values to
    unpack`, exit 1); every failure of a family's conversion of a file's tensors names the file."""
    from lora_run_training import ModelSourceError
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(single_files["clip_l"]))
    name = next(k for k in tensors if k.endswith("token_embedding.weight"))
    tensors[name] = tensors[name].reshape(-1).contiguous()
    flat = tmp_path / "clip_l.safetensors"
    save_file(tensors, str(flat))
    adapter = _adapter(_files_recipe(tiny_recipe, {**single_files, "clip_l": flat}))
    with pytest.raises(ModelSourceError, match=r"\[model\.files\.clip_l\] clip_l\.safetensors does not fit the "
                                               r"flux\.1-dev clip_l layout \(ValueError: "):
        adapter.load_encoders(only=("clip_l",))


# ------------------------------------------------------------------------------------------------ a model folder
def _copy_model(tiny_model, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


def _model_recipe(tiny_recipe, model: Path, name: str) -> Path:
    return _with_source(tiny_recipe(name=name), model)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _shard_index(folder: Path, shard: str) -> None:
    """transformer/ with its weights behind a shard index naming ``shard``."""
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").rename(folder / "transformer" / "part-1.safetensors")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "part-1.safetensors", "b.weight": shard}}))


FOLDER_DAMAGE = {
    "config not JSON": (lambda f: (f / "transformer" / "config.json").write_text("{not json"),
                        "transformer/config.json: is not valid JSON"),
    "config a list": (lambda f: (f / "vae" / "config.json").write_text("[1, 2]"),
                      "vae/config.json: is not a JSON object (it holds a list)"),
    "config a FIFO": (lambda f: _fifo(f / "text_encoder" / "config.json"),
                      "text_encoder/config.json: is a FIFO (named pipe), not a regular file"),
    "config a folder": (lambda f: ((f / "vae" / "config.json").unlink(), (f / "vae" / "config.json").mkdir()),
                        "vae/config.json: is a folder, not a regular file"),
    "tokenizer config a FIFO": (lambda f: _fifo(f / "tokenizer" / "tokenizer_config.json"),
                                "tokenizer/tokenizer_config.json: is a FIFO (named pipe)"),
    "model_index not UTF-8": (lambda f: (f / "model_index.json").write_bytes(b'{"a": "\xff"}'),
                              "model_index.json: is not valid JSON"),
    "scheduler config not JSON": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text(""),
                                  "scheduler/scheduler_config.json: is not valid JSON"),
    "weights truncated": (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (f / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]),
                          "vae/diffusion_pytorch_model.safetensors: truncated: its tensors need"),
    "weights /dev/zero": (lambda f: ((f / "text_encoder_2" / "model.safetensors").unlink(),
                                     (f / "text_encoder_2" / "model.safetensors").symlink_to("/dev/zero")),
                          "text_encoder_2/model.safetensors: is a character device"),
    "shard missing": (lambda f: _shard_index(f, "part-2.safetensors"),
                      "transformer/part-2.safetensors: missing (named by diffusion_pytorch_model.safetensors.index.json)"),
    "shard outside": (lambda f: _shard_index(f, "../vae/diffusion_pytorch_model.safetensors"),
                      "names the shard ../vae/diffusion_pytorch_model.safetensors, which is not a file name in its folder"),
}


def test_damaged_files_of_a_model_folder_are_named_by_check_and_the_run(tiny_model, tiny_recipe, tmp_path, capsys,
                                                                         figures):
    """diffusers and transformers met these files only after the dataset was cached: a tokenizer config that is a
    FIFO crashed (`OverflowError: int too big to convert`, exit 1), a config.json that is a FIFO or a folder was "no
    file named config.json", a damaged weights file "Unable to load weights" without the reason, and a damaged
    model_index.json or scheduler config was not seen at all."""
    for n, (kind, (damage, message)) in enumerate(FOLDER_DAMAGE.items()):
        model = _copy_model(tiny_model, tmp_path, f"model-{n}")
        damage(model)
        recipe = _model_recipe(tiny_recipe, model, f"r{n}.toml")
        code, text = run_cli(["check", str(recipe)], capsys, never="unexpected")
        line = _line(text, "[model.source]")
        assert code == 2 and message in line and str(model) in line, (kind, text[-1500:])
        if kind == "tokenizer config a FIFO":      # the crash it was: the run stops before writing anything
            out = tmp_path / "run"
            code, text = run_cli([str(recipe), "--output-dir", str(out)], capsys, never="unexpected")
            assert code == 2 and message in text and not out.exists(), text[-1500:]
    figures("hostile weights", cases=len(FOLDER_DAMAGE) + 1, faults=len(FOLDER_DAMAGE) + 1)


def test_a_hub_snapshot_may_lack_shards_not_downloaded_yet(tiny_model, tmp_path):
    """A hub model's snapshot in the local cache is checked too, but a shard its index names and the cache does not
    hold yet is downloaded when the model loads: only a local folder must hold every shard."""
    from lora_run_formats.model_files import folder_problems

    model = _copy_model(tiny_model, tmp_path, "snapshot")
    _shard_index(model, "part-2.safetensors")
    assert folder_problems(model, partial=True) == []
    assert [p.split(": ", 1)[1] for p in folder_problems(model)] == [
        "missing (named by diffusion_pytorch_model.safetensors.index.json)"]


def test_weights_that_do_not_fit_their_config_are_refused(tiny_model, tiny_recipe, tmp_path):
    """A config.json with fewer blocks than its weights trained a smaller model, tensors of the weights the model
    has no place for were dropped, and weights missing from a text encoder's file were initialised randomly:
    diffusers and transformers only warn (unseen). Each is refused, naming the component folder (the fewer blocks
    before the model is built: tests/formats/test_config_fit.py); the intact folder loads."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_run_training import ModelSourceError

    model = _copy_model(tiny_model, tmp_path, "fewer-blocks")
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 0}))
    with pytest.raises(ModelSourceError, match=r"\[model\.source\] .*/transformer/config\.json: num_layers = 0, but "
                                               r"the weights hold 1 double block \(transformer_blocks\.0\)"):
        _adapter(_model_recipe(tiny_recipe, model, "a.toml")).load_transformer()
    model = _copy_model(tiny_model, tmp_path, "extra-tensor")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "proj_extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(ModelSourceError, match=r"\[model\.source\] .*/transformer: its weights do not fit its "
                                               r"config\.json \(the FLUX transformer\): 1 tensor\(s\) of its files "
                                               r"have no place in the model \(proj_extra\.weight"):
        _adapter(_model_recipe(tiny_recipe, model, "a2.toml")).load_transformer()
    model = _copy_model(tiny_model, tmp_path, "missing-weight")
    weights = model / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors[next(k for k in tensors if "mlp.fc1.weight" in k)]
    save_file(tensors, str(weights))
    with pytest.raises(ModelSourceError, match=r"/text_encoder: its weights do not fit its config\.json .*1 "
                                               r"weight\(s\) missing from its files \(.*mlp\.fc1\.weight"):
        _adapter(_model_recipe(tiny_recipe, model, "b.toml")).load_encoders(only=("clip_l",))
    adapter = _adapter(_model_recipe(tiny_recipe, tiny_model, "c.toml"))      # the control
    assert isinstance(adapter.load_transformer(), torch.nn.Module)


@pytest.mark.slow
def test_nan_weights_are_named_not_blamed_on_the_learning_rate(single_files, tiny_model, tiny_recipe, tmp_path,
                                                              capsys, figures):
    """A model file holding NaN ended as "the loss became nan … lower the learning rate" (exit 1): the VAE's NaN
    latents were even cached. The file is named (exit 2) and nothing non-finite is cached."""
    import torch
    from safetensors.torch import load_file, save_file

    def poisoned(source: Path, target: Path) -> Path:
        tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in load_file(str(source)).items()}
        save_file(tensors, str(target))
        return target

    vae = poisoned(single_files["vae"], tmp_path / "ae.safetensors")
    cache = tmp_path / "cache"
    recipe = _files_recipe(tiny_recipe, {**single_files, "vae": vae})
    recipe.write_text(recipe.read_text().replace("[train]\n", f'[train]\ncache_dir = "{cache}"\n', 1))
    code, text = run_cli([str(recipe), "--output-dir", str(tmp_path / "run-vae")], capsys, never="unexpected")
    assert code == 2 and "[model.files.vae] ae.safetensors: its weights hold NaN or inf" in text, text[-1500:]
    assert not list(cache.rglob("*.safetensors")), "no NaN latent is cached"
    model = _copy_model(tiny_model, tmp_path, "nan-transformer")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    poisoned(Path(shutil.copy(weights, tmp_path / "w.safetensors")), weights)
    code, text = run_cli([str(_model_recipe(tiny_recipe, model, "t.toml")), "--output-dir", str(tmp_path / "run-t")],
                         capsys, never="unexpected")
    assert code == 2 and f"[model.source] {model}: the transformer weights hold NaN or inf" in text, text[-1500:]
    assert "learning rate" not in text
    figures("hostile weights", cases=2, faults=2)


# ----------------------------------------------------------------------------------------- LoRAs for `eval --lora`
EVAL = ["--set", 'eval.prompts=["{trigger}"]', "--set", "eval.strengths=[1.0]", "--set", "eval.seeds=[1]",
        "--set", "eval.steps=2"]


def _lora(path: Path, module: str = "double_blocks_0_img_attn_proj", width: int = 64, value: float = 0.01,
          dtype=None) -> Path:
    """A one-module kohya LoRA for the tiny FLUX model (its attention projection is 64 wide)."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"lora_unet_{module}.lora_down.weight": torch.full((4, width), value),
               f"lora_unet_{module}.lora_up.weight": torch.full((64, 4), value),
               f"lora_unet_{module}.alpha": torch.tensor(4.0)}
    save_file({k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}, str(path))
    return path


def test_eval_refuses_a_broken_lora_before_any_model_loads(tiny_recipe, tmp_path, capsys, figures):
    """A LoRA holding NaN (or int tensors) was evaluated: exit 0, black images scored as the LoRA's; a truncated one
    loaded the whole pipeline first. Each is refused naming the file (exit 2) before anything loads or is written."""
    import torch

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(_lora(tmp_path / "t.safetensors").read_bytes()[:-10])
    cases = [(_lora(tmp_path / "nan.safetensors", value=float("nan")), "holds NaN or inf values"),
             (_lora(tmp_path / "inf.safetensors", value=float("inf")), "holds NaN or inf values"),
             (_lora(tmp_path / "int.safetensors", dtype=torch.int32), "is I32, not floating point"),
             (truncated, "not a LoRA file: truncated: its tensors need")]
    for lora, message in cases:
        out = tmp_path / f"eval-{lora.stem}"
        code, text = run_cli(["eval", str(tiny_recipe()), "--lora", str(lora), "--output-dir", str(out), *EVAL],
                             capsys, never="unexpected")
        assert code == 2 and f"--lora {lora}: not a LoRA file: " in text and message in text, text[-1500:]
        assert "generating" not in text and not out.exists()
    figures("hostile weights", cases=len(cases), faults=len(cases))


@pytest.mark.slow
def test_eval_refuses_a_lora_that_does_not_fit_the_model(tiny_recipe, single_files, tmp_path, capsys, figures,
                                                          monkeypatch):
    """A LoRA naming layers the model does not have was applied in part, silently (diffusers only warns); one wider
    than its layers crashed at the first image (exit 1: diffusers widened the layer). Both are refused naming the
    file (exit 2), nothing written; the intact LoRA is evaluated. Against a model folder and a transformer given as a
    BFL single file, from the headers before anything loads (``lora_run_formats.lora_check``;
    tests/reliability/test_lora_check.py); where the headers do not say (a single file whose layout the family does
    not read: here FLUX.1's reading switched off), by the loader (``require_lora_fit``), after the pipeline's load."""
    from lora_run_flux.adapter import FluxAdapter

    folder, files = str(tiny_recipe()), str(_files_recipe(tiny_recipe, single_files, name="files.toml"))
    other = _lora(tmp_path / "other.safetensors", module="double_blocks_7_img_attn_proj")
    wide = _lora(tmp_path / "wide.safetensors", width=128)
    before = {other: "module lora_unet_double_blocks_7_img_attn_proj: names the layer transformer.transformer_blocks.7."
                     "attn.to_out.0, which this model does not have",
              wide: "module lora_unet_double_blocks_0_img_attn_proj: lora_down.weight is [4, 128] (128 inputs), but "
                    "transformer.transformer_blocks.0.attn.to_out.0 takes 64 inputs"}
    after = {other: "does not fit this FLUX.1 model (2 of its tensors; transformer.transformer_blocks.7.attn.to_out.0."
                    "lora_A.weight names no linear layer of the FLUX.1 model …)",
             wide: "has shape (4, 128); the layer has 64 inputs"}
    cases = [(recipe, lora, before[lora], False) for recipe in (folder, files) for lora in (other, wide)]
    cases += [(files, lora, after[lora], True) for lora in (other, wide)]
    for n, (recipe, lora, message, loaded) in enumerate(cases):
        out = tmp_path / f"eval-{n}-{lora.stem}"
        with monkeypatch.context() as patch:
            if loaded:
                patch.setattr(FluxAdapter, "file_layer_shapes", lambda self, key, header: None)
            code, text = run_cli(["eval", recipe, "--lora", str(lora), "--output-dir", str(out), *EVAL], capsys,
                                 never="unexpected")
        assert code == 2 and message in text and lora.name in text, (lora.name, text[-1500:])
        assert ("generating" in text) == loaded and not out.exists(), (lora.name, text[-1500:])
    out = tmp_path / "eval-good"
    code, text = run_cli(["eval", folder, "--lora", str(_lora(tmp_path / "good.safetensors")), "--output-dir",
                          str(out), *EVAL], capsys, never="unexpected")
    assert code == 0 and (out / "report.html").is_file(), text[-1500:]
    figures("hostile weights", cases=len(cases) + 1, faults=len(cases))


# --------------------------------------------------------------------------------------------------- the cache
def test_a_folder_or_file_in_the_way_of_an_atomic_write_is_named(tmp_path):
    """The cache (and every atomic write) crashed on a folder where its file goes (`IsADirectoryError`) or a file
    where its folder goes (`NotADirectoryError`, `FileExistsError`): exit 1, after the model had loaded."""
    from lora_run.errors import OutputError
    from lora_run_rundir import atomic_write_text

    (tmp_path / "entry.safetensors").mkdir()
    (tmp_path / "entry.safetensors" / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match=r"entry\.safetensors: is a folder where lora-run writes a file"):
        atomic_write_text(tmp_path / "entry.safetensors", "x")
    assert (tmp_path / "entry.safetensors" / "mine.txt").read_text() == "keep"
    (tmp_path / "shard").write_text("mine")
    with pytest.raises(OutputError, match=r"/shard: is not a folder, but lora-run writes .*/shard/deep/x\.json"):
        atomic_write_text(tmp_path / "shard" / "deep" / "x.json", "x")
    assert (tmp_path / "shard").read_text() == "mine"
    (tmp_path / "link").symlink_to(tmp_path / "target.txt")      # a link at the name is replaced, never followed
    atomic_write_text(tmp_path / "link", "new")
    assert not (tmp_path / "link").is_symlink() and not (tmp_path / "target.txt").exists()


@pytest.mark.slow
def test_a_cache_with_a_file_where_its_folder_goes_is_named(tiny_recipe, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "latents").write_text("someone's notes")
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text().replace("[train]\n", f'[train]\ncache_dir = "{cache}"\n', 1))
    code, text = run_cli([str(recipe), "--output-dir", str(tmp_path / "run")], capsys, never="unexpected")
    # refused by the pre-flight now, before the model loads (a cache folder must be lora-run's: test_owned_writes.py)
    assert code == 2 and "[train.cache_dir]" in text and "latents (a file where lora-run keeps a folder)" in text, \
        text[-1500:]
    assert (cache / "latents").read_text() == "someone's notes"


# ------------------------------------------------------------------------------- the loss log beside an eval's LoRA
def test_a_damaged_loss_log_beside_a_lora_is_left_out(tiny_recipe, tmp_path, capsys, figures):
    """`eval --lora` reads the loss log of the LoRA's run folder for its report: a log that was not UTF-8 or held
    a line nested too deep ended the evaluation after its images were generated ("unexpected UnicodeDecodeError",
    exit 1), a FIFO there hung it and a link to /dev/zero filled the memory. Bad lines are skipped, a log that is
    not a regular file is left out with a warning naming it."""
    import threading

    from lora_run_eval.metrics import read_loss

    log = tmp_path / "loss.jsonl"
    log.write_bytes(b'\xff\xfe{"step": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n{"step": 2, "loss": 0.5}\n')
    assert read_loss(log) == [(2, 0.5)]
    for name, make in (("fifo", os.mkfifo), ("zero", lambda p: os.symlink("/dev/zero", p))):
        odd = tmp_path / f"{name}.jsonl"
        make(odd)
        found: list = []
        reader = threading.Thread(target=lambda p=odd: found.append(read_loss(p)), daemon=True)
        reader.start()
        reader.join(20)
        assert found == [[]], name
        assert f"warning: {odd}: is a " in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "eval" / "loss.jsonl").write_bytes(b"\xff\xfe not UTF-8\n")
    code, text = run_cli(["eval", str(tiny_recipe()), "--lora", str(_lora(run / "lora.safetensors")), "--output-dir",
                          str(tmp_path / "eval"), *EVAL], capsys, never="unexpected")
    assert code == 0 and (tmp_path / "eval" / "report.html").is_file(), text[-1500:]
    figures("hostile weights", cases=4, faults=4)
