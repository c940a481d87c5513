"""The files of a model lora-run (or an engine it drives) reads on a user's behalf, checked before anything loads
(by the native adapters' ``check_sources`` and the engine backends' model checks, so ``lora-run check`` and a run's
pre-flight both see them; no torch, nothing but headers and small JSON files read):

- a ``[model.files]`` single file: a regular file (not a folder, FIFO, device or link loop) that is a complete
  safetensors file (``lora_run_formats.read_header``: truncated, a header that lies, unknown dtypes, overlapping
  or out-of-range offsets are named);
- a diffusers folder (``[model] source``, or a hub model's snapshot in the local cache): ``model_index.json`` and,
  in each component folder, every ``*.json`` (a config, a tokenizer file, a shard index: a regular UTF-8 JSON
  object within ``TEXT_LIMIT``), the tokenizer's other files (``*.txt``, ``*.model``, ``*.tiktoken``: regular
  files), and the weights the loaders read (``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, or
  the shards an ``*.safetensors.index.json`` names; of a shard index and a single file beside it, only the one the
  library reads: diffusers' index, transformers' single file): complete safetensors files, and a component the family loads
  from the folder has some (``folder_problems``' ``loaded``). Other files are never read;
- a component's ``config.json`` against its weights' headers (``config_fit``): the blocks and widths the family
  declares for it (``folder_problems``' ``fits``), and a ``[model.files]`` file's against the config the loader
  reads for it (``file_fit_problems``), so no library builds a model its weights do not fill;
- what a diffusers folder says it is (``folder_classes``: its pipeline and its transformer's class), which the
  native adapters compare with the installed families' (``ModelAdapter.foreign_folder``). What a single file is
  (its layout) is ``lora_run_formats.layouts``'.

Without it, diffusers and transformers met these files after the dataset was cached, as "no file named
config.json" for a FIFO, "int too big to convert" for a tokenizer config that is a FIFO (exit 1), or a 300-character
"Unable to load weights" that left out why.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from lora_run.files import MiB, FileProblem, check_input_file, read_limited, shown

from .config_fit import Fit, fit_problems, header_shapes
from .header import HeaderError, read_header

#: The size limit of a JSON or tokenizer file in a model folder (a large tokenizer.json is tens of MiB).
TEXT_LIMIT = 256 * MiB
#: The weight files diffusers and transformers load from a component folder when it has no shard index.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
#: Where a component folder holds both a shard index and a single file of the same weights, the one each library
#: loads, then the one it leaves unread: diffusers takes its index first, transformers its single file.
_PREFERRED = (("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
              ("model.safetensors", "model.safetensors.index.json"))
_TOKENIZER_SUFFIXES = (".txt", ".model", ".tiktoken")
#: any file of weights a loader may read (other names, variants, formats): a folder with one is not "without weights"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def read_weights(path: str | Path) -> tuple[dict | None, str | None]:
    """A weights file's checked safetensors header, read once: (the header, None), or (None, why the file is not a
    complete safetensors file)."""
    try:
        return read_header(path, kind="model"), None
    except HeaderError as exc:
        return None, str(exc)


def weights_problem(path: str | Path) -> str | None:
    """Why a single weights file is not a complete safetensors file, or None."""
    return read_weights(path)[1]


def read_json(path: str | Path) -> tuple[dict | None, str | None]:
    """A JSON file of a model folder, read once: (its table, None), or (None, why it cannot be used). It must be a
    regular file within ``TEXT_LIMIT`` holding one UTF-8 JSON object."""
    try:
        data = json.loads(read_limited(path, "model JSON", TEXT_LIMIT).decode("utf-8"))
    except FileProblem as exc:
        return None, str(exc)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"is not valid JSON ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
    if not isinstance(data, dict):
        return None, f"is not a JSON object (it holds a {type(data).__name__})"
    return data, None


def json_problem(path: Path) -> str | None:
    """Why a JSON file of a model folder cannot be used (``read_json``), or None."""
    return read_json(path)[1]


def config_json(path: str | Path) -> dict | None:
    """A model's JSON file (a config, ``model_index.json``) as a table, or None where there is none to use: absent,
    not a regular file, not JSON, not an object (``check`` names each of those through ``json_problem``; a
    reader here falls back as for an absent file instead of crashing or blocking on a FIFO)."""
    return read_json(path)[0]


def folder_classes(folder: str | Path) -> tuple[str | None, str | None]:
    """What a diffusers folder says it is: the pipeline its ``model_index.json`` names (``_class_name``) and its
    transformer's class (``transformer/config.json``'s ``_class_name``, else the ``transformer`` entry of
    ``model_index.json``); None for each where the folder does not say (absent, unreadable: named by the other
    checks)."""
    folder = Path(folder)
    index = config_json(folder / "model_index.json") or {}
    config = config_json(folder / "transformer" / "config.json") or {}
    entry = index.get("transformer")
    listed = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    names = (index.get("_class_name"), config.get("_class_name") or listed)
    return tuple(name if isinstance(name, str) and name else None for name in names)  # type: ignore[return-value]


def parameter_count(paths: list[Path]) -> int | None:
    """The elements the tensors of these weights files hold, from their safetensors headers (nothing else is read), or
    None where one cannot be read."""
    total = 0
    for path in paths:
        header = read_weights(path)[0]
        if header is None:
            return None
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def component_weights(sub: str | Path) -> list[Path] | None:
    """The weights files diffusers loads from the component folder ``sub``: the shards of its index (preferred where
    both are there), else its single file; None where there are none, or a shard is missing (a snapshot still
    downloading)."""
    sub = Path(sub)
    index = sub / "diffusion_pytorch_model.safetensors.index.json"
    data = config_json(index) if os.path.lexists(index) else None
    if data is not None:
        shards, bad = _shards(index, data, partial=False)
        return sorted(shards) if shards and not bad else None
    single = [sub / name for name in WEIGHT_NAMES if os.path.lexists(sub / name)]
    return single[:1] or None


def component_headers(sub: str | Path) -> list[dict] | None:
    """The checked safetensors headers of every weights file a loader reads from the component folder ``sub``
    (``component_weights``, else transformers' shard index ``model.safetensors.index.json``), or None where there
    are none, a shard is missing or a header cannot be read (the other checks name those)."""
    sub = Path(sub)
    paths = component_weights(sub)
    index = sub / "model.safetensors.index.json"
    if paths is None and os.path.lexists(index) and (data := config_json(index)) is not None:
        shards, bad = _shards(index, data, partial=False)
        paths = sorted(shards) if shards and not bad else None
    headers = [read_weights(path)[0] for path in paths or ()]
    return headers if headers and all(h is not None for h in headers) else None  # type: ignore[return-value]


def folder_problems(folder: str | Path, partial: bool = False, fits: Mapping[str, Fit] | None = None,
                    loaded: frozenset[str] = frozenset()) -> list[str]:
    """Every problem of a diffusers folder's files (module docstring), each naming its file. ``partial``: a hub
    model's snapshot in the local cache, where a shard not downloaded yet is fetched when the model loads.
    ``fits``: component folder name -> what its config.json must fit in its weights (``config_fit``).
    ``loaded``: the component folders whose model is loaded from this folder: one of them with a config.json but
    no weights file (an interrupted download or copy) is named (not where ``partial``)."""
    folder = Path(folder)
    out = []
    index = folder / "model_index.json"
    if os.path.lexists(index):
        out += _named(index, json_problem(index))
    try:
        subs = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as exc:
        return out + [f"{shown(folder)}: cannot be listed ({exc.strerror or exc})"]
    for sub in subs:
        out += _component_problems(sub, partial, (fits or {}).get(sub.name), weighted=sub.name in loaded)
    return out


def component_fit_problems(sub: str | Path, fit: Fit) -> list[str]:
    """What the config.json of the component folder ``sub`` declares that its weights do not hold (``config_fit``),
    each naming the config file; damaged files are left to ``folder_problems``."""
    return _component_problems(Path(sub), True, fit, fit_only=True)


def file_fit_problems(config: str | Path, weights: str | Path, fit: Fit) -> list[str]:
    """What the config.json ``config`` declares that the single weights file ``weights`` does not hold (``fit``:
    declared in the file's own layout), naming the config file; nothing where either cannot be read (absent, or
    named by the other checks)."""
    data, header = config_json(config), read_weights(weights)[0]
    if data is None or header is None:
        return []
    return [f"{shown(config)}: {why}" for why in fit_problems(data, header_shapes(header), fit,
                                                            weights=f"the weights of {Path(weights).name}")]


def _component_problems(sub: Path, partial: bool, fit: Fit | None = None, fit_only: bool = False,
                        weighted: bool = False) -> list[str]:
    """The problems of one component folder's files, then (``fit``) what its config.json declares that its weights
    do not hold; ``fit_only``: only the latter; ``weighted``: a config.json without any weights file is named."""
    try:
        entries = sorted(p for p in sub.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        return [] if fit_only else [f"{shown(sub)}: cannot be listed ({exc.strerror or exc})"]
    out: list[str] = []
    unread = {second for first, second in _PREFERRED if os.path.lexists(sub / first) and os.path.lexists(sub / second)}
    entries = [e for e in entries if e.name not in unread]
    weights = {sub / name for name in WEIGHT_NAMES if os.path.lexists(sub / name) and name not in unread}
    config: dict | None = None
    shapes: dict[str, Any] = {}                 # every weight name: its shape, None where only an index names it
    for entry in entries:
        if entry.name.endswith(".json"):
            data, problem = read_json(entry)
            out += _named(entry, problem)
            if data is not None and entry.name == "config.json":
                config = data
            if data is not None and entry.name.endswith(".safetensors.index.json"):
                shards, bad = _shards(entry, data, partial)
                out += bad
                weights |= shards
                shapes.update(dict.fromkeys(k for k in data["weight_map"] if isinstance(k, str)) if not bad else {})
        elif entry.name.endswith(_TOKENIZER_SUFFIXES):
            try:
                check_input_file(entry, "tokenizer", TEXT_LIMIT)
            except FileProblem as exc:
                out.append(f"{shown(entry)}: {exc}")
    for path in sorted(weights):
        header, problem = read_weights(path)
        out += _named(path, problem)
        shapes.update(header_shapes(header) if header is not None else {})
    if weighted and not partial and config is not None and not any(e.name.endswith(_WEIGHT_SUFFIXES) for e in entries):
        out.append(f"{shown(sub)}: has a config.json but no weights file ({' or '.join(WEIGHT_NAMES)}, or the shards "
                   "of an index): an interrupted download or copy?")
    if fit_only:
        out = []
    if fit and config is not None:
        out += [f"{shown(sub / 'config.json')}: {why}" for why in fit_problems(config, shapes, fit)]
    return out


def _shards(index: Path, data: dict, partial: bool) -> tuple[set[Path], list[str]]:
    """The shard files an ``*.safetensors.index.json`` (``data``, as read) names (plain names in its folder), and
    what is wrong."""
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return set(), [f"{shown(index)}: has no weight_map of tensor names to file names"]
    shards, bad = set(), []
    for name in sorted(set(weight_map.values())):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            bad.append(f"{shown(index)}: names the shard {shown(name)}, which is not a file name in its folder")
        elif not os.path.lexists(index.parent / name):
            if not partial:
                bad.append(f"{shown(index.parent / name)}: missing (named by {index.name})")
        else:
            shards.add(index.parent / name)
    return shards, bad


def _named(path: Path, problem: str | None) -> list[str]:
    return [] if problem is None else [f"{shown(path)}: {problem}"]
