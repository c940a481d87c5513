"""On CUDA: the transformer's no-grad forward replayed from CUDA graphs (plugins/lora_run_native/graphed.py) gives
what the eager forward gives, call after call, with the inputs of every call (the denoising steps' timesteps and
latents) and per LoRA scale; a planted replay that does not copy the new inputs in is caught."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native import graphed  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=64, num_attention_heads=4, joint_attention_dim=128,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=[16, 24, 24])
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]))
    return model.to("cuda", torch.bfloat16).eval()


def _calls(steps=5, batch=3, tokens=64, text=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // 8
    ids[:, 2] = torch.arange(tokens) % 8
    common = dict(encoder_hidden_states=torch.randn(batch, text, 128, generator=g),
                  pooled_projections=torch.randn(batch, 64, generator=g), img_ids=ids, txt_ids=torch.zeros(text, 3),
                  guidance=torch.full((batch,), 3.5))
    for step in range(steps):
        yield {"hidden_states": torch.randn(batch, tokens, 64, generator=g), "timestep": torch.full((batch,), 1 - step / steps),
               **common}


def _run(model, scales):
    out = []
    with torch.no_grad():
        for scale in scales:
            for call in _calls():
                inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "img_ids" and k != "txt_ids"
                                  else v.dtype) for k, v in call.items()}
                out.append(model(**inputs, joint_attention_kwargs={"scale": scale}, return_dict=False)[0].float())
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_replayed_forward_matches_the_eager_one_per_step_and_scale(monkeypatch):
    model = _model()
    eager = _run(model, [1.0, 0.5, 0.0])
    with graphed.graphed_forward(model) as graphs:
        replayed = _run(model, [1.0, 0.5, 0.0])
        assert len(graphs.graphs) == 3
    assert graphs.failed is None and not graphs.graphs                 # released on the way out
    assert graphs.recorded == 3 and graphs.replays == 3 * 4 and graphs.calls == 15   # per scale: 1 eager call first
    assert graphs.describe() == "12 of 15 calls replayed from 3 CUDA graph(s)"
    assert "forward" not in vars(model)                                # restored
    assert max(_rel(a, b) for a, b in zip(replayed, eager)) < 1e-3
    assert _rel(eager[0], eager[10]) > 0.01                           # the scale matters: the check can fail

    class StaleInputs(graphed.GraphedForward):                        # planted: the new call's inputs not copied in
        def _replay(self, entry, leaves):
            graph, _inputs, output = entry
            graph.replay()
            return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)

    monkeypatch.setattr(graphed, "GraphedForward", StaleInputs)
    with graphed.graphed_forward(model):
        stale = _run(model, [1.0])
    assert max(_rel(a, b) for a, b in zip(stale, eager[:5])) > 0.01


def _run_scaled_layers(model, scales):
    """As Hunyuan-DiT's sampling applies a strength: on the LoRA layers (``scale_lora_layers``), not as an argument."""
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    out = []
    for scale in scales:
        scale_lora_layers(model, scale)
        try:
            out += _run(model, [1.0])
        finally:
            unscale_lora_layers(model, scale)
    return out


def test_a_strength_set_on_the_layers_gets_its_own_graph(monkeypatch):
    """Control: a key without the LoRA layers' state replays the first strength's graph at the second."""
    model = _model()
    eager = _run_scaled_layers(model, [1.0, 0.5])
    with graphed.graphed_forward(model) as graphs:
        replayed = _run_scaled_layers(model, [1.0, 0.5])
    assert graphs.recorded == 2, graphs.describe()
    assert max(_rel(a, b) for a, b in zip(replayed, eager)) < 1e-3
    assert _rel(eager[2], eager[7]) > 0.01                             # the strength matters: the check can fail
    monkeypatch.setattr(graphed, "lora_state", lambda module: None)    # planted: the layers' state not in the key
    with graphed.graphed_forward(model) as graphs:
        stale = _run_scaled_layers(model, [1.0, 0.5])
    assert graphs.recorded == 1
    assert max(_rel(a, b) for a, b in zip(stale[5:], eager[5:])) > 0.01


def test_a_forward_that_syncs_with_the_host_runs_eagerly_and_says_why():
    model = _model()
    eager_forward = model.forward

    def syncing(*args, **kwargs):
        out = eager_forward(*args, **kwargs)
        float(out[0].sum())                         # a host sync: not allowed while a graph is recorded
        return out

    model.forward = syncing
    expected = _run(model, [1.0])
    with graphed.graphed_forward(model) as graphs:
        got = _run(model, [1.0])
    assert graphs.failed and graphs.recorded == 0 and graphs.replays == 0 and "run eagerly" in graphs.describe()
    assert max(_rel(a, b) for a, b in zip(got, expected)) < 1e-3
    assert model.forward is syncing
    with graphed.graphed_forward(model) as again:                    # not tried again on the same model
        assert model.forward is syncing
        _run(model, [1.0])
    assert again.failed == graphs.failed and again.calls == 0 and "run eagerly" in again.describe()
