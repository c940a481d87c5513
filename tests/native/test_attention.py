"""The FlashAttention-4 op and its selection (plugins/lora_run_native/attention.py), on CPU.

The real kernel needs an SM90/SM100 GPU; here the same op registration (custom op + fake + autograd) runs a
stand-in kernel (plain attention that also returns the log-sum-exp), so the registration, the routing through
diffusers' dispatch, torch.compile and the start-up check are exercised for real."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import attention  # noqa: E402


def _forward(q, k, v, scale):
    """Math attention in fp32, layout (B, S, H, D); lse (B, H, S)."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous()


def _backward(dout, q, k, v, out, lse, scale, wrong=False):
    qf, kf, vf, do = (t.float().transpose(1, 2) for t in (q, k, v, dout))
    p = torch.exp(qf @ kf.transpose(-1, -2) * scale - lse[..., None])      # softmax from the saved lse
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    delta = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - delta) * (1.1 if wrong else 1.0)                        # planted mistake: dS off by 10%
    dq, dk = ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


@pytest.fixture(scope="module")
def standin():
    return attention.define_op("lora_run_test", _forward, _backward)


@pytest.fixture(scope="module")
def wrong_standin():
    return attention.define_op("lora_run_test_wrong", _forward,
                               lambda *a: _backward(*a, wrong=True))


def qkv(tokens=20, heads=2, dim=16, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, tokens, heads, dim, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def test_fake_registration_gives_shapes_without_running_the_kernel(standin):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 37, 3, 64, dtype=torch.bfloat16) for _ in range(3))
        out, lse = torch.ops.lora_run_test.fa4_attention(q, k, v, 0.125)
        assert out.shape == (2, 37, 3, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.lora_run_test.fa4_attention_backward(out, q, k, v, out, lse, 0.125)
        assert dq.shape == q.shape and dv.shape == v.shape
    meta = [torch.empty(1, 5, 2, 8, device="meta") for _ in range(3)]
    assert torch.ops.lora_run_test.fa4_attention(*meta, 0.5)[1].shape == (1, 2, 5)


def test_opcheck_of_the_registration(standin):
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.lora_run_test.fa4_attention.default, (q, k, v, 0.25))


def test_op_gradients_match_sdpa(standin):
    q, k, v = qkv()
    out = standin(q, k, v, 0.25)[0]
    out.pow(2).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), scale=0.25).transpose(1, 2)
    ref.pow(2).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_startup_check_passes_a_right_kernel_and_catches_a_wrong_one(standin, wrong_standin):
    assert attention.numeric_check(standin, "cpu", tokens=40, heads=2, head_dim=32) is None
    problem = attention.numeric_check(wrong_standin, "cpu", tokens=40, heads=2, head_dim=32)
    assert problem is not None and problem.startswith("dq relative error")

    def raises(*_a):
        raise RuntimeError("illegal memory access\nmore")

    assert attention.numeric_check(raises, "cpu", tokens=8, heads=1, head_dim=16) == "RuntimeError: illegal memory access"


def test_compiled_region_keeps_the_op_in_one_graph(standin):
    """fullgraph=True fails on any graph break: the op must be traceable through its fake registration."""
    import torch._dynamo

    torch._dynamo.reset()

    def block(q, k, v):
        return (standin(q * 2, k, v, 0.25)[0] + 1).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    q, k, v = qkv()
    compiled(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    block(q, k, v).backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_selection_logic():
    ok = lambda: None  # noqa: E731
    assert attention.choose("sdpa", cuda=True, capability=(9, 0), import_error=None, check=ok).kernel == "sdpa"
    assert attention.choose("auto", cuda=False, capability=None, import_error=None, check=ok).reason == "no CUDA device"
    ampere = attention.choose("auto", cuda=True, capability=(8, 0), import_error=None, check=ok)
    assert ampere.kernel == "sdpa" and "SM80" in ampere.reason
    missing = attention.choose("fa4", cuda=True, capability=(9, 0), import_error="flash-attn-4 is not importable: x",
                               check=ok)
    assert missing.kernel == "sdpa" and "lora-run[hopper]" in missing.reason
    failed = attention.choose("auto", cuda=True, capability=(9, 0), import_error=None, check=lambda: "dq 1e-1 > 1e-2")
    assert failed.kernel == "sdpa" and "start-up check" in failed.reason
    hopper = attention.choose("auto", cuda=True, capability=(9, 0), import_error=None, check=ok)
    assert hopper.kernel == "fa4" and "SM90" in hopper.reason
    assert attention.choose("auto", cuda=True, capability=(10, 0), import_error=None, check=ok).kernel == "fa4"
    called = []
    attention.choose("auto", cuda=True, capability=(8, 6), import_error=None, check=lambda: called.append(1))
    assert not called                           # the check runs only where FA4 could run
    assert hopper.describe().startswith("attention FlashAttention-4 (SM90")
    assert ampere.describe().startswith("attention SDPA flash (FlashAttention-2) (SM80")


def test_setup_on_cpu_keeps_sdpa():
    model = torch.nn.Linear(2, 2)
    assert attention.setup(model, "auto", "cpu") == attention.AttentionChoice("sdpa", "no CUDA device")


def test_flux_attention_is_routed_through_the_op_by_diffusers_dispatch(standin):
    """A tiny FLUX transformer: every attention call goes through the registered op (counted), and the
    model's output and LoRA gradients equal those of the default (SDPA) backend."""
    from tests.native.test_accel import inputs, tiny_flux_with_lora

    calls = []

    def counting(q, k, v, scale):
        calls.append(tuple(q.shape))
        return standin(q, k, v, scale)

    model = tiny_flux_with_lora()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**inputs())[0]
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_out, ref_grads = run()
    backend = attention.register_backend(counting, "lora_run_test_fa4", serves=lambda *a: a[3] is None)
    routed = attention.set_backend(model, backend)
    assert routed == 4                                   # 2 double + 2 single blocks
    out, grads = run()
    assert len(calls) == 4 and calls[0] == (1, 16 + 8, 2, 32)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name


