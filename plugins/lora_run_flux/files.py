"""FLUX.1 single-file checkpoints as ComfyUI / sd-scripts users have them.

- ``flux1-dev.safetensors``: the transformer in BFL's layout (``double_blocks.N.img_attn.qkv`` …, fused q/k/v
  and ``linear1``), optionally under ``model.diffusion_model.``;
- ``ae.safetensors``: the autoencoder in the original LDM layout (``encoder.down.N.block.M`` …);
- ``clip_l.safetensors`` / ``t5xxl_*.safetensors``: transformers' own key layout (``text_model.…`` /
  ``encoder.block.N…``), sometimes under a prefix.

This module converts these layouts to diffusers' and back (the reverse is used to write the tiny test model
as single files) and infers each model's config from the tensor shapes when no config is available,
following FLUX.1's conventions (RoPE axes ``head_dim/8, 7·head_dim/16, 7·head_dim/16``; CLIP heads of 64
features; VAE group norm of 32 groups; FLUX VAE scaling 0.3611 / shift 0.1159).
"""
from __future__ import annotations

import re
from typing import Any

from lora_run_native.single_files import (  # noqa: F401 - the encoders' helpers, re-exported
    LayoutError, clip_state_dict, count_blocks, infer_clip_config, infer_t5_config, strip_prefixes, t5_state_dict)

FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159

