"""FLUX.2 LoRA files: diffusers/peft ↔ kohya (``lora_unet_`` + BFL path) ↔ ComfyUI (``diffusion_model.`` +
BFL path, ``lora_A``/``lora_B``, scale folded in).

BFL's FLUX.2 fuses only the double blocks' q/k/v (``img_attn.qkv``, ``txt_attn.qkv``); the single blocks are
fused in diffusers too (``attn.to_qkv_mlp_proj`` = ``linear1``, ``attn.to_out`` = ``linear2``) and the
modulation layers are shared by all blocks (``double_stream_modulation_img.lin`` …):

===========================================  ====================================================
BFL module                                   diffusers module (``transformer.`` + path)
===========================================  ====================================================
``double_blocks.N.img_attn.qkv``             ``transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``
``double_blocks.N.txt_attn.qkv``             ``…attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
``double_blocks.N.img_attn.proj``            ``…attn.to_out.0``
``double_blocks.N.txt_attn.proj``            ``…attn.to_add_out``
``double_blocks.N.img_mlp.0`` / ``.2``       ``…ff.linear_in`` / ``…ff.linear_out``
``double_blocks.N.txt_mlp.0`` / ``.2``       ``…ff_context.linear_in`` / ``…ff_context.linear_out``
``single_blocks.N.linear1`` / ``linear2``    ``single_transformer_blocks.N.attn.to_qkv_mlp_proj`` / ``attn.to_out``
``double_stream_modulation_{img,txt}.lin``   ``double_stream_modulation_{img,txt}.linear``
``single_stream_modulation.lin``             ``single_stream_modulation.linear``
``img_in``, ``txt_in``                       ``x_embedder``, ``context_embedder``
``time_in.*``, ``guidance_in.*``             ``time_guidance_embed.{timestep,guidance}_embedder.linear_{1,2}``
``final_layer.linear``                       ``proj_out``
``final_layer.adaLN_modulation.1``           ``norm_out.linear`` (shift/scale halves swapped)
===========================================  ====================================================

Fusing q/k/v is exact: the fused down matrix stacks the three ``A`` (rank 3r), the up matrix is
block-diagonal in the ``B`` (kohya and diffusers' own FLUX.2 kohya reader split such a block-diagonal file
back into three rank-r LoRAs). Reading reuses the FLUX.1 module's key parser and scale split.
torch is imported inside the functions.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from lora_run_flux.lora import FormatError, _diffusers_modules, _split_scale, _swap_halves, kohya_metadata

KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
          "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
TOP = {"double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
       "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
       "single_stream_modulation.lin": "single_stream_modulation.linear",
       "img_in": "x_embedder", "txt_in": "context_embedder",
       "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
       "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
       "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
       "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
#: BFL's final modulation is (shift, scale), diffusers' ``norm_out.linear`` (scale, shift): the up matrix's
#: halves swap (diffusers' own FLUX.2 LoRA readers do not swap them: give diffusers the diffusers file)
SWAPPED = {"final_layer.adaLN_modulation.1"}

_QKV_PART = {part: (name, i) for name, parts in QKV.items() for i, part in enumerate(parts)}
_DOUBLE_REV = {v: k for k, v in DOUBLE.items()}
_SINGLE_REV = {v: k for k, v in SINGLE.items()}
_TOP_REV = {v: k for k, v in TOP.items()}


def bfl_module(module: str) -> tuple[str, int, int]:
    """diffusers transformer module → (BFL module path, part index, parts) — 3 parts for fused q/k/v."""
    m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", module)
    if m and m[2] in _QKV_PART:
        name, i = _QKV_PART[m[2]]
        return f"double_blocks.{m[1]}.{name}", i, 3
    if m and m[2] in _DOUBLE_REV:
        return f"double_blocks.{m[1]}.{_DOUBLE_REV[m[2]]}", 0, 1
    m = re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", module)
    if m and m[2] in _SINGLE_REV:
        return f"single_blocks.{m[1]}.{_SINGLE_REV[m[2]]}", 0, 1
    if module in _TOP_REV:
        return _TOP_REV[module], 0, 1
    raise FormatError(f"transformer.{module}: no BFL (kohya/ComfyUI) equivalent is known for this FLUX.2 module")


def diffusers_modules(module: str) -> list[str]:
    """BFL module path → the diffusers module paths it covers."""
    m = re.match(r"^double_blocks\.(\d+)\.(.+)$", module)
    if m and m[2] in QKV:
        return [f"transformer_blocks.{m[1]}.{p}" for p in QKV[m[2]]]
    if m and m[2] in DOUBLE:
        return [f"transformer_blocks.{m[1]}.{DOUBLE[m[2]]}"]
    m = re.match(r"^single_blocks\.(\d+)\.(.+)$", module)
    if m and m[2] in SINGLE:
        return [f"single_transformer_blocks.{m[1]}.{SINGLE[m[2]]}"]
    if module in TOP:
        return [TOP[module]]
    raise FormatError(f"{module}: not a FLUX.2 module this converter knows")


def _fused(state_dict: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{BFL module: (down, up)} without the scale; q/k/v fused block-diagonally."""
    import torch

    out: dict[str, tuple[Any, Any]] = {}
    parts: dict[str, list[Any]] = {}
    for (component, module), pair in sorted(_diffusers_modules(state_dict).items()):
        if component != "transformer":
            raise FormatError(f"{component}.{module}: FLUX.2 LoRAs carry no text-encoder part")
        name, index, count = bfl_module(module)
        if count == 1:
            out[name] = (pair["A"], _swap_halves(pair["B"]) if name in SWAPPED else pair["B"])
        else:
            parts.setdefault(name, [None] * count)[index] = pair
    for name, pairs in parts.items():
        if any(p is None for p in pairs):
            missing = [diffusers_modules(name)[i] for i, p in enumerate(pairs) if p is None]
            raise FormatError(f"transformer.{missing[0]}: q, k and v must all carry a LoRA to fuse into {name}")
        down = torch.cat([p["A"] for p in pairs], dim=0)
        up = torch.block_diag(*[p["B"] for p in pairs])
        out[name] = (down, up)
    return out


