"""Regenerate ``data/sd_scripts_options.json`` from the sd-scripts facts extracted by running sd-scripts.

The backend validates every generated ``--config_file`` and ``--dataset_config`` against this compact copy
(option name → type, nargs, choices; dataset section → key → type), because sd-scripts itself does not
type-check its config file. The inputs are the JSON files in ``shared/tools-data/sd-scripts/``
(``flux_train_network_args.json``, ``hunyuan_image_train_network_args.json``, ``dataset_config_keys.json``),
which were produced from sd-scripts' own ``setup_parser()`` and ``ConfigSanitizer``.

    python -m lora_run_kohya.refresh_data [TOOLS_DATA_DIR]   # default: ../shared/tools-data/sd-scripts

A test compares the shipped file with a fresh regeneration whenever the shared folder is present.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCRIPTS = {"flux_train_network.py": "flux_train_network_args.json",
           "hunyuan_image_train_network.py": "hunyuan_image_train_network_args.json"}
OUTPUT = Path(__file__).with_name("data") / "sd_scripts_options.json"
DEFAULT_SOURCE = Path(__file__).resolve().parents[2].parent / "shared" / "tools-data" / "sd-scripts"


def compact_options(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in sorted(entries, key=lambda e: e["dest"]):
        spec: dict[str, Any] = {"type": entry["type"]}
        if entry.get("nargs") not in (None, 0):
            spec["nargs"] = entry["nargs"]
        if entry.get("action") not in (None, "Store"):
            spec["action"] = entry["action"]
        choices = entry.get("choices")
        if choices:
            spec["choices"] = [c for c in choices if c is not None]
        if entry.get("default") is not None:
            spec["default"] = entry["default"]
        out[entry["dest"]] = spec
    return out


def build(source: Path) -> dict[str, Any]:
    scripts = {}
    for script, name in SCRIPTS.items():
        scripts[script] = compact_options(json.loads((source / name).read_text("utf-8")))
    dataset = json.loads((source / "dataset_config_keys.json").read_text("utf-8"))["default"]
    notes = json.loads((source / "dataset_config_keys.json").read_text("utf-8")).get("_notes", [])
    commit = ""
    for note in notes:
        if "sd-scripts@" in note:
            commit = note.split("sd-scripts@", 1)[1].split()[0]
            break
    return {
        "_generated_by": "python -m lora_run_kohya.refresh_data",
        "sd_scripts_commit": commit,
        "scripts": scripts,
        "dataset": {
            "top_level_keys": dataset["top_level_keys"],
            "general": {k: v["type"] for k, v in sorted(dataset["general"].items())},
            "datasets": {k: v["type"] for k, v in sorted(dataset["datasets_dreambooth"].items())},
            "subsets": {k: v["type"] for k, v in sorted(dataset["subsets_dreambooth"].items())},
            "required_subset_keys": sorted(k for k, v in dataset["subsets_dreambooth"].items() if v["required"]),
        },
    }


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else DEFAULT_SOURCE
    OUTPUT.write_text(render(build(source)), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
