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

``state.json`` records the size and SHA-256 of every other file of the folder. ``--resume`` verifies them
(``newest_intact``): a damaged checkpoint (truncated, emptied, bit-flipped) is moved aside to
``step-NNNNNN.damaged`` with a warning naming the file, and the newest intact one is used; when none is
usable the error names each damaged file. A folder under a checkpoint's name that lora-run did not write (no state
of its own, not among the checkpoints the manifest records after every save) is refused instead
(``unwritten_checkpoints``): it is never renamed, deleted or written into.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from lora_run.errors import OutputError
from lora_run.files import FileProblem, read_limited, shown
from lora_run_rundir import JSON_LIMIT, disk_full_error, is_disk_full, parse_json
from lora_run_rundir.provenance import file_digests, sha256_file

from .outputs import HEADER_BYTES

STATE = "resume/state.json"
TRAINABLE = "resume/trainable.safetensors"
OPTIMIZER = "resume/optimizer.safetensors"
RNG = "resume/rng.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def temp_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place (this process's own)."""
    return Path(root) / f".step-{step:06d}.tmp-{os.getpid()}"


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


def optimizer_state_bytes(optimizer: str, shapes: list[tuple[int, ...]]) -> int:
    """The saved optimizer state of trainable tensors of these shapes: Adafactor's factored second moment from the
    shapes, the others at `memory.OPTIMIZER_BYTES` per element (AdamW's two fp32 moments, 8-bit AdamW's two
    one-byte ones, Prodigy's four; an unknown optimizer counts as AdamW)."""
    from .memory import OPTIMIZER_BYTES

    if optimizer == "adafactor":        # exp_avg_sq_row + exp_avg_sq_col of 2+-d tensors, exp_avg_sq otherwise
        return sum(4 * (math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:])) if len(s) >= 2 else 4 * math.prod(s)
                   for s in shapes)
    return OPTIMIZER_BYTES.get(optimizer, 8) * sum(math.prod(s) for s in shapes)


#: the generators' states (``rng.safetensors``: torch's CPU state and one per CUDA device)
RNG_BYTES = 64 * 1024


