"""The data pipeline shared by every family: aspect-ratio buckets, the epoch plan, image preparation.

- **Buckets**: every ``(w, h)`` with sides multiples of ``bucket_step`` (itself a multiple of the family's
  pixel multiple) between ``bucket_min`` and ``bucket_max`` whose area is at most ``resolution²``, the
  largest such height for each width. An image goes to the bucket nearest its aspect ratio **among the
  buckets that fit inside it**: we never upscale (the image is scaled down to cover the bucket, then centre
  cropped).
- **Epoch plan**: each subject image appears ``repeats`` times, each regularisation image its set's
  ``repeats`` times. Subject and regularisation samples are shuffled separately (seeded by seed and epoch)
  and interleaved evenly, so regularisation samples are spread through the epoch; their loss is multiplied
  by the set's ``weight``. Batches hold samples of one bucket. Caption dropout (probability
  ``caption_dropout``) replaces the caption by the empty string, decided per epoch and position from the seed.
- Everything is a pure function of (recipe, items, seed, epoch): resuming at step N rebuilds the same order.
"""
from __future__ import annotations

import math
import random
from typing import Any

import attrs

from lora_run.dataset import Item
from lora_run_folder import training_caption
from lora_run_training.sections import DatasetKeys


@attrs.frozen
class Sample:
    """One training sample of an epoch."""

    index: int                  # index into the item list
    bucket: tuple[int, int]     # (width, height) in pixels
    caption: str                # after the trigger policy and caption dropout
    weight: float               # loss weight (regularisation sets have their own)
    is_reg: bool


def make_buckets(resolution: int, bucket_min: int, bucket_max: int, step: int, multiple: int = 16) -> list[tuple[int, int]]:
    """All buckets ``(w, h)``: sides multiples of ``step`` (rounded up to ``multiple``) in ``[min, max]``,
    area at most ``resolution²`` (the square ``resolution × resolution`` is always included)."""
    step = max(multiple, (step // multiple) * multiple)
    area = resolution * resolution
    lo = math.ceil(bucket_min / step) * step
    hi = (bucket_max // step) * step
    found: set[tuple[int, int]] = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (area // w // step) * step)
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    side = (resolution // step) * step
    if lo <= side <= hi:
        found.add((side, side))
    return sorted(found)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]], step: int) -> tuple[int, int]:
    """The bucket for an image of ``size = (w, h)``: nearest aspect ratio among buckets not larger than the
    image (ties: the larger area). An image smaller than every bucket gets its own size rounded down to
    ``step`` (lint already warns about and skips images below ``bucket_min``)."""
    w, h = size
    fitting = [b for b in buckets if b[0] <= w and b[1] <= h]
    if not fitting:
        return (max(step, (w // step) * step), max(step, (h // step) * step))
    aspect = math.log(w / h)
    return min(fitting, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 6), -b[0] * b[1]))


def prepare_image(image: Any, bucket: tuple[int, int]) -> Any:
    """Scale a PIL RGB image down (Lanczos) to cover ``bucket`` and centre-crop it to exactly ``bucket``."""
    from PIL import Image

    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def image_to_tensor(image: Any) -> Any:
    """PIL RGB → float tensor ``(3, H, W)`` in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class EpochPlanner:
    """Deterministic epochs of batches over the usable items."""

    def __init__(self, items: list[Item], section: DatasetKeys, buckets_of: list[tuple[int, int]], *,
                 seed: int, batch_size: int):
        self.items = items
        self.section = section
        self.buckets_of = buckets_of            # bucket per item (same order as items)
        self.seed = seed
        self.batch_size = batch_size
        self.captions = [training_caption(item, section) for item in items]
        counts: dict[tuple[int, int], int] = {}
        for i, item in enumerate(items):
            counts[buckets_of[i]] = counts.get(buckets_of[i], 0) + item.repeats
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in counts.values())

    def epoch(self, epoch: int) -> list[list[Sample]]:
        """The batches of epoch ``epoch`` (0-based)."""
        rng = random.Random(f"{self.seed}:order:{epoch}")
        subject = [i for i, item in enumerate(self.items) if not item.is_reg for _ in range(item.repeats)]
        reg = [i for i, item in enumerate(self.items) if item.is_reg for _ in range(item.repeats)]
        rng.shuffle(subject)
        rng.shuffle(reg)
        keyed = [((n + 0.5) / len(subject), 0, i) for n, i in enumerate(subject)]
        keyed += [((n + 0.5) / len(reg), 1, i) for n, i in enumerate(reg)]
        order = [i for _, _, i in sorted(keyed)]
        drop = random.Random(f"{self.seed}:caption_dropout:{epoch}")
        p = self.section.caption_dropout
        samples = []
        for i in order:
            item = self.items[i]
            dropped = p > 0 and drop.random() < p
            samples.append(Sample(i, self.buckets_of[i], "" if dropped else self.captions[i], item.weight, item.is_reg))
        batches: list[list[Sample]] = []
        pending: dict[tuple[int, int], list[Sample]] = {}
        for s in samples:
            queue = pending.setdefault(s.bucket, [])
            queue.append(s)
            if len(queue) == self.batch_size:
                batches.append(queue)
                pending[s.bucket] = []
        batches.extend(q for q in pending.values() if q)
        return batches

    def all_captions(self) -> set[str]:
        """Every caption a sample can be trained with (the empty one too when caption dropout is on)."""
        out = set(self.captions)
        if self.section.caption_dropout > 0:
            out.add("")
        return out
