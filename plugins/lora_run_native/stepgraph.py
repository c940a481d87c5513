"""Training micro-steps replayed from CUDA graphs: forward, loss and backward as one graph per input shape.

`[train] cuda_graphs = "step"` (speed mode on CUDA, one process). The blocks are compiled as usual (inductor's
default mode, no CUDA-graph trees); what is graphed is the whole micro-step around them: the transformer's
forward, the loss and the backward that adds each LoRA parameter's gradient into its ``.grad``. Against
``"on"`` (each compiled block's forward and backward replayed as its own graph by CUDA-graph trees: 114 graphs
per token count for FLUX.1) this is one launch per micro-step instead of one per block, and one recording per
bucket shape (a bucket and its transpose are two: the latents differ in shape) instead of 114 per token count.

How a call is served, by its key (every input's name, shape and dtype):
- the first call of a key runs eagerly: it compiles the blocks (and FlashAttention-4's kernels) for that shape;
- a later call records the key's graph once recording has begun (below): it runs once more eagerly on a side
  stream, as the warm-up a capture needs (it is that step's real work: its gradients count), then records the
  graph; nothing of the recording runs;
- later calls copy their inputs into the graph's own input tensors and replay it. The loss handed back is a
  copy, so a loss read after the next replay is still its own step's.
At most ``max_graphs`` keys are recorded, sharing one memory pool; further keys run eagerly. A recording that
fails (something in the step reads a value on the host, which a capture forbids) turns the graphs off for the
rest of the run, with the reason in ``failed``; every call is then eager, as without graphs.

Memory: the graphs' pool holds a recorded step's activations for good, and an eager step beside it needs its own.
So recording begins only once every one of the ``expected`` keys (the run's bucket shapes) has had its eager first
call (or after ``patience`` calls, for a shape that is slow to come), the largest key first, and the allocator's
cache is emptied before each warm-up and before each capture: at no time do an eager step's activations sit beside
the pool's (on an H100, the fast recipe's five shapes reserved 56.8 GiB for 33.7 GiB allocated when each shape was
recorded at its second call).

What a replay assumes, and the trainer keeps:
- the gradients stay the same tensors: the optimizer zeroes them in place (``zero_grad(set_to_none=False)``),
  never frees them; the backward recorded adds into them;
- the trained and frozen weights keep their storage (optimizer steps update them in place);
- the body uses nothing from the host but its inputs: the loss gets ``step`` as a 0-dim tensor on the device
  (a loss that needs its Python value reads it on the host, which fails the recording: eager steps then);
- random numbers (LoRA dropout) come from the device's default generator, whose seed and offset a replay reads
  when it starts, so the per-step reseeding holds.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MAX_GRAPHS = 8


class StepGraphs:
    """``body(inputs, step) -> loss`` (a detached device scalar; the body runs the backward) served from CUDA graphs
    (see the module's docstring)."""

    def __init__(self, body: Callable[[dict[str, Any], Any], Any], max_graphs: int = MAX_GRAPHS,
                 notify: Callable[[str], Any] | None = None, expected: int = 1, patience: int | None = None):
        self.body = body
        self.notify = notify        # told once, when a recording fails
        self.max_graphs = max_graphs
        self.expected = max(1, expected)                                     # keys to see before recording
        self.patience = patience if patience is not None else max(32, 4 * self.expected)
        self.graphs: dict[Any, tuple[Any, dict[str, Any], Any, Any]] = {}   # key -> (graph, inputs, step, loss)
        self.seen: dict[Any, int] = {}                                       # key -> its inputs' elements
        self.pool: Any = None
        self.side: Any = None       # the warm-ups' stream: one for every recording, so their freed memory is reused
        self.calls = self.recorded = self.replays = 0
        self.record_s = 0.0         # the warm-ups and recordings together
        self.failed: str | None = None

    def describe(self) -> str:
        if self.failed:
            return f"eager micro-steps: recording the step as a CUDA graph failed ({self.failed})"
        return f"{self.replays} of {self.calls} micro-steps replayed from {self.recorded} CUDA graph(s)"

    def __call__(self, inputs: dict[str, Any], step: int) -> Any:
        self.calls += 1
        key = tuple((name, tuple(value.shape), value.dtype) for name, value in sorted(inputs.items()))
        if key in self.graphs:
            return self._replay(self.graphs[key], inputs, step)
        if self.failed is not None or key not in self.seen or not self._records(key):
            self.seen.setdefault(key, sum(value.numel() for value in inputs.values()))
            return self.body(inputs, step)
        return self._record(key, inputs, step)

    def _records(self, key: Any) -> bool:
        """Whether a call of ``key`` (seen before, not recorded) records its graph now: room for another graph,
        and either every expected key has been seen and no larger one waits for its recording, or ``patience``
        calls have gone by."""
        if len(self.graphs) >= self.max_graphs:
            return False
        if self.calls > self.patience:
            return True
        waiting = [size for other, size in self.seen.items() if other not in self.graphs and other != key]
        return len(self.seen) >= self.expected and all(size <= self.seen[key] for size in waiting)

    def _record(self, key: Any, inputs: dict[str, Any], step: int) -> Any:
        import torch

        started = time.perf_counter()
        static = {name: value.clone() for name, value in inputs.items()}
        step_tensor = torch.full((), step, dtype=torch.int64, device=next(iter(static.values())).device)
        if self.pool is None:
            self.pool, self.side = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        torch.cuda.empty_cache()          # the eager steps' cached blocks serve only their stream: give them back
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self.body(static, step_tensor)          # this step's real work, and the capture's warm-up
        torch.cuda.current_stream().wait_stream(self.side)
        torch.cuda.current_stream().synchronize()
        torch.cuda.empty_cache()          # and the warm-up's, before the capture takes its pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_loss = self.body(static, step_tensor)
        except Exception as exc:  # noqa: BLE001 - any failure: eager steps from here on
            from .graphed import reset_after_failed_capture

            reset_after_failed_capture()
            text = str(exc).strip()
            self.failed = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            self.graphs.clear()
            self.pool = None
            if self.notify is not None:
                self.notify(f"warning: [train.cuda_graphs] \"step\": {self.describe()}; the run goes on with eager steps")
            return loss
        finally:
            torch.cuda.empty_cache()      # whatever a failed capture left cached goes back too
            self.record_s += time.perf_counter() - started
        self.graphs[key] = (graph, static, step_tensor, static_loss)
        self.recorded += 1
        return loss

    def _replay(self, entry: tuple[Any, dict[str, Any], Any, Any], inputs: dict[str, Any], step: int) -> Any:
        graph, static, step_tensor, loss = entry
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        step_tensor.fill_(step)
        graph.replay()
        self.replays += 1
        return loss.clone()
