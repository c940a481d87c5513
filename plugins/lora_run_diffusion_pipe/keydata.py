"""Which keys diffusion-pipe reads: a compact copy of the research data, used to check generated configs.

``KEYS`` was extracted from ``tools-data/diffusion-pipe/config_keys.json`` (a grep of diffusion-pipe's
train.py, utils/*.py and models/*.py at commit ``SOURCE_COMMIT``) by :func:`extract`; a test re-extracts it
from the shared file when that file is present and compares. Regenerate with::

    python -m lora_run_diffusion_pipe.keydata path/to/config_keys.json > plugins/lora_run_diffusion_pipe/_keys.py

No file outside this package is read at run time.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from lora_run_engines import keys

from ._keys import KEYS, SOURCE_COMMIT

__all__ = ["KEYS", "SOURCE_COMMIT", "extract", "config_problems", "dataset_problems"]


def _first_word(text: str) -> str:
    return text.split()[0]


def extract(data: dict[str, Any]) -> dict[str, Any]:
    """The compact key data from the full research JSON (pure function: same input, same output)."""
    top = data["top_level"]
    ignored = sorted(k for k, v in top.items() if "NOT READ" in v or "effectively ignored" in v)
    optimizer_type = data["optimizer"]["type"]
    match = re.search(r"match: (.*?); anything else", optimizer_type)
    builtin = sorted(_first_word(part) for part in match[1].split(", ")) if match else []
    model_keys = {}
    for model_type in ("flux", "hunyuan_image"):
        model_keys[model_type] = sorted(set(data["model_keys_by_type_autogrep"][model_type]) | {"type", "dtype"})
    directory = data["directory"]
    return {
        "top_level": sorted(k for k in top if k not in ignored),
        "top_level_ignored": ignored,
        "top_level_required": sorted(k for k, v in top.items() if v.startswith(("REQUIRED", "table, REQUIRED"))),
        "save_keys": sorted(k for k in top if k.startswith("save_every_n_")),
        "model_types": list(data["model_types"]),
        "model_keys": model_keys,
        "dtype_names": sorted({_first_word(d) for d in data["dtype_names"]}),
        "adapter": sorted(k for k, v in data["adapter"].items() if not v.startswith("FORBIDDEN")),
        "adapter_forbidden": sorted(k for k, v in data["adapter"].items() if v.startswith("FORBIDDEN")),
        "optimizer_builtin": builtin,
        "dataset": sorted(data["dataset"]),
        "directory": sorted({k for k in directory if not k.startswith("_")} | set(directory["_overridable"])),
        "cli": sorted(_first_word(k) for k in data["cli_train_py"]),
    }


def _unknown(table: dict[str, Any], allowed: list[str], where: str) -> list[str]:
    return keys.table_problems(table, allowed, unknown=lambda key, close: f"{where}{key}: not a key diffusion-pipe "
                               "reads" + (f" (did you mean {where}{close}?)" if close else ""))


def config_problems(config: dict[str, Any]) -> list[str]:
    """Problems of a main config (as a dict) against the key data; empty when diffusion-pipe will accept it."""
    out = []
    for key in KEYS["top_level_ignored"]:
        if key in config:
            out.append(f"{key}: diffusion-pipe ignores this key")
    out += _unknown(config, KEYS["top_level"], "")
    out += [f"{key}: required" for key in KEYS["top_level_required"] if key not in config]
    if not any(key in config for key in KEYS["save_keys"]):
        out.append(f"one of {', '.join(KEYS['save_keys'])} is required")
    model = config.get("model", {})
    model_type = model.get("type")
    if model_type not in KEYS["model_types"]:
        out.append(f"model.type: {model_type!r} is not a diffusion-pipe model type")
    elif model_type in KEYS["model_keys"]:
        out += _unknown(model, KEYS["model_keys"][model_type], "model.")
    for key in ("dtype", "transformer_dtype"):
        if key in model and model[key] not in KEYS["dtype_names"]:
            out.append(f"model.{key}: {model[key]!r} is not a dtype name ({', '.join(KEYS['dtype_names'])})")
    adapter = config.get("adapter")
    if adapter is not None:
        out += [f"adapter.{key}: diffusion-pipe refuses this key" for key in KEYS["adapter_forbidden"] if key in adapter]
        out += _unknown({k: v for k, v in adapter.items() if k not in KEYS["adapter_forbidden"]}, KEYS["adapter"],
                        "adapter.")
        if adapter.get("type") not in ("lora", "lokr"):
            out.append(f"adapter.type: {adapter.get('type')!r} is not lora or lokr")
        if "dtype" in adapter and adapter["dtype"] not in KEYS["dtype_names"]:
            out.append(f"adapter.dtype: {adapter['dtype']!r} is not a dtype name")
    optimizer = config.get("optimizer", {})
    if "type" not in optimizer:
        out.append("optimizer.type: required")
    if "save_dtype" in config and config["save_dtype"] not in KEYS["dtype_names"]:
        out.append(f"save_dtype: {config['save_dtype']!r} is not a dtype name")
    return out


def dataset_problems(dataset: dict[str, Any]) -> list[str]:
    """Problems of a dataset config (as a dict) against the key data."""
    out = _unknown(dataset, KEYS["dataset"], "")
    if "resolutions" not in dataset and "size_buckets" not in dataset:
        out.append("resolutions: required (unless size_buckets)")
    directories = dataset.get("directory")
    if not directories:
        out.append("directory: at least one [[directory]] is required")
    for i, entry in enumerate(directories or []):
        out += _unknown(entry, KEYS["directory"], f"directory[{i}].")
        if "path" not in entry:
            out.append(f"directory[{i}].path: required")
    return out


def _render(keys: dict[str, Any], commit: str) -> str:
    import pprint

    body = pprint.pformat(keys, width=110, sort_dicts=True)
    return ('"""Generated by `python -m lora_run_diffusion_pipe.keydata` from tools-data/diffusion-pipe/'
            'config_keys.json; do not edit."""\n'
            f"SOURCE_COMMIT = {commit!r}\n\nKEYS = {body}\n")


def main(argv: list[str]) -> int:
    import json

    if len(argv) != 1:
        print("usage: python -m lora_run_diffusion_pipe.keydata CONFIG_KEYS_JSON", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        data = json.load(fh)
    match = re.search(r"@ ([0-9a-f]{40})", data["_meta"]["source"])
    sys.stdout.write(_render(extract(data), match[1] if match else "unknown"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
