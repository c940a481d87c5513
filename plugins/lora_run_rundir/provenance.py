"""What a run was made with, for the manifest (the playbook's §10 "always record"): the versions of the Python
packages that train, the GPU driver, the base model's identity (a hub revision resolved to its commit, or a
digest of every local model file: ``_file_record``) and the digests of the LoRA files a run wrote. No torch import: versions are
read from the installed distributions' metadata."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

#: The distributions whose versions decide what a run computes (those installed are recorded).
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface-hub", "numpy",
            "bitsandbytes", "optimum-quanto", "torchao", "prodigyopt", "flash-attn", "xformers", "triton")
_CHUNK = 8 << 20
#: Files up to this size get a full SHA-256 in the model's record; larger ones their safetensors header's.
FULL_DIGEST_LIMIT = 64 << 20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def package_versions() -> dict[str, str]:
    """name -> version of the PACKAGES installed in this Python (absent ones left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except (metadata.PackageNotFoundError, ValueError, OSError):
            continue
    return out


def gpu_driver() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), or None where there is none."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as fh:
            text = fh.read(4096)
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for [^ ]+)?\s+([0-9][0-9.]+)", text)
    return found.group(1) if found else None


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def _safetensors_header(data: Any) -> tuple[int, dict[str, Any]]:
    """(where the tensor bytes begin, the parsed JSON header) of a safetensors file's bytes (a buffer of at least its
    header); ValueError for bytes that are not safetensors."""
    if len(data) < 8:
        raise ValueError("too short")
    (length,) = struct.unpack("<Q", data[:8])
    if length > 100 << 20 or len(data) < 8 + length:
        raise ValueError("header length")
    from .atomic import parse_json

    header = parse_json(bytes(data[8:8 + length]))
    if not isinstance(header, dict):
        raise ValueError("header")
    return 8 + length, header


def header_sha256(path: Path) -> str | None:
    """A SHA-256 of a safetensors file's header (its length and JSON: every tensor's name, dtype, shape and offsets,
    and the metadata), read without the tensor data; None for a file that is not safetensors."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if length <= 100 << 20:      # a longer claim is refused below without reading it
                head += fh.read(length)
        base, _ = _safetensors_header(head)
    except (OSError, ValueError, struct.error):
        return None
    return hashlib.sha256(head[:base]).hexdigest()


def _file_record(path: Path, earlier: dict[str, Any]) -> dict[str, Any]:
    """size, modification time and a digest of one file: the SHA-256 of a file up to ``FULL_DIGEST_LIMIT``, the
    safetensors header's (``header_sha256``) of a larger one, so that a run's start does not read tens of GB of
    weights (a re-export, conversion or quantisation changes the header; a flipped bit in the data does not, and the
    loaders' own checks are what catch that). A file of that size with no safetensors header gets size and time
    alone. The digest ``earlier`` recorded for the same path, size and modification time is reused."""
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    kind = "sha256" if st.st_size <= FULL_DIGEST_LIMIT else "header_sha256"
    before = earlier.get(str(path))
    if isinstance(before, dict) and all(before.get(k) == v for k, v in record.items()) \
            and isinstance(before.get(kind), str):
        return {**record, kind: before[kind]}
    digest = sha256_file(path) if kind == "sha256" else header_sha256(path)
    return {**record, kind: digest} if digest is not None else record


def _local_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root, n) for n in sorted(names) if not n.startswith(".") and Path(root, n).is_file())
    return out


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub id's revision (a branch, tag or commit; "main" when unset) resolves to in the local hub
    cache, or None where nothing of that revision is cached (nothing is downloaded or asked of the hub here)."""
    if revision and _COMMIT.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    for name in ("model_index.json", "config.json"):
        try:
            found = try_to_load_from_cache(repo, name, revision=revision)
        except Exception:        # a malformed id or cache: recorded as unresolved
            found = None
        if isinstance(found, str):
            commit = Path(found).parent.name
            if _COMMIT.match(commit):
                return commit
    ref = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        text = ref.read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return text if _COMMIT.match(text) else None


def model_identity(model: Any, default_hub_id: str | None = None, earlier: Any = None) -> dict[str, Any]:
    """The base model's identity: for a hub id its revision and the commit it resolved to; for a local folder or a
    ``[model.files]`` file the size, time and digest of every file (``_file_record``). ``earlier`` is the record of an earlier start of the
    same run (its digests are reused for files unchanged since)."""
    old = earlier.get("files") if isinstance(earlier, dict) and isinstance(earlier.get("files"), dict) else {}
    source = model.source or default_hub_id
    out: dict[str, Any] = {"source": source, "revision": model.revision}
    files: dict[str, Any] = {}
    if source:
        local = Path(source).expanduser()
        if local.is_dir():
            for path in _local_files(local.resolve()):
                files[str(path)] = _file_record(path, old)
        elif not local.exists() and not source.startswith((".", "/", "~")):
            out["hub_commit"] = hub_commit(source, model.revision)
    for _key, value in sorted(dict(model.files).items()):
        path = Path(value).expanduser()
        if path.is_file():
            files[str(path.resolve())] = _file_record(path.resolve(), old)
    if files:
        out["files"] = files
    return out


def _tensors_sha256(data: Any) -> str | None:
    """A SHA-256 of the tensors alone in a safetensors file's bytes (names, dtypes, shapes and bytes, in name order),
    leaving out its metadata: equal for two runs that trained the same LoRA, whatever their start times. None for
    bytes that are not safetensors."""
    try:
        base, header = _safetensors_header(data)
        digest = hashlib.sha256()
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) - base:
                return None
            digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode() + b"\0")
            digest.update(data[base + start:base + end])
        return digest.hexdigest()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


