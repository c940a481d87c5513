"""The FlashAttention-4 op and its selection (plugins/lora_run_native/attention.py), on CPU.

The real kernel needs an SM90/SM100 GPU; here the same op registration (custom op + fake + autograd) runs a
stand-in kernel (plain attention that also returns the log-sum-exp), so the registration, the routing through
diffusers' dispatch, torch.compile and the start-up check are exercised for real."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import attention  # noqa: E402


def _scores(q, k, keys_used, scale):
    """fp32 scores (B, H, Sq, Sk); keys at or beyond a row's `keys_used` get -inf."""
    scores = q.float().transpose(1, 2) @ k.float().transpose(1, 2).transpose(-1, -2) * scale
    if keys_used is not None:
        unused = torch.arange(k.shape[1])[None, :] >= keys_used[:, None].long()
        scores = scores.masked_fill(unused[:, None, None, :], float("-inf"))
    return scores


def _forward(q, k, v, keys_used, scale, ignore_keys_used=False):
    """Math attention in fp32, layout (B, S, H, D); lse (B, H, S)."""
    scores = _scores(q, k, None if ignore_keys_used else keys_used, scale)   # planted mistake: ignore the mask
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.float().transpose(1, 2)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous()


def _backward(dout, q, k, v, out, lse, keys_used, scale, wrong=False, junk_in_unused=False):
    qf, kf, vf, do = (t.float().transpose(1, 2) for t in (q, k, v, dout))
    p = torch.exp(_scores(q, k, keys_used, scale) - lse[..., None])      # softmax from the saved lse
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    delta = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - delta) * (1.1 if wrong else 1.0)                        # planted mistake: dS off by 10%
    dq, dk = ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale
    if junk_in_unused and keys_used is not None:                          # a kernel that leaves the unused rows
        unused = torch.arange(k.shape[1])[None, :] >= keys_used[:, None].long()
        dk, dv = (g.masked_fill(unused[:, None, :, None], float("nan")) for g in (dk, dv))
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


@pytest.fixture(scope="module")
def standin():
    return attention.define_op("lora_run_test", _forward, _backward)


@pytest.fixture(scope="module")
def wrong_standin():
    return attention.define_op("lora_run_test_wrong", _forward,
                               lambda *a: _backward(*a, wrong=True))


@pytest.fixture(scope="module")
def maskless_standin():
    """Planted mistake: a kernel that attends to every key, ignoring keys_used."""
    return attention.define_op("lora_run_test_maskless", lambda *a: _forward(*a, ignore_keys_used=True),
                               _backward)


@pytest.fixture(scope="module")
def junk_standin():
    """A kernel that leaves junk in the gradient rows of the unused keys (the op must zero them)."""
    return attention.define_op("lora_run_test_junk", _forward, lambda *a: _backward(*a, junk_in_unused=True))


def qkv(tokens=20, heads=2, dim=16, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, tokens, heads, dim, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def test_fake_registration_gives_shapes_without_running_the_kernel(standin):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 37, 3, 64, dtype=torch.bfloat16) for _ in range(3))
        out, lse = torch.ops.lora_run_test.fa4_attention(q, k, v, None, 0.125)
        assert out.shape == (2, 37, 3, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.lora_run_test.fa4_attention_backward(out, q, k, v, out, lse, None, 0.125)
        assert dq.shape == q.shape and dv.shape == v.shape
    meta = [torch.empty(1, 5, 2, 8, device="meta") for _ in range(3)]
    assert torch.ops.lora_run_test.fa4_attention(*meta, None, 0.5)[1].shape == (1, 2, 5)


def test_opcheck_of_the_registration(standin):
    q, k, v = qkv()
    torch.library.opcheck(torch.ops.lora_run_test.fa4_attention.default, (q, k, v, None, 0.25))
    used = torch.tensor([13], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lora_run_test.fa4_attention.default, (q, k, v, used, 0.25))


def test_op_gradients_match_sdpa(standin):
    q, k, v = qkv()
    out = standin(q, k, v, None, 0.25)[0]
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
        return (standin(q * 2, k, v, None, 0.25)[0] + 1).sum()

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

    def counting(q, k, v, keys_used, scale):
        calls.append(tuple(q.shape))
        return standin(q, k, v, keys_used, scale)

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


def _on_cpu(query, key, value, attn_mask, dropout_p, is_causal):
    """fa4_serves without its CUDA/bf16 conditions, so the routing runs on CPU in fp32."""
    return (attn_mask is None or attention.key_mask(attn_mask, key.shape[0], key.shape[1]) is not None) \
        and dropout_p == 0.0 and not is_causal


def _masked_case(batch=2, tokens=20):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(batch, tokens, 2, 16, generator=g).requires_grad_() for _ in range(3))
    keys = torch.ones(batch, tokens, dtype=torch.bool)
    keys[0, 1::3] = False                  # not a prefix
    keys[1, 11:] = False                   # a prefix (text padding)
    return q, k, v, keys.view(batch, 1, 1, tokens)


