"""FLUX.2 in the memory model: the shapes match the real architectures (built on the meta device, no weights),
the plans `lora-run plan` shows put [dev] on one 80 GB GPU (`memory`) and on a 24 GB one (`low-vram`)."""
from __future__ import annotations

import re

import pytest

ARCH = {"dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                    guidance_embeds=True),
        "klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                         guidance_embeds=False),
        "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                         guidance_embeds=False)}


def _meta_model(name):
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel(in_channels=128, attention_head_dim=128, **ARCH[name])


@pytest.mark.parametrize("name", sorted(ARCH))
def test_shapes_match_the_architecture(name):
    import torch

    from lora_run_flux2 import shapes
    from lora_run_flux2.adapter import TARGET_PRESETS

    shape = {"dev": shapes.DEV_SHAPE, "klein-9b": shapes.KLEIN_9B_SHAPE, "klein-4b": shapes.KLEIN_4B_SHAPE}[name]
    model = _meta_model(name)
    assert shape.params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=0.01)
    assert shape.blocks == ARCH[name]["num_layers"] + ARCH[name]["num_single_layers"]
    for preset, patterns in TARGET_PRESETS.items():
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and any(re.fullmatch(p, n) for p in patterns)]
        per_rank = sum(m.in_features + m.out_features for m in linears)
        assert sum(n * (i + o) for n, i, o in shape.lora_shapes[preset]) == per_rank, preset


def test_the_plans_fit_80_and_24_gb():
    from lora_run_native import perfmodel

    for mode, most in (("memory", 80 * 0.93), ("low-vram", 24 * 0.93)):
        plan = perfmodel.plan_mode(mode, "flux.2-dev", 1024, 1024, 1, 64, "all-linear")
        assert plan.fp8 and plan.checkpoint_blocks == 56
        assert perfmodel.estimate_peak_gib("flux.2-dev", 1024, 1024, 1, 64, "all-linear", plan) <= most
    low = perfmodel.plan_mode("low-vram", "flux.2-dev", 1024, 1024, 1, 64, "all-linear")
    assert 0 < low.offload_blocks < 56            # only as many blocks streamed as a 24 GB card needs
    # the family plugin's shape is what the memory model uses
    from lora_run_flux2.shapes import DEV_SHAPE

    assert perfmodel.family_shape("flux.2-dev") is DEV_SHAPE and perfmodel.family_shape("no-such") is None
