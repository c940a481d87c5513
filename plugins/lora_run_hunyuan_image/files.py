"""HunyuanImage-2.1 single files (the ComfyUI / sd-scripts / diffusion-pipe downloads) ↔ diffusers state dicts.

diffusers 0.42.1 has no ``from_single_file`` for HunyuanImage-2.1, so the layouts are converted here; the
mapping follows the published facts of diffusers' ``scripts/convert_hunyuan_image_to_diffusers.py``:

Transformer (``hunyuanimage2.1.safetensors``, Tencent's module names, optionally under ``model.diffusion_model.``
or ``diffusion_model.``):

- ``img_in.proj`` → ``x_embedder.proj``; ``byt5_in.layernorm``/``fc1..3`` → ``context_embedder_2.norm``/``linear_1..3``;
  ``txt_in.input_embedder`` → ``context_embedder.proj_in``; ``txt_in.t_embedder.mlp.0/2`` and
  ``txt_in.c_embedder.linear_1/2`` → ``context_embedder.time_text_embed.{timestep,text}_embedder.linear_1/2``;
  ``time_in`` / ``time_r_in`` / ``guidance_in`` ``.mlp.0/2`` → ``time_guidance_embed.{timestep_embedder,
  timestep_embedder_r, guidance_embedder}.linear_1/2``.
- token refiner ``txt_in.individual_token_refiner.blocks.i``: ``self_attn_qkv`` (fused, split in three) →
  ``attn.to_q/k/v``, ``self_attn_proj`` → ``attn.to_out.0``, ``mlp.fc1/fc2`` → ``ff.net.0.proj``/``ff.net.2``,
  ``adaLN_modulation.1`` → ``norm_out.linear``, ``norm1``/``norm2`` kept.
- ``double_blocks.i``: ``img_attn_qkv`` → ``attn.to_q/k/v``, ``txt_attn_qkv`` → ``attn.add_{q,k,v}_proj``,
  ``img_attn_proj`` → ``attn.to_out.0``, ``txt_attn_proj`` → ``attn.to_add_out``, ``{img,txt}_attn_{q,k}_norm`` →
  ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}``, ``img_mlp``/``txt_mlp`` ``fc1/fc2`` → ``ff``/``ff_context``
  ``.net.0.proj/.net.2``, ``img_mod.linear``/``txt_mod.linear`` → ``norm1.linear``/``norm1_context.linear``.
- ``single_blocks.i``: ``linear1`` (q, k, v of ``hidden`` rows each, then the MLP input) → ``attn.to_q/k/v`` +
  ``proj_mlp``; ``linear2`` → ``proj_out``; ``q_norm``/``k_norm`` → ``attn.norm_q/k``; ``modulation.linear`` →
  ``norm.linear``.
- ``final_layer.linear`` → ``proj_out``; ``final_layer.adaLN_modulation.1`` (shift, scale) → ``norm_out.linear``
  (scale, shift).

VAE (``hunyuan_image_2.1_vae``): Tencent's ``encoder.down.b.block.r`` / ``downsample`` and ``decoder.up.b.block.r``
/ ``upsample`` are numbered consecutively as diffusers' ``down_blocks.n`` / ``up_blocks.n``; ``mid.block_1/2`` →
``mid_block.resnets.0/1``; ``mid.attn_1.{norm,q,k,v,proj_out}`` → ``mid_block.attentions.0.{norm,to_q,to_k,to_v,
proj}``; 5-D weights with a time axis of 1 are squeezed. A file already in diffusers layout is used as is.

Qwen2.5-VL (``qwen_2.5_vl_7b``): transformers-4 names (``model.layers…``, ``visual…``, ``lm_head``) →
transformers 5's (``model.language_model…``, ``model.visual…``). ByT5 (``byt5_small_glyphxl``): a T5 encoder
state dict (``encoder.…``, ``shared.weight``), loaded into ``T5EncoderModel``.

torch is imported inside functions only.
"""
from __future__ import annotations

import re
from typing import Any

from lora_run_native.single_files import LayoutError, strip_prefixes

PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _split(value: Any, sizes: list[int]) -> list[Any]:
    import torch

    return list(torch.split(value, sizes, dim=0))


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    return strip_prefixes(state, PREFIXES)


