"""On-disk latent and text-embedding caches (safetensors), shared by every family.

An entry's key is the SHA-256 of ``kind``, the content hash of its source (the image file's bytes, or the
caption text), the encoder identity (``ModelAdapter.encoder_identity``: model files, dtype, tokenizer
settings) and, for latents, the bucket. The file ``<cache>/<kind>/<key[:2]>/<key>.safetensors`` stores the
tensors and, in its metadata, the key, the format version, the source and, per tensor, its shape, dtype and
the SHA-256 of its bytes. On every read the entry is checked: the file must be a regular file of sane size
and parse, its metadata must carry the same key and version, it must hold exactly the expected tensors, each
matching its recorded shape, dtype and checksum (a flipped bit is caught), of the dtype the run itself would
have stored (latents float32, text embeddings the compute dtype, masks int64: a record rewritten for another
dtype is not enough) and finite. A latent must have the geometry of its bucket (3-D, both sides the bucket's
divided by one integer factor; and the same channel count and factor as the other latents of the run), a
text entry the shapes of a fresh encode (``odd_texts``: the shapes the family declares before anything loads,
``ModelAdapter.text_shapes``: fixed sequence lengths, widths from the configs; and those of this run's fresh
encodes, else those of most of its text entries). Anything else is **corrupt**: the file is deleted and rebuilt,
never trusted.

When an image changes, its new content hash gives a new key (a miss); the per-kind ``index.json`` remembers
which key each source had, so the entry of the old content is found **stale** and deleted. Writes are
atomic (temporary file + rename), so a killed run never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

import attrs

from lora_run.files import FileProblem, read_limited
from lora_run_rundir import JSON_LIMIT, atomic_path, atomic_write_text, parse_json

FORMAT_VERSION = "2"   # 2: per-tensor shape, dtype and checksum in the metadata
_KEY = re.compile(r"^[0-9a-f]{64}$")
#: An entry larger than this is not one of ours (latents and text embeddings are a few MiB at most).
MAX_ENTRY_BYTES = 1 << 30


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
            index = parse_json(read_limited(self._index_path, "json", JSON_LIMIT))
        except (OSError, ValueError, FileProblem):
            index = {}
        # only well-formed keys: a tampered index must never make us delete a file outside the cache
        self._index: dict[str, str] = {k: v for k, v in index.items() if isinstance(k, str) and isinstance(v, str)
                                       and _KEY.match(v)} if isinstance(index, dict) else {}
        self._index_dirty = False

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, expected: dict[str, Any], source: str | None = None,
             check: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any] | None:
        """The tensors of a valid entry (a hit), or None (a miss; a corrupt or stale file is removed).
        ``expected``: each tensor's name → the torch dtype the run stores it in; ``check``: what the tensors must
        be beyond their own record (e.g. a latent's bucket geometry)."""
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
        if tensors is not None and check is not None and check(tensors) is not None:
            tensors = None
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

    def discard(self, key: str) -> None:
        """A hit found wrong after the fact (``odd_latents``, ``odd_texts``): delete it; it is rebuilt as a miss."""
        self.stats.hits -= 1
        self.stats.corrupt += 1
        self.stats.misses += 1
        self._remove(self.path(key))

    def contains_valid(self, key: str, expected: dict[str, Any]) -> bool:
        path = self.path(key)
        return path.is_file() and self._read_valid(path, key, expected) is not None

    def _read_valid(self, path: Path, key: str, expected: dict[str, Any]) -> dict[str, Any] | None:
        import torch
        from safetensors import safe_open

        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_ENTRY_BYTES:
                return None
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                    return None
                records = json.loads(meta.get("tensors", "null"))
                names = set(fh.keys())
                if names != set(expected) or not isinstance(records, dict) or set(records) != names:
                    return None
                tensors = {name: fh.get_tensor(name) for name in names}
        except Exception:  # noqa: BLE001 - any parse failure means corrupt
            return None
        for name, value in tensors.items():
            if value.dtype != expected[name] or records[name] != tensor_record(value):
                return None
            if value.is_floating_point() and not bool(torch.isfinite(value.float()).all()):
                return None
        return tensors

    def store(self, key: str, tensors: dict[str, Any], source: str | None = None) -> None:
        from safetensors.torch import save_file

        path = self.path(key)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        records = json.dumps({k: tensor_record(v) for k, v in data.items()}, sort_keys=True)
        needed = sum(v.numel() * v.element_size() for v in data.values()) + 65536
        with atomic_path(path, needed) as tmp:
            save_file(data, str(tmp), metadata={"key": key, "version": FORMAT_VERSION, "kind": self.kind,
                                                "source": _text(source or "")[:500], "tensors": records})
        if source is not None:
            self._index[source] = key
            self._index_dirty = True

    def flush(self) -> None:
        """Write the source → key index (atomically) if it changed."""
        if self._index_dirty:
            atomic_write_text(self._index_path, json.dumps(self._index, indent=1, sort_keys=True))
            self._index_dirty = False

    def _remove(self, path: Path) -> None:
        if path.parent.parent != self.root:          # only entries of this cache, by construction
            return
        try:
            os.unlink(path)
        except OSError:
            pass


def _text(source: str) -> str:
    """``source`` as UTF-8-safe text for an entry's metadata: a file name's undecodable bytes (kept by Python as
    lone surrogates, which safetensors cannot encode) become ``\\xNN`` escapes."""
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def tensor_record(tensor: Any) -> dict[str, Any]:
    """What an entry's metadata records of each tensor: shape, dtype and the SHA-256 of its bytes."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else flat
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
            "sha256": hashlib.sha256(raw.numpy().tobytes() if flat.numel() else b"").hexdigest()}


def latent_geometry(latent: Any, bucket: tuple[int, int]) -> tuple[int, int] | None:
    """(channels, downscale factor) of a latent [C, H, W] for a bucket (width, height), or None when its shape
    cannot be a latent of that bucket (not 3-D, sides not the bucket's divided by one integer factor)."""
    shape = tuple(getattr(latent, "shape", ()))
    if len(shape) != 3 or min(shape) < 1:
        return None
    channels, h, w = shape
    width, height = bucket
    if height % h or width % w or height // h != width // w or height // h < 1:
        return None
    return channels, height // h


def odd_latents(latents: dict[int, Any], buckets_of: list[tuple[int, int]]) -> list[int]:
    """Indices of latents whose (channels, factor) differ from most of the run's latents (a wrong-shaped
    entry that still fits some bucket geometry): they are rebuilt."""
    from collections import Counter

    geometry = {i: latent_geometry(z, buckets_of[i]) for i, z in latents.items()}
    common = Counter(g for g in geometry.values() if g is not None).most_common(1)
    return sorted(i for i, g in geometry.items() if g is None or (common and g != common[0][0]))


def text_layout(tensors: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The shape of each tensor of a text entry, by name."""
    return tuple(sorted((name, tuple(value.shape)) for name, value in tensors.items()))


def fits_shapes(tensors: dict[str, Any], expected: dict[str, tuple[int | None, ...]] | None) -> str | None:
    """How ``tensors`` differ from ``expected`` (tensor name -> the shape a fresh encode gives, None for a dimension
    not known ahead: ``ModelAdapter.text_shapes``; names it leaves out are not compared), or None where they fit."""
    for name, shape in (expected or {}).items():
        if name not in tensors:
            continue
        held = tuple(tensors[name].shape)
        if len(held) != len(shape) or any(want is not None and want != got for want, got in zip(shape, held)):
            return f"{name} has shape {list(held)}, not [{', '.join('*' if d is None else str(d) for d in shape)}]"
    return None


def odd_texts(texts: dict[str, dict[str, Any]], reference: dict[str, Any] | None = None,
              expected: dict[str, tuple[int | None, ...]] | None = None) -> list[str]:
    """Captions whose text tensors are shaped unlike ``expected`` (the shapes the family declares before anything
    loads: ``fits_shapes``) or, among the rest, unlike ``reference`` (a fresh encode of this run) or, without one,
    unlike most of the run's text entries (a wrong-shaped entry with a consistent record): they are rebuilt. So a
    text cache rewritten whole to one other shape is rebuilt even in a run that encodes nothing, wherever the
    family declares the shapes."""
    from collections import Counter

    odd = {caption for caption, tensors in texts.items() if fits_shapes(tensors, expected) is not None}
    layouts = {caption: text_layout(tensors) for caption, tensors in texts.items() if caption not in odd}
    common = Counter(layouts.values()).most_common(1)
    want = text_layout(reference) if reference is not None else common[0][0] if common else None
    return sorted(odd | {caption for caption, layout in layouts.items() if layout != want})
