"""Replaying a model's no-grad forward from CUDA graphs, for sampling and evaluation.

A diffusers pipeline calls the transformer once per denoising step with inputs of the same shapes. Run eagerly at
512² (batch 1 to 3), the FLUX.1 forward is bound by the host: thousands of kernel launches through Python (the
blocks, and peft's LoRA layers around every targeted linear) take longer than the GPU's work. A CUDA graph
launches the whole forward at once.

    with graphed_forward(pipe.transformer, enabled=on_cuda) as graphs:
        pipe(...)                    # the transformer's calls go through `graphs`
    graphs.recorded, graphs.replays, graphs.failed

How a call is served, by its key (the call's structure, every tensor's shape, dtype and device, every other
argument's value, e.g. the LoRA scale):
- with gradients enabled, or a tensor argument off the GPU, or an argument that cannot be a key: eagerly;
- the first call of a key: eagerly (it also compiles any lazily built kernel, e.g. FlashAttention-4's);
- the second: recorded (after one warm-up call on a side stream), then replayed;
- later ones: replayed. Its tensor arguments are copied into the graph's own input tensors, and its outputs
  are copied out of the graph's memory, so nothing a caller keeps is overwritten by the next replay.
At most ``max_graphs`` keys are recorded (the graphs share one memory pool); calls of further keys run eagerly.
A recording that fails (a forward that synchronises with the host, say) turns the graphs off for the rest of
the block and for later blocks on the same module: every call then runs eagerly, and ``failed`` says why.
HunyuanImage-2.1's transformer is one such model (2026-12-04, H200): its samples and evaluation run eagerly. (Its
forward in diffusers 0.42.1 reorders the text tokens by boolean-mask indexing, whose output shape depends on the
mask's values: a read on the host, which a capture forbids. That is a reading of the code, not yet confirmed.)

A recorded forward replays exactly the kernels of its recording: it must not depend on anything but its
arguments and the model's tensors (whose values may change between replays, not their storage). The one piece of
module state a pipeline changes between calls is peft's: a LoRA strength applied to the layers themselves
(``scale_lora_layers``, as Hunyuan-DiT's sampling does) is a Python float baked into the recorded kernels, and so
are merged or disabled adapters. Every LoRA layer's scaling, active adapters and merged/disabled flags are part
of the key (``lora_state``), so each strength gets its own graph instead of replaying the first one's. The model's
blocks must stay on the GPU: a model whose blocks are streamed from the host is not graphed (callers pass
``enabled=False``). Under autocast the recording runs with autocast's cast cache off, so the casts of the
model's weights are inside the graph, not references to cached copies that autocast frees later.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

MAX_GRAPHS = 8
#: set on a module whose recording failed, with the reason: the next block does not try again (a failed capture
#: costs a forward and leaves nothing to gain)
FAILED_ATTRIBUTE = "_lora_run_graphs_failed"


class GraphedForward:
    """The stand-in for a module's ``forward`` (see the module's docstring)."""

    def __init__(self, eager: Callable[..., Any], max_graphs: int = MAX_GRAPHS, state: Callable[[], Any] | None = None):
        self.eager = eager
        self.max_graphs = max_graphs
        self.state = state        # module state a recording bakes in besides the arguments (part of the key)
        self.graphs: dict[Any, tuple[Any, list[Any], Any]] = {}     # key -> (graph, static inputs, static output)
        self.seen: set[Any] = set()
        self.pool: Any = None
        self.calls = 0
        self.recorded = 0         # graphs recorded (the count stays after the block releases them)
        self.replays = 0
        self.failed: str | None = None

    def describe(self) -> str:
        """One line for a log: how the calls were served."""
        if self.failed:
            return f"{self.calls} calls run eagerly: recording a CUDA graph failed ({self.failed})"
        return f"{self.replays} of {self.calls} calls replayed from {self.recorded} CUDA graph(s)"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils._pytree import tree_flatten

        self.calls += 1
        if self.failed is not None or torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = _key(spec, leaves)
        if key is not None and self.state is not None:
            key = (key, self.state())
        if key is None:
            return self.eager(*args, **kwargs)
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.eager(*args, **kwargs)
            try:
                self.graphs[key] = self._record(leaves, spec)
            except Exception as exc:  # noqa: BLE001 - any failure: eager from here on
                self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                reset_after_failed_capture()
                self.graphs.clear()
                self.recorded = 0
                return self.eager(*args, **kwargs)
            self.recorded += 1
        return self._replay(self.graphs[key], leaves)

    def _record(self, leaves: list[Any], spec: Any) -> tuple[Any, list[Any], Any]:
        import torch
        from torch.utils._pytree import tree_unflatten

        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static, spec)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with _uncached_autocast():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager(*args, **kwargs)                # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.eager(*args, **kwargs)
        return graph, [x for x in static if isinstance(x, torch.Tensor)], output

    def _replay(self, entry: tuple[Any, list[Any], Any], leaves: list[Any]) -> Any:
        import torch
        from torch.utils._pytree import tree_map

        graph, inputs, output = entry
        for target, value in zip(inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            target.copy_(value)
        graph.replay()
        self.replays += 1
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)


def reset_after_failed_capture() -> None:
    """After a recording that failed: a capture that ends in an error (a host read inside it) never runs the default
    CUDA generators' end-of-capture step, so they stay as if capturing, and the next random draw outside a graph
    (inductor compiling a new shape does some) fails with "Offset increment outside graph capture encountered
    unexpectedly" (seen on an H100, 2026-12-05). A small capture that ends cleanly puts them back."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.zeros(1, device="cuda").add_(1)
    del graph


