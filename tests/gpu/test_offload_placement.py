"""On CUDA (skipped without a GPU): placing a transformer whose plan offloads blocks never holds the
offloaded blocks' fp8 weights on the GPU together. The 8 GiB acceptance row (full-size FLUX.1, 1024²) ran out
of memory before its first step because every block was quantised onto the GPU first (about 11 GiB of fp8
weights) and the offloaded ones went back to the host only afterwards."""
from __future__ import annotations

import pytest


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _model():
    """FLUX.1's real width (24 heads × 128, joint dim 4096) with 2 + 6 blocks: about 1.6 B parameters."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=6, guidance_embeds=True)
    return model.to(torch.bfloat16).requires_grad_(False)


def _fp8_bytes(modules):
    from lora_run_native import accel

    Fp8Linear = accel.fp8_linear_class()
    return sum(m.w8.numel() for root in modules for m in root.modules() if isinstance(m, Fp8Linear))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_offloaded_blocks_are_parked_as_they_are_quantised():
    import torch

    from lora_run_native import accel

    plan = accel.PerfPlan("low-vram", compile=False, fp8=True, checkpoint_blocks=8, offload_blocks=6)
    largest = 3072 * 4 * 3072 + 3072 * 3072     # the single block's fused projection, elements
    temp = 3 * 4 * largest                        # one layer's float32 copy and quotient while quantising
    peaks = {}
    for order in ("placed", "control"):
        model = _model()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if order == "placed":
            offloader = accel.place_frozen_weights(model, plan, "cuda", torch.bfloat16)
        else:     # the order that ran out of memory: everything quantised on the GPU, then parked
            accel.store_frozen_linears_in_fp8(model, torch.bfloat16, device="cuda")
            model.to("cuda")
            offloader = accel.BlockOffloader(accel.repeated_blocks(model), accel.checkpoint_indices(8, 6), "cuda")
            for i in offloader.offload:
                offloader.park(i)
        blocks = accel.repeated_blocks(model)
        per_block = max(sum(cpu.numel() for _, cpu in pairs) for pairs in offloader.host.values())
        resident = torch.cuda.memory_allocated()
        peaks[order] = (torch.cuda.max_memory_allocated(), resident + per_block + temp, len(blocks))
        assert _fp8_bytes(blocks[i] for i in offloader.offload) == 0
        del model, offloader, blocks
    peak, bound, n = peaks["placed"]
    assert n == 8 and peak <= bound, f"placement peaked at {peak / 2**30:.2f} GiB, bound {bound / 2**30:.2f} GiB"
    control_peak, control_bound, _ = peaks["control"]
    assert control_peak > control_bound, "the control (quantise all, then park) should break the bound"
