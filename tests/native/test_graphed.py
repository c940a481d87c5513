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
