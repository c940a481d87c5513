"""Whole-image distances used for "carbon copies": SSIM of 64×64 grey copies and a 64-bit DCT hash."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from lora_run_eval.imagesim import hamming, image_distance, phash, signature, ssim

from .conftest import astronaut, face_free


def test_identical_images_have_zero_distance():
    a = signature(astronaut())
    assert image_distance(a, a) == (0.0, 0)


def test_near_copies_are_close_and_different_photos_are_far():
    base = astronaut()
    near = ImageEnhance.Brightness(base).enhance(1.05).resize((500, 500))
    d_near = image_distance(signature(base), signature(near))
    assert d_near[0] < 0.08 and d_near[1] <= 4
    for name, other in face_free().items():
        d_far = image_distance(signature(base), signature(other))
        assert d_far[0] > 0.3 and d_far[1] > 10, name


def test_ssim_and_hash_properties():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, 64))
    assert ssim(x, x) == 1.0
    assert ssim(x, 255 - x) < 0
    assert hamming(0b1011, 0b0001) == 2
    flat = Image.new("RGB", (100, 100), (90, 90, 90))
    assert phash(flat) == phash(flat.resize((37, 53)))
