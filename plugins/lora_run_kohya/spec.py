"""sd-scripts' option and dataset-config schema (shipped in ``data/``), and the validators we run before launch.

sd-scripts reads ``--config_file`` with ``toml.load`` and hands the values to argparse *without* converting
or checking them: a string where a float belongs, an unknown key or a value outside ``choices`` passes
silently and fails (or is ignored) later. ``--dataset_config`` is checked by voluptuous, but only when
sd-scripts starts. So every file we generate is checked here first, against the data extracted from
sd-scripts itself (``python -m lora_run_kohya.refresh_data`` rebuilds it).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

from lora_run_engines import keys

DATA = Path(__file__).with_name("data") / "sd_scripts_options.json"


@functools.lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    return json.loads(DATA.read_text("utf-8"))


def options(script: str) -> dict[str, dict[str, Any]]:
    """option dest → {type, nargs?, action?, choices?, default?} for ``flux_train_network.py`` etc."""
    return load()["scripts"][script]


def check_option(script: str, key: str, value: Any) -> str | None:
    """Why ``key = value`` is not a valid ``--config_file`` entry for ``script`` (None if it is)."""
    spec = options(script).get(key)
    if spec is None:
        close = keys.close_match(key, options(script))
        return f"`{key}` is not an option of sd-scripts' {script}" + (f" (did you mean `{close}`?)" if close else "")
    kind = spec["type"]
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        return f"`{key}` must be a finite number, got {keys.describe(value)}"
    if spec.get("nargs") in ("*", "+"):
        if not isinstance(value, list):
            return f"`{key}` takes a list (nargs={spec['nargs']}), got {keys.describe(value)}"
        bad = [v for v in value if not keys.value_ok(kind, v)]
        if bad:
            return f"`{key}` takes a list of {kind}, got {keys.describe(bad[0])} in it"
        values = value
    else:
        if not keys.value_ok(kind, value):
            hint = " (write 1.0, not 1: sd-scripts does not convert config-file values)" if kind == "float" else ""
            return f"`{key}` expects {kind}, got {keys.describe(value)}{hint}"
        values = [value]
    choices = spec.get("choices")
    if choices:
        for v in values:
            if v not in choices:
                return f"`{key}` must be one of {', '.join(map(str, choices))}; got {v!r}"
    return None


def check_config(script: str, config: dict[str, Any]) -> list[str]:
    """Every problem of a ``--config_file`` table: sections are flattened one level, like sd-scripts does."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for section, table in config.items():
        items = table.items() if isinstance(table, dict) else [(section, table)]
        where = f"[{section}]" if isinstance(table, dict) else "top level"
        for key, value in items:
            if isinstance(value, dict):
                problems.append(f"{where} `{key}`: nested tables are not flattened by sd-scripts")
                continue
            if key in seen:
                problems.append(f"{where} `{key}` repeats {seen[key]}: sd-scripts would keep only one")
            seen[key] = where
            why = check_option(script, key, value)
            if why:
                problems.append(f"{where} {why}")
    return problems


def check_dataset(dataset: dict[str, Any]) -> list[str]:
    """Every problem of a ``--dataset_config`` table against sd-scripts' voluptuous schema (DreamBooth style)."""
    schema = load()["dataset"]
    problems: list[str] = []

    def check_table(table: Any, allowed: dict[str, str], where: str, extra: tuple[str, ...] = ()) -> None:
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table, got {keys.describe(table)}")
            return
        problems.extend(keys.table_problems(
            table, allowed, skip=extra,
            unknown=lambda key, _close: f"{where} `{key}`: extra keys not allowed (sd-scripts' dataset schema)",
            wrong=lambda key, kind, value: f"{where} `{key}` expects {kind}, got {keys.describe(value)}"))

    for key in dataset:
        if key not in schema["top_level_keys"]:
            problems.append(f"top level `{key}`: only {' and '.join(schema['top_level_keys'])} are allowed")
    if "general" in dataset:
        check_table(dataset["general"], schema["general"], "[general]")
    datasets = dataset.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        problems.append("[[datasets]] must be a non-empty array of tables")
        return problems
    for i, ds in enumerate(datasets):
        check_table(ds, schema["datasets"], f"[[datasets]][{i}]", extra=("subsets",))
        subsets = ds.get("subsets") if isinstance(ds, dict) else None
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"[[datasets]][{i}] needs a non-empty [[datasets.subsets]] array")
            continue
        for j, sub in enumerate(subsets):
            where = f"[[datasets]][{i}].subsets[{j}]"
            check_table(sub, schema["subsets"], where)
            for req in schema["required_subset_keys"]:
                if isinstance(sub, dict) and req not in sub:
                    problems.append(f"{where} `{req}` is required")
    return problems
