"""LoRA file formats shared by the backends: kohya (sd-scripts / ComfyUI) ↔ diffusers (peft) conversions.

A library, not a plugin: it registers nothing. The family-specific layouts live in the family packages
(``lora_run_<family>.lora``); ``lora_run_formats.flux`` and ``lora_run_formats.hunyuan_image`` are kept as
other names of those modules for the engine backends.

``lora_run_formats.header`` is the one check of a ``.safetensors`` file read on a user's behalf and
``lora_run_formats.model_files`` the checks of a model's single files and diffusers folder (every backend's);
``lora_run_formats.layouts`` says what kind of model file a header belongs to (the native families' slots);
``lora_run_formats.lora_check`` whether a LoRA's matrices form LoRAs and fit the model they name (headers only).

torch is imported inside the functions that need it, so importing this package is cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .header import HeaderError, read_header, safetensors_problem, tensor_names

__all__ = ["FormatError", "HeaderError", "copy_with_metadata", "detect_format", "kohya_modules", "load_lora",
           "lora_file_problem", "read_header", "read_metadata", "safetensors_problem", "save_lora", "tensor_names"]


class FormatError(ValueError):
    """A state dict a conversion cannot convert (the message names the key)."""


def kohya_modules(state_dict: Mapping[str, Any], key_pattern: Any, unmatched: str,
                  shown_prefix: str = "") -> list[tuple[str, Any, Any, float | None]]:
    """A kohya LoRA grouped by module: ``(module, lora_down, lora_up, alpha or None)`` sorted by module, each
    checked to be a plain Linear LoRA. ``key_pattern`` matches every key with the groups ``module`` and
    ``which``; a key it does not match is a FormatError ``"<key>: <unmatched>"``."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        match = key_pattern.match(key)
        if match is None:
            raise FormatError(f"{key}: {unmatched}")
        grouped.setdefault(match["module"], {})[match["which"].split(".")[0]] = value
    out = []
    for module, entry in sorted(grouped.items()):
        if "lora_down" not in entry or "lora_up" not in entry:
            raise FormatError(f"{shown_prefix}{module}: needs both lora_down.weight and lora_up.weight")
        down, up = entry["lora_down"], entry["lora_up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise FormatError(f"{shown_prefix}{module}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                              "do not form a Linear LoRA")
        out.append((module, down, up, float(entry["alpha"].item()) if "alpha" in entry else None))
    return out


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """``"kohya"`` (``*.lora_down.weight`` keys), ``"diffusers"`` (``*.lora_A.weight``) or ``"unknown"``."""
    keys = list(state_dict)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(".lora_A." in k for k in keys):
        return "diffusers"
    return "unknown"


def load_lora(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a ``.safetensors`` LoRA: (tensors, metadata strings)."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file, read from its checked JSON header (no torch)."""
    return dict(read_header(path).get("__metadata__") or {})


#: safetensors dtypes a LoRA's tensors may have (its weights and alphas are floating point).
LORA_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"})


def lora_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a LoRA lora-run can apply, or None: not a complete safetensors file (``read_header``:
    truncated, a header that lies, …), no LoRA tensors in kohya or diffusers format (a model's weights, a file of
    another kind), a tensor that is not floating point, or one holding NaN or inf (a LoRA trained into NaN would
    give black or noise images that the evaluation would score as the LoRA's), or matrices that do not form LoRAs
    (``lora_check.structure_problem``: a module without one of its matrices, ranks that disagree, an alpha that is
    not one number), the first module named. Whether the modules fit the model is the family's check
    (``lora_check.fit_problem``, through the native adapters' ``lora_problem``)."""
    try:
        header = read_header(path, kind="lora")
    except HeaderError as exc:
        return str(exc)
    names = tensor_names(header)
    if detect_format(dict.fromkeys(names)) == "unknown":
        return (f"holds no LoRA tensors (none of its {len(names)} tensor names ends in lora_down.weight or holds "
                ".lora_A.)")
    odd = next((n for n in names if header[n]["dtype"] not in LORA_DTYPES), None)
    if odd is not None:
        return f"tensor {odd} is {header[odd]['dtype']}, not floating point: not a LoRA's weights"
    from .lora_check import structure_problem

    return structure_problem(header) or _non_finite(path, header, names)


#: How to find a non-finite value in the raw bytes of each LoRA dtype: the unsigned view of one element, and the
#: bits that are all set exactly in NaN and inf (the exponent; float8 e4m3, which has no inf, marks NaN with every
#: exponent and mantissa bit).
_NON_FINITE_BITS = {"F64": ("<u8", 0x7FF0_0000_0000_0000), "F32": ("<u4", 0x7F80_0000), "F16": ("<u2", 0x7C00),
                    "BF16": ("<u2", 0x7F80), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F)}


def _non_finite(path: str | Path, header: dict[str, Any], names: list[str]) -> str | None:
    """The first tensor holding NaN or inf, named, or None (one tensor in memory at a time). Read from the raw bytes
    with numpy, without torch: `lora-run eval` refuses a broken LoRA in any install, and an install without the
    `train` extra then names the packages generation needs instead of failing on an import."""
    import struct

    import numpy as np

    try:
        with open(path, "rb") as fh:
            start = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name in names:
                view, bits = _NON_FINITE_BITS[header[name]["dtype"]]
                begin, end = header[name]["data_offsets"]
                fh.seek(start + begin)
                raw = np.frombuffer(fh.read(end - begin), dtype=view)
                if bool(((raw & np.array(bits, dtype=view)) == bits).any()):
                    return f"tensor {name} holds NaN or inf values (the LoRA is broken: its training diverged?)"
    except Exception as exc:  # noqa: BLE001 - a file that changed since its header was read
        return f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def copy_with_metadata(source: str | Path, target: str | Path, extra: Mapping[str, str]) -> Path:
    """Copy a ``.safetensors`` file atomically, merging ``extra`` into its metadata (no torch, tensors untouched).

    The header is JSON followed by the raw tensor bytes; offsets are relative to the end of the header, so
    only the header is rewritten (padded with spaces to 8 bytes, as safetensors does).
    """
    import json
    import shutil
    import struct

    from lora_run_rundir import atomic_path

    target = Path(target)
    with open(source, "rb") as src:
        size = struct.unpack("<Q", src.read(8))[0]
        if size > 100_000_000:
            raise ValueError(f"{source}: not a safetensors file (header of {size} bytes)")
        header = json.loads(src.read(size))
        metadata = dict(header.get("__metadata__") or {})
        metadata.update({str(k): str(v) for k, v in extra.items()})
        header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(src, out, 1 << 20)
    return target


def save_lora(path: str | Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a ``.safetensors`` LoRA atomically (a temp file renamed on success); tensors made contiguous."""
    from safetensors.torch import save_file

    from lora_run_rundir import atomic_path

    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + (1 << 20)
    with atomic_path(path, needed) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path
