"""HunyuanImage-2.1 LoRA state dicts: ComfyUI ↔ kohya ↔ diffusers/peft.

Three layouts name the same block weights:

=====================================  ==============================  ===============================================
ComfyUI (``diffusion_model.`` + path)  kohya (``lora_unet_`` + name)    diffusers (``transformer.`` + path)
=====================================  ==============================  ===============================================
``double_blocks.N.img_attn.qkv``       ``double_blocks_N_img_attn_qkv``  ``transformer_blocks.N.attn.to_q/to_k/to_v``
``double_blocks.N.txt_attn.qkv``       ``…_txt_attn_qkv``                ``…attn.add_q_proj/add_k_proj/add_v_proj``
``double_blocks.N.img_attn.proj``      ``…_img_attn_proj``               ``…attn.to_out.0``
``double_blocks.N.txt_attn.proj``      ``…_txt_attn_proj``               ``…attn.to_add_out``
``double_blocks.N.img_mlp.0`` / ``.2``  ``…_img_mlp_0`` / ``_2``          ``…ff.net.0.proj`` / ``…ff.net.2``
``double_blocks.N.txt_mlp.0`` / ``.2``  ``…_txt_mlp_0`` / ``_2``          ``…ff_context.net.0.proj`` / ``…ff_context.net.2``
``double_blocks.N.img_mod.lin``        ``…_img_mod_lin``                 ``…norm1.linear``
``double_blocks.N.txt_mod.lin``        ``…_txt_mod_lin``                 ``…norm1_context.linear``
``single_blocks.N.linear1``            ``single_blocks_N_linear1``       ``single_transformer_blocks.N.attn.to_q/to_k/to_v`` + ``proj_mlp``
``single_blocks.N.linear2``            ``…_linear2``                     ``…proj_out``
``single_blocks.N.modulation.lin``     ``…_modulation_lin``              ``…norm.linear``
=====================================  ==============================  ===============================================

The split follows diffusers' ``scripts/convert_hunyuan_image_to_diffusers.py``: a fused ``qkv`` output is
q, k, v of ``hidden`` rows each; ``linear1`` is q, k, v and then the MLP input (``4·hidden`` rows); the
modulation layers keep their (shift, scale, gate) order. The block layout is the same as FLUX's, so the
exact fuse/split arithmetic of :mod:`lora_run_formats.flux` is reused for the block modules.

Names we read besides the ComfyUI ones:

- HunyuanImage's own module names, which diffusion-pipe's peft model uses before it renames them for its
  saved file (``img_attn_qkv``, ``img_attn_proj``, ``img_mlp.fc1``/``fc2``, ``img_mod.linear``,
  ``modulation.linear``);
- sd-scripts' kohya names (``networks.lora_hunyuan_image``: ``img_mlp_fc1``/``fc2``, ``img_mod_linear``,
  ``modulation_linear``), which ComfyUI does not load without renaming (sd-scripts ships
  ``convert_hunyuan_image_lora_to_comfy.py`` for that).

The files lora-run writes (output formats): ``comfyui`` is the ComfyUI layout (``diffusion_model.`` peft keys,
scale folded into ``lora_B``, no alpha), which ComfyUI loads directly; ``kohya`` uses sd-scripts' names with
alphas and ``ss_*`` metadata (:func:`to_sd_scripts_names`), the layout sd-scripts' trainer writes and reads
(ComfyUI needs sd-scripts' converter for it). Inside this module kohya dicts use ComfyUI's names
(``img_mlp_0``, ``img_mod_lin``, ``modulation_lin``), which ComfyUI also reads with a ``lora_unet_`` prefix.
ComfyUI-layout peft files (diffusion-pipe's ``adapter_model.safetensors``) carry no alpha: the LoRA acts at
scale 1. Only block modules are handled (diffusion-pipe trains nothing else); any other key raises
:class:`FormatError` naming it. torch is imported inside the functions.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from lora_run_formats import FormatError, kohya_modules
from lora_run_flux.lora import diffusers_to_kohya as _flux_diffusers_to_kohya
from lora_run_flux.lora import kohya_to_diffusers as _flux_kohya_to_diffusers

__all__ = ["FormatError", "comfy_to_diffusers", "diffusers_to_comfy", "comfy_to_kohya", "kohya_to_comfy",
           "diffusers_to_kohya", "kohya_to_diffusers", "normalize_kohya", "compact_fused", "kohya_metadata",
           "to_sd_scripts_names", "diffusers_to_sd_scripts",
           "detect_layout", "COMFY_PREFIX", "KOHYA_PREFIX"]

COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
MLP_RATIO = 4.0

#: kohya (underscore) module names inside a block → ComfyUI (dotted) names.
DOUBLE_NAMES: dict[str, str] = {
    "img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
    "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin",
    "txt_attn_qkv": "txt_attn.qkv", "txt_attn_proj": "txt_attn.proj", "txt_mlp_0": "txt_mlp.0",
    "txt_mlp_2": "txt_mlp.2", "txt_mod_lin": "txt_mod.lin",
}
SINGLE_NAMES: dict[str, str] = {"linear1": "linear1", "linear2": "linear2", "modulation_lin": "modulation.lin"}
#: Other spellings of the same modules (HunyuanImage's originals and sd-scripts' kohya names), underscored.
ALIASES: dict[str, str] = {
    "img_mlp_fc1": "img_mlp_0", "img_mlp_fc2": "img_mlp_2", "img_mod_linear": "img_mod_lin",
    "txt_mlp_fc1": "txt_mlp_0", "txt_mlp_fc2": "txt_mlp_2", "txt_mod_linear": "txt_mod_lin",
    "modulation_linear": "modulation_lin",
}
#: ComfyUI's names → sd-scripts' (``networks.lora_hunyuan_image``), for the kohya files we write.
SD_SCRIPTS_NAMES: dict[str, str] = {comfy: sd for sd, comfy in ALIASES.items()}
FUSED_PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>.+)\.(?P<which>lora_down\.weight|lora_up\.weight|alpha)$")
_BLOCK = re.compile(r"^(?P<kind>double_blocks|single_blocks)_(?P<index>\d+)_(?P<name>.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(?:transformer\.)?(?:transformer_blocks|single_transformer_blocks)\.\d+\.")


def _kohya_module(path: str, key: str) -> str:
    """A module path in any accepted spelling → the kohya module name (without ``lora_unet_``)."""
    flat = path.replace(".", "_")
    match = _BLOCK.match(flat)
    if match is None:
        raise FormatError(f"{key}: not a HunyuanImage-2.1 double/single block module (only block LoRAs are "
                          "supported)")
    name = ALIASES.get(match["name"], match["name"])
    table = DOUBLE_NAMES if match["kind"] == "double_blocks" else SINGLE_NAMES
    if name not in table:
        raise FormatError(f"{key}: {match['kind']}.{match['index']} has no LoRA-able module named "
                          f"'{match['name']}' (known: {', '.join(sorted(table))})")
    return f"{match['kind']}_{match['index']}_{name}"


def _comfy_path(kohya_module: str) -> str:
    match = _BLOCK.match(kohya_module)
    assert match is not None
    table = DOUBLE_NAMES if match["kind"] == "double_blocks" else SINGLE_NAMES
    return f"{match['kind']}.{match['index']}.{table[match['name']]}"


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """``"comfy"`` (peft keys on ComfyUI/original module names), ``"diffusers"``, ``"kohya"`` or ``"unknown"``."""
    keys = list(state_dict)
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(_DIFFUSERS_BLOCK.match(k) for k in keys):
        return "diffusers"
    if any(k.startswith(COMFY_PREFIX) or k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
        return "comfy"
    return "unknown"


def lora_targets(module: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a HunyuanImage-2.1 LoRA module goes (``lora_run_formats.lora_check.Targets``), in any layout the
    loader reads: a kohya module (``lora_unet_`` + ComfyUI's or sd-scripts' names), a ComfyUI one
    (``diffusion_model.`` + path, or the bare path) or a diffusers one (``transformer.`` + path) -> the
    transformer's layers it writes (q, k, v (and MLP input) of a fused one, in order). None for any other name."""
    from lora_run_flux.lora import lora_targets as flux_targets

    path = module[len(KOHYA_PREFIX):] if module.startswith(KOHYA_PREFIX) else module
    for prefix in ("transformer.", "base_model.model."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    if _DIFFUSERS_BLOCK.match(path):
        return "transformer", (path,)
    path = path[len(COMFY_PREFIX):] if path.startswith(COMFY_PREFIX) else path
    try:
        return flux_targets(KOHYA_PREFIX + _kohya_module(path, module))
    except FormatError:
        return None


# ------------------------------------------------------------------------------------ ComfyUI ↔ kohya
def comfy_to_kohya(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI-layout peft keys (``diffusion_model.<module>.lora_A/B.weight``; the prefix is optional, original
    HunyuanImage names are accepted) → kohya keys with ``alpha = rank`` (the file's scale 1 is kept)."""
    import torch

    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            raise FormatError(f"{key}: alpha tensors are not part of the ComfyUI peft layout (use kohya_to_* for "
                              "kohya files)")
        match = _PEFT_KEY.match(key)
        if match is None:
            raise FormatError(f"{key}: not a LoRA key (expected <module>.lora_A.weight or <module>.lora_B.weight)")
        path = match["module"]
        for prefix in (COMFY_PREFIX, "transformer.", "base_model.model."):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        pairs.setdefault(_kohya_module(path, key), {})[match["which"]] = value
    out: dict[str, Any] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise FormatError(f"{_comfy_path(module)}: has no {missing} weight")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(f"{_comfy_path(module)}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                              "form a Linear LoRA")
        name = KOHYA_PREFIX + module
        out[f"{name}.lora_down.weight"] = a
        out[f"{name}.lora_up.weight"] = b
        out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]), dtype=torch.float32)
    return out


def normalize_kohya(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A kohya HunyuanImage LoRA with sd-scripts' names (``img_mlp_fc1``, ``img_mod_linear``,
    ``modulation_linear``) → the same tensors under ComfyUI's names (``img_mlp_0``, ``img_mod_lin``,
    ``modulation_lin``). Already-normalized keys pass through; non-block keys raise :class:`FormatError`."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise FormatError(f"{key}: not a kohya LoRA key (expected lora_unet_<module>.lora_down.weight, "
                              ".lora_up.weight or .alpha)")
        out[f"{KOHYA_PREFIX}{_kohya_module(match['module'], key)}.{match['which']}"] = value
    return out


