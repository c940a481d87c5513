"""FLUX.2 sources: the single files people download (BFL/ComfyUI transformer, `flux2-vae.safetensors`, a
one-file text encoder) load to the same weights as the diffusers folder; wrong files are named with the key."""
from __future__ import annotations

import pytest

from lora_run_devtools.testing import parse_recipe_text


@pytest.fixture(scope="module")
def klein_files(tiny_klein, tmp_path_factory):
    from lora_run_flux2.tiny import write_single_files

    return write_single_files(tiny_klein, tmp_path_factory.mktemp("klein-files"))


def _adapter(source, files: dict, family="flux.2-klein", model_extra: str = ""):
    from lora_run_native.adapters import adapter_class

    lines = "\n".join(f'{k} = "{v}"' for k, v in files.items())
    src = f'source = "{source}"' if source else ""
    recipe = parse_recipe_text(f"""
[model]
family = "{family}"
{src}
offline = true
{model_extra}
[model.files]
{lines}
[dataset]
path = "/tmp"
trigger = "ohwx"
[train]
steps = 1
mixed_precision = "no"
""")
    return adapter_class(family)(recipe)


def _same(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_single_files_load_to_the_folders_weights(tiny_klein, klein_files):
    import torch

    files = {"transformer": klein_files["transformer"], "vae": klein_files["vae"], "qwen3": klein_files["text_encoder"]}
    from_files = _adapter(tiny_klein, files)
    assert from_files.check_sources() == []
    from_folder = _adapter(tiny_klein, {})
    assert _same(from_files.load_transformer(), from_folder.load_transformer())
    dtype = torch.float32
    assert _same(from_files._component("vae", dtype), from_folder._component("vae", dtype))
    assert _same(from_files._component("qwen3", dtype), from_folder._component("qwen3", dtype))
    # the cache knows the transformer file from the folder's component
    assert from_files.encoder_identity("latents") != from_folder.encoder_identity("latents")


def test_the_dev_text_encoder_file_loads_in_the_names_transformers_saves_and_in_its_own(tiny_dev, tmp_path):
    """[dev]'s Mistral-3 text encoder as one file: transformers saves it with checkpoint names (``language_model.model.*``,
    ``vision_tower.*``, ``multi_modal_projector.*``) that differ from the model's own (``model.language_model.*`` …); both
    load to the folder's weights. Control: a file whose tensors match no name of the model is refused."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_run.errors import LoraRunError
    from lora_run_flux2.tiny import write_single_files

    files = write_single_files(tiny_dev, tmp_path / "files")
    saved = load_file(str(files["text_encoder"]))
    assert any(k.startswith("language_model.model.") for k in saved) and any(k.startswith("vision_tower.") for k in saved)
    dtype = torch.float32
    folder = _adapter(tiny_dev, {}, family="flux.2-dev")._component("mistral", dtype)
    own = tmp_path / "own-names.safetensors"
    save_file({k: v.contiguous() for k, v in folder.state_dict().items() if k != "lm_head.weight"}, str(own))
    for path in (files["text_encoder"], own):
        loaded = _adapter(tiny_dev, {"mistral": path}, family="flux.2-dev")._component("mistral", dtype)
        assert _same(loaded, folder), path
    alien = tmp_path / "alien.safetensors"
    save_file({f"encoder.block.{k}": v.contiguous() for k, v in saved.items()}, str(alien))
    with pytest.raises(LoraRunError, match=r"model\.files\.mistral.*does not match"):
        _adapter(tiny_dev, {"mistral": alien}, family="flux.2-dev")._component("mistral", dtype)


def test_transformer_config_is_inferred_without_a_source_config(tiny_klein, klein_files, tmp_path):
    """A folder with only the tokenizer (no transformer/ config): the config comes from the tensors."""
    import shutil

    only_tok = tmp_path / "tok"
    shutil.copytree(tiny_klein / "tokenizer", only_tok / "tokenizer")
    adapter = _adapter(only_tok, {"transformer": klein_files["transformer"]})
    assert _same(adapter.load_transformer(), _adapter(tiny_klein, {}).load_transformer())


def test_wrong_files_are_named(tiny_klein, tiny_single_bad, tmp_path):
    from lora_run_training import ModelSourceError

    flux1, garbage = tiny_single_bad
    problems = _adapter(tiny_klein, {"transformer": flux1}).check_sources()       # found by `lora-run check`
    assert problems == [(("model", "files", "transformer"), f"{flux1} is a FLUX.1 transformer (BFL layout, as "
                         "flux1-dev.safetensors), not a FLUX.2 transformer")]
    with pytest.raises(ModelSourceError, match=r"\[model.files.transformer\].*FLUX.1 transformer, not FLUX.2"):
        _adapter(tiny_klein, {"transformer": flux1}).load_transformer()
    with pytest.raises(ModelSourceError, match=r"\[model.files.transformer\].*not a readable safetensors"):
        _adapter(tiny_klein, {"transformer": garbage}).load_transformer()
    with pytest.raises(ModelSourceError, match=r"\[model.files.vae\].*FLUX.1 ae.safetensors"):
        _adapter(tiny_klein, {"vae": flux1.parent / "ae.safetensors"})._component("vae", None)


@pytest.fixture
def tiny_single_bad(tmp_path):
    """A FLUX.1-layout transformer/VAE pair and a file that is not safetensors."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "bad"
    folder.mkdir()
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
               "model.diffusion_model.double_blocks.0.img_mod.lin.weight": torch.zeros(6, 2)},
              str(folder / "flux1-dev.safetensors"))
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1, 1, 1, 1),
               "decoder.up.0.block.0.conv1.weight": torch.zeros(1, 1, 1, 1)}, str(folder / "ae.safetensors"))
    garbage = folder / "broken.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    return folder / "flux1-dev.safetensors", garbage


