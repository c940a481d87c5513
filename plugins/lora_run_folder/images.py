"""Opening training images safely: one function used by the lint and by every data pipeline.

Pillow only (no torch). Orientation from EXIF is applied; CMYK, 16-bit, palette and alpha images are
converted to 8-bit RGB (alpha composited on white), and each conversion is reported. The file is read once,
without blocking (a FIFO put in its place is refused, never waited on), and decoded from the bytes that were
hashed: a caller that knows the file's SHA-256 from the lint passes it, and a file changed since is refused.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import attrs

from lora_run.files import FileProblem, MiB, check_input_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
#: Formats photos come in that are not read (a dataset lint warning names each such file).
UNREAD_IMAGE_EXTENSIONS = frozenset({".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng",
                                     ".cr2", ".nef", ".arw", ".psd"})
#: Above this many pixels an image is refused as a possible decompression bomb (a 12k × 12k photo is fine).
MAX_PIXELS = 150_000_000
#: The size limit (bytes) of one training / subject image file (its pixels are limited by ``MAX_PIXELS``).
IMAGE_LIMIT = 256 * MiB


class ImageProblem(Exception):
    """The file cannot be used as a training image; the message says why."""


@attrs.frozen
class OpenedImage:
    image: object  # PIL.Image.Image, RGB
    notes: tuple[str, ...]
    original_size: tuple[int, int]
    sha256: str = ""   # of the bytes decoded


def read_image_bytes(path: Path) -> bytes:
    """The bytes of an image file: a regular file within ``IMAGE_LIMIT``, checked again on the open file (a FIFO,
    device or folder swapped in after the check is refused, not read)."""
    check_input_file(path, "image", IMAGE_LIMIT)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise FileProblem(f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise FileProblem("was replaced by something that is not a regular file while being read")
        try:
            data = fh.read(IMAGE_LIMIT + 1)
        except OSError as exc:
            raise FileProblem(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > IMAGE_LIMIT:
        raise FileProblem("grew over the limit for image files while being read")
    return data


def open_rgb(path: Path, expect_sha256: str | None = None) -> OpenedImage:
    """Read and decode an image file (``read_image_bytes``, ``decode_rgb``), or raise ImageProblem with a clear
    reason; with ``expect_sha256``, a file whose bytes no longer have that digest is refused (it changed since it was
    hashed)."""
    try:
        data = read_image_bytes(path)
    except FileProblem as exc:
        raise ImageProblem(str(exc)) from None
    return decode_rgb(data, expect_sha256)


def decode_rgb(data: bytes, expect_sha256: str | None = None) -> OpenedImage:
    """Decode an image file's bytes fully and return an 8-bit RGB image with the bytes' SHA-256, or raise
    ImageProblem with a clear reason (``expect_sha256``: as ``open_rgb``'s)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    notes: list[str] = []
    try:
        if not data:
            raise ImageProblem("empty file (0 bytes)")
        sha = hashlib.sha256(data).hexdigest()
        if expect_sha256 is not None and sha != expect_sha256:
            raise ImageProblem("changed while lora-run was using the dataset (its bytes differ from those the "
                               "lint checked); nothing is trained on an image the lint did not check")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if getattr(img, "n_frames", 1) > 1:
                    notes.append("animated: first frame used")
                img.load()
                size = img.size
                transposed = ImageOps.exif_transpose(img)
                if transposed is not None and transposed.size != img.size or _has_rotation(img):
                    notes.append("EXIF orientation applied")
                img = transposed if transposed is not None else img
                img = _to_rgb(img, notes)
                return OpenedImage(img, tuple(notes), size, sha)
    except ImageProblem:
        raise
    except MemoryError:
        raise ImageProblem("too large to decode in the memory available") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"too many pixels (over {MAX_PIXELS:,}): refused as a possible decompression "
                           "bomb") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image Pillow can read (wrong extension or corrupt file)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            raise ImageProblem("truncated image (the file ends early)") from None
        raise ImageProblem(f"corrupt image: {text}") from None


def _has_rotation(img: object) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - broken EXIF is not worth failing over
        return False


def _to_rgb(img: object, notes: list[str]) -> object:
    from PIL import Image

    mode = img.mode  # type: ignore[attr-defined]
    if mode == "RGB":
        return img
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
        return img.convert("RGB")  # type: ignore[attr-defined]
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        notes.append("16-bit converted to 8-bit")
        # the formats read here (PNG) store these modes as 16-bit samples: 65535 is white whatever the image's
        # brightest pixel (a dark 16-bit photo whose values all lie below 256 is near black, not full range)
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype("uint8")).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):  # type: ignore[attr-defined]
        notes.append("alpha composited on white")
        rgba = img.convert("RGBA")  # type: ignore[attr-defined]
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "P":
        notes.append("palette converted to RGB")
    elif mode in ("I;16N", "F"):
        notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")  # type: ignore[attr-defined]
