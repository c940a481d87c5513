"""Whether a LoRA file's matrices form LoRAs, and whether they fit the model they name, from the file's safetensors
header alone (no tensor data, no torch): the one check every backend and command that loads a user's LoRA asks
before anything loads (``lora_file_problem`` for `lora-run eval`, the native adapters' ``lora_problem`` for `eval`
and the generation API).

- ``structure_problem``: every module has both matrices (``lora_down``/``lora_A`` and ``lora_up``/``lora_B``), each a
  matrix (or both 4-D: a Conv2d LoRA, whose fit the loader checks), down/A ``(rank, inputs)`` and up/B ``(outputs,
  rank)`` with the same rank, at least 1; an ``alpha`` is one number. A file that breaks one of these cannot be applied by any loader; the loaders found it only after the
  base pipeline had loaded (minutes and gigabytes for a full-size model).
- ``fit_problem``: each module against the layers it names, through the family's declaration of where its LoRA names
  go (``Targets``: a module name as in the file -> the component and the layers, in diffusers' names, whose outputs
  it writes: one layer, or the parts of a fused one in order) and the widths of the base model's layers, read from
  the weights' headers (``linear_shapes``). The down matrix must read the layer's inputs, the up matrix write its
  outputs (the parts' together); a module naming a layer the model does not have (a LoRA of another model size) or
  matrices the wrong way round (transposed) is named.

A module name the family does not declare, and a component whose weights are not on disk (not in the local cache, a
single file in another layout), are not compared: the loader names them after the load.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config_fit import FLOAT_DTYPES

#: A LoRA tensor's name: the module, and which tensor (kohya's down/up/alpha, peft's A/B with an optional adapter
#: name ``default``); other names (DoRA scales, LoHa, biases) are left to the loaders.
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_down\.weight|lora_up\.weight|lora_A(?:\.default)?\.weight|"
                      r"lora_B(?:\.default)?\.weight|alpha)$")
_SIDE = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up", "alpha": "alpha"}

#: module name as in the file -> (component, the layers it writes, in diffusers' names) or None where not known
Targets = Callable[[str], "tuple[str, tuple[str, ...]] | None"]


def lora_modules(header: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """A checked safetensors header's LoRA tensors by module: module -> {"down" | "up" | "alpha": (tensor name,
    shape)}."""
    out: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for name, entry in header.items():
        match = LORA_KEY.match(name) if name != "__metadata__" else None
        if match is not None:
            side = _SIDE[match["which"].split(".")[0]]
            out.setdefault(match["module"], {})[side] = (name, list(entry["shape"]))
    return out


def _tail(name: str, module: str) -> str:
    return name[len(module) + 1:]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def structure_problem(header: Mapping[str, Any]) -> str | None:
    """Why the LoRA tensors of this checked header do not form LoRAs, naming the first module that does not (by
    name) and how many more do not, or None."""
    bad: list[str] = []
    for module, entry in sorted(lora_modules(header).items()):
        why = _module_problem(entry, module)
        if why is not None:
            bad.append(f"module {module}: {why}")
    return _first(bad, "modules")


def _module_problem(entry: Mapping[str, tuple[str, list[int]]], module: str) -> str | None:
    down, up, alpha = entry.get("down"), entry.get("up"), entry.get("alpha")
    if down is None or up is None:
        has = _tail((down or up or alpha)[0], module)           # type: ignore[index]
        lacks = "the down (lora_down / lora_A)" if down is None else "the up (lora_up / lora_B)"
        return f"has {has} but not {lacks} matrix: a LoRA needs both"
    if (len(down[1]), len(up[1])) != (4, 4):    # a Conv2d LoRA's pair (peft, LyCORIS) is 4-D: its ranks are checked
        for (name, shape), what in ((down, "rank × inputs"), (up, "outputs × rank")):
            if len(shape) != 2:
                return f"{_tail(name, module)} has shape {_shape(shape)}, not a matrix ({what}): not a Linear LoRA"
    if down[1][0] != up[1][1]:
        return (f"its ranks disagree: {_tail(down[0], module)} is {_shape(down[1])} (rank × inputs) but "
                f"{_tail(up[0], module)} is {_shape(up[1])} (outputs × rank)")
    if down[1][0] == 0:
        return f"has rank 0 ({_tail(down[0], module)} is {_shape(down[1])})"
    if alpha is not None and _count(alpha[1]) != 1:
        return f"its alpha has shape {_shape(alpha[1])}, not one number (a 0-dim tensor)"
    return None


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _first(bad: list[str], what: str) -> str | None:
    if not bad:
        return None
    more = len(bad) - 1
    return bad[0] + (f" (and {more} more {what})" if more else "")


def linear_shapes(headers: Sequence[Mapping[str, Any]]) -> dict[str, list[int] | None]:
    """layer -> its weight's shape ``(outputs, inputs)`` for every ``<layer>.weight`` of the checked safetensors
    headers of one component's weights (diffusers' names); None where the shape is not the layer's (a quantized,
    packed tensor)."""
    out: dict[str, list[int] | None] = {}
    for header in headers:
        for name, entry in header.items():
            if name != "__metadata__" and name.endswith(".weight"):
                out[name[:-len(".weight")]] = list(entry["shape"]) if entry.get("dtype") in FLOAT_DTYPES else None
    return out


def _layer(layers: Mapping[str, list[int] | None], path: str) -> tuple[bool, list[int] | None]:
    """(whether the component has the layer, its shape): transformers 5 dropped CLIP's ``text_model.`` level, which
    a LoRA's names may still have (and weights saved before it still have)."""
    bare = path[len("text_model."):] if path.startswith("text_model.") else path
    for candidate in (path, bare, "text_model." + bare):
        if candidate in layers:
            return True, layers[candidate]
    return False, None


