"""When `StepGraphs` records (plugins/lora_run_native/stepgraph.py), on the CPU: the capture itself needs CUDA
(tests/gpu/test_step_graphs_gpu.py), the order of the calls does not. Recording begins once every expected bucket
shape has had its eager first call, largest shape first, so that an eager step's activations never sit beside the
graphs' pool; a shape that is slow to come stops holding the others back after `patience` calls."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_run_native.stepgraph import StepGraphs  # noqa: E402


class Traced(StepGraphs):
    """The scheduling of `StepGraphs` with the CUDA part (warm-up, capture, replay) replaced by a log."""

    def __init__(self, **kw):
        super().__init__(lambda inputs, step: inputs["noisy"].sum(), **kw)
        self.log: list[tuple[str, int]] = []

    def _record(self, key, inputs, step):
        self.log.append(("record", inputs["noisy"].shape[-1]))
        self.graphs[key] = (None, inputs, step, None)
        self.recorded += 1
        return self.body(inputs, step)

    def _replay(self, entry, inputs, step):
        self.log.append(("replay", inputs["noisy"].shape[-1]))
        self.replays += 1
        return self.body(inputs, step)

    def call(self, side: int, step: int = 0):
        before = len(self.log)
        self(dict(noisy=torch.zeros(1, 4, side), text=torch.zeros(1, 8)), step)
        return self.log[before] if len(self.log) > before else ("eager", side)


def test_recording_waits_for_every_shape_then_goes_largest_first():
    g = Traced(expected=3)
    assert [g.call(s) for s in (4, 4, 8, 4)] == [("eager", 4)] * 2 + [("eager", 8), ("eager", 4)]
    # every shape seen: the largest records first; a smaller one waits for it
    assert [g.call(s) for s in (16, 4, 8, 16, 4, 8, 4)] == [
        ("eager", 16), ("eager", 4), ("eager", 8), ("record", 16), ("eager", 4), ("record", 8), ("record", 4)]
    assert [g.call(s) for s in (16, 8, 4)] == [("replay", 16), ("replay", 8), ("replay", 4)]
    assert g.describe() == f"3 of {g.calls} micro-steps replayed from 3 CUDA graph(s)"


def test_a_shape_slow_to_come_holds_the_others_back_only_for_patience_calls():
    g = Traced(expected=2, patience=5)
    kinds = [g.call(4)[0] for _ in range(7)]
    assert kinds == ["eager"] * 5 + ["record", "replay"]


def test_one_shape_records_at_its_second_call_and_max_graphs_caps_the_graphs():
    one = Traced()
    assert [one.call(4)[0] for _ in range(3)] == ["eager", "record", "replay"]
    capped = Traced(expected=2, max_graphs=1)
    assert [capped.call(s)[0] for s in (4, 8, 8, 4, 4, 8)] == ["eager", "eager", "record", "eager", "eager", "replay"]


def test_without_the_bucket_count_each_shape_records_at_its_second_call():
    """A caller that expects one shape gets the order before the fix: 4 records while 16 has not had its eager
    call, whose activations then sit beside the pool (what the first test rules out for a caller that knows)."""
    g = Traced(expected=1)
    assert [g.call(s) for s in (4, 4, 16)] == [("eager", 4), ("record", 4), ("eager", 16)]
