"""On CUDA (skipped without a float8 GPU): `[train] fp8_matmul`'s op on the GPU's float8 GEMM, eager and compiled
by inductor (as the training blocks run it), against the same float64 computation the CPU tests use, at
FLUX.1's widths."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import accel  # noqa: E402

from tests.native.test_fp8_matmul import expected_forward, expected_grad_input, rel  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available()
                                or torch.cuda.get_device_capability() < (8, 9), reason="needs a float8 GPU")


@pytest.mark.parametrize("compiled", [False, True])
def test_op_matches_float64_at_flux_widths(compiled):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 12288, device="cuda").requires_grad_(False)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, 12288, device="cuda")[:, None])
    layer = accel.fp8_linear_class()(lin, torch.bfloat16)
    assert accel.use_fp8_matmuls(layer) == 1
    forward = torch.compile(layer, fullgraph=True) if compiled else layer
    x = torch.randn(2, 1536, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = forward(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert rel(y, expected_forward(x.detach(), layer.w8, layer.scale, layer.bias)) < 1e-2
    assert rel(x.grad, expected_grad_input(dy, layer.w8, layer.scale)) < 1e-2
    assert rel(y, lin(x.detach().float())) < 0.08


@pytest.mark.parametrize("sharded", [False, True])
def test_an_older_gpu_refuses_fp8_matmuls_unless_fsdp_turns_them_off(sharded, tmp_path, monkeypatch):
    """On a GPU below compute capability 8.9 (the capability is planted), `fp8_matmul = true` stops an unsharded
    run before training (exit 2's RecipeError) but not an FSDP one: FSDP keeps the sharded base in bf16 and
    warns, so there is nothing to refuse. A check placed before FSDP's say would refuse both."""
    from diffusers import FluxTransformer2DModel

    from lora_run.errors import RecipeError
    from lora_run.recipe import load_recipe
    from lora_run_native import train
    from lora_run_native.adapters import adapter_class

    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nfamily = "flux.1-dev"\nsource = "unused"\n[dataset]\npath = "unused"\n'
                      '[train]\nsteps = 2\nfp8_matmul = true\n', encoding="utf-8")
    r = load_recipe(recipe).recipe
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[8, 12, 12])
    adapter = adapter_class("flux.1-dev")(r, device="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    said = []
    if sharded:
        train.prepare_transformer(adapter, model, r, "cuda", echo=said.append, sharded=True)
        assert any("not used under FSDP" in line for line in said)
        assert not any(isinstance(m, accel.fp8_linear_class()) for m in model.modules())
    else:
        with pytest.raises(RecipeError, match="compute capability 8.9"):
            train.prepare_transformer(adapter, model, r, "cuda", echo=said.append)
