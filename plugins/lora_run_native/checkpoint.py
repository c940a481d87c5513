"""Resumable training state: ``<run>/checkpoints/step-NNNNNN/``.

A checkpoint folder holds the LoRA of that step in the recipe's output formats (``<name>-stepNNNNNN.safetensors``,
``diffusers/…``: usable without resuming) and, under ``resume/``, the resumable state:

- ``trainable.safetensors``: the trainable (LoRA) parameters in fp32 under their module names;
- ``optimizer.safetensors`` + the optimizer's non-tensor state in ``state.json``;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states;
- ``state.json``: step, epoch and position in the epoch (the data order is a pure function of the seed and
  the epoch), the LR scheduler state, python's and numpy's RNG states, and free-form run info.

It is written into ``.step-NNNNNN.tmp-<pid>/`` and renamed into place, so a checkpoint folder is complete or
absent; ``resume/state.json`` is written last, and only folders with one are considered for ``--resume``.
Only safetensors and JSON are read back (no pickle).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

STATE = "resume/state.json"
TRAINABLE = "resume/trainable.safetensors"
OPTIMIZER = "resume/optimizer.safetensors"
RNG = "resume/rng.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    out = []
    if Path(root).is_dir():
        for entry in Path(root).iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and (entry / STATE).is_file():
                out.append((int(m[1]), entry))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temp folders)."""
    removed = []
    found = complete_checkpoints(root)
    for _, path in found[:-keep_last] if keep_last > 0 else found:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for entry in Path(root).glob(".step-*.tmp-*") if Path(root).is_dir() else []:
        pid = entry.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(entry, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json) of python, numpy and torch RNG states."""
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    data = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, data


def restore_rng(tensors: dict[str, Any], data: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py = data["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ optimizer
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def split_state(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer/scheduler state dict → (tensors keyed ``state.<param>.<name>``, the rest as JSON)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict.get("state", {}).items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = _jsonable(value)
    rest = {k: _jsonable(v) for k, v in state_dict.items() if k != "state"}
    return tensors, {"scalars": scalars, "rest": rest}


def join_state(tensors: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in data["scalars"].items():
        state.setdefault(int(pid), {}).update({k: _from_json(v) for k, v in entry.items()})
    out = {k: _from_json(v) for k, v in data["rest"].items()}
    out["state"] = state
    return out


# -------------------------------------------------------------------------------------------- save/load
def save(root: Path, step: int, *, trainable: dict[str, Any], optimizer: Any, scheduler: Any, info: dict[str, Any],
         write_loras: Callable[[Path], dict[str, Path]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically (temp folder + rename); returns its folder."""
    from safetensors.torch import save_file

    root = Path(root)
    final = checkpoint_dir(root, step)
    if (final / STATE).is_file():
        return final
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "resume").mkdir(parents=True)
    save_file({k: v.detach().to("cpu").float().contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE))
    opt_tensors, opt_data = split_state(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / OPTIMIZER))
    rng_tensors, rng_data = capture_rng()
    save_file(rng_tensors, str(tmp / RNG))
    loras = {fmt: str(p.relative_to(tmp)) for fmt, p in (write_loras(tmp) if write_loras else {}).items()}
    state = {"step": step, "optimizer": opt_data, "scheduler": _jsonable(scheduler.state_dict()), "rng": rng_data,
             "loras": loras, **info}
    text = json.dumps(state)
    with open(tmp / STATE, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():                    # an incomplete folder of the same step (no state.json)
        shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load(path: Path) -> dict[str, Any]:
    """Everything of a checkpoint: ``trainable``, ``optimizer`` (a state dict), ``scheduler``, ``rng_tensors``
    and the JSON ``state``."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / STATE).read_text("utf-8"))
    return {
        "state": state,
        "trainable": load_file(str(path / TRAINABLE)),
        "optimizer": join_state(load_file(str(path / OPTIMIZER)), state["optimizer"]),
        "scheduler": _from_json(state["scheduler"]),
        "rng_tensors": load_file(str(path / RNG)),
    }