#: ``file_digests`` already computed in this process, by the file's identity: (device, inode, size, mtime_ns). A
#: rename keeps it, so a checkpoint's LoRA files hashed in their temp folder (on the writing thread) are not read
#: again when the run's end records them; a file written again has another mtime and is read again.
_DIGESTS: dict[tuple[int, int, int, int], dict[str, Any]] = {}


def file_digests(path: Path) -> dict[str, Any]:
    """size, SHA-256 and tensors' SHA-256 (``_tensors_sha256``) of a LoRA file, from one read of it (mapped), or
    from this process's earlier read of the same unchanged file (``_DIGESTS``)."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _DIGESTS:
            return dict(_DIGESTS[key])
        if st.st_size == 0:
            out = {"size": 0, "sha256": hashlib.sha256().hexdigest(), "tensors_sha256": None}
        else:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as data:
                out = {"size": st.st_size, "sha256": hashlib.sha256(data).hexdigest(),
                       "tensors_sha256": _tensors_sha256(data)}
    _DIGESTS[key] = out
    return dict(out)


def digest_soon(paths: Any) -> Any:
    """Compute ``file_digests`` of ``paths`` on a daemon thread (returned, started), so that the run's end finds
    them done: the final LoRA files, hashed while the last samples and the evaluation run."""
    import threading

    def run() -> None:
        for path in paths:
            try:
                file_digests(Path(path))
            except OSError:
                pass
    thread = threading.Thread(target=run, name="lora-run digests", daemon=True)
    thread.start()
    return thread


def lora_digests(folder: Path, artifacts: Any) -> dict[str, dict[str, Any]]:
    """relative path -> size, SHA-256 and tensors' SHA-256 of every ``.safetensors`` file the artifacts name inside
    the run folder (final LoRAs and the checkpoints' LoRA files)."""
    paths: set[Path] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.endswith(".safetensors"):
            path = Path(node)
            if folder in path.parents and path.is_file() and not path.is_symlink():
                paths.add(path)
    walk(artifacts)
    out = {}
    for path in sorted(paths):
        try:
            out[str(path.relative_to(folder))] = file_digests(path)
        except OSError:
            continue
    return out


def version_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the versions an earlier start of a run recorded and those of this one."""
    out = []
    old, new = before.get("lora_run_version"), now.get("lora_run_version")
    if isinstance(old, str) and old != new:
        out.append(f"lora-run {old} → {new}")
    old_pkgs = before.get("packages") if isinstance(before.get("packages"), dict) else {}
    new_pkgs = now.get("packages") or {}
    for name in sorted(set(old_pkgs) | set(new_pkgs)):
        a, b = old_pkgs.get(name), new_pkgs.get(name)
        if a != b:
            out.append(f"{name} {a or '(absent)'} → {b or '(absent)'}")
    old_py = before.get("hardware", {}).get("python") if isinstance(before.get("hardware"), dict) else None
    new_py = now.get("hardware", {}).get("python")
    if isinstance(old_py, str) and old_py != new_py:
        out.append(f"python {old_py} → {new_py}")
    return out


