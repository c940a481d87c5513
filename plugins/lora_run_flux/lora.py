"""FLUX.1 LoRA state dicts: diffusers/peft format ↔ kohya (sd-scripts ``networks.lora_flux``) format.

The two formats name the same weights differently, and BFL's reference model (which kohya follows) fuses
layers that diffusers splits:

============================================  =========================================================
kohya module (``lora_unet_`` + BFL path)      diffusers module(s) (``transformer.`` + path)
============================================  =========================================================
``double_blocks_N_img_attn_qkv``              ``transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``
``double_blocks_N_txt_attn_qkv``              ``…attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
``double_blocks_N_img_attn_proj``             ``…attn.to_out.0``
``double_blocks_N_txt_attn_proj``             ``…attn.to_add_out``
``double_blocks_N_img_mlp_0`` / ``_2``        ``…ff.net.0.proj`` / ``…ff.net.2``
``double_blocks_N_txt_mlp_0`` / ``_2``        ``…ff_context.net.0.proj`` / ``…ff_context.net.2``
``double_blocks_N_img_mod_lin``               ``…norm1.linear``
``double_blocks_N_txt_mod_lin``               ``…norm1_context.linear``
``single_blocks_N_linear1``                   ``single_transformer_blocks.N.attn.to_q/to_k/to_v`` + ``proj_mlp``
``single_blocks_N_linear2``                   ``…proj_out``
``single_blocks_N_modulation_lin``            ``…norm.linear``
``img_in``, ``txt_in``                        ``x_embedder``, ``context_embedder``
``time_in_in_layer`` / ``_out_layer``         ``time_text_embed.timestep_embedder.linear_1`` / ``linear_2``
``vector_in_…``, ``guidance_in_…``            ``time_text_embed.text_embedder…``, ``…guidance_embedder…``
``final_layer_linear``                        ``proj_out`` (top level)
``final_layer_adaLN_modulation_1``            ``norm_out.linear`` (shift/scale halves swapped)
============================================  =========================================================

Text encoders: ``lora_te1_<CLIP-L path>`` ↔ ``text_encoder.<path>``; ``lora_te3_<T5 path>`` ↔
``text_encoder_2.<path>``.

Fusing is exact: separate LoRAs ``ΔW_p = B_p A_p`` on the parts of a fused layer become one LoRA whose down
matrix stacks the ``A_p`` (rank = sum of the part ranks) and whose up matrix is block-diagonal in the
``B_p``. A part without a LoRA adds no rank: only its rows of the up matrix are zero (the fused layer's
output includes it), so no all-zero block is written. kohya scales by ``alpha / rank``; the fused alpha is
chosen so that this ratio is the recipe's ``alpha / rank``. Splitting back drops the all-zero columns of
each part's up block, so a file we fused splits back into the original ranks; a LoRA trained fused (by
sd-scripts) gives each part the full shared down matrix — also exact.

torch is imported inside the functions.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from lora_run_formats import FormatError, kohya_modules  # noqa: F401 - FormatError re-exported

KOHYA_PREFIX = "lora_unet_"
TE1_PREFIX = "lora_te1_"      # CLIP-L
TE3_PREFIX = "lora_te3_"      # T5-XXL (sd-scripts' name; there is no te2 for FLUX)

DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
SWAPPED = {"final_layer_adaLN_modulation_1"}   # BFL: (shift, scale); diffusers AdaLayerNormContinuous: (scale, shift)

_DOUBLE_REVERSE = {part: (name, i) for name, parts in DOUBLE.items() for i, part in enumerate(parts)}
_SINGLE_REVERSE = {part: (name, i) for name, parts in SINGLE.items() for i, part in enumerate(parts)}
_TOP_REVERSE = {module: name for name, module in TOP.items()}

_DIFFUSERS_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_(?:unet|te\d)_.+?)\.(?P<which>lora_down\.weight|lora_up\.weight|alpha)$")
_CLIP = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_T5 = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention_(?:q|k|v|o)|DenseReluDense_(?:wi_0|wi_1|wi|wo))$")
_COMPONENT_PREFIXES = (("transformer.", "transformer"), ("text_encoder_2.", "text_encoder_2"),
                       ("text_encoder.", "text_encoder"), ("base_model.model.", "transformer"), ("unet.", None))


# --------------------------------------------------------------------------------------- helpers
def _split_scale(scale: float) -> tuple[float, float]:
    """scale = down_factor · up_factor with up_factor a power of two near sqrt(scale) (keeps magnitudes even)."""
    if scale <= 0 or not math.isfinite(scale):
        return scale, 1.0
    up = 2.0 ** round(math.log2(scale) / 2)
    return scale / up, up


def _diffusers_modules(state_dict: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(component, module path): {"A": tensor, "B": tensor}} from peft/diffusers keys."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state_dict.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            if "lora_magnitude_vector" in key:
                raise FormatError(f"{key}: DoRA magnitude vectors have no kohya equivalent")
            raise FormatError(f"{key}: not a diffusers/peft LoRA key (expected <module>.lora_A.weight or "
                              "<module>.lora_B.weight)")
        module, component = match["module"], "transformer"
        for prefix, name in _COMPONENT_PREFIXES:
            if module.startswith(prefix):
                if name is None:
                    raise FormatError(f"{key}: a UNet LoRA, not a FLUX transformer LoRA")
                module, component = module[len(prefix):], name
                break
        out.setdefault((component, module), {})["A" if match["which"] == "lora_A" else "B"] = value
    for (component, module), pair in out.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise FormatError(f"{component}.{module}: has no {missing} weight")
        if pair["A"].dim() != 2 or pair["B"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise FormatError(f"{component}.{module}: lora_A {tuple(pair['A'].shape)} and lora_B "
                              f"{tuple(pair['B'].shape)} do not form a LoRA (only Linear layers are supported)")
    return out


def _kohya_target(module: str) -> tuple[str, int, int]:
    """diffusers transformer module path → (kohya module name, part index, number of parts)."""
    match = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", module)
    if match and match[2] in _DOUBLE_REVERSE:
        name, i = _DOUBLE_REVERSE[match[2]]
        return f"{KOHYA_PREFIX}double_blocks_{match[1]}_{name}", i, len(DOUBLE[name])
    match = re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", module)
    if match and match[2] in _SINGLE_REVERSE:
        name, i = _SINGLE_REVERSE[match[2]]
        return f"{KOHYA_PREFIX}single_blocks_{match[1]}_{name}", i, len(SINGLE[name])
    if module in _TOP_REVERSE:
        return KOHYA_PREFIX + _TOP_REVERSE[module], 0, 1
    raise FormatError(f"transformer.{module}: no kohya (BFL) equivalent is known for this FLUX module")


def _diffusers_target(kohya_module: str) -> tuple[str, list[str]]:
    """kohya module name → (component, [diffusers module paths]) (several for fused layers)."""
    if kohya_module.startswith(KOHYA_PREFIX):
        rest = kohya_module[len(KOHYA_PREFIX):]
        match = re.match(r"^double_blocks_(\d+)_(.+)$", rest)
        if match and match[2] in DOUBLE:
            return "transformer", [f"transformer_blocks.{match[1]}.{p}" for p in DOUBLE[match[2]]]
        match = re.match(r"^single_blocks_(\d+)_(.+)$", rest)
        if match and match[2] in SINGLE:
            return "transformer", [f"single_transformer_blocks.{match[1]}.{p}" for p in SINGLE[match[2]]]
        if rest in TOP:
            return "transformer", [TOP[rest]]
    elif kohya_module.startswith(TE1_PREFIX):
        match = _CLIP.match(kohya_module[len(TE1_PREFIX):])
        if match:
            tail = match[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return "text_encoder", [f"text_model.encoder.layers.{match[1]}.{tail}"]
    elif kohya_module.startswith(TE3_PREFIX):
        match = _T5.match(kohya_module[len(TE3_PREFIX):])
        if match:
            kind, _, leaf = match[3].partition("_")
            return "text_encoder_2", [f"encoder.block.{match[1]}.layer.{match[2]}.{kind}.{leaf}"]
    raise FormatError(f"{kohya_module}: not a FLUX kohya LoRA module this converter knows")


def _swap_halves(t: Any) -> Any:
    import torch

    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _fused_sizes(parts: list[dict[str, Any] | None], modules: dict, component_modules: list[str],
                 mlp_ratio: float) -> list[int]:
    """Output sizes of every part of a fused layer, including parts that have no LoRA."""
    present = [p for p in parts if p is not None]
    hidden = present[0]["A"].shape[1]          # q/k/v and linear1 all read the hidden state
    sizes = []
    for part, module in zip(parts, component_modules):
        if part is not None:
            sizes.append(part["B"].shape[0])
        elif module.endswith("proj_mlp"):
            sizes.append(_mlp_hidden(module, modules, hidden, mlp_ratio))
        else:
            sizes.append(hidden)
    return sizes


def _mlp_hidden(proj_mlp: str, modules: dict, hidden: int, mlp_ratio: float) -> int:
    block = proj_mlp.rsplit(".", 1)[0]
    proj_out = modules.get(("transformer", f"{block}.proj_out"))
    if proj_out is not None:                   # linear2 reads cat(attention, mlp)
        return proj_out["A"].shape[1] - hidden
    for (component, module), pair in modules.items():
        if component == "transformer" and module.endswith("ff.net.0.proj") and pair["A"].shape[1] == hidden:
            return pair["B"].shape[0]
    return int(hidden * mlp_ratio)


def lora_targets(module: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a FLUX.1 LoRA module goes (``lora_run_formats.lora_check.Targets``): a kohya module
    (``lora_unet_``/``lora_te1_``/``lora_te3_`` + BFL or transformers path) -> its component and diffusers layers
    (the q, k, v (and MLP-input) parts of a fused one, in order); a diffusers module (``transformer.``,
    ``text_encoder.``, ``text_encoder_2.`` + path) -> itself. None for any other name."""
    if module.startswith((KOHYA_PREFIX, TE1_PREFIX, TE3_PREFIX)):
        try:
            component, layers = _diffusers_target(module)
        except FormatError:
            return None
        return component, tuple(layers)
    for prefix, component in _COMPONENT_PREFIXES:
        if module.startswith(prefix) and component is not None and len(module) > len(prefix):
            return component, (module[len(prefix):],)
    return None


