"""Whether a model's ``config.json`` describes the model its weights hold, from the config and the weights'
safetensors headers alone (no tensor data, no torch).

diffusers and transformers build the model a config describes before they compare it with the weights: a
config.json of a far larger model than its weights (``num_layers = 100000``) cost minutes and gigabytes of memory
before the loading report said anything, and one of a smaller model trained a smaller model. So the model checks
(``model_files.folder_problems``, ``model_files.file_fit_problems``) compare first, driven by what each family
declares of its components (``ModelAdapter.config_fits`` / ``file_fits``):

- ``Blocks``: a config field that counts repeated blocks (``num_layers``) and the weight names holding one block
  each, the block's number in the pattern's first group (``^transformer_blocks\\.(\\d+)\\.``). Where the weights
  hold blocks of that kind, they must be numbered 0 … n-1 for the config's n.
- ``Width``: config fields whose product is one dimension of a tensor the config determines
  (``num_attention_heads`` × ``attention_head_dim`` = rows of ``x_embedder.weight``).

Each declared field must also be a whole number within bounds (``COUNT_LIMIT`` blocks, ``WIDTH_LIMIT`` wide), so
an absurd value is named even where the weights cannot be compared. A field the config leaves out (the class's
default applies) and a pattern no weight name matches (another layout, which the load names) are not compared.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

#: The most blocks a config may declare of one kind (the largest released models have about a hundred layers).
COUNT_LIMIT = 1000
#: The widest a declared width field may be (hidden sizes of released models are at most tens of thousands).
WIDTH_LIMIT = 1 << 20
#: Tensor dtypes whose shapes are the layer's own (quantized weights are packed into integer tensors).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


@dataclass(frozen=True)
class Blocks:
    """``field`` counts blocks (``length``: the field is a list, one entry per block); ``pattern`` (searched in
    each weight name) holds a block's number in its first group; ``what`` names one block in messages. A field
    may name a nested table's key (``text_config.num_hidden_layers``) and alternatives (``a|b``: the first the
    config has)."""

    field: str
    pattern: str
    what: str
    length: bool = False


@dataclass(frozen=True)
class Width:
    """The product of ``fields`` is dimension ``dim`` of the tensor whose whole name matches ``tensor``."""

    fields: tuple[str, ...]
    tensor: str
    dim: int


#: What a family declares of one component: its block counts and widths.
Fit = Sequence[Union[Blocks, Width]]


def header_shapes(header: Mapping[str, Any]) -> dict[str, list[int] | None]:
    """A checked safetensors header's tensor names and shapes (None for a quantized, non-float tensor)."""
    return {name: (entry["shape"] if entry.get("dtype") in FLOAT_DTYPES else None)
            for name, entry in header.items() if name != "__metadata__"}


def fit_problems(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int] | None], fit: Fit,
                 weights: str = "the weights") -> list[str]:
    """What ``config`` declares that does not fit ``shapes`` (every weight name; a shape, or None where it is not
    known), per ``fit``: one sentence each, without the config's file name. ``weights`` names them in messages."""
    out: list[str] = []
    for rule in fit:
        if isinstance(rule, Blocks):
            out += _blocks_problem(config, shapes, rule, weights)
        elif "quantization_config" not in config:       # packed weights: their shapes are not the layers'
            out += _width_problem(config, shapes, rule, weights)
    return list(dict.fromkeys(out))


def _lookup(config: Mapping[str, Any], field: str) -> tuple[str, Any] | None:
    """(the field's name as found, its value) for the first alternative of ``field`` the config has, or None."""
    for name in field.split("|"):
        table: Any = config
        for part in name.split("."):
            if not isinstance(table, Mapping) or part not in table:
                break
            table = table[part]
        else:
            return name, table
    return None


def declared(config: Mapping[str, Any], field: str) -> Any:
    """The value of ``field`` in ``config`` (a nested table's key ``text_config.hidden_size``, alternatives ``a|b``:
    the first the config has), or None where it has none."""
    found = _lookup(config, field)
    return None if found is None else found[1]