def test_masked_calls_fall_back_to_sdpa(standin):
    fn = attention.make_backend_fn(lambda *a: pytest.fail("the op must not see a masked call"),
                                   serves=attention.fa4_serves)
    q, k, v = qkv(grad=False)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., -3:] = False
    out = fn(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask).transpose(1, 2)
    assert torch.allclose(out, ref)
    assert not attention.fa4_serves(q, k, v, None, 0.0, False)        # fp32 CPU tensors: SDPA


@pytest.mark.slow
def test_compiled_flux_blocks_keep_the_routed_op_in_graph():
    """The blocks compiled as the speed plan compiles them (token dims dynamic), attention routed to the op
    through diffusers' dispatch: no graph break (same graph count as without routing), the kernel runs inside
    the compiled graphs at every bucket shape, gradients equal the eager SDPA model's."""
    import torch._dynamo

    from lora_run_native import accel
    from tests.native.test_accel import inputs, tiny_flux_with_lora

    kernel_calls = []

    def counted_forward(q, k, v, scale):
        kernel_calls.append(q.shape[1])
        return _forward(q, k, v, scale)

    op = attention.define_op("lora_run_test_count", counted_forward, _backward)
    reference = tiny_flux_with_lora()
    ref_out = reference(**inputs())[0]
    ref_out.pow(2).mean().backward()

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny_flux_with_lora()
    attention.set_backend(model, attention.register_backend(op, "lora_run_test_count", serves=lambda *a: a[3] is None))
    for i, block in enumerate(accel.repeated_blocks(model)):
        accel._wrap_block(block, i, compile=True, checkpoint=False, offloader=None, backend=counting_backend)
    out = model(**inputs())[0]
    out.pow(2).mean().backward()
    assert len(kernel_calls) == 4 and len(graphs) == 4            # 2 block types × 2 input variants, no break
    assert any("fa4_attention" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert torch.allclose(out, ref_out, atol=1e-5)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4), n
    torch._dynamo.reset()


def test_auto_keeps_sdpa_where_fa4_dispatch_costs_more_than_it_saves():
    ok = lambda: None  # noqa: E731
    kw = dict(cuda=True, capability=(9, 0), import_error=None, check=ok)
    small = attention.choose("auto", tokens=1536, graphs=False, **kw)
    assert small.kernel == "sdpa" and "1536 tokens without CUDA graphs" in small.reason
    assert attention.choose("auto", tokens=1536, graphs=True, **kw).kernel == "fa4"
    assert attention.choose("auto", tokens=4608, graphs=False, **kw).kernel == "fa4"
    assert attention.choose("fa4", tokens=1536, graphs=False, **kw).kernel == "fa4"     # asked for: honoured


def test_asking_for_fa4_where_it_cannot_run_stops_with_the_key_named():
    from types import SimpleNamespace

    from lora_run.errors import RecipeError
    from lora_run_native.train import choose_attention

    recipe = SimpleNamespace(train=SimpleNamespace(attention="fa4"))
    with pytest.raises(RecipeError) as info:
        choose_attention(torch.nn.Linear(2, 2), recipe, "cpu")
    assert "[train.attention] \"fa4\"" in str(info.value) and "no CUDA device" in str(info.value)
    recipe.train.attention = "auto"
    assert choose_attention(torch.nn.Linear(2, 2), recipe, "cpu").kernel == "sdpa"
