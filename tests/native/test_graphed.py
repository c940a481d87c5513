"""graphed.py's keys and its block without a GPU (the replay itself: tests/gpu/test_graphed_gpu.py)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils._pytree import tree_flatten  # noqa: E402

from lora_run_native import graphed  # noqa: E402


def _key(*args, **kwargs):
    leaves, spec = tree_flatten((args, kwargs))
    return graphed._key(spec, leaves)


def test_a_call_that_cannot_be_replayed_has_no_key():
    assert _key(torch.zeros(2)) is None                               # a host tensor
    assert _key(1.0, extra=[1, {2}]) is None                          # an unhashable argument


def test_keys_tell_apart_what_a_recording_bakes_in():
    def key(*args, **kwargs):                                         # meta tensors: no memory, a device type
        leaves, spec = tree_flatten((args, kwargs))
        return graphed._key(spec, leaves, device_type="meta")

    x, y = torch.zeros(2, 3, device="meta"), torch.zeros(3, 2, device="meta")
    assert key(x, scale=1.0) is not None
    assert key(x, scale=1.0) != key(y, scale=1.0)                     # shape
    assert key(x, scale=1.0) != key(x.t().contiguous().t(), scale=1.0)   # strides
    assert key(x, scale=1.0) != key(x.to(torch.bfloat16), scale=1.0)  # dtype
    assert key(x, scale=1.0) != key(x, scale=0.5)                     # the LoRA scale, a Python float
    assert key(x, scale=1.0) != key(x, other=1.0)                     # the call's structure
    assert key(x, scale=1.0) == key(torch.ones(2, 3, device="meta"), scale=1.0)
    assert key(x.requires_grad_(), scale=1.0) is None                 # a tensor that needs its gradient


def test_without_cuda_the_module_is_left_as_it_is():
    layer = torch.nn.Linear(3, 2)
    with graphed.graphed_forward(layer) as graphs:
        assert "forward" not in vars(layer) or not torch.cuda.is_available()
        layer(torch.zeros(1, 3))
    assert "forward" not in vars(layer) and graphs.recorded == 0


def test_a_module_whose_recording_failed_is_not_tried_again():
    layer = torch.nn.Linear(3, 2)
    setattr(layer, graphed.FAILED_ATTRIBUTE, "RuntimeError: a host sync")
    with graphed.graphed_forward(layer) as graphs:
        assert "forward" not in vars(layer)
    assert graphs.failed == "RuntimeError: a host sync" and "run eagerly" in graphs.describe()


def _lora_model():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1"],
                                               init_lora_weights=False), model)
    return model


def test_the_lora_state_tells_strengths_merges_and_disabled_adapters_apart():
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    model = _lora_model()
    state = graphed.lora_state(model)
    base = state()
    assert len(base) == 2 and state() == base
    scale_lora_layers(model, 0.5)
    assert state() != base                                           # a strength set on the layers
    unscale_lora_layers(model, 0.5)
    assert state() == base
    model[0].merge()
    assert state() != base                                           # merged into the weights
    model[0].unmerge()
    assert state() == base
    for layer in (model[0], model[1]):
        layer.enable_adapters(False)
    assert state() != base                                           # disabled
    assert graphed.lora_state(torch.nn.Linear(2, 2))() == ()         # no LoRA: nothing to tell apart


def test_a_strength_set_on_the_layers_is_not_served_from_another_strengths_graph(monkeypatch):
    """Hunyuan-DiT's sampling applies the LoRA strength to the layers (``scale_lora_layers``), not as an argument.
    A recording bakes the scaling into its kernels, so a call at another strength must not replay it. Without a GPU
    the recording is simulated: it keeps the output of its call, as a replay would reproduce it. Control: without
    the LoRA state in the key the second strength gets the first strength's output."""
    import functools

    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    monkeypatch.setattr(graphed, "_key", functools.partial(graphed._key, device_type="cpu"))
    monkeypatch.setattr(graphed.GraphedForward, "_record",
                        lambda self, leaves, spec: (None, [], self.eager(*leaves)))
    monkeypatch.setattr(graphed.GraphedForward, "_replay",
                        lambda self, entry, leaves: (setattr(self, "replays", self.replays + 1), entry[2].clone())[1])

    def served(state):
        model = _lora_model()
        x = torch.ones(1, 4)
        forward = graphed.GraphedForward(model.forward, state=state(model) if state else None)
        with torch.no_grad():
            outputs = {}
            for strength in (1.0, 0.5):
                scale_lora_layers(model, strength)
                for _ in range(3):                                   # eager, recorded, replayed
                    outputs[strength] = forward(x)
                unscale_lora_layers(model, strength)
                scale_lora_layers(model, strength)
                expected = model(x)
                unscale_lora_layers(model, strength)
                outputs[strength] = (outputs[strength], expected)
        return outputs, forward

    outputs, forward = served(graphed.lora_state)
    for strength, (got, expected) in outputs.items():
        assert torch.allclose(got, expected), strength
    assert forward.recorded == 2
    planted, _ = served(None)                                        # the control: the key without the LoRA state
    got, expected = planted[0.5]
    assert not torch.allclose(got, expected)