def held_width(shapes: Mapping[str, Sequence[int] | None], fit: Fit, field: str) -> int | None:
    """The width ``field`` has in weights of ``shapes`` (every weight name: its shape, None where not known), read
    through the ``Width`` rule of ``fit`` that names ``field`` alone; None where no such rule or tensor is found."""
    for rule in fit:
        if isinstance(rule, Width) and rule.fields == (field,):
            pattern = re.compile(rule.tensor)
            for tensor in sorted(shapes):
                shape = shapes[tensor]
                if pattern.fullmatch(tensor) and shape is not None and len(shape) > rule.dim:
                    return int(shape[rule.dim])
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "…"


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounds(name: str, value: Any, low: int, high: int, kind: str) -> list[str]:
    """Why ``value`` is not a whole number in [low, high], as a one-item list, or none."""
    if _integer(value) and low <= value <= high:
        return []
    return [f"{name} = {_shown(value)} is not {kind} (a whole number from {low} to {high})"]


def _blocks_problem(config: Mapping[str, Any], shapes: Mapping[str, Any], rule: Blocks, weights: str) -> list[str]:
    found = _lookup(config, rule.field)
    if found is None:
        return []
    name, value = found
    if rule.length and not isinstance(value, list):
        return [f"{name} = {_shown(value)} is not a list (one entry per {rule.what})"]
    if not rule.length and not (_integer(value) and value >= 0):
        return _bounds(name, value, 0, COUNT_LIMIT, f"a number of {rule.what}s")
    declared = len(value) if rule.length else value
    pattern = re.compile(rule.pattern)
    held: dict[int, str] = {}
    for tensor in shapes:
        m = pattern.search(tensor)
        if m is not None:
            held.setdefault(int(m.group(1)), tensor[:m.end(1)])
    shown = f"{name} has {declared} entries" if rule.length else f"{name} = {_shown(declared)}"
    if not held:                                 # not this layout: the bounds alone
        if declared <= COUNT_LIMIT or not rule.length:
            return _bounds(name, declared, 0, COUNT_LIMIT, f"a number of {rule.what}s")
        return [f"{shown}, more than {COUNT_LIMIT} {rule.what}s"]
    numbers = sorted(held)                       # distinct, so 0 … n-1 exactly when there are n up to n-1
    if len(numbers) == declared and numbers[-1] == declared - 1:
        return []
    span = held[numbers[0]] if len(numbers) == 1 else f"{held[numbers[0]]} … {held[numbers[-1]]}"
    gaps = numbers[-1] + 1 - len(numbers)
    return [f"{shown}, but {weights} hold {_count(len(numbers), rule.what)} ({span}"
            f"{f', {gaps} missing in between' if gaps else ''}): a config.json of another model or model size?"]


def _width_problem(config: Mapping[str, Any], shapes: Mapping[str, Any], rule: Width, weights: str) -> list[str]:
    values = []
    for field in rule.fields:
        found = _lookup(config, field)
        if found is None:
            return []
        if not (_integer(found[1]) and found[1] > 0):
            return _bounds(*found, 1, WIDTH_LIMIT, "a width")
        values.append(found)
    pattern = re.compile(rule.tensor)
    tensor = next((t for t in sorted(shapes) if pattern.fullmatch(t) and shapes[t] is not None), None)
    if tensor is None or len(shapes[tensor]) <= rule.dim:   # not this layout: the bounds alone
        return next((why for found in values if (why := _bounds(*found, 1, WIDTH_LIMIT, "a width"))), [])
    declared, held = math.prod(v for _, v in values), shapes[tensor][rule.dim]
    if declared == held:
        return []
    names = " × ".join(n for n, _ in values)
    product = " × ".join(_shown(v) for _, v in values) + f" = {_shown(declared)}" if len(values) > 1 \
        else _shown(declared)
    return [f"{names} = {product}, but {tensor} in {weights} has shape {list(shapes[tensor])} ({held} along its "
            f"dimension {rule.dim}): a config.json of another model or model size?"]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