def _grads(fn, q, k, v):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.pow(2).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def test_a_boolean_key_mask_runs_on_the_op_with_the_valid_keys_first(standin, maskless_standin, junk_standin):
    q, k, v, mask = _masked_case()
    reference = _grads(lambda a, b, c: attention._sdpa(a, b, c, mask, 0.0, False, 0.25), q, k, v)
    assert float(reference[2][0, 1::3].abs().max()) == 0.0           # SDPA: masked keys get no gradient
    for op in (standin, junk_standin):
        calls = []

        def counting(*args, op=op):
            calls.append(args[3].tolist())
            return op(*args)

        fn = attention.make_backend_fn(counting, serves=_on_cpu)
        got = _grads(lambda a, b, c: fn(a, b, c, attn_mask=mask, scale=0.25), q, k, v)
        assert calls == [[13, 11]]                                   # keys_used per row, through the op
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference):
            assert torch.allclose(a, b, atol=1e-5), name
    # control: a kernel that ignores keys_used is caught by the same comparison
    fn = attention.make_backend_fn(maskless_standin, serves=_on_cpu)
    wrong = _grads(lambda a, b, c: fn(a, b, c, attn_mask=mask, scale=0.25), q, k, v)
    assert not torch.allclose(wrong[0], reference[0], atol=1e-3)


def test_the_masked_path_compiles_into_one_graph(standin):
    """fullgraph=True: sorting the mask, gathering the keys and counting them break no graph (no host sync)."""
    import torch._dynamo

    torch._dynamo.reset()
    q, k, v, mask = _masked_case()
    fn = attention.make_backend_fn(standin, serves=_on_cpu)
    compiled = torch.compile(lambda a, b, c: fn(a, b, c, attn_mask=mask, scale=0.25), backend="aot_eager",
                             fullgraph=True)
    got = _grads(compiled, q, k, v)
    reference = _grads(lambda a, b, c: attention._sdpa(a, b, c, mask, 0.0, False, 0.25), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference):
        assert torch.allclose(a, b, atol=1e-5), name
    torch._dynamo.reset()


def test_startup_check_covers_the_masked_path(standin, maskless_standin):
    assert attention.numeric_check(standin, "cpu", tokens=40, heads=2, head_dim=32) is None
    problem = attention.numeric_check(maskless_standin, "cpu", tokens=40, heads=2, head_dim=32)
    assert problem is not None and problem.startswith("masked out relative error")


