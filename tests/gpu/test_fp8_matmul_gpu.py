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
