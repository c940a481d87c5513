"""Whole-image similarity for the "carbon copies" signal: SSIM of small grayscale copies and a DCT hash.

numpy + Pillow only. Both work on a fixed small size so that composition, not detail, is compared.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

SSIM_SIDE = 64          # images are compared as 64×64 grayscale
SSIM_WINDOW = 7         # uniform 7×7 window
HASH_SIDE = 32          # the DCT hash looks at a 32×32 grayscale copy …
HASH_BITS_SIDE = 8      # … and keeps its 8×8 lowest frequencies (64 bits)
BLANK_RANGE = 2.0       # a 64×64 grayscale copy whose values span at most this (of 255) is one flat colour


@attrs.frozen
class Signature:
    """What is kept of an image to compare it with others."""

    gray: Any        # SSIM_SIDE² float64 array
    phash: int       # 64-bit DCT hash

    @property
    def blank(self) -> bool:
        """One flat colour (a black image is what a pipeline that produced NaNs writes): nothing to compare."""
        return float(self.gray.max() - self.gray.min()) <= BLANK_RANGE


def _gray(image: Any, side: int) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.float64)


def _dct_matrix(n: int) -> Any:
    import numpy as np

    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(image: Any) -> int:
    """64-bit perceptual hash: 2-D DCT of a 32×32 grayscale copy; bit = low-frequency coefficient > median
    (the DC term is left out of the median)."""
    import numpy as np

    d = _dct_matrix(HASH_SIDE)
    coeffs = d @ _gray(image, HASH_SIDE) @ d.T
    low = coeffs[:HASH_BITS_SIDE, :HASH_BITS_SIDE].reshape(-1)
    median = np.median(low[1:])
    bits = 0
    for value in low:
        bits = (bits << 1) | int(value > median)
    return bits


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM of two equal-size grayscale arrays (uniform window, K1 = 0.01, K2 = 0.03, L = 255)."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    def mean(x: Any) -> Any:
        return sliding_window_view(x, (SSIM_WINDOW, SSIM_WINDOW)).mean(axis=(-1, -2))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = mean(a), mean(b)
    var_a = mean(a * a) - mu_a ** 2
    var_b = mean(b * b) - mu_b ** 2
    cov = mean(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(np.clip(value.mean(), -1.0, 1.0))


def signature(image: Any) -> Signature:
    return Signature(_gray(image, SSIM_SIDE), phash(image))


def signature_of(path: Path | str) -> Signature | None:
    from lora_run_folder.images import ImageProblem, open_rgb

    try:
        return signature(open_rgb(Path(path)).image)
    except (ImageProblem, OSError):
        return None


def image_distance(a: Signature, b: Signature) -> tuple[float, int]:
    """(1 − SSIM, pHash Hamming distance in bits out of 64)."""
    return 1.0 - ssim(a.gray, b.gray), hamming(a.phash, b.phash)