def _key(spec: Any, leaves: list[Any], device_type: str = "cuda") -> Any:
    """The call's key, or None when it cannot be graphed (a tensor off the GPU, an unhashable argument)."""
    import torch

    parts: list[Any] = [str(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if x.device.type != device_type or x.requires_grad:
                return None
            parts.append(("tensor", tuple(x.shape), x.stride(), x.dtype, x.device))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            parts.append((type(x).__name__, x))
    return tuple(parts)


def lora_state(module: Any) -> Callable[[], tuple]:
    """A function giving the state of ``module``'s peft LoRA layers that a recorded forward bakes in: each layer's
    ``scaling`` per adapter (a Python float in the kernels), its active adapters and whether its adapters are
    merged or disabled. The layers are found once; the state is read at every call."""
    layers = [m for m in module.modules() if isinstance(getattr(m, "scaling", None), dict)]

    def state() -> tuple:
        return tuple((tuple(sorted(m.scaling.items())), tuple(getattr(m, "active_adapters", ()) or ()),
                      bool(getattr(m, "merged", False)), bool(getattr(m, "disable_adapters", False)))
                     for m in layers)
    return state


@contextlib.contextmanager
def _uncached_autocast() -> Iterator[None]:
    import torch

    if not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


@contextlib.contextmanager
def graphed_forward(module: Any, *, enabled: bool = True, max_graphs: int = MAX_GRAPHS) -> Iterator[GraphedForward]:
    """Inside the block, ``module``'s calls go through a ``GraphedForward`` (when ``enabled`` and CUDA is
    available; otherwise it stays as it is, and the yielded object counts nothing). The module's own ``forward``
    is restored on the way out and the graphs are released."""
    import torch

    had_own = "forward" in vars(module)
    eager = module.forward
    graphs = GraphedForward(eager, max_graphs=max_graphs, state=lora_state(module))
    graphs.failed = getattr(module, FAILED_ATTRIBUTE, None)     # a model that failed once is not tried again
    if not (enabled and torch.cuda.is_available()) or graphs.failed:
        yield graphs
        return
    module.forward = graphs
    try:
        yield graphs
    finally:
        if had_own:
            module.forward = eager
        else:
            del module.forward
        if graphs.failed:
            setattr(module, FAILED_ATTRIBUTE, graphs.failed)
        graphs.graphs.clear()
        graphs.pool = None
