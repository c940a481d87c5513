"""Test helpers for lora-run and for plugin authors (a pytest plugin, loaded through the `pytest11` entry point).

Fixtures:
- ``subject_dataset``: a folder of small captioned images (distinct patterns, trigger ``ohwx``);
- ``write_recipe``: ``write_recipe(body, name="recipe.toml") -> Path`` in a temp folder, with a
  ``{dataset}`` placeholder for the subject folder;
- ``plugins_with``: ``plugins_with(obj, ...)`` loads the installed plugins plus test plugin objects.

Functions: ``make_images`` (the images behind ``subject_dataset``), ``build_tiny(family, folder)`` (a built-in
family's tiny random model), ``parse_recipe_text(text)`` (a recipe from TOML text, without a file),
``header_only_weights`` / ``header_only_files`` (model files of the released kinds, ``MODEL_FILES``, holding only
their headers).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest


def build_tiny(family: str, folder: str | Path) -> Path:
    """The tiny random model of a built-in family (its package's ``tiny`` builder) written to ``folder``: FLUX.1-dev,
    HunyuanImage-2.1, Hunyuan-DiT v1.2, FLUX.2 [klein] or [dev]."""
    if family == "flux.1-dev":
        from lora_run_flux.tiny import build_tiny_flux
        return build_tiny_flux(folder)
    if family == "hunyuan-image-2.1":
        from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image
        return build_tiny_hunyuan_image(folder)
    if family == "hunyuan-dit-1.2":
        from lora_run_hunyuan_dit.tiny import build_tiny_hunyuan_dit
        return build_tiny_hunyuan_dit(folder)
    if family in ("flux.2-klein", "flux.2-dev"):
        from lora_run_flux2.tiny import build_tiny_flux2
        return build_tiny_flux2(folder, family.removeprefix("flux.2-"))
    raise ValueError(f"no tiny builder for family {family!r}")


def parse_recipe_text(text: str, name: str = "recipe.toml", base: Path | None = None, plugins: Any = None) -> Any:
    """Structure a recipe from TOML text with the tables of ``plugins`` (default: the installed plugins'); paths
    are relative to ``base`` (default: the current folder). Raises ``RecipeError`` naming ``name``."""
    from lora_run.errors import RecipeError
    from lora_run.plugins import load_plugins
    from lora_run.recipe import Problems, resolve_paths, structure, tomllib

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{name}: not valid TOML: {exc}") from None
    recipe_class = (plugins or load_plugins()).recipe_class
    resolve_paths(raw, base or Path.cwd(), recipe_class)
    raw.pop("extends", None)
    problems = Problems(name)
    recipe = structure(raw, problems, recipe_class)
    problems.raise_if_any()
    return recipe


#: Released single files by kind: tensors (real names and shapes) by which lora-run tells each kind from the
#: others (``lora_run_formats.layouts``: the names a layout needs, the shapes it compares, the widths a file shares
#: with its transformer), a subset of the file's own header. tests/formats/test_file_kinds.py checks each against
#: the whole header of the model built on the meta device from its published config (the single-file layouts by
#: the families' own converters). ``byt5_small``: byt5-small's vocabulary rows (the glyph encoder's own count may
#: differ; no check reads it).
MODEL_FILES: dict[str, dict[str, tuple[int, ...]]] = {
    "flux1-dev": {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
        "time_in.in_layer.weight": (3072, 256), "guidance_in.in_layer.weight": (3072, 256),
        "double_blocks.0.img_mod.lin.weight": (18432, 3072), "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.18.txt_mlp.2.weight": (3072, 12288), "single_blocks.0.linear1.weight": (21504, 3072),
        "single_blocks.37.linear2.weight": (3072, 15360), "final_layer.linear.weight": (64, 3072)},
    "ae": {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3)},
    "sdxl_vae": {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3), "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
    "hunyuan_image_2.1_vae": {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (64, 128, 3, 3),
        "encoder.down.4.downsample.conv.weight": (256, 1024, 3, 3),
        "encoder.mid.attn_1.q.weight": (1024, 1024, 1, 1), "encoder.conv_out.weight": (128, 1024, 3, 3),
        "decoder.conv_in.weight": (1024, 64, 3, 3), "decoder.up.0.upsample.conv.weight": (4096, 1024, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3)},
    "hunyuanimage2.1": {
        "img_in.proj.weight": (3584, 64, 1, 1), "txt_in.input_embedder.weight": (3584, 3584),
        "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight": (10752, 3584),
        "byt5_in.fc1.weight": (2048, 1472), "byt5_in.fc3.weight": (3584, 2048), "time_in.mlp.0.weight": (3584, 256),
        "double_blocks.0.img_mod.linear.weight": (21504, 3584), "double_blocks.0.img_attn_qkv.weight": (10752, 3584),
        "double_blocks.19.txt_mlp.fc2.weight": (3584, 14336), "single_blocks.0.linear1.weight": (25088, 3584),
        "single_blocks.39.linear2.weight": (3584, 17920), "final_layer.linear.weight": (64, 3584)},
    "clip_l": {
        "text_model.embeddings.token_embedding.weight": (49408, 768),
        "text_model.embeddings.position_embedding.weight": (77, 768),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072), "text_model.final_layer_norm.weight": (768,)},
    "clip_g": {
        "text_model.embeddings.token_embedding.weight": (49408, 1280),
        "text_model.embeddings.position_embedding.weight": (77, 1280),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (1280, 1280),
        "text_model.encoder.layers.31.mlp.fc2.weight": (1280, 5120), "text_model.final_layer_norm.weight": (1280,),
        "text_projection.weight": (1280, 1280)},
    "t5xxl": {
        "shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
        "encoder.block.23.layer.1.DenseReluDense.wo.weight": (4096, 10240),
        "encoder.final_layer_norm.weight": (4096,)},
    "umt5_xxl": {
        "shared.weight": (256384, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
        "encoder.block.23.layer.1.DenseReluDense.wo.weight": (4096, 10240),
        "encoder.final_layer_norm.weight": (4096,)},
    "byt5_small": {
        "shared.weight": (384, 1472), "encoder.block.0.layer.0.SelfAttention.q.weight": (384, 1472),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 6),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (3584, 1472),
        "encoder.block.11.layer.1.DenseReluDense.wo.weight": (1472, 3584),
        "encoder.final_layer_norm.weight": (1472,)},
    "qwen_2.5_vl_7b": {
        "model.embed_tokens.weight": (152064, 3584), "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
        "model.layers.0.self_attn.q_proj.bias": (3584,), "model.layers.0.self_attn.k_proj.weight": (512, 3584),
        "model.layers.27.mlp.down_proj.weight": (3584, 18944), "model.norm.weight": (3584,),
        "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14), "visual.blocks.0.attn.qkv.weight": (3840, 1280),
        "visual.merger.mlp.2.weight": (3584, 5120), "lm_head.weight": (152064, 3584)},
    "qwen_3_4b": {
        "model.embed_tokens.weight": (151936, 2560), "model.layers.0.self_attn.q_proj.weight": (4096, 2560),
        "model.layers.0.self_attn.q_norm.weight": (128,), "model.layers.0.self_attn.k_proj.weight": (1024, 2560),
        "model.layers.35.mlp.down_proj.weight": (2560, 9728), "model.norm.weight": (2560,)},
    "qwen_3_8b": {
        "model.embed_tokens.weight": (151936, 4096), "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
        "model.layers.0.self_attn.q_norm.weight": (128,), "model.layers.0.self_attn.k_proj.weight": (1024, 4096),
        "model.layers.35.mlp.down_proj.weight": (4096, 12288), "model.norm.weight": (4096,)},
    "flux-2-klein-4b": {
        "img_in.weight": (3072, 128), "txt_in.weight": (3072, 7680),
        "double_stream_modulation_img.lin.weight": (18432, 3072),
        "single_stream_modulation.lin.weight": (9216, 3072), "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "single_blocks.19.linear2.weight": (3072, 12288), "final_layer.linear.weight": (128, 3072)},
}
#: the kind of file each family's ``[model.files]`` slot takes (``MODEL_FILES``)
SLOT_FILES: dict[str, dict[str, str]] = {
    "flux.1-dev": {"transformer": "flux1-dev", "vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl"},
    "hunyuan-image-2.1": {"transformer": "hunyuanimage2.1", "vae": "hunyuan_image_2.1_vae", "qwen": "qwen_2.5_vl_7b",
                          "byt5": "byt5_small"},
    "flux.2-klein": {"transformer": "flux-2-klein-4b", "qwen3": "qwen_3_4b"},
}


def header_only_weights(path: str | Path, tensors: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A complete ``.safetensors`` file of ``tensors`` (name -> shape) whose data is never written: the header, then
    the file extended to its full size (a hole: a sparse file where the filesystem has them, so gigabytes of
    "weights" take no space). Every check of the header passes; loading it reads zeros."""
    from lora_run_formats.header import DTYPE_BITS

    header: dict[str, Any] = {"__metadata__": {"note": "header only: not really weights"}}
    offset = 0
    for name, shape in tensors.items():
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def header_only_files(root: Path, slots: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    """``{family: {slot: path}}``: for each family's ``[model.files]`` slots a ``.safetensors`` file under
    ``root/files/FAMILY/`` that holds only a header, for recipes whose files are named but never loaded (config
    generation, the engines' plans): the tensors of the released file the slot takes (``SLOT_FILES``,
    ``header_only_weights``), so the check of each file's kind passes; none for a slot of no known file."""
    files: dict[str, dict[str, str]] = {}
    for family, names in slots.items():
        files[family] = {}
        for slot in names:
            kind = SLOT_FILES.get(family, {}).get(slot)
            path = header_only_weights(Path(root) / "files" / family / f"{slot}.safetensors",
                                       MODEL_FILES[kind] if kind else {})
            files[family][slot] = str(path)
    return files


def make_images(folder: Path, count: int = 4, size: tuple[int, int] = (320, 288), trigger: str = "ohwx",
                captions: bool = True, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Distinct synthetic RGB images (no near-duplicates) with `<trigger>, ...` captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        freq = 2 + i
        base = np.stack([np.sin(xx / w * freq * np.pi + c) * np.cos(yy / h * (i + 1) * np.pi) for c in range(3)], -1)
        noise = rng.normal(0, 0.15, size=(h, w, 3))
        pixels = ((base + noise) * 0.5 + 0.5).clip(0, 1) * 255
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(pixels.astype("uint8")).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"{trigger}, a photo number {i}" if trigger else f"a photo {i}",
                                                encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def subject_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "subject"
    make_images(folder, count=4)
    return folder


@pytest.fixture
def write_recipe(tmp_path: Path, subject_dataset: Path) -> Callable[..., Path]:
    def write(body: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(body.replace("{dataset}", str(subject_dataset)), encoding="utf-8")
        return path
    return write


@pytest.fixture
def plugins_with() -> Callable[..., Any]:
    from lora_run.plugins import load_plugins

    def load(*objects: Any) -> Any:
        return load_plugins(extra=objects)
    return load
