"""`[train] fp8_matmul`: the frozen base's forward and input-gradient matmuls in float8 (accel.py).

The CPU runs the real op (torch's float8 `_scaled_mm` has a CPU kernel): every check compares it with an
independent computation in float64 from the same float8 operands, and with the bf16 layer it replaces. Each
check has a planted-mistake control it must catch."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import accel, perfmodel  # noqa: E402

from .test_accel import grads, tiny_flux_with_lora  # noqa: E402

E4M3 = torch.float8_e4m3fn


def fp8_layer(in_features: int = 96, out_features: int = 80, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    with torch.no_grad():   # output channels of very different sizes: the per-channel scales matter
        lin.weight.mul_(torch.logspace(-2, 1, out_features)[:, None])
    layer = accel.fp8_linear_class()(lin, torch.bfloat16)
    accel.use_fp8_matmuls(layer)
    return lin, layer


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected_forward(x, w8, scale, bias):
    """x quantised row-wise to e4m3 as the op documents, times the stored weight, in float64."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    q = (x2 / s).to(E4M3).double() * s
    out = q @ (w8.double() * scale.double()).t()
    return (out + bias.double() if bias is not None else out).reshape(*x.shape[:-1], -1)


def expected_grad_input(dy, w8, scale):
    """dy · s_w (the weight's per-output-channel scale on dy's columns) quantised row-wise, times W8."""
    g = dy.reshape(-1, dy.shape[-1]).double() * scale.double().reshape(1, -1)
    s = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    q = (g / s).to(E4M3).double() * s
    return (q @ w8.double()).reshape(*dy.shape[:-1], -1)


def test_row_quantisation_keeps_each_row_within_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(7, 200) * torch.logspace(-3, 3, 7)[:, None]          # rows six orders apart
    q, s = accel.quantise_rows(x)
    assert q.dtype == E4M3 and s.shape == (7, 1)
    back = q.float() * s
    # e4m3 keeps 3 mantissa bits: |error| ≤ 2^-4 of the value for normal numbers, plus the subnormal step
    assert torch.all((back - x).abs() <= x.abs() / 16 + s * 2.0 ** -9)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((7,), 448.0))
    column = torch.linspace(0.5, 2.0, 200)
    qc, sc = accel.quantise_rows(x, column)
    # the same bound with the column scale folded in: values far below their row's largest are subnormal in e4m3
    # (an unseeded run failed about one time in twelve with a relative bound alone)
    assert torch.all((qc.float() * sc - x * column).abs() <= (x * column).abs() / 16 + sc * 2.0 ** -9)
    assert not torch.allclose(qc.float() * sc, x, rtol=1 / 16)                  # the control: scale applied


def test_forward_is_the_float8_product_of_the_stored_weight():
    lin, layer = fp8_layer()
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 80)
    want = expected_forward(x, layer.w8, layer.scale, layer.bias)
    assert rel(y, want) < 1e-2                       # bf16 output rounding of the same float8 product
    assert rel(y, lin(x.float())) < 0.08             # and near the layer it replaces (e4m3 ≈ 2^-4 per factor)
    # planted mistakes the comparison must catch: the weight's scale per input column instead of per output
    # channel, and the input left unquantised with a float8 weight of another layer's scale
    wrong_axis = (x.reshape(-1, 96).double() @ (layer.w8.double() * layer.scale.double().mean()).t())
    assert rel(wrong_axis.reshape(3, 5, 80) + layer.bias.double(), want) > 0.1


def test_input_gradient_moves_the_weight_scale_onto_the_gradient():
    lin, layer = fp8_layer(bias=False)
    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4, 80, dtype=torch.bfloat16)
    layer(x).backward(dy)
    assert x.grad.dtype == torch.bfloat16
    want = expected_grad_input(dy, layer.w8, layer.scale)
    assert rel(x.grad, want) < 1e-2
    assert rel(x.grad, dy.double() @ lin.weight.double()) < 0.08
    # the control: without the column scale (dy quantised as is, times W8) the gradient is far off
    unscaled = expected_grad_input(dy, layer.w8, torch.ones_like(layer.scale))
    assert rel(unscaled, want) > 0.5