# ----------------------------------------------------------------- components several families share
# Text encoders (transformers' names, with or without the prefix a version or a single file adds) and autoencoders.
#: ``CLIPTextModel`` (FLUX.1's CLIP-L).
CLIP_TEXT: Fit = (Blocks("num_hidden_layers", r"(?:^|\.)encoder\.layers\.(\d+)\.", "layer"),
                  Width(("hidden_size",), r"(?:.*\.)?embeddings\.token_embedding\.weight", 1))
#: ``T5EncoderModel`` (FLUX.1's T5-XXL, Hunyuan-DiT's mT5, HunyuanImage's ByT5).
T5_ENCODER: Fit = (Blocks("num_layers", r"(?:^|\.)encoder\.block\.(\d+)\.", "block"),
                   Width(("d_model",), r"shared\.weight|(?:.*\.)?encoder\.embed_tokens\.weight", 1),
                   Width(("num_heads", "d_kv"), r"(?:.*\.)?encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight", 0))
#: ``BertModel`` (Hunyuan-DiT's bilingual CLIP text tower).
BERT: Fit = (Blocks("num_hidden_layers", r"(?:^|\.)encoder\.layer\.(\d+)\.", "layer"),
             Width(("hidden_size",), r"(?:.*\.)?embeddings\.word_embeddings\.weight", 1))
#: ``Qwen3ForCausalLM`` (FLUX.2 [klein]).
QWEN3: Fit = (Blocks("num_hidden_layers", r"^(?:model\.)?layers\.(\d+)\.", "layer"),
              Width(("hidden_size",), r"(?:model\.)?embed_tokens\.weight", 1))
#: ``Mistral3ForConditionalGeneration`` (FLUX.2 [dev]): the language model and the vision tower.
MISTRAL3: Fit = (Blocks("text_config.num_hidden_layers", r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)\.",
                        "language-model layer"),
                 Blocks("vision_config.num_hidden_layers", r"(?:^|\.)vision_tower\.transformer\.layers\.(\d+)\.",
                        "vision layer"),
                 Width(("text_config.hidden_size",), r"(?:.*\.)?language_model\.(?:model\.)?embed_tokens\.weight", 1))
#: ``Qwen2_5_VLForConditionalGeneration`` (HunyuanImage-2.1): transformers reads the text model's fields from
#: ``text_config``, or from the top level in configs written before it had one.
QWEN2_5_VL: Fit = (Blocks("text_config.num_hidden_layers|num_hidden_layers",
                          r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.", "language-model layer"),
                   Blocks("vision_config.depth", r"(?:^|\.)visual\.blocks\.(\d+)\.", "vision block"),
                   Width(("text_config.hidden_size|hidden_size",),
                         r"(?:model\.)?(?:language_model\.)?embed_tokens\.weight", 1))
#: diffusers' ``AutoencoderKL`` and ``AutoencoderKLFlux2`` in a diffusers folder.
AUTOENCODER_KL: Fit = (
    Blocks("down_block_types", r"^encoder\.down_blocks\.(\d+)\.", "encoder down block", length=True),
    Blocks("block_out_channels", r"^encoder\.down_blocks\.(\d+)\.", "encoder down block", length=True),
    Blocks("up_block_types", r"^decoder\.up_blocks\.(\d+)\.", "decoder up block", length=True),
    Blocks("layers_per_block", r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", "encoder.down_blocks.0 resnet"))
#: The same fields in the LDM single-file layout (FLUX.1's ``ae.safetensors``, FLUX.2's and HunyuanImage-2.1's
#: autoencoder files).
AUTOENCODER_FILE: Fit = (
    Blocks("down_block_types", r"(?:^|\.)encoder\.down\.(\d+)\.", "encoder down level", length=True),
    Blocks("block_out_channels", r"(?:^|\.)encoder\.down\.(\d+)\.", "encoder down level", length=True),
    Blocks("up_block_types", r"(?:^|\.)decoder\.up\.(\d+)\.", "decoder up level", length=True),
    Blocks("layers_per_block", r"(?:^|\.)encoder\.down\.0\.block\.(\d+)\.", "encoder.down.0 block"))