def checkpoint_bytes(lora_bytes: int, shapes: list[tuple[int, ...]], optimizer: str) -> int:
    """One checkpoint folder: its LoRA files (``outputs.lora_files_bytes``), the fp32 trainable tensors, the
    optimizer state and the generators' states, with header room for each resume file."""
    return (lora_bytes + 4 * sum(math.prod(s) for s in shapes) + optimizer_state_bytes(optimizer, shapes)
            + RNG_BYTES + 3 * HEADER_BYTES)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (and stale temp folders)."""
    removed = []
    found = complete_checkpoints(root)
    for _, path in found[:-keep_last] if keep_last > 0 else found:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for entry in Path(root).glob(".step-*.tmp-*") if Path(root).is_dir() else []:
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):   # never a live writer's folder
            shutil.rmtree(entry, ignore_errors=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by someone else
        return True
    return True


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
def cpu_copy(value: Any) -> Any:
    """``value`` (a state dict: tensors in dicts, lists and tuples) with every tensor copied to the CPU and every
    container rebuilt: a copy that later steps cannot change, for a write on another thread."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


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
class Writing:
    """One checkpoint being written on a thread of its own while training goes on (``write``: a call of ``save``
    on copies taken at its step). ``done`` says whether it ended; ``wait`` joins it and returns ``save``'s folder or
    raises what it raised, on the caller's thread. The thread is a daemon: a process killed or aborted meanwhile
    leaves the temp folder that ``prune`` removes later, never a checkpoint under its final name."""

    def __init__(self, step: int, write: Callable[[], Path]):
        import threading

        self.step = step
        self.seconds = 0.0                         # the write's own time, on its thread
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"lora-run checkpoint {step}",
                                        daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], Path]) -> None:
        import time

        started = time.perf_counter()
        try:
            self._result = write()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def save(root: Path, step: int, *, trainable: dict[str, Any], optimizer: Any, scheduler: Any, info: dict[str, Any],
         write_loras: Callable[[Path], dict[str, Path]] | None = None,
         rng: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically (temp folder + rename); returns its folder. ``rng``: the generators'
    states as ``capture_rng`` took them at that step (taken now when not given; a write on another thread must be
    given the ones of its step)."""
    from safetensors.torch import save_file

    root = Path(root)
    final = checkpoint_dir(root, step)
    if (final / STATE).is_file():
        return final
    if os.path.lexists(final):       # never ours: ours are renamed in whole (``--resume`` refused those it found)
        raise OutputError(f"{shown(final)}: something lora-run did not write is where this checkpoint goes (it holds "
                          "no checkpoint state); move it out of the run folder, then continue with --resume")
    tmp = temp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    weights = {k: v.detach().to("cpu").float().contiguous() for k, v in trainable.items()}
    opt_tensors, opt_data = split_state(optimizer.state_dict())
    lora_count = 1 + (1 if write_loras else 0)
    needed = (sum(v.numel() * 4 for v in weights.values()) * (1 + lora_count)
              + sum(v.numel() * v.element_size() for v in opt_tensors.values()) + (1 << 20))
    writing = tmp / TRAINABLE
    try:
        (tmp / "resume").mkdir(parents=True)
        save_file(weights, str(writing))
        writing = tmp / OPTIMIZER
        save_file(opt_tensors, str(writing))
        rng_tensors, rng_data = rng or capture_rng()
        writing = tmp / RNG
        save_file(rng_tensors, str(writing))
        writing = tmp
        loras = {fmt: str(p.relative_to(tmp)) for fmt, p in (write_loras(tmp) if write_loras else {}).items()}
        state = {"step": step, "optimizer": opt_data, "scheduler": _jsonable(scheduler.state_dict()), "rng": rng_data,
                 "loras": loras, "files": _records(tmp), **info}
        writing = tmp / STATE
        with open(writing, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)        # our own half-written folder (frees its space too)
        if not isinstance(exc, OutputError) and is_disk_full(exc):
            target = final / writing.relative_to(tmp) if writing != tmp else final
            raise disk_full_error(target, needed) from exc
        raise
    return final


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` (relative names), for ``verify``. A LoRA file's come from
    ``file_digests``, which keeps them (and its tensors' digest) for the manifest's record at the run's end."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors" and path.parent.name != "resume":
            digests = file_digests(path)
            out[path.relative_to(folder).as_posix()] = {"size": digests["size"], "sha256": digests["sha256"]}
        else:
            out[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def verify(folder: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong, naming the file."""
    folder = Path(folder)
    state_path = folder / STATE
    if not os.path.lexists(state_path):
        return f"{shown(state_path)}: missing"
    try:
        state = parse_json(read_limited(state_path, "json", JSON_LIMIT))
    except FileProblem as exc:
        return f"{shown(state_path)}: {exc}"
    except (OSError, ValueError) as exc:
        return f"{shown(state_path)}: not readable JSON ({type(exc).__name__})"
    if not isinstance(state, dict) or not _is_state(state):
        return f"{shown(state_path)}: not a checkpoint state"
    records = state.get("files")
    if isinstance(records, dict):
        for rel, rec in sorted(records.items()):
            if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
                return f"{shown(state_path)}: records a file outside the checkpoint ({rel!r})"
            path = folder / rel
            if not path.is_file() or path.is_symlink():
                return f"{shown(path)}: " + ("missing" if not os.path.lexists(path) else "not a regular file")
            size = path.stat().st_size
            if not isinstance(rec, dict) or size != rec.get("size"):
                return f"{shown(path)}: {size} bytes, {rec.get('size') if isinstance(rec, dict) else '?'} recorded " \
                       "(truncated or damaged)"
            if sha256_file(path) != rec.get("sha256"):
                return f"{shown(path)}: checksum differs from the one recorded (damaged)"
        required = {TRAINABLE, OPTIMIZER, RNG} - set(records)
        if required:
            return f"{shown(folder / sorted(required)[0])}: not recorded in the checkpoint state"
        return None
    from safetensors import safe_open                   # a checkpoint of an older version: parse its files

    for rel in (TRAINABLE, OPTIMIZER, RNG):
        try:
            with safe_open(str(folder / rel), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - any parse failure means damaged
            return f"{shown(folder / rel)}: not a readable safetensors file ({type(exc).__name__})"
    return None


def candidate_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under its final name, whether intact or not, oldest first."""
    out = []
    if Path(root).is_dir():
        for entry in Path(root).iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink():
                out.append((int(m[1]), entry))
    return sorted(out)


def recorded_checkpoints(manifest: dict[str, Any]) -> set[str]:
    """The names of the checkpoint folders a run folder's manifest records its runs saved (``artifacts.checkpoints``,
    written after every save) or was writing when it stopped (its ``checkpoints/step-NNNNNN`` paths among the paths
    being written, ``WRITING``, unless something was there when that writing began: a run killed after a checkpoint's
    rename, before its record); none from a record of the wrong shape."""
    from lora_run_rundir.folder import WRITING, unfinished

    artifacts = manifest.get("artifacts")
    entries = artifacts.get("checkpoints") if isinstance(artifacts, dict) else None
    names = set()
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("dir"), str):
            names.add(Path(entry["dir"]).name)
        elif isinstance(entry, dict) and isinstance(entry.get("step"), int):
            names.add(checkpoint_dir(Path(), entry["step"]).name)
    writing = manifest.get(WRITING) if isinstance(manifest.get(WRITING), list) else []
    for rel in writing:
        parts = rel.split("/") if isinstance(rel, str) else []
        if len(parts) == 2 and parts[0] == "checkpoints" and _STEP_DIR.match(parts[1]) and unfinished(manifest, rel):
            names.add(parts[1])
    return names


def _is_state(state: dict[str, Any]) -> bool:
    return isinstance(state.get("step"), int) and "optimizer" in state


def unwritten_checkpoints(root: Path, recorded: set[str]) -> list[Path]:
    """The folders under a checkpoint's name lora-run did not write: neither holding a checkpoint state of their own
    (``resume/state.json``: lora-run renames a checkpoint into place whole, its state written last) nor among the
    checkpoints the run folder records (``recorded_checkpoints``: one lora-run wrote whose state was damaged since).
    ``--resume`` refuses them: moving them aside as damaged would rename what lora-run did not create."""
    return [folder for _step, folder in candidate_checkpoints(root)
            if folder.name not in recorded and not _is_state(_state_record(folder))]


def newest_intact(root: Path, warn: Callable[[str], None] = print, move_damaged: bool = True
                  ) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that verifies and loads, with its data, or (None, None) when there is none at all.
    Damaged newer ones are named in a warning and moved aside (``step-NNNNNN.damaged``) so that training
    can write those steps again; when checkpoints exist but none is usable, OutputError names every damaged
    file (and they stay where they are, so a later ``--resume`` says the same). Every folder here is one lora-run
    wrote: ``check_resume`` refused the others first (``unwritten_checkpoints``)."""
    damaged: list[tuple[Path, str]] = []
    for _step, folder in reversed(candidate_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            try:
                data = load(folder)
            except Exception as exc:  # noqa: BLE001 - verified but unloadable: damaged all the same
                problem = f"{shown(folder)}: cannot be loaded ({type(exc).__name__}: {exc})"
            else:
                for bad, why in damaged:
                    where = _move_aside(bad) if move_damaged else None
                    warn(f"warning: checkpoint {bad.name} is damaged: {why}"
                         + (f"; moved to {where.name}" if where else "") + f"; resuming from {folder.name}")
                return folder, data
        damaged.append((folder, problem))
    if damaged:
        raise OutputError(f"{shown(root)}: no usable checkpoint to resume from: "
                          f"{'; '.join(why for _, why in damaged)}; start the run again with --overwrite (the LoRA "
                          "files in the checkpoint folders may still load)")
    return None, None


def misplaced_entries(root: Path) -> list[str]:
    """The entries under a checkpoint's name that are not plain folders (a file, a link, a dangling link), each
    named: no run writes them, and a resumed run would train up to that step and then fail writing there."""
    out = []
    if Path(root).is_dir() and not Path(root).is_symlink():
        for entry in sorted(Path(root).iterdir()):
            if _STEP_DIR.match(entry.name) and (entry.is_symlink() or not entry.is_dir()):
                out.append(f"{shown(entry)} is {'a link' if entry.is_symlink() else 'not a folder'}")
    return out


#: The recipe's parts a checkpoint's state depends on (its LoRA, optimizer, schedule, data order); its paths are
#: left out (a dataset or model folder may move; the run folder's own records check the dataset).
_TRAINED_WITH = ("lora", "optimizer", "scheduler", "text_encoder", "train")


def trained_with(recipe: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recipe (``to_dict``'s data) a checkpoint records and ``--resume`` compares."""
    out = {name: recipe.get(name, {}) for name in _TRAINED_WITH}
    out["train"] = {k: v for k, v in out["train"].items() if k != "cache_dir"}
    out["model"] = {"family": recipe.get("model", {}).get("family")}
    return out


def recorded_recipe_differences(root: Path, recipe: dict[str, Any]) -> list[tuple[Path, list[str]]]:
    """(state file, recipe keys) for every checkpoint whose state records a recipe (``trained_with``) that
    ``recipe`` (``to_dict``'s data) differs from where a resumed run cannot follow it: a checkpoint from another
    run's folder, or a run folder whose ``recipe.toml`` was removed. Checkpoints that record no recipe, or whose
    state does not parse, are left to ``verify`` and to the loading."""
    from lora_run_rundir.resume import resume_differences

    recipe, out = trained_with(recipe), []
    for _step, folder in candidate_checkpoints(root):
        saved = _state_record(folder).get("recipe")
        if isinstance(saved, dict):
            differences = resume_differences(saved, recipe)
            if differences:
                out.append((folder / STATE, differences))
    return out


def past_the_end(root: Path, recipe: Any) -> tuple[Path, int, int, str] | None:
    """(state file, its step, the run's length now, the recipe key that sets it) where the newest checkpoint whose
    state reads has trained more steps than ``recipe`` (its ``[train] steps`` or ``epochs``) now gives: a resume
    continues from its newest checkpoint and cannot go back. For an epochs-based recipe the length needs the
    batches of an epoch, which a checkpoint records (``batches_per_epoch``); an older checkpoint that does not is
    left to the check after loading (``Trainer.restore``)."""
    t = recipe.train
    for _step, folder in reversed(candidate_checkpoints(root)):
        state = _state_record(folder)
        step = state.get("step")
        if not _is_state(state):
            continue
        if t.steps is not None:
            total, key = t.steps, "train.steps"
        else:
            bpe = state.get("batches_per_epoch")
            if not isinstance(bpe, int) or isinstance(bpe, bool) or bpe < 1:
                return None
            total, key = math.ceil(t.epochs * bpe / t.gradient_accumulation), "train.epochs"
        return (folder / STATE, step, total, key) if step > total else None
    return None


def recorded_loras(folder: Path) -> dict[str, str]:
    """The LoRA files (format -> path relative to ``folder``) a checkpoint's state records; none for a state that
    does not parse (an older checkpoint damaged after the one a run resumed from)."""
    loras = _state_record(folder).get("loras")
    if not isinstance(loras, dict):
        return {}
    return {fmt: rel for fmt, rel in loras.items() if isinstance(fmt, str) and isinstance(rel, str)}


def _state_record(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, or an empty record where it does not read as a JSON object."""
    try:
        state = parse_json(read_limited(Path(folder) / STATE, "json", JSON_LIMIT))
    except (OSError, ValueError, FileProblem):
        return {}
    return state if isinstance(state, dict) else {}


def _move_aside(folder: Path) -> Path | None:
    aside, n = folder.with_name(f"{folder.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged-{n}")
    try:
        folder.rename(aside)
    except OSError:
        return None
    return aside


def load(path: Path) -> dict[str, Any]:
    """Everything of a checkpoint: ``trainable``, ``optimizer`` (a state dict), ``scheduler``, ``rng_tensors``
    and the JSON ``state``."""
    from safetensors.torch import load_file

    path = Path(path)
    state = parse_json((path / STATE).read_bytes())
    return {
        "state": state,
        "trainable": load_file(str(path / TRAINABLE)),
        "optimizer": join_state(load_file(str(path / OPTIMIZER)), state["optimizer"]),
        "scheduler": _from_json(state["scheduler"]),
        "rng_tensors": load_file(str(path / RNG)),
    }