def test_other_masks_fall_back_to_sdpa():
    fn = attention.make_backend_fn(lambda *a: pytest.fail("the op must not see this call"), serves=_on_cpu)
    q, k, v = qkv(grad=False)
    full = torch.ones(1, 1, 20, 20, dtype=torch.bool)                # differs per query: not a key mask
    full[..., -3:, :5] = False
    additive = torch.zeros(1, 1, 1, 20)
    additive[..., -3:] = float("-inf")                               # a float mask
    for mask in (full, additive):
        out = fn(q, k, v, attn_mask=mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
        assert torch.allclose(out, ref)
    assert not attention.fa4_serves(q, k, v, None, 0.0, False)        # fp32 CPU tensors: SDPA
    assert attention.key_mask(torch.ones(2, 5, dtype=torch.bool), 2, 5) is None    # 2-D: queries × keys to SDPA


def _tiny_hunyuan_image_with_lora():
    """One double, one single and one refiner block; captions padded (Qwen 7 of 10 tokens, byT5 2 of 4), as
    the family's adapter passes them (both encoders, so diffusers puts the valid text tokens first)."""
    from diffusers import HunyuanImageTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = HunyuanImageTransformer2DModel(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                           text_embed_dim=24, text_embed_2_dim=20, rope_axes_dim=(16, 16))
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    g = torch.Generator().manual_seed(2)
    mask, mask_2 = torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    mask[:, :7], mask_2[:, :2] = 1, 1
    kwargs = dict(hidden_states=torch.randn(1, 16, 3, 3, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 10, 24, generator=g), encoder_attention_mask=mask,
                  encoder_hidden_states_2=torch.randn(1, 4, 20, generator=g), encoder_attention_mask_2=mask_2,
                  return_dict=False)
    return model, kwargs


def _output_and_lora_grads(model, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)[0]
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hunyuan_image_attention_runs_on_the_op_with_its_text_padding_mask(standin, maskless_standin):
    """A tiny HunyuanImage-2.1 transformer with padded captions: every block's attention (masked: image tokens
    and the valid text tokens) goes through the op, and the output and LoRA gradients equal the default
    (SDPA) backend's; the refiner's query-by-key mask stays on SDPA. A kernel ignoring the mask is caught."""
    model, kwargs = _tiny_hunyuan_image_with_lora()

    def run():
        return _output_and_lora_grads(model, kwargs)

    ref_out, ref_grads = run()
    calls = []

    def counting(q, k, v, keys_used, scale):
        calls.append(None if keys_used is None else keys_used.tolist())
        return standin(q, k, v, keys_used, scale)

    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert attention.set_backend(model, attention.register_backend(counting, "lora_run_test_hy", serves=_on_cpu)) >= blocks
    out, grads = run()
    assert len(calls) == blocks and all(used is not None for used in calls)
    assert calls == [[9 + 7 + 2]] * blocks                # 3×3 image tokens + the valid text tokens
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    attention.set_backend(model, attention.register_backend(maskless_standin, "lora_run_test_hy_wrong", serves=_on_cpu))
    wrong, _ = run()
    assert not torch.allclose(wrong, ref_out, atol=1e-4)


@pytest.mark.slow
def test_compiled_flux_blocks_keep_the_routed_op_in_graph():
    """The blocks compiled as the speed plan compiles them (token dims dynamic), attention routed to the op
    through diffusers' dispatch: no graph break (same graph count as without routing), the kernel runs inside
    the compiled graphs at every bucket shape, gradients equal the eager SDPA model's."""
    import torch._dynamo

    from lora_run_native import accel
    from tests.native.test_accel import inputs, tiny_flux_with_lora

    kernel_calls = []

    def counted_forward(q, k, v, keys_used, scale):
        kernel_calls.append(q.shape[1])
        return _forward(q, k, v, keys_used, scale)

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


def test_auto_keeps_sdpa_at_head_sizes_where_fa4_measured_slower():
    kw = dict(cuda=True, capability=(9, 0), import_error=None, check=lambda: None, tokens=4429)
    dit = attention.choose("auto", head_sizes=(88,), **kw)
    assert dit.kernel == "sdpa" and dit.reason.startswith("head size 88: FlashAttention-4 measured slower")
    assert attention.choose("auto", head_sizes=(128,), **kw).kernel == "fa4"             # FLUX, HunyuanImage-2.1
    assert attention.choose("fa4", head_sizes=(88,), **kw).kernel == "fa4"              # asked for: honoured


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


def _tiny_hunyuan_dit_with_lora():
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
                              hidden_size=32, num_layers=2, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32,
                              cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=77, text_len_t5=256,
                              sample_size=16, use_style_cond_and_image_meta_size=False)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=r".*blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"), model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    g = torch.Generator().manual_seed(2)
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([400.0]),
                  encoder_hidden_states=torch.randn(1, 77, 32, generator=g),
                  text_embedding_mask=torch.ones(1, 77, dtype=torch.long),
                  encoder_hidden_states_t5=torch.randn(1, 256, 32, generator=g),
                  text_embedding_mask_t5=torch.ones(1, 256, dtype=torch.long), image_rotary_emb=rope,
                  return_dict=False)
    return model, kwargs


