"""The grouped Adafactor (plugins/lora_run_native/optim.py) against transformers' Adafactor, step by step."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers_opt = pytest.importorskip("transformers.optimization")

from lora_run_native import optim  # noqa: E402
from lora_run_native.train import make_optimizer  # noqa: E402

SHAPES = [(8, 24), (8, 24), (24, 8), (8, 24), (5, 3, 4), (7,), (7,), (16, 1)]


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def run(opt_class, kw, steps=6, dtype=torch.float32, skip=None):
    params = make_params(dtype=dtype)
    opt = opt_class([{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.0}], **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            # gradients of very different scales, so update clipping and the factors matter
            p.grad = None if (skip and (step, i) in skip) else \
                (torch.randn(p.shape, generator=g) * (10.0 ** (i % 3 - 1))).to(dtype)
        opt.step()
    return params, opt


CONFIGS = [
    dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=0.01),  # recipes
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False),
    dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True, beta1=0.9, weight_decay=0.1),
    dict(lr=3e-3, relative_step=False, scale_parameter=True, clip_threshold=0.5, decay_rate=-0.5, beta1=0.5),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_matches_transformers_adafactor_over_several_steps(kw):
    skip = {(2, 1), (2, 5), (4, 0)}      # some tensors miss a step: their step counts diverge from the others'
    ours, opt = run(optim.ForeachAdafactor, kw, skip=skip)
    ref, ref_opt = run(transformers_opt.Adafactor, kw, skip=skip)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
    for p, q in zip(ours, ref):
        s, t = opt.state[p], ref_opt.state[q]
        assert s["step"] == t["step"]
        for name in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            assert (name in s) == (name in t)
            if name in s:
                assert torch.allclose(s[name], t[name], rtol=1e-5, atol=1e-6 * float(t[name].abs().max()))


def test_bf16_parameters_match_too():
    kw = CONFIGS[0]
    ours, _ = run(optim.ForeachAdafactor, kw, dtype=torch.bfloat16, steps=3)
    ref, _ = run(transformers_opt.Adafactor, kw, dtype=torch.bfloat16, steps=3)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b) or torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-4)


def test_the_parity_check_catches_a_planted_mistake(monkeypatch):
    """The same comparison against a ForeachAdafactor whose factored second moment uses the wrong axis."""
    original = optim.ForeachAdafactor._update

    def wrong(self, group, params, factored, step):
        if factored:
            group = dict(group, decay_rate=group["decay_rate"] * 1.01)      # β2 schedule slightly off
        return original(self, group, params, factored, step)

    monkeypatch.setattr(optim.ForeachAdafactor, "_update", wrong)
    ours, _ = run(optim.ForeachAdafactor, CONFIGS[0])
    ref, _ = run(transformers_opt.Adafactor, CONFIGS[0])
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours, ref))


def test_state_dicts_move_between_the_two_optimizers():
    """A checkpoint written by transformers' Adafactor resumes with ours (and continues identically)."""
    kw = CONFIGS[0]
    params, ref_opt = run(transformers_opt.Adafactor, kw, steps=3)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = optim.ForeachAdafactor([{"params": twin[:5]}, {"params": twin[5:], "weight_decay": 0.0}], **kw)
    ours.load_state_dict(copy.deepcopy(ref_opt.state_dict()))     # as from a file: no shared tensors
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, q, gr in zip(params, twin, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref_opt.step()
        ours.step()
    for a, b in zip(twin, params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_recipes_get_the_grouped_adafactor_and_fused_adamw_on_cuda():
    from types import SimpleNamespace

    p = torch.nn.Parameter(torch.zeros(4, 4))
    recipe = SimpleNamespace(optimizer=SimpleNamespace(name="adafactor", lr=1e-4, weight_decay=0.0,
                                                       betas=[0.9, 0.999], eps=1e-8))
    opt = make_optimizer(recipe, [{"params": [p]}], on_cuda=False)
    assert isinstance(opt, optim.ForeachAdafactor)
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False
    recipe.optimizer.name = "adamw"
    assert make_optimizer(recipe, [{"params": [p]}], on_cuda=False).defaults.get("fused") in (None, False)


def test_chunked_groups_give_the_same_result(monkeypatch):
    """Large groups are updated in chunks (bounded transient memory): same parameters as one stack."""
    whole, _ = run(optim.ForeachAdafactor, CONFIGS[1])
    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 200)        # (8, 24) tensors: one per chunk
    chunked, _ = run(optim.ForeachAdafactor, CONFIGS[1])
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