def fit_problem(header: Mapping[str, Any], targets: Targets,
                shapes: Mapping[str, Mapping[str, list[int] | None]]) -> str | None:
    """Why the LoRA of this checked header (whose modules form LoRAs: ``structure_problem``) does not fit the model
    whose components' layers are ``shapes`` (component -> ``linear_shapes``), naming the first module that does not
    and how many more do not, or None. ``targets`` is the family's declaration of where its LoRA names go."""
    bad: list[str] = []
    modules = lora_modules(header)
    for module, entry in sorted(modules.items()):
        if "down" not in entry or "up" not in entry:
            continue
        try:
            found = targets(module)
        except Exception:  # noqa: BLE001 - a name the family's converter does not know: left to the loader
            found = None
        layers = shapes.get(found[0]) if found else None
        if found is None or layers is None or not found[1]:
            continue
        why = _fit(entry, module, found[0], found[1], layers)
        if why is not None:
            bad.append(f"module {module}: {why}")
    return _first(bad, f"of its {len(modules)} modules")


_OTHER = " (a LoRA of another model or model size?)"


def _fit(entry: Mapping[str, tuple[str, list[int]]], module: str, component: str, paths: Sequence[str],
         layers: Mapping[str, list[int] | None]) -> str | None:
    if len(entry["down"][1]) != 2:
        return None                                     # a Conv2d LoRA: its loader compares it with the layer
    parts = []
    for path in paths:
        has, shape = _layer(layers, path)
        if not has:
            return f"names the layer {component}.{path}, which this model does not have{_OTHER}"
        if shape is None:
            return None                                 # packed weights: the widths are not known
        if len(shape) != 2:
            return f"names {component}.{path}, which is not a linear layer (its weight is {_shape(shape)})"
        parts.append(shape)
    (down_name, down), (up_name, up) = entry["down"], entry["up"]
    inputs, outputs = parts[0][1], sum(p[0] for p in parts)
    where = f"{component}.{paths[0]}" if len(paths) == 1 else \
        f"{component}.{paths[0]} … {paths[-1].rsplit('.', 1)[-1]} ({len(paths)} fused parts)"
    if any(p[1] != inputs for p in parts):
        return None                                     # parts of different inputs: no fused layer the family has
    if down[1] == inputs and up[0] == outputs:
        return None
    if down[0] == inputs and up[1] == outputs:
        return (f"its matrices are transposed: {_tail(down_name, module)} is {_shape(down)} and {_tail(up_name, module)} "
                f"{_shape(up)}, but {where} takes {inputs} inputs and gives {outputs} outputs, so the down matrix "
                f"must be [rank, {inputs}] and the up matrix [{outputs}, rank]")
    if down[1] != inputs:
        return (f"{_tail(down_name, module)} is {_shape(down)} ({down[1]} inputs), but {where} takes {inputs} inputs"
                f"{_OTHER}")
    return f"{_tail(up_name, module)} is {_shape(up)} ({up[0]} outputs), but {where} gives {outputs} outputs{_OTHER}"
