"""On-disk latent and text-embedding caches (safetensors), shared by every family.

An entry's key is the SHA-256 of ``kind``, the content hash of its source (the image file's bytes, or the
caption text), the encoder identity (``ModelAdapter.encoder_identity``: model files, dtype, tokenizer
settings) and, for latents, the bucket. The file ``<cache>/<kind>/<key[:2]>/<key>.safetensors`` stores the
tensors and, in its metadata, the key, the format version and the source. On every read the entry is
checked: the file must parse, its metadata must carry the same key and version, the expected tensors must
be present and finite. Anything else is **corrupt**: the file is deleted and rebuilt, never trusted.

When an image changes, its new content hash gives a new key (a miss); the per-kind ``index.json`` remembers
which key each source had, so the entry of the old content is found **stale** and deleted. Writes are
atomic (temporary file + rename), so a killed run never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs

from lora_run.rundir import atomic_path, atomic_write_text

FORMAT_VERSION = "1"


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    corrupt: int = 0

    def text(self) -> str:
        return f"{self.hits} hit(s), {self.misses} built ({self.stale} stale, {self.corrupt} corrupt rebuilt)"


def entry_key(kind: str, content_hash: str, identity: str, extra: str = "") -> str:
    return hashlib.sha256(f"{kind}\0{FORMAT_VERSION}\0{content_hash}\0{identity}\0{extra}".encode()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Cache:
    """One kind of cache (``latents`` or ``text``) under ``root``."""

    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind
        self.kind = kind
        self.stats = CacheStats()
        self._index_path = self.root / "index.json"
        try:
            self._index: dict[str, str] = json.loads(self._index_path.read_text("utf-8"))
            if not isinstance(self._index, dict):
                self._index = {}
        except (OSError, ValueError):
            self._index = {}
        self._index_dirty = False

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, expected: tuple[str, ...], source: str | None = None) -> dict[str, Any] | None:
        """The tensors of a valid entry (a hit), or None (a miss; a corrupt or stale file is removed)."""
        if source is not None:
            old = self._index.get(source)
            if old is not None and old != key:
                self.stats.stale += 1
                self._remove(self.path(old))
                self._index.pop(source, None)
                self._index_dirty = True
        path = self.path(key)
        if not path.is_file():
            self.stats.misses += 1
            return None
        tensors = self._read_valid(path, key, expected)
        if tensors is None:
            self.stats.corrupt += 1
            self.stats.misses += 1
            self._remove(path)
            return None
        self.stats.hits += 1
        if source is not None and self._index.get(source) != key:
            self._index[source] = key
            self._index_dirty = True
        return tensors

    def contains_valid(self, key: str, expected: tuple[str, ...]) -> bool:
        path = self.path(key)
        return path.is_file() and self._read_valid(path, key, expected) is not None

    def _read_valid(self, path: Path, key: str, expected: tuple[str, ...]) -> dict[str, Any] | None:
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                    return None
                names = set(fh.keys())
                if not set(expected) <= names:
                    return None
                tensors = {name: fh.get_tensor(name) for name in names}
        except Exception:  # noqa: BLE001 - any parse failure means corrupt
            return None
        for value in tensors.values():
            if value.is_floating_point() and not bool(torch.isfinite(value.float()).all()):
                return None
        return tensors

    def store(self, key: str, tensors: dict[str, Any], source: str | None = None) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(data, str(tmp), metadata={"key": key, "version": FORMAT_VERSION, "kind": self.kind,
                                                "source": (source or "")[:500]})
        if source is not None:
            self._index[source] = key
            self._index_dirty = True

    def flush(self) -> None:
        """Write the source → key index (atomically) if it changed."""
        if self._index_dirty:
            atomic_write_text(self._index_path, json.dumps(self._index, indent=1, sort_keys=True))
            self._index_dirty = False

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