def kohya_to_comfy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A kohya HunyuanImage LoRA → ComfyUI-layout peft keys with ``alpha / rank`` folded into lora_B."""
    out: dict[str, Any] = {}
    for module, down, up, alpha in kohya_modules(normalize_kohya(state_dict), _KOHYA_KEY, "not a kohya LoRA key",
                                                 KOHYA_PREFIX):
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        path = COMFY_PREFIX + _comfy_path(module)
        out[f"{path}.lora_A.weight"] = down
        out[f"{path}.lora_B.weight"] = up if scale == 1.0 else (up.float() * scale).to(up.dtype)
    return out


def compact_fused(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Shrink fused kohya modules whose stacked down matrix repeats one block (a LoRA trained fused, then
    split and fused again) back to that block: ``up·[A;A;A] = (Σ up_i)·A``, alpha divided accordingly.
    Exact; other modules are returned unchanged."""
    import torch

    out = dict(state_dict)
    for key in list(state_dict):
        match = _KOHYA_KEY.match(key)
        if match is None or match["which"] != "lora_down.weight":
            continue
        name = _BLOCK.match(match["module"])
        parts = FUSED_PARTS.get(name["name"]) if name else None
        if not parts:
            continue
        base = key[: -len(".lora_down.weight")]
        down, up = state_dict[key], state_dict[f"{base}.lora_up.weight"]
        if down.shape[0] % parts:
            continue
        rank = down.shape[0] // parts
        blocks = torch.split(down, rank, dim=0)
        if not all(torch.equal(blocks[0], blk) for blk in blocks[1:]):
            continue
        out[key] = blocks[0].contiguous()
        out[f"{base}.lora_up.weight"] = sum(torch.split(up, rank, dim=1)).contiguous()
        alpha = state_dict.get(f"{base}.alpha")
        total = float(alpha.item()) if alpha is not None else float(down.shape[0])
        out[f"{base}.alpha"] = torch.tensor(total / parts, dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------------ diffusers ↔ kohya
def _check_diffusers_blocks(state_dict: Mapping[str, Any]) -> None:
    for key in state_dict:
        if not _DIFFUSERS_BLOCK.match(key):
            raise FormatError(f"{key}: not a HunyuanImage-2.1 transformer block LoRA key (expected "
                              "[transformer.]transformer_blocks.N.… or single_transformer_blocks.N.…)")


def diffusers_to_kohya(state_dict: Mapping[str, Any], alpha: float | None = None,
                       rank: int | None = None) -> dict[str, Any]:
    """A diffusers/peft HunyuanImage LoRA → kohya keys (ComfyUI names) with alphas.

    ``alpha``/``rank`` are the training values (peft scales by ``alpha / rank``); ``alpha=None`` means the
    weights already act at scale 1. Separate q/k/v (and MLP-input) LoRAs fuse exactly into one module
    (stacked down, block-diagonal up); when the parts share one down matrix the result keeps that rank.
    """
    _check_diffusers_blocks(state_dict)
    return compact_fused(_flux_diffusers_to_kohya(state_dict, alpha, rank, mlp_ratio=MLP_RATIO))


def to_sd_scripts_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A kohya HunyuanImage LoRA → the same tensors under sd-scripts' module names (``img_mlp_fc1``/``fc2``,
    ``img_mod_linear``, ``modulation_linear``; the attention names are shared): the layout sd-scripts'
    ``networks.lora_hunyuan_image`` saves and loads. :func:`normalize_kohya` is the inverse."""
    out: dict[str, Any] = {}
    for key, value in normalize_kohya(state_dict).items():
        match = _KOHYA_KEY.match(key)
        assert match is not None
        block = _BLOCK.match(match["module"])
        assert block is not None
        name = SD_SCRIPTS_NAMES.get(block["name"], block["name"])
        out[f"{KOHYA_PREFIX}{block['kind']}_{block['index']}_{name}.{match['which']}"] = value
    return out


def diffusers_to_sd_scripts(state_dict: Mapping[str, Any], alpha: float | None = None,
                            rank: int | None = None) -> dict[str, Any]:
    """diffusers/peft keys → a kohya file in sd-scripts' names, with alphas (our `kohya` output format)."""
    return to_sd_scripts_names(diffusers_to_kohya(state_dict, alpha, rank))


