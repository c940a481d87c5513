"""FLUX.2 single-file checkpoints: BFL/ComfyUI transformer files (``flux2-dev.safetensors``,
``flux-2-klein-base-4b.safetensors`` …) and one-file text encoders.

Reading a BFL transformer goes through diffusers' own converter
(``convert_flux2_transformer_checkpoint_to_diffusers``, what ``Flux2Transformer2DModel.from_single_file``
uses); the config comes from ``[model] source`` when it has one, else from the tensor shapes
(:func:`infer_transformer_config`). :func:`transformer_diffusers_to_bfl` is the inverse layout (tests build
single files with it). BFL names: ``double_blocks.N.{img,txt}_attn.qkv`` (q/k/v fused), ``…_attn.proj``,
``…_attn.norm.{query,key}_norm.scale``, ``…_mlp.{0,2}``, ``single_blocks.N.linear1/linear2/norm.*``,
``img_in``, ``txt_in``, ``time_in.{in,out}_layer``, ``guidance_in.*``, ``double_stream_modulation_{img,txt}.lin``,
``single_stream_modulation.lin``, ``final_layer.linear`` and ``final_layer.adaLN_modulation.1`` ((shift,
scale); diffusers' ``norm_out.linear`` is (scale, shift)).

torch is imported inside the functions.
"""
from __future__ import annotations

import re
from typing import Any

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear", "final_layer.linear": "proj_out"}
_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
           "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
           "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
           "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm": "attn.norm_q",
           "norm.key_norm": "attn.norm_k"}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


class LayoutError(ValueError):
    """A file that is not in the expected layout (the message says what is wrong)."""


def strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def is_bfl(state: dict[str, Any]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in state)


def transformer_bfl_to_diffusers(raw: dict[str, Any]) -> dict[str, Any]:
    """A BFL/ComfyUI FLUX.2 transformer state dict → diffusers names (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    state = strip_prefix(raw)
    if not is_bfl(state):
        if any(k.startswith("transformer_blocks.") for k in state):
            return state                     # already diffusers names
        raise LayoutError("no double_blocks/single_blocks tensors (not a FLUX.2 transformer)")
    if not any(k.startswith("single_stream_modulation.") for k in state):
        raise LayoutError("no single_stream_modulation tensors: a FLUX.1 transformer, not FLUX.2")
    try:
        return convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
    except KeyError as exc:
        raise LayoutError(f"unexpected tensor {exc} for a FLUX.2 transformer") from None


def transformer_diffusers_to_bfl(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers FLUX.2 transformer names → BFL names (q/k/v fused, final modulation halves swapped)."""
    import torch

    out: dict[str, Any] = {}
    rev_top = {v: k for k, v in _TOP.items()}
    rev_double = {v: k for k, v in _DOUBLE.items()}
    rev_single = {v: k for k, v in _SINGLE.items()}
    fused: dict[str, list[Any]] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        bfl_param = "scale" if ("norm_" in module and param == "weight") else param
        m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", module)
        if m:
            for name, parts in _QKV.items():
                if m[2] in parts:
                    fused.setdefault(f"double_blocks.{m[1]}.{name}.{param}", [None] * 3)[parts.index(m[2])] = value
                    break
            else:
                out[f"double_blocks.{m[1]}.{rev_double[m[2]]}.{bfl_param}"] = value
            continue
        m = re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", module)
        if m:
            out[f"single_blocks.{m[1]}.{rev_single[m[2]]}.{bfl_param}"] = value
            continue
        if module == "norm_out.linear":
            half = value.shape[0] // 2
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([value[half:], value[:half]])
            continue
        out[f"{rev_top[module]}.{param}"] = value
    for key, parts in fused.items():
        out[key] = torch.cat(parts, dim=0)
    return out


def infer_transformer_config(state: dict[str, Any]) -> dict[str, Any]:
    """A ``Flux2Transformer2DModel`` config from diffusers-named tensors (FLUX.2's conventions: head dim 128
    unless the q-norm says otherwise, RoPE axes of equal size, mlp ratio from the feed-forward width)."""
    try:
        head_dim = int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0])
        inner, in_channels = state["x_embedder.weight"].shape
        joint = int(state["context_embedder.weight"].shape[1])
        ff_inner = int(state["transformer_blocks.0.ff.linear_out.weight"].shape[1])
        tg_channels = int(state["time_guidance_embed.timestep_embedder.linear_1.weight"].shape[1])
    except KeyError as exc:
        raise LayoutError(f"missing {exc} (not a FLUX.2 transformer)") from None
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    return {"patch_size": 1, "in_channels": int(in_channels), "num_layers": len(doubles),
            "num_single_layers": len(singles), "attention_head_dim": head_dim,
            "num_attention_heads": int(inner) // head_dim, "joint_attention_dim": joint,
            "timestep_guidance_channels": tg_channels, "mlp_ratio": ff_inner / int(inner),
            "axes_dims_rope": (head_dim // 4,) * 4,
            "guidance_embeds": any(k.startswith("time_guidance_embed.guidance_embedder.") for k in state)}


def match_prefix(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Text-encoder files name tensors with or without the model's wrapper prefixes: Qwen3's ``model.``, and Mistral-3's
    checkpoint names (``language_model.model.layers.…``, ``vision_tower.…``, ``language_model.lm_head.…``, as
    transformers saves them) against the model's own (``model.language_model.layers.…``, ``model.vision_tower.…``,
    ``lm_head.…``). Each name is matched to ``own``'s by what is left without its leading ``model.`` and
    ``language_model.`` segments; names that match nothing stay as they are (the load names them)."""
    if all(k in own for k in state):
        return state

    def bare(key: str) -> str:
        return re.sub(r"^(?:(?:model|language_model)\.)+", "", key)

    by_bare: dict[str, list[str]] = {}
    for key in own:
        by_bare.setdefault(bare(key), []).append(key)
    return {by_bare[bare(k)][0] if len(by_bare.get(bare(k), ())) == 1 else k: v for k, v in state.items()}


def vae_ldm_to_diffusers(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """BFL's ``flux2-vae.safetensors`` (LDM layout + ``bn.running_mean/var``) → ``AutoencoderKLFlux2`` names,
    through diffusers' LDM autoencoder converter; the batch-norm statistics keep their names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = strip_prefix(raw)
    for prefix in ("vae.", "first_stage_model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("encoder.down.") for k in state):
        raise LayoutError("no encoder.down.* tensors (not an autoencoder in BFL/LDM layout)")
    if "bn.running_mean" not in state:
        raise LayoutError("no bn.running_mean (a FLUX.1 ae.safetensors, not the FLUX.2 autoencoder)")
    out = convert_ldm_vae_checkpoint(state, dict(config))
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        if key in state:
            out[key] = state[key]
    return out