# --------------------------------------------------------------------------------------- conversions
def diffusers_to_kohya(state_dict: Mapping[str, Any], alpha: float | None = None, rank: int | None = None, *,
                       mlp_ratio: float = 4.0) -> dict[str, Any]:
    """A diffusers/peft FLUX LoRA (``[transformer.]<module>.lora_A/B.weight``) → kohya keys with alphas.

    ``alpha``/``rank`` are the LoRA's training values (peft scales by ``alpha / rank``); ``rank=None`` uses
    each module's own rank (peft's rank_pattern), ``alpha=None`` means no scaling (a file whose scale is
    already folded in). Text-encoder keys (``text_encoder.``/``text_encoder_2.``) become ``lora_te1_``/
    ``lora_te3_``. Raises :class:`FormatError` for keys it cannot place.
    """
    import torch

    modules = _diffusers_modules(state_dict)

    def scale_of(pair: dict[str, Any]) -> float:
        if alpha is None:
            return 1.0
        return float(alpha) / float(rank if rank is not None else pair["A"].shape[0])

    out: dict[str, Any] = {}
    fused: dict[str, list[dict[str, Any] | None]] = {}
    fused_modules: dict[str, list[str]] = {}
    for (component, module), pair in sorted(modules.items()):
        if component != "transformer":
            prefix = TE1_PREFIX if component == "text_encoder" else TE3_PREFIX
            name = prefix + module.replace(".", "_")
            _diffusers_target(name)            # validates the module path
            out[f"{name}.lora_down.weight"] = pair["A"]
            out[f"{name}.lora_up.weight"] = pair["B"]
            out[f"{name}.alpha"] = torch.tensor(scale_of(pair) * pair["A"].shape[0], dtype=torch.float32)
            continue
        name, index, count = _kohya_target(module)
        if count == 1:
            up = _swap_halves(pair["B"]) if name[len(KOHYA_PREFIX):] in SWAPPED else pair["B"]
            out[f"{name}.lora_down.weight"] = pair["A"]
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(scale_of(pair) * pair["A"].shape[0], dtype=torch.float32)
            continue
        slots = fused.setdefault(name, [None] * count)
        slots[index] = pair
        fused_modules[name] = _diffusers_target(name)[1]

    for name, parts in sorted(fused.items()):
        present = [p for p in parts if p is not None]
        sizes = _fused_sizes(parts, modules, fused_modules[name], mlp_ratio)
        ranks = [p["A"].shape[0] if p is not None else 0 for p in parts]   # no all-zero block for a missing part
        ref = present[0]
        dtype, device, hidden = ref["A"].dtype, ref["A"].device, ref["A"].shape[1]
        for p, module in zip(parts, fused_modules[name]):
            if p is not None and p["A"].shape[1] != hidden:
                raise FormatError(f"transformer.{module}: lora_A reads {p['A'].shape[1]} features, its sibling "
                                  f"parts read {hidden}")
        base = scale_of(ref)
        down = torch.zeros(sum(ranks), hidden, dtype=dtype, device=device)
        up = torch.zeros(sum(sizes), sum(ranks), dtype=ref["B"].dtype, device=device)
        row = col = 0
        for p, size, r in zip(parts, sizes, ranks):
            if p is not None:
                down[col:col + r] = p["A"]
                factor = scale_of(p) / base if base else 1.0
                up[row:row + size, col:col + r] = p["B"] * factor if factor != 1.0 else p["B"]
            row, col = row + size, col + r
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(base * sum(ranks), dtype=torch.float32)
    return out