def test_hunyuan_dit_attention_reaches_the_op_through_the_dispatching_processor(standin, wrong_standin):
    """diffusers' Hunyuan-DiT processor calls SDPA itself; the family's dispatching processor computes the same
    attention (output and LoRA gradients equal diffusers' processor's), and with the backend set every self- and
    cross-attention call runs on the op. A kernel with a wrong backward is caught by the same comparison."""
    from lora_run_hunyuan_dit.attention import use_dispatching_attention

    model, kwargs = _tiny_hunyuan_dit_with_lora()

    def run():
        return _output_and_lora_grads(model, kwargs)

    ref_out, ref_grads = run()
    assert attention.set_backend(model, attention.register_backend(standin, "lora_run_test_dit0")) == 0
    assert use_dispatching_attention(model) == 4                     # attn1 and attn2 of two blocks
    out, grads = run()                                               # no backend yet: SDPA through dispatch
    assert torch.allclose(out, ref_out, atol=1e-6)
    calls = []

    def counting(q, k, v, keys_used, scale, op=standin):
        calls.append((q.shape[1], k.shape[1]))
        return op(q, k, v, keys_used, scale)

    assert attention.set_backend(model, attention.register_backend(counting, "lora_run_test_dit", serves=_on_cpu)) == 4
    out, grads = run()
    assert sorted(set(calls)) == [(16, 16), (16, 77 + 256)]          # self-attention, cross-attention to the text
    assert len(calls) == 4
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    attention.set_backend(model, attention.register_backend(wrong_standin, "lora_run_test_dit_wrong", serves=_on_cpu))
    _, wrong = run()
    assert any(not torch.allclose(wrong[n], g, atol=1e-5, rtol=1e-4) for n, g in ref_grads.items())


def test_the_startup_check_runs_at_the_model_head_sizes():
    from lora_run_hunyuan_dit.attention import use_dispatching_attention
    from tests.native.test_accel import tiny_flux_with_lora

    assert attention.head_dims(tiny_flux_with_lora()) == [32]
    assert attention.head_dims(_tiny_hunyuan_image_with_lora()[0]) == [32]
    dit, _ = _tiny_hunyuan_dit_with_lora()
    assert attention.head_dims(dit) == [128]                  # diffusers' own processor does not dispatch: none
    use_dispatching_attention(dit)
    assert attention.head_dims(dit) == [16]


def test_each_kernel_variant_keeps_the_time_of_its_first_call(monkeypatch):
    """FlashAttention-4 compiles a variant on its first call: that call's host time is kept (the manifest's
    attention_first_calls_s), later calls of the variant do not replace it, another token count or a key mask is
    another variant."""
    import time

    from lora_run_native.train import _compiler_seconds

    monkeypatch.setattr(attention, "FIRST_CALLS", {})
    q = torch.zeros(1, 7, 2, 16)
    with attention._first_call("forward", q, None):
        time.sleep(0.2)
    with attention._first_call("forward", q, None):
        pass
    with attention._first_call("forward", q, torch.tensor([3])):
        pass
    with attention._first_call("forward", torch.zeros(1, 9, 2, 16), None):
        pass
    assert len(attention.FIRST_CALLS) == 3
    assert attention.FIRST_CALLS["forward", "torch.float32", 7, 16, False] >= 0.2
    assert 0.2 <= _compiler_seconds()["attention_first_calls_s"] < 1.0