def test_float32_input_without_autocast_keeps_float32():
    _, layer = fp8_layer()
    x = torch.randn(6, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    assert rel(y, expected_forward(x, layer.w8, layer.scale, layer.bias)) < 1e-2


def test_layers_the_float8_gemm_cannot_take_keep_dequantised_matmuls():
    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 72)).requires_grad_(False)
    accel.store_frozen_linears_in_fp8(model, torch.bfloat16)
    assert accel.use_fp8_matmuls(model) == 1
    assert [m.matmul for m in model] == ["fp8", "dequant"]            # 72 is not a multiple of 16
    assert "matmul=float8" in repr(model[0]) and "matmul=float8" not in repr(model[1])


def test_compiled_forward_and_backward_match_eager():
    _, layer = fp8_layer()

    def step(x):
        return layer(x).float().square().sum()

    x = torch.randn(2, 9, 96, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    step(x1).backward()
    torch.compile(step, backend="aot_eager", fullgraph=True)(x2).backward()
    assert torch.equal(x1.grad, x2.grad)


def test_a_tiny_flux_trains_through_float8_matmuls_close_to_bf16():
    """The LoRA gradients of a model whose frozen base computes in float8 against the same model in float32:
    within the e4m3 rounding the layers add, and further than the fp8-storage-only model (which rounds only
    the weights) — a planted no-op (fp8_matmul ignored) would match the storage-only model exactly."""
    model = tiny_flux_with_lora()
    storage, fp8mm = copy.deepcopy(model), copy.deepcopy(model)
    accel.store_frozen_linears_in_fp8(storage, torch.bfloat16)
    count = accel.store_frozen_linears_in_fp8(fp8mm, torch.bfloat16)
    accel.use_fp8_matmuls(fp8mm)
    layers = [m for m in fp8mm.modules() if isinstance(m, accel.fp8_linear_class())]
    assert count == len(layers) and sum(m.matmul == "fp8" for m in layers) >= count - 2
    out, g = grads(model)
    out_s, g_s = grads(storage)
    out_f, g_f = grads(fp8mm)
    keys = sorted(g)
    err_storage = rel(torch.cat([g_s[k].flatten() for k in keys]), torch.cat([g[k].flatten() for k in keys]))
    err_fp8mm = rel(torch.cat([g_f[k].flatten() for k in keys]), torch.cat([g[k].flatten() for k in keys]))
    assert err_fp8mm < 0.2 and rel(out_f, out) < 0.1
    assert err_fp8mm > err_storage * 1.05 and not torch.equal(out_f, out_s)


def test_the_plan_takes_fp8_matmuls_in_every_mode():
    for mode in ("auto", "speed", "memory", "low-vram"):
        plan = perfmodel.choose_mode(mode, "flux.1-dev", 1024, 1024, 1, 32, "attention", 130.0,
                                     fp8_requested=False, fp8_matmul=True)
        assert plan.fp8 and plan.fp8_matmul and "fp8 base, fp8 matmuls" in plan.describe()
    plain = perfmodel.choose_mode("auto", "flux.1-dev", 1024, 1024, 1, 32, "attention", 130.0, fp8_requested=False)
    assert not plain.fp8_matmul and "fp8 matmuls" not in plain.describe()


def test_a_cli_run_trains_through_float8_matmuls(flux_recipe, run_cli, tmp_path):
    """`lora-run recipe --set train.fp8_matmul=true` on the tiny FLUX model: the run completes, its LoRA
    moved and is finite, and its sample (drawn through the same float8 layers) was written."""
    from .conftest import lora_tensors

    out = tmp_path / "run"
    result = run_cli(flux_recipe(), "--output-dir", out, "--set", "train.steps=3", "--set", "train.fp8_matmul=true",
                     "--set", "sample.prompts=[\"a photo of {trigger}\"]", "--set", "sample.every_steps=3",
                     "--set", "sample.steps=2", "--set", "sample.width=64", "--set", "sample.height=64")
    assert result.returncode == 0, result.stderr[-2000:]
    lora = next(out.glob("*.safetensors"))
    up = [v for k, v in lora_tensors(lora).items() if "lora_B" in k or "lora_up" in k]
    assert up and all(bool(v.isfinite().all()) for v in up) and any(float(v.abs().sum()) > 0 for v in up)
    assert list((out / "samples").rglob("*.png"))


def test_backends_without_float8_matmuls_refuse_the_key(flux_recipe, run_cli):
    result = run_cli("check", flux_recipe(), "--set", "train.fp8_matmul=true", "--set", "backend.name=\"kohya\"")
    assert result.returncode == 2 and "[train.fp8_matmul]" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