_REFINER = "txt_in.individual_token_refiner.blocks.{i}."
_DIFF_REFINER = "context_embedder.token_refiner.refiner_blocks.{i}."
#: (original module, diffusers module) templates; ``{i}`` is a block index, ``{n}`` a digit
_RENAMES: list[tuple[str, str]] = [
    ("img_in.proj", "x_embedder.proj"),
    ("byt5_in.layernorm", "context_embedder_2.norm"),
    ("byt5_in.fc{n}", "context_embedder_2.linear_{n}"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_{n}", "context_embedder.time_text_embed.text_embedder.linear_{n}"),
    ("time_in.mlp.0", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_guidance_embed.timestep_embedder.linear_2"),
    ("time_r_in.mlp.0", "time_guidance_embed.timestep_embedder_r.linear_1"),
    ("time_r_in.mlp.2", "time_guidance_embed.timestep_embedder_r.linear_2"),
    ("guidance_in.mlp.0", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_guidance_embed.guidance_embedder.linear_2"),
    (_REFINER + "norm1", _DIFF_REFINER + "norm1"),
    (_REFINER + "norm2", _DIFF_REFINER + "norm2"),
    (_REFINER + "self_attn_proj", _DIFF_REFINER + "attn.to_out.0"),
    (_REFINER + "mlp.fc1", _DIFF_REFINER + "ff.net.0.proj"),
    (_REFINER + "mlp.fc2", _DIFF_REFINER + "ff.net.2"),
    (_REFINER + "adaLN_modulation.1", _DIFF_REFINER + "norm_out.linear"),
    ("double_blocks.{i}.img_mod.linear", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.linear", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn_proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn_proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("double_blocks.{i}.img_attn_q_norm", "transformer_blocks.{i}.attn.norm_q"),
    ("double_blocks.{i}.img_attn_k_norm", "transformer_blocks.{i}.attn.norm_k"),
    ("double_blocks.{i}.txt_attn_q_norm", "transformer_blocks.{i}.attn.norm_added_q"),
    ("double_blocks.{i}.txt_attn_k_norm", "transformer_blocks.{i}.attn.norm_added_k"),
    ("double_blocks.{i}.img_mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
    ("single_blocks.{i}.modulation.linear", "single_transformer_blocks.{i}.norm.linear"),
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
    ("single_blocks.{i}.q_norm", "single_transformer_blocks.{i}.attn.norm_q"),
    ("single_blocks.{i}.k_norm", "single_transformer_blocks.{i}.attn.norm_k"),
    ("final_layer.linear", "proj_out"),
]
#: fused original modules → the diffusers modules of their equal (or, for ``linear1``, hidden-sized) parts
_FUSED: list[tuple[str, list[str]]] = [
    (_REFINER + "self_attn_qkv", [_DIFF_REFINER + "attn.to_" + p for p in "qkv"]),
    ("double_blocks.{i}.img_attn_qkv", ["transformer_blocks.{i}.attn.to_" + p for p in "qkv"]),
    ("double_blocks.{i}.txt_attn_qkv", ["transformer_blocks.{i}.attn.add_" + p + "_proj" for p in "qkv"]),
    ("single_blocks.{i}.linear1", ["single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"]),
]
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _rx(template: str) -> re.Pattern:
    text = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>\d)")
    return re.compile(text + r"\.(?P<suffix>weight|bias)")


def _renamed(state: dict[str, Any], to_diffusers: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the renamed, un-fused tensors under the other layout's names, every other tensor as it is)."""
    pairs = [(_rx(o if to_diffusers else d), d if to_diffusers else o) for o, d in _RENAMES]
    out: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        found = next(((target, m) for pattern, target in pairs if (m := pattern.fullmatch(key))), None)
        if found is None:
            rest[key] = value
        else:
            out[found[0].format(**found[1].groupdict()) + "." + found[1]["suffix"]] = value
    return out, rest


def _final_modulation(key: str, value: Any, to_diffusers: bool) -> tuple[str, Any]:
    """The final layer's modulation under the other layout's name, its halves swapped (Tencent: shift, scale;
    diffusers: scale, shift)."""
    import torch

    source, target = _FINAL_MOD if to_diffusers else _FINAL_MOD[::-1]
    m = _rx(source).fullmatch(key)
    if m is None:
        raise LayoutError(f"unknown tensor {key}")
    first, second = torch.chunk(value, 2, dim=0)
    return f"{target}.{m['suffix']}", torch.cat([second, first], dim=0)


def transformer_original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Tencent/ComfyUI HunyuanImage-2.1 transformer tensors → diffusers ``HunyuanImageTransformer2DModel`` names."""
    import torch

    state = _strip_prefix(state)
    if not any(k.startswith("double_blocks.") for k in state):
        raise LayoutError("no double_blocks.* tensors (not a HunyuanImage-2.1 transformer in Tencent's layout)")
    out, rest = _renamed(state, to_diffusers=True)
    for key, value in rest.items():
        for source, targets in _FUSED:
            m = _rx(source).fullmatch(key)
            if m:
                if len(targets) == 4:      # single block linear1: q, k, v of `hidden` rows, then the MLP input
                    hidden = state[f"single_blocks.{m['i']}.linear2.weight"].shape[0]
                    parts = _split(value, [hidden, hidden, hidden, value.shape[0] - 3 * hidden])
                else:
                    parts = list(torch.chunk(value, 3, dim=0))
                for target, part in zip(targets, parts):
                    out[target.format(**m.groupdict()) + "." + m["suffix"]] = part.contiguous()
                break
        else:
            name, swapped = _final_modulation(key, value, to_diffusers=True)
            out[name] = swapped
    return out


def transformer_diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`transformer_original_to_diffusers` (writes Tencent-layout files, e.g. for tests)."""
    import torch

    out, rest = _renamed(state, to_diffusers=False)
    fused: dict[tuple[str, str, str], dict[int, Any]] = {}
    for key, value in rest.items():
        for source, targets in _FUSED:
            hit = next(((n, m) for n, t in enumerate(targets) if (m := _rx(t).fullmatch(key))), None)
            if hit:
                n, m = hit
                fused.setdefault((source.format(**m.groupdict()), m["suffix"], str(len(targets))), {})[n] = value
                break
        else:
            name, swapped = _final_modulation(key, value, to_diffusers=False)
            out[name] = swapped
    for (name, suffix, count), parts in fused.items():
        if len(parts) != int(count):
            raise LayoutError(f"{name}: only {len(parts)} of its {count} parts present")
        out[f"{name}.{suffix}"] = torch.cat([parts[n] for n in range(int(count))], dim=0)
    return out


# ------------------------------------------------------------------------------------------------- VAE
def vae_original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """Tencent's HunyuanImage-2.1 VAE layout → ``AutoencoderKLHunyuanImage`` names (diffusers layout passes)."""
    state = {k[len("vae."):] if k.startswith("vae.") else k: v for k, v in state.items()}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return state
    if not any(k.startswith("encoder.down.") for k in state):
        raise LayoutError("no encoder.down.* tensors (not a HunyuanImage-2.1 VAE)")
    out: dict[str, Any] = {}
    for side, level, sampler, flat_name in (("encoder", "down", "downsample", "down_blocks"),
                                            ("decoder", "up", "upsample", "up_blocks")):
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{side}.{level}.")})
        flat = 0
        for b in levels:
            blocks = sorted({int(k.split(".")[4]) for k in state if k.startswith(f"{side}.{level}.{b}.block.")})
            for r in blocks:
                prefix = f"{side}.{level}.{b}.block.{r}."
                for k, v in state.items():
                    if k.startswith(prefix):
                        out[f"{side}.{flat_name}.{flat}.{k[len(prefix):]}"] = v
                flat += 1
            prefix = f"{side}.{level}.{b}.{sampler}."
            if any(k.startswith(prefix) for k in state):
                for k, v in state.items():
                    if k.startswith(prefix):
                        out[f"{side}.{flat_name}.{flat}.{k[len(prefix):]}"] = v
                flat += 1
        for k, v in state.items():
            if k.startswith(f"{side}.mid.block_"):
                n = int(k.split(".")[2][len("block_"):]) - 1
                out[f"{side}.mid_block.resnets.{n}." + k.split(".", 3)[3]] = v
            elif k.startswith(f"{side}.mid.attn_1."):
                rest = k[len(f"{side}.mid.attn_1."):]
                name, _, suffix = rest.partition(".")
                name = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "proj"}.get(name, name)
                out[f"{side}.mid_block.attentions.0.{name}.{suffix}"] = v
            elif k.startswith((f"{side}.conv_in.", f"{side}.conv_out.", f"{side}.norm_out.")):
                out[k] = v
    for k, v in list(out.items()):
        if v.dim() == 5 and v.shape[2] == 1:
            out[k] = v.squeeze(2)
    return out


def infer_vae_config(state: dict[str, Any]) -> dict[str, Any]:
    """``AutoencoderKLHunyuanImage`` config from diffusers-layout VAE tensors (HunyuanImage-2.1 conventions)."""
    downs = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    resnets = [i for i in downs if f"encoder.down_blocks.{i}.conv1.weight" in state]
    samplers = [i for i in downs if i not in resnets]
    levels = len(samplers) + 1
    per_level = len(resnets) // levels
    channels = [int(state[f"encoder.down_blocks.{resnets[lvl * per_level]}.conv1.weight"].shape[0]) for lvl in range(levels)]
    return {"in_channels": int(state["encoder.conv_in.weight"].shape[1]), "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "latent_channels": int(state["encoder.conv_out.weight"].shape[0]) // 2, "block_out_channels": channels,
            "layers_per_block": per_level, "spatial_compression_ratio": 2 ** len(samplers), "sample_size": 384,
            "scaling_factor": 0.75289}


def infer_transformer_config(state: dict[str, Any]) -> dict[str, Any]:
    """``HunyuanImageTransformer2DModel`` config from diffusers-layout tensors. The head size is 128 as in
    HunyuanImage-2.1 (tiny test models, whose widths are below 128, use 32)."""
    hidden = int(state["x_embedder.proj.weight"].shape[0])
    head_dim = 128 if hidden % 128 == 0 and hidden >= 1024 else 32
    count = lambda prefix: len({k.split(".")[1] for k in state if k.startswith(prefix)})  # noqa: E731
    refiner = len({k.split(".")[3] for k in state if k.startswith("context_embedder.token_refiner.refiner_blocks.")})
    mlp = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden
    return {"in_channels": int(state["x_embedder.proj.weight"].shape[1]), "out_channels": int(state["proj_out.weight"].shape[0]),
            "num_attention_heads": hidden // head_dim, "attention_head_dim": head_dim,
            "num_layers": count("transformer_blocks."), "num_single_layers": count("single_transformer_blocks."),
            "num_refiner_layers": refiner, "mlp_ratio": mlp, "patch_size": [1, 1], "qk_norm": "rms_norm",
            "guidance_embeds": any(k.startswith("time_guidance_embed.guidance_embedder.") for k in state),
            "text_embed_dim": int(state["context_embedder.proj_in.weight"].shape[1]),
            "text_embed_2_dim": int(state["context_embedder_2.linear_1.weight"].shape[1])
            if "context_embedder_2.linear_1.weight" in state else None,
            "rope_theta": 256.0, "rope_axes_dim": [head_dim // 2, head_dim // 2],
            "use_meanflow": any(k.startswith("time_guidance_embed.timestep_embedder_r.") for k in state)}


# ------------------------------------------------------------------------------------------- text encoders
def qwen_comfy_to_transformers5(state: dict[str, Any]) -> dict[str, Any]:
    """transformers-4 Qwen2.5-VL names (ComfyUI's file) → transformers 5's ``Qwen2_5_VLForConditionalGeneration``."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            out["model.language_model." + k[len("model."):]] = v
        elif k.startswith("visual."):
            out["model." + k] = v
        else:
            out[k] = v
    return out


def qwen_diffusers_to_comfy(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse: transformers-5 names → the transformers-4 names of ComfyUI's ``qwen_2.5_vl_7b`` file."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.visual."):
            out[k[len("model."):]] = v
        else:
            out[k] = v
    return out


def vae_diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`vae_original_to_diffusers` (writes Tencent-layout VAE files, e.g. for tests)."""
    out: dict[str, Any] = {}
    for side, level, sampler, flat_name in (("encoder", "down", "downsample", "down_blocks"),
                                            ("decoder", "up", "upsample", "up_blocks")):
        flats = sorted({int(k.split(".")[2]) for k in state if k.startswith(f"{side}.{flat_name}.")})
        b = r = 0
        for n in flats:
            prefix = f"{side}.{flat_name}.{n}."
            is_resnet = f"{prefix}conv1.weight" in state
            target = f"{side}.{level}.{b}.block.{r}." if is_resnet else f"{side}.{level}.{b}.{sampler}."
            for k, v in state.items():
                if k.startswith(prefix):
                    out[target + k[len(prefix):]] = v
            if is_resnet:
                r += 1
            else:
                b, r = b + 1, 0
        for k, v in state.items():
            if k.startswith(f"{side}.mid_block.resnets."):
                n, rest = k.split(".", 4)[3], k.split(".", 4)[4]
                out[f"{side}.mid.block_{int(n) + 1}.{rest}"] = v
            elif k.startswith(f"{side}.mid_block.attentions.0."):
                name, _, suffix = k[len(f"{side}.mid_block.attentions.0."):].partition(".")
                name = {"to_q": "q", "to_k": "k", "to_v": "v", "proj": "proj_out"}.get(name, name)
                out[f"{side}.mid.attn_1.{name}.{suffix}"] = v
            elif k.startswith((f"{side}.conv_in.", f"{side}.conv_out.", f"{side}.norm_out.")):
                out[k] = v
    return out


#: Qwen2.5-VL-7B-Instruct's text configuration (HunyuanImage-2.1's text encoder), used for a single file when
#: `[model] source` provides no text_encoder/config.json.
QWEN_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 128000, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