def kohya_to_diffusers(state_dict: Mapping[str, Any], *, prefix: bool = True) -> dict[str, Any]:
    """A kohya FLUX LoRA → diffusers/peft keys with ``alpha / rank`` folded into the weights.

    Keys are ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.``/
    ``text_encoder_2.`` for ``lora_te1_``/``lora_te3_``); ``prefix=False`` drops the ``transformer.`` prefix.
    A missing ``alpha`` means ``alpha = rank`` (scale 1), as sd-scripts and diffusers assume.
    """
    import torch

    out: dict[str, Any] = {}
    for module, down, up, alpha in kohya_modules(state_dict, _KOHYA_KEY, "not a kohya LoRA key (expected "
                                                 "lora_unet_/lora_te*_<module>.lora_down.weight, .lora_up.weight or "
                                                 ".alpha; LoHa/LoKr/DoRA files are not plain LoRAs)"):
        total_rank = down.shape[0]
        alpha = alpha if alpha is not None else float(total_rank)
        s_down, s_up = _split_scale(alpha / total_rank)
        component, targets = _diffusers_target(module)
        head = "" if (component == "transformer" and not prefix) else component + "."
        if module[len(KOHYA_PREFIX):] in SWAPPED:
            up = _swap_halves(up)
        if len(targets) == 1:
            out[f"{head}{targets[0]}.lora_A.weight"] = down * s_down
            out[f"{head}{targets[0]}.lora_B.weight"] = up * s_up
            continue
        hidden = down.shape[1]
        if len(targets) == 3:                  # q, k, v of equal size
            if up.shape[0] % 3:
                raise FormatError(f"{module}: lora_up has {up.shape[0]} rows, not three equal q/k/v parts")
            sizes = [up.shape[0] // 3] * 3
        else:                                  # linear1: q, k, v (hidden each) and the MLP input
            if up.shape[0] <= 3 * hidden:
                raise FormatError(f"{module}: lora_up has {up.shape[0]} rows, expected 3×{hidden} + MLP")
            sizes = [hidden, hidden, hidden, up.shape[0] - 3 * hidden]
        pieces = torch.split(up, sizes, dim=0)
        nonzero = [piece.ne(0).any(dim=0) for piece in pieces]
        everything_zero = not any(bool(cols.any()) for cols in nonzero)
        for target, piece, cols in zip(targets, pieces, nonzero):
            if everything_zero:                # an untrained LoRA: keep every part, full rank
                a, b = down, piece
            elif not bool(cols.any()):         # this part carries no LoRA
                continue
            elif bool(cols.all()):
                a, b = down, piece
            else:                              # drop columns that contribute nothing to this part
                a, b = down[cols], piece[:, cols]
            out[f"{head}{target}.lora_A.weight"] = (a * s_down).contiguous()
            out[f"{head}{target}.lora_B.weight"] = (b * s_up).contiguous()
    return out


# --------------------------------------------------------------------------------------- metadata
MODELSPEC_FIELDS = {"title", "author", "description", "date", "resolution", "license", "tags", "usage_hint",
                    "thumbnail", "trigger_phrase", "prediction_type", "timestep_range", "encoder_layer",
                    "hash_sha256", "merged_from", "preprocessor"}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def kohya_metadata(**fields: Any) -> dict[str, str]:
    """safetensors metadata as sd-scripts writes it for a FLUX.1-dev LoRA (all values strings).

    Fixed: ``ss_network_module = "networks.lora_flux"``, ``ss_base_model_version = "flux1"``,
    ``modelspec.sai_model_spec = "1.0.1"``, ``modelspec.architecture = "flux-1-dev/lora"``,
    ``modelspec.implementation`` (BFL's repository). Each keyword becomes ``ss_<name>`` (e.g.
    ``network_dim=16`` → ``ss_network_dim = "16"``), except the ModelSpec fields (``title``, ``date``,
    ``resolution``, ``description``, ``author``, ``license``, ``tags``, ``trigger_phrase``, …) which become
    ``modelspec.<name>``; keys already starting with ``ss_``, ``sshs_`` or ``modelspec.`` are kept; dicts and
    lists are JSON; ``None`` is ``"None"`` (as ``str(None)`` in sd-scripts). Keywords override the fixed values.
    """
    out = {
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
        "ss_model_type": "flux",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    }
    for name, value in fields.items():
        if name.startswith(("ss_", "sshs_", "modelspec.")):
            key = name
        elif name in MODELSPEC_FIELDS:
            key = f"modelspec.{name}"
        else:
            key = f"ss_{name}"
        out[key] = _as_text(value)
    return out


def is_kohya_flux(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(KOHYA_PREFIX) for k in state_dict)