# ------------------------------------------------------------------------------------------ transformer
# (diffusers name relative to the block, BFL name relative to the block) for un-fused layers (weight + bias).
_DOUBLE_PLAIN = [
    ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
]
_DOUBLE_NORMS = [
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"), ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
]
_DOUBLE_FUSED = [
    (("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.qkv"),
]
_SINGLE_PLAIN = [("norm.linear", "modulation.lin"), ("proj_out", "linear2")]
_SINGLE_NORMS = [("attn.norm_q.weight", "norm.query_norm.scale"), ("attn.norm_k.weight", "norm.key_norm.scale")]
_SINGLE_FUSED = (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear1")
_TOP_PLAIN = [
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear"),
]
_SWAPPED = ("norm_out.linear", "final_layer.adaLN_modulation.1")   # BFL (shift, scale) ↔ diffusers (scale, shift)
_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def _swap(t: Any) -> Any:
    import torch

    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _renamed(get: Any, d: str, b: str, plain: list[tuple[str, str]], norms: list[tuple[str, str]],
             to_diffusers: bool = True) -> dict[str, Any]:
    """One block's un-fused tensors under the other layout's names (``d``/``b``: the block's diffusers and BFL
    prefixes): BFL → diffusers, or back with ``to_diffusers=False``. ``get`` reads a tensor of the source."""
    pairs = [(f"{dn}.{suffix}", f"{bn}.{suffix}") for dn, bn in plain for suffix in ("weight", "bias")] + list(norms)
    if to_diffusers:
        return {d + dn: get(b + bn) for dn, bn in pairs}
    return {b + bn: get(d + dn) for dn, bn in pairs}


def transformer_bfl_to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """BFL ``flux1-dev.safetensors`` tensors → ``FluxTransformer2DModel`` state dict (any model size)."""
    import torch

    sd = strip_prefixes(dict(sd), _TRANSFORMER_PREFIXES)
    if "img_in.weight" not in sd or not any(k.startswith("double_blocks.") for k in sd):
        raise LayoutError("no img_in / double_blocks.* tensors: not a FLUX transformer in BFL layout")
    out: dict[str, Any] = {}
    hidden = sd["img_in.weight"].shape[0]

    def take(bfl: str) -> Any:
        if bfl not in sd:
            raise LayoutError(f"missing tensor {bfl}")
        return sd.pop(bfl)

    for dname, bname in _TOP_PLAIN:
        if f"{bname}.weight" in sd:
            out[f"{dname}.weight"], out[f"{dname}.bias"] = take(f"{bname}.weight"), take(f"{bname}.bias")
    out[f"{_SWAPPED[0]}.weight"] = _swap(take(f"{_SWAPPED[1]}.weight"))
    out[f"{_SWAPPED[0]}.bias"] = _swap(take(f"{_SWAPPED[1]}.bias"))
    for i in range(count_blocks(sd, r"double_blocks\.(\d+)\.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out.update(_renamed(take, d, b, _DOUBLE_PLAIN, _DOUBLE_NORMS))
        for parts, bname in _DOUBLE_FUSED:
            for suffix in ("weight", "bias"):
                for dname, piece in zip(parts, torch.chunk(take(f"{b}{bname}.{suffix}"), 3, dim=0)):
                    out[f"{d}{dname}.{suffix}"] = piece.clone()
    for i in range(count_blocks(sd, r"single_blocks\.(\d+)\.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out.update(_renamed(take, d, b, _SINGLE_PLAIN, _SINGLE_NORMS))
        parts, bname = _SINGLE_FUSED
        for suffix in ("weight", "bias"):
            fused = take(f"{b}{bname}.{suffix}")
            sizes = [hidden, hidden, hidden, fused.shape[0] - 3 * hidden]
            for dname, piece in zip(parts, torch.split(fused, sizes, dim=0)):
                out[f"{d}{dname}.{suffix}"] = piece.clone()
    return out


def transformer_bfl_layer_shapes(shapes: dict[str, Any]) -> dict[str, Any] | None:
    """The weight shapes ``(outputs, inputs)`` of the diffusers layers a BFL transformer file becomes, from its
    header's tensor shapes alone (``transformer_bfl_to_diffusers``'s names and splits on shapes; None for a shape
    not known), so a LoRA is compared with a ``[model.files] transformer`` before it loads
    (``lora_run_formats.lora_check``); None where the file is not in BFL's layout."""
    sd = strip_prefixes({k: v for k, v in shapes.items() if k.endswith(".weight")}, _TRANSFORMER_PREFIXES)
    if not isinstance(sd.get("img_in.weight"), list) or not any(k.startswith("double_blocks.") for k in sd):
        return None
    hidden = sd["img_in.weight"][0]
    out: dict[str, Any] = {d: sd[f"{b}.weight"] for d, b in [*_TOP_PLAIN, _SWAPPED] if f"{b}.weight" in sd}

    def split(fused: Any, sizes: list[int]) -> list[Any]:
        if fused is None or len(fused) != 2 or min(sizes) < 1:
            return [None] * len(sizes)
        return [[size, fused[1]] for size in sizes]

    for i in range(count_blocks(sd, r"double_blocks\.(\d+)\.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out.update({d + dn: sd[f"{b}{bn}.weight"] for dn, bn in _DOUBLE_PLAIN if f"{b}{bn}.weight" in sd})
        for parts, bname in _DOUBLE_FUSED:
            if f"{b}{bname}.weight" in sd:
                fused = sd[f"{b}{bname}.weight"]
                sizes = [fused[0] // 3] * 3 if fused and fused[0] % 3 == 0 else [0, 0, 0]
                out.update({d + dn: shape for dn, shape in zip(parts, split(fused, sizes))})
    for i in range(count_blocks(sd, r"single_blocks\.(\d+)\.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out.update({d + dn: sd[f"{b}{bn}.weight"] for dn, bn in _SINGLE_PLAIN if f"{b}{bn}.weight" in sd})
        parts, bname = _SINGLE_FUSED
        if f"{b}{bname}.weight" in sd:
            fused = sd[f"{b}{bname}.weight"]
            sizes = [hidden] * 3 + [fused[0] - 3 * hidden] if fused else [0] * 4
            out.update({d + dn: shape for dn, shape in zip(parts, split(fused, sizes))})
    return out


def transformer_diffusers_to_bfl(sd: dict[str, Any]) -> dict[str, Any]:
    """``FluxTransformer2DModel`` state dict → BFL layout (the inverse of :func:`transformer_bfl_to_diffusers`)."""
    import torch

    sd = dict(sd)
    out: dict[str, Any] = {}
    for dname, bname in _TOP_PLAIN:
        if f"{dname}.weight" in sd:
            out[f"{bname}.weight"], out[f"{bname}.bias"] = sd[f"{dname}.weight"], sd[f"{dname}.bias"]
    out[f"{_SWAPPED[1]}.weight"] = _swap(sd[f"{_SWAPPED[0]}.weight"])
    out[f"{_SWAPPED[1]}.bias"] = _swap(sd[f"{_SWAPPED[0]}.bias"])
    for i in range(count_blocks(sd, r"transformer_blocks\.(\d+)\.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out.update(_renamed(sd.__getitem__, d, b, _DOUBLE_PLAIN, _DOUBLE_NORMS, to_diffusers=False))
        for parts, bname in _DOUBLE_FUSED:
            for suffix in ("weight", "bias"):
                out[f"{b}{bname}.{suffix}"] = torch.cat([sd[f"{d}{p}.{suffix}"] for p in parts], dim=0)
    for i in range(count_blocks(sd, r"single_transformer_blocks\.(\d+)\.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out.update(_renamed(sd.__getitem__, d, b, _SINGLE_PLAIN, _SINGLE_NORMS, to_diffusers=False))
        parts, bname = _SINGLE_FUSED
        for suffix in ("weight", "bias"):
            out[f"{b}{bname}.{suffix}"] = torch.cat([sd[f"{d}{p}.{suffix}"] for p in parts], dim=0)
    return out


def infer_transformer_config(diffusers_sd: dict[str, Any]) -> dict[str, Any]:
    """A ``FluxTransformer2DModel`` config from a (converted) state dict's shapes."""
    hidden = diffusers_sd["x_embedder.weight"].shape[0]
    head_dim = diffusers_sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    if head_dim % 16:
        raise LayoutError(f"attention head size {head_dim} is not a multiple of 16; cannot infer the RoPE axes")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": diffusers_sd["x_embedder.weight"].shape[1],
        "out_channels": diffusers_sd["proj_out.weight"].shape[0],
        "num_layers": count_blocks(diffusers_sd, r"transformer_blocks\.(\d+)\."),
        "num_single_layers": count_blocks(diffusers_sd, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": diffusers_sd["context_embedder.weight"].shape[1],
        "pooled_projection_dim": diffusers_sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in diffusers_sd,
        "axes_dims_rope": [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16],
    }


# ---------------------------------------------------------------------------------------------------- VAE
_VAE_PREFIXES = ("first_stage_model.", "vae.", "ae.")
_RESNET = [("conv_shortcut", "nin_shortcut")]
_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _vae_rules(num_up: int) -> list[tuple[str, str]]:
    """(diffusers regex, LDM template) pairs; templates use the regex groups."""
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.*)", r"\1.norm_out.\2"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", r"encoder.down.\1.block.\2.\3"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", r"encoder.down.\1.downsample.conv.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.*)", r"\1.mid.block_1.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.*)", r"\1.mid.block_2.\2"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", r"\1.mid.attn_1.\2"),
    ]
    for i in range(num_up):
        rules.append((rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\.(.*)", rf"decoder.up.{num_up - 1 - i}.block.\1.\2"))
        rules.append((rf"decoder\.up_blocks\.{i}\.upsamplers\.0\.conv\.(.*)", rf"decoder.up.{num_up - 1 - i}.upsample.conv.\1"))
    return rules


def vae_diffusers_to_ldm(sd: dict[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL`` state dict → LDM layout (``ae.safetensors``), attention weights as 1×1 convs."""
    num_up = count_blocks(sd, r"decoder\.up_blocks\.(\d+)\.")
    rules = _vae_rules(num_up)
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, template in rules:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, template, key)
                break
        if ".mid.attn_1." in new:
            for dname, lname in _ATTN:
                new = new.replace(f".attn_1.{dname}.", f".attn_1.{lname}.")
            if new.endswith(".weight") and value.dim() == 2:
                value = value[:, :, None, None]
        else:
            for dname, lname in _RESNET:
                new = new.replace(f".{dname}.", f".{lname}.")
        out[new] = value
    return out


def vae_ldm_to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """LDM-layout autoencoder tensors → ``AutoencoderKL`` state dict (the inverse of the above)."""
    sd = strip_prefixes(dict(sd), _VAE_PREFIXES)
    if not any(k.startswith("encoder.down.") for k in sd) or not any(k.startswith("decoder.up.") for k in sd):
        raise LayoutError("no encoder.down.* / decoder.up.* tensors: not an autoencoder in LDM layout")
    num_up = count_blocks(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = key
        m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(.*)", key)
        if m:
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.*)", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.*)", key):
            rest = m[2]
            for dname, lname in _ATTN:
                if rest.startswith(lname + "."):
                    rest = dname + rest[len(lname):]
                    break
            new = f"{m[1]}.mid_block.attentions.0.{rest}"
            if new.endswith(".weight") and value.dim() == 4:
                value = value[:, :, 0, 0]
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", key):
            new = f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)", key):
            new = f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        out[new] = value
    return out


def infer_vae_config(diffusers_sd: dict[str, Any]) -> dict[str, Any]:
    num_down = count_blocks(diffusers_sd, r"encoder\.down_blocks\.(\d+)\.")
    channels = [diffusers_sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(num_down)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": diffusers_sd["encoder.conv_in.weight"].shape[1],
        "out_channels": diffusers_sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * num_down,
        "up_block_types": ["UpDecoderBlock2D"] * num_down,
        "block_out_channels": channels,
        "layers_per_block": count_blocks(diffusers_sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": diffusers_sd["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,
        "scaling_factor": FLUX_VAE_SCALING,
        "shift_factor": FLUX_VAE_SHIFT,
        "use_quant_conv": "quant_conv.weight" in diffusers_sd,
        "use_post_quant_conv": "post_quant_conv.weight" in diffusers_sd,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in diffusers_sd,
    }


# ------------------------------------------------------------------------------------------ text encoders