def diffusers_to_kohya(state_dict: Mapping[str, Any], *, alpha: float, rank: int) -> dict[str, Any]:
    """peft/diffusers FLUX.2 LoRA (scale not folded in) → kohya keys; each module's ``alpha`` keeps the
    training scale ``alpha / rank`` (a fused q/k/v of rank 3r gets alpha 3·alpha)."""
    import torch

    out: dict[str, Any] = {}
    for name, (down, up) in _fused(state_dict).items():
        key = KOHYA_PREFIX + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(alpha / rank * down.shape[0], dtype=torch.float32)
    return out


def diffusers_to_comfyui(state_dict: Mapping[str, Any], *, alpha: float, rank: int) -> dict[str, Any]:
    """peft/diffusers FLUX.2 LoRA → ComfyUI's ``diffusion_model.<BFL path>.lora_A/lora_B.weight`` with the
    scale folded into the weights (no alpha keys: ComfyUI, diffusers and diffusion-pipe read it at scale 1)."""
    s_down, s_up = _split_scale(alpha / rank)
    out: dict[str, Any] = {}
    for name, (down, up) in _fused(state_dict).items():
        out[f"{COMFY_PREFIX}{name}.lora_A.weight"] = down * s_down
        out[f"{COMFY_PREFIX}{name}.lora_B.weight"] = up * s_up
    return out


_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>.+?)\.(?P<which>lora_down\.weight|lora_up\.weight|alpha)$")
_COMFY_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_BFL_FROM_KOHYA = {n.replace(".", "_"): n for n in list(QKV) + list(DOUBLE) + list(SINGLE)}


