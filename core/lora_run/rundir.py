"""The run directory: atomic writes, the manifest, the never-overwrite rule."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

MANIFEST = "manifest.json"
RECIPE = "recipe.toml"
LOG = "run.log"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """For writers that want a file name (safetensors.save_file): yields a temp path, renamed on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    import sys

    torch = sys.modules.get("torch")  # only report what is already imported; never import torch here
    if torch is not None:
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    return info


class RunDir:
    """A run's output folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def prepare(self, *, overwrite: bool, resume: bool) -> None:
        """Create the folder; refuse a non-empty one unless resuming or told to overwrite."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError(f"{p}: the output path exists and is not a folder")
        existing = [c for c in p.iterdir()] if p.is_dir() else []
        if resume:
            # a run killed between writing recipe.toml and its first manifest is still resumable
            if not (p / MANIFEST).is_file() and not (p / RECIPE).is_file():
                raise OutputError(f"{p}: nothing to resume (no {MANIFEST}); start without --resume")
        elif existing and not overwrite:
            raise OutputError(f"{p}: the output folder is not empty ({len(existing)} entries); use --resume to "
                              "continue that run, --overwrite to replace it, or --output-dir for a new folder")
        elif existing and overwrite:
            _clear(p)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"{p}: cannot write to the output folder ({exc.strerror})") from None

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write_text(target, text)
        return target

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            return {}

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.read_manifest()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(self.path / MANIFEST, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return data

    def log(self, message: str) -> None:
        with open(self.path / LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def _clear(path: Path) -> None:
    """--overwrite: move the old run aside first, delete it only once the move worked."""
    import shutil

    trash = path.with_name(f".{path.name}.old-{int(time.time())}")
    path.rename(trash)
    path.mkdir()
    shutil.rmtree(trash, ignore_errors=True)
