"""Buckets, the epoch plan, timestep sampling: pure functions, no model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_run.dataset import Item
from lora_run_training.sections import DatasetKeys, RegularizationSet
from lora_run_native.data import EpochPlanner, choose_bucket, make_buckets, prepare_image


@given(res=st.sampled_from([256, 512, 768, 1024]), lo=st.sampled_from([256, 384]), hi=st.sampled_from([768, 1024]),
       step=st.sampled_from([16, 32, 64]))
def test_buckets_are_multiples_within_limits_and_area(res, lo, hi, step):
    from hypothesis import assume

    assume(lo <= res <= hi)     # the recipe rules guarantee it
    buckets = make_buckets(res, lo, hi, step, multiple=16)
    side = res // step * step
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res * res


def test_hunyuan_image_grid_of_32():
    for w, h in make_buckets(1024, 512, 2048, 64, multiple=32):
        assert w % 32 == 0 and h % 32 == 0


@settings(max_examples=200)
@given(w=st.integers(256, 4000), h=st.integers(256, 4000))
def test_bucket_never_upscales(w, h):
    buckets = make_buckets(512, 256, 768, 64)
    bw, bh = choose_bucket((w, h), buckets, 64)
    assert bw <= w and bh <= h


def test_bucket_follows_aspect_ratio():
    buckets = make_buckets(512, 256, 768, 64)
    assert choose_bucket((1000, 1000), buckets, 64) == (512, 512)
    bw, bh = choose_bucket((1200, 800), buckets, 64)
    assert bw > bh and abs(bw / bh - 1.5) < 0.2
    bw, bh = choose_bucket((600, 1200), buckets, 64)
    assert bh > bw


def test_prepare_image_scales_down_and_crops_exactly():
    from PIL import Image

    image = Image.new("RGB", (300, 200), (10, 20, 30))
    out = prepare_image(image, (256, 128))
    assert out.size == (256, 128)


def _items(tmp_path: Path, subject: int, reg: int, repeats: int = 1, reg_weight: float = 0.5) -> list[Item]:
    items = [Item(tmp_path / f"s{i}.png", f"ohwx photo {i}", None, "subject", repeats=repeats) for i in range(subject)]
    items += [Item(tmp_path / f"r{i}.png", None, None, "regularization[0]", is_reg=True, weight=reg_weight,
                   default_caption="a person") for i in range(reg)]
    return items


def _section(tmp_path: Path, dropout: float = 0.0) -> DatasetKeys:
    return DatasetKeys(path=str(tmp_path), trigger="ohwx", caption_dropout=dropout,
                          regularization=[RegularizationSet(path=str(tmp_path), weight=0.5)])


def test_epoch_plan_repeats_interleave_weights_and_determinism(tmp_path):
    items = _items(tmp_path, subject=4, reg=2, repeats=3)
    planner = EpochPlanner(items, _section(tmp_path), [(64, 64)] * len(items), seed=1, batch_size=1)
    epoch = [b[0] for b in planner.epoch(0)]
    assert len(epoch) == 4 * 3 + 2 == planner.batches_per_epoch
    assert sum(1 for s in epoch if not s.is_reg) == 12
    regs = [n for n, s in enumerate(epoch) if s.is_reg]
    assert regs and regs[0] > 0 and regs[-1] < len(epoch) - 1, "regularisation samples are spread, not at one end"
    assert all(s.weight == 0.5 and s.caption == "a person" for s in epoch if s.is_reg)
    assert [s.index for s in epoch] == [b[0].index for b in planner.epoch(0)], "same seed, same order"
    assert [s.index for s in epoch] != [b[0].index for b in planner.epoch(1)], "each epoch reshuffles"


def test_batches_share_a_bucket(tmp_path):
    items = _items(tmp_path, subject=6, reg=0)
    buckets = [(64, 64), (80, 64)] * 3
    planner = EpochPlanner(items, _section(tmp_path), buckets, seed=3, batch_size=2)
    batches = planner.epoch(0)
    assert len(batches) == planner.batches_per_epoch == 4
    for batch in batches:
        assert len({s.bucket for s in batch}) == 1


def test_caption_dropout_rate(tmp_path):
    items = _items(tmp_path, subject=10, reg=0, repeats=20)
    planner = EpochPlanner(items, _section(tmp_path, dropout=0.25), [(64, 64)] * 10, seed=5, batch_size=1)
    captions = [b[0].caption for b in planner.epoch(0)]
    rate = captions.count("") / len(captions)
    assert 0.15 < rate < 0.35
    assert "" in planner.all_captions()


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "logit-normal", "shift", "flux-shift"])
def test_sigma_sampling_in_range_and_seeded(method):
    import torch

    from lora_run_native.timesteps import sample_sigmas

    a = sample_sigmas(method, 512, torch.Generator().manual_seed(0), shift=3.0, image_seq_len=4096)
    b = sample_sigmas(method, 512, torch.Generator().manual_seed(0), shift=3.0, image_seq_len=4096)
    assert torch.equal(a, b)
    assert float(a.min()) > 0 and float(a.max()) < 1


def test_shifts_move_sigma_towards_noise():
    import torch

    from lora_run_native.timesteps import flux_mu, sample_sigmas

    base = sample_sigmas("sigmoid", 4096, torch.Generator().manual_seed(0))
    shifted = sample_sigmas("shift", 4096, torch.Generator().manual_seed(0), shift=3.0)
    assert float(shifted.mean()) > float(base.mean()) + 0.1
    small = sample_sigmas("flux-shift", 4096, torch.Generator().manual_seed(0), image_seq_len=256)
    large = sample_sigmas("flux-shift", 4096, torch.Generator().manual_seed(0), image_seq_len=4096)
    assert float(large.mean()) > float(small.mean())
    assert math.isclose(flux_mu(256), 0.5) and math.isclose(flux_mu(4096), 1.15)


def test_noise_offset_is_per_sample_and_channel():
    import torch

    from lora_run_native.timesteps import make_noise

    plain = make_noise((2, 16, 8, 8), torch.Generator().manual_seed(0))
    offset = make_noise((2, 16, 8, 8), torch.Generator().manual_seed(0), noise_offset=0.5)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)), "a constant per sample and channel"
    assert float(diff.abs().mean()) > 0.05


def test_noise_offset_of_a_patchified_latent_is_per_vae_channel():
    """FLUX.2's latent is 2×2-patchified (channel 4c + 2i + j = VAE channel c at (i, j)): the offset is one δ per VAE
    channel, so unpatchified it is constant over the image; one δ per patch channel (group 1) is a 2×2 pattern."""
    import torch

    from lora_run_flux2.latents import unpatchify
    from lora_run_native.timesteps import make_noise

    plain = make_noise((2, 128, 4, 4), torch.Generator().manual_seed(0))
    grouped = unpatchify(make_noise((2, 128, 4, 4), torch.Generator().manual_seed(0), 0.5, group=4) - plain)
    assert torch.allclose(grouped, grouped[:, :, :1, :1].expand_as(grouped), atol=1e-6)
    assert float(grouped.abs().mean()) > 0.05
    per_patch = unpatchify(make_noise((2, 128, 4, 4), torch.Generator().manual_seed(0), 0.5) - plain)
    assert not torch.allclose(per_patch, per_patch[:, :, :1, :1].expand_as(per_patch), atol=1e-3)
    from lora_run_flux2.adapter import Flux2Adapter
    from lora_run_native.adapters.base import ModelAdapter

    assert Flux2Adapter.noise_offset_group == 4 and ModelAdapter.noise_offset_group == 1


def test_loss_weighting_schemes():
    import torch

    from lora_run_native.timesteps import loss_weighting

    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weighting("none", sigma), torch.ones(3))
    assert torch.allclose(loss_weighting("sigma_sqrt", sigma), sigma ** -2)
    cos = loss_weighting("cosmap", sigma)
    assert float(cos[1]) == pytest.approx(2 / (math.pi * 0.5))