def kohya_to_diffusers(state_dict: Mapping[str, Any], *, prefix: bool = True) -> dict[str, Any]:
    """A kohya HunyuanImage LoRA (ComfyUI or sd-scripts names) → diffusers/peft keys, ``alpha / rank`` folded
    in (``transformer.`` prefix unless ``prefix=False``); loads with ``load_lora_adapter(…, prefix="transformer")``."""
    return _flux_kohya_to_diffusers(normalize_kohya(state_dict), prefix=prefix)


# ------------------------------------------------------------------------------------ ComfyUI ↔ diffusers
def comfy_to_diffusers(state_dict: Mapping[str, Any], *, prefix: bool = True) -> dict[str, Any]:
    """diffusion-pipe's ``adapter_model.safetensors`` (ComfyUI-layout peft keys, scale 1) → diffusers/peft keys.

    Fused q/k/v and ``linear1`` LoRAs are split exactly: each part gets the shared down matrix and its rows
    of the up matrix."""
    return kohya_to_diffusers(comfy_to_kohya(state_dict), prefix=prefix)


def diffusers_to_comfy(state_dict: Mapping[str, Any], alpha: float | None = None,
                       rank: int | None = None) -> dict[str, Any]:
    """diffusers/peft keys → ComfyUI-layout peft keys (``diffusion_model.`` prefix, scale folded in)."""
    return kohya_to_comfy(diffusers_to_kohya(state_dict, alpha, rank))


# ------------------------------------------------------------------------------------ metadata
def kohya_metadata(**fields: Any) -> dict[str, str]:
    """safetensors metadata for a HunyuanImage-2.1 kohya LoRA (all values strings).

    Fixed: ``ss_network_module = "networks.lora_hunyuan_image"`` and ``modelspec.architecture =
    "hunyuan-image-2.1/lora"`` (sd-scripts' names), ``modelspec.sai_model_spec = "1.0.1"``,
    ``modelspec.implementation`` (Tencent's repository), and our own ``ss_base_model_version =
    "hunyuan_image_2.1"`` / ``ss_model_type = "hunyuan_image"`` (replacing the FLUX values). Keywords follow
    :func:`lora_run_formats.flux.kohya_metadata`'s rules and override the fixed values.
    """
    from lora_run_flux.lora import kohya_metadata as flux_metadata

    base = {
        "ss_network_module": "networks.lora_hunyuan_image",
        "ss_base_model_version": "hunyuan_image_2.1",
        "ss_model_type": "hunyuan_image",
        "modelspec.architecture": "hunyuan-image-2.1/lora",
        "modelspec.implementation": "https://github.com/Tencent-Hunyuan/HunyuanImage-2.1",
    }
    return flux_metadata(**{**base, **fields})