def test_without_source_every_file_is_required(klein_files):
    def file_problems(files):
        return sorted((key, why) for key, why in _adapter(None, files).check_sources() if key[1] == "files")

    problems = file_problems({"transformer": klein_files["transformer"]})
    assert [key for key, _ in problems] == [("model", "files", "qwen3"), ("model", "files", "vae")]
    problems = file_problems({"transformer": klein_files["transformer"].parent / "missing.safetensors",
                              "vae": klein_files["vae"], "qwen3": klein_files["text_encoder"]})
    assert [(key, why.startswith("file not found")) for key, why in problems] == [(("model", "files", "transformer"), True)]


def test_empty_prompt_for_cfg_samples_without_a_loaded_encoder(tiny_klein):
    """Base [klein] samples use CFG with the empty prompt: with every caption cached (no encoder loaded) it is
    encoded on demand, on the CPU, and the encoder leaves again."""
    import torch

    fresh = _adapter(tiny_klein, {})
    negative = fresh._negative()["prompt_embeds"]
    assert fresh.encoders == {}
    reference = _adapter(tiny_klein, {})
    reference.load_encoders(only=("qwen3",))
    assert torch.allclose(negative, reference._embed([""]), atol=1e-6)


def test_vae_file_without_any_config_uses_flux2s_defaults(tiny_klein, klein_files, tmp_path):
    """No VAE config in the source nor in the cache: diffusers' defaults (FLUX.2's autoencoder) are assumed; the
    tiny file does not match them and the error names the file and the key."""
    import shutil

    from lora_run_training import ModelSourceError

    only_tok = tmp_path / "tok"
    shutil.copytree(tiny_klein / "tokenizer", only_tok / "tokenizer")
    adapter = _adapter(only_tok, {"vae": klein_files["vae"]})
    with pytest.raises(ModelSourceError, match=r"\[model.files.vae\] flux2-vae.safetensors does not match the FLUX.2 "
                                               r"autoencoder config"):
        adapter._component("vae", None)


def test_files_without_source_need_the_hub_ids_small_files(klein_files, monkeypatch):
    """Offline with every component as a file but no source: the tokenizer's hub model must be cached."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(klein_files["transformer"].parent / "empty-hub-cache"))
    files = {"transformer": klein_files["transformer"], "vae": klein_files["vae"], "qwen3": klein_files["text_encoder"]}
    problems = _adapter(None, files).check_sources()
    assert [key for key, _ in problems] == [("model", "source")]
    assert "black-forest-labs/FLUX.2-klein-base-4B" in problems[0][1] and "not in the local" in problems[0][1]


def test_a_model_index_that_is_no_json_object_is_named_not_a_crash(tiny_klein, tmp_path):
    """FLUX.2's own reads of model_index.json (the pipeline's class, is_distilled) crashed `check` on one holding a
    JSON list ("unexpected AttributeError: 'list' object has no attribute 'get'", exit 1); every JSON file of a
    model folder is read through one reader that treats it as absent, and the folder check names it."""
    import shutil

    folder = tmp_path / "klein"
    shutil.copytree(tiny_klein, folder)
    (folder / "model_index.json").write_text("[1]")
    for extra in ("", 'version = "base-4b"'):         # the version is checked against is_distilled
        adapter = _adapter(folder, {}, model_extra=extra)
        assert [why for _key, why in adapter.check_sources()] == [
            f"{folder / 'model_index.json'}: is not a JSON object (it holds a list)"], extra