def _kohya_module(flat: str) -> str:
    """``double_blocks_3_img_attn_qkv`` → ``double_blocks.3.img_attn.qkv``."""
    m = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", flat)
    if m and m[3] in _BFL_FROM_KOHYA:
        return f"{m[1]}.{m[2]}.{_BFL_FROM_KOHYA[m[3]]}"
    for name in TOP:
        if flat == name.replace(".", "_"):
            return name
    raise FormatError(f"lora_unet_{flat}: not a FLUX.2 module this converter knows")


def to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A FLUX.2 kohya or ComfyUI LoRA → ``transformer.<module>.lora_A/B.weight`` with the scale folded in.
    A fused q/k/v is split exactly: each part keeps the columns of the shared down matrix its block of the up
    matrix uses (all of them for a LoRA trained fused). Pairs are checked by the FLUX.1 module's parser."""
    import torch

    pairs: dict[str, Any] = {}
    alphas: dict[str, float] = {}
    for key, value in state_dict.items():
        kohya = _KOHYA_KEY.match(key)
        comfy = None if kohya else _COMFY_KEY.match(key)
        if kohya is None and comfy is None:
            raise FormatError(f"{key}: not a FLUX.2 kohya (lora_unet_…) or ComfyUI (diffusion_model.…) LoRA key")
        if kohya is not None:
            module = _kohya_module(kohya["module"])
            if kohya["which"] == "alpha":
                alphas[module] = float(value.item())
                continue
            side = "lora_A" if kohya["which"].startswith("lora_down") else "lora_B"
        else:
            module, side = comfy["module"], comfy["which"]
            diffusers_modules(module)
        pairs[f"{module}.{side}.weight"] = value
    out: dict[str, Any] = {}
    for (_, module), pair in sorted(_diffusers_modules(pairs).items()):
        down, up = pair["A"], pair["B"]
        s_down, s_up = _split_scale(alphas.get(module, down.shape[0]) / down.shape[0])
        targets = diffusers_modules(module)
        up = _swap_halves(up) if module in SWAPPED else up
        if up.shape[0] % len(targets):
            raise FormatError(f"{module}: up has {up.shape[0]} rows, not {len(targets)} equal parts")
        for target, piece in zip(targets, torch.chunk(up, len(targets), dim=0)):
            cols = piece.ne(0).any(dim=0)
            a, b = (down, piece) if bool(cols.all()) or not bool(cols.any()) else (down[cols], piece[:, cols])
            out[f"transformer.{target}.lora_A.weight"] = (a * s_down).contiguous()
            out[f"transformer.{target}.lora_B.weight"] = (b * s_up).contiguous()
    return out


def lora_targets(module: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a FLUX.2 LoRA module goes (``lora_run_formats.lora_check.Targets``): a kohya (``lora_unet_``) or
    ComfyUI (``diffusion_model.``) module on BFL's names -> the transformer's diffusers layers it writes (q, k, v of
    a fused one, in order); a diffusers one (``transformer.`` + path) -> itself. None for any other name."""
    try:
        if module.startswith(KOHYA_PREFIX):
            return "transformer", tuple(diffusers_modules(_kohya_module(module[len(KOHYA_PREFIX):])))
        if module.startswith(COMFY_PREFIX):
            return "transformer", tuple(diffusers_modules(module[len(COMFY_PREFIX):]))
    except FormatError:
        return None
    if module.startswith("transformer.") and len(module) > len("transformer."):
        return "transformer", (module[len("transformer."):],)
    return None


def flux2_kohya_metadata(variant: str, **fields: Any) -> dict[str, str]:
    """sd-scripts-style ``ss_*``/ModelSpec metadata for a FLUX.2 LoRA (``variant``: ``klein`` or ``dev``)."""
    return kohya_metadata(**{"ss_network_module": "networks.lora_flux2", "ss_base_model_version": f"flux2_{variant}",
                             "ss_model_type": "flux2", "modelspec.architecture": f"flux-2-{variant}/lora",
                             "modelspec.implementation": "https://github.com/black-forest-labs/flux2", **fields})
