"""The one check of a ``.safetensors`` file lora-run reads on a user's behalf (a model's weights, a LoRA), from its
header alone (no torch, nothing but the header read): every rule the safetensors library enforces when it opens the
file, so a file this check passes opens, and one it refuses is named with the reason before anything loads.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON (an object: tensor name ->
``{"dtype", "shape", "data_offsets": [begin, end]}``, and an optional ``"__metadata__"`` of strings), then the tensor
bytes, which the tensors cover exactly, without gaps or overlaps.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from lora_run.files import FileProblem, check_input_file

#: safetensors' own limit on the header (its ``HeaderTooLarge``).
HEADER_LIMIT = 100_000_000
#: bits per element of each dtype the safetensors format names.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
#: No file lora-run reads is larger (a regular-file check needs a limit).
WEIGHTS_LIMIT = 1 << 42


class HeaderError(ValueError):
    """The file is not a complete safetensors file; ``str()`` says why (without the file name)."""


def read_header(path: str | Path, limit: int = WEIGHTS_LIMIT, kind: str = "weights") -> dict[str, Any]:
    """The checked JSON header of a ``.safetensors`` file: tensor name -> dtype/shape/offsets, and
    ``__metadata__``. HeaderError says what is wrong: a path that is not UTF-8, not a regular file (a folder, a FIFO, a device, a link
    loop), over ``limit``, too short, a header length past the end, a header that is not a JSON object, a tensor
    entry of the wrong form, an unknown dtype, offsets that do not match the shape, overlap, leave gaps or run past
    the end of the file (truncated), metadata that is not strings."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:     # safetensors (Rust) opens UTF-8 paths only: "Path … is not valid UTF-8"
        raise HeaderError("its path is not valid UTF-8, which the safetensors library cannot open; rename the file "
                          "or its folder") from None
    try:
        size = check_input_file(path, kind, limit).st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise HeaderError(f"too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or 8 + n > size:
                raise HeaderError(f"its header claims {n} bytes but the file has {size}: truncated or not "
                                  "safetensors")     # the words the GPU runs recorded (tests/kohya/fixtures)
            raw = fh.read(n)
    except FileProblem as exc:
        raise HeaderError(str(exc)) from None
    except OSError as exc:
        raise HeaderError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HeaderError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict) or not raw.startswith(b"{"):     # safetensors wants the "{" first
        raise HeaderError("not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("its __metadata__ is not a table of strings")
    spans = []
    for name, entry in header.items():
        if name != "__metadata__":
            spans.append((*_span(name, entry), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise HeaderError(f"tensor {name!r} starts at byte {begin} of the data, not {end}: tensors overlap or "
                              "leave a gap")
        end = stop
    if 8 + n + end != size:
        raise HeaderError(f"truncated: its tensors need {8 + n + end} bytes, the file has {size}" if 8 + n + end > size
                          else f"{size - 8 - n - end} bytes after its last tensor (not a safetensors file)")
    return header


def _span(name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, checked against its dtype and shape."""
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r} is not described by a table")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {name!r} has an unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise HeaderError(f"tensor {name!r} has no valid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]:
        raise HeaderError(f"tensor {name!r} has no valid data_offsets")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise HeaderError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold a {dtype} tensor of shape "
                          f"{shape}")
    return offsets[0], offsets[1]


def safetensors_problem(path: str | Path, limit: int = WEIGHTS_LIMIT, kind: str = "weights") -> str | None:
    """Why ``path`` is not a complete safetensors file (``read_header``'s reason), or None."""
    try:
        read_header(path, limit, kind)
    except HeaderError as exc:
        return str(exc)
    return None


def tensor_names(header: dict[str, Any]) -> list[str]:
    """The tensor names of a header (``__metadata__`` left out)."""
    return [k for k in header if k != "__metadata__"]
