"""GPU speed and memory modes for the native trainer (``[train] memory_mode``).

Three modes, applied to a transformer *after* the LoRA is injected:

* ``speed``    — bf16 base weights, no activation checkpointing, regional ``torch.compile`` of every
                 repeated block (one compiled graph per block type, reused by all blocks of that type).
* ``memory``   — frozen base weights stored in float8 (e4m3, per-output-channel scale, dequantised inside
                 the compiled block so only one layer's bf16 copy exists at a time), plus block-level
                 activation checkpointing of just enough blocks to fit the budget.
* ``low-vram`` — ``memory`` with every block checkpointed, and the frozen weights of a share of the blocks
                 kept in pinned CPU memory and streamed to the GPU one block ahead of use, on a side stream
                 (forward order in the forward pass, reverse order while backward recomputes).

``auto`` picks the fastest mode whose estimated peak fits the GPU's free memory (``memory.py``).
Numerics: ``speed`` computes exactly what the reference computes (bf16 autocast, fp32 LoRA weights);
the fp8 modes round the *frozen* base weights to e4m3 (as sd-scripts' ``--fp8_base`` does).
Everything here is a no-op on CPU except fp8 storage (used by ``base_precision = "fp8"`` everywhere).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterable, Iterator

import attrs

MODES = ("speed", "memory", "low-vram")


@attrs.frozen
class PerfPlan:
    """What will be applied; `memory.py` fills `checkpoint_blocks` and `offload_blocks` from the budget."""

    mode: str
    compile: bool = False
    fp8: bool = False
    checkpoint_blocks: int = 0      # how many repeated blocks run under activation checkpointing
    offload_blocks: int = 0         # how many blocks keep their frozen weights in pinned CPU memory
    compile_mode: str = "default"   # torch.compile mode of each block ("reduce-overhead": CUDA graphs)
    dynamic_tokens: bool = False    # compile the token dimension symbolic: one graph for every bucket shape
    fp8_matmul: bool = False        # the fp8 base's matmuls run in float8 (`[train] fp8_matmul`; needs `fp8`)
    step_graphs: bool = False       # each micro-step (forward, loss, backward) replayed as one CUDA graph (stepgraph.py)

    def describe(self) -> str:
        compiled = ("compiled + CUDA graphs" if self.compile_mode == "reduce-overhead" else
                    "compiled + step CUDA graphs" if self.step_graphs else "compiled")
        parts = [self.mode, compiled if self.compile else "eager", "fp8 base" if self.fp8 else "bf16 base"]
        if self.fp8_matmul:
            parts.append("fp8 matmuls")
        if self.checkpoint_blocks:
            parts.append(f"checkpointing {self.checkpoint_blocks} blocks")
        if self.offload_blocks:
            parts.append(f"offloading {self.offload_blocks} blocks")
        return ", ".join(parts)


def repeated_blocks(model: Any) -> list[Any]:
    """The transformer's repeated blocks in execution order (FLUX/HunyuanImage: double then single)."""
    names = getattr(model, "_repeated_blocks", None) or []
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks and hasattr(model, "blocks"):
        blocks = list(model.blocks)
    return blocks


# ------------------------------------------------------------------------------------------ fp8 storage
#: compiled blocks dequantise the fp8 base inside their graph (`dequant_in_graph`); False calls the opaque op there
#: too (the benchmark's A/B: `bench/perf.py --rows memory-opaque`)
IN_GRAPH_DEQUANT = True


def _fp8_linear_class() -> type:
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint

    def _dequant(w8: Any, scale: Any, dtype: Any) -> Any:
        return (w8.to(torch.float32) * scale).to(dtype)

    def dequant_in_graph(x: Any, w8: Any, scale: Any, bias: Any) -> Any:
        """The layer inside a compiled block: inductor generates the dequantisation (the same float32 product,
        rounded once) and calls the matmul from its own code. Called through the opaque op there instead, every
        layer cost about 145 µs of host time against 17 µs for a bf16 layer (H100, `bench/dequant_bench.py`); the
        lent H100's steps were GPU-bound either way (docs/performance.md), a slower host's may not be. The checkpoint
        marks the bf16 weight to be
        recomputed, so the partitioner saves only the fp8 weight and its scale for backward, as the opaque op
        does (without it, it saved the bf16 weight of every layer: a bf16 copy of the model)."""
        weight = torch.utils.checkpoint.checkpoint(_dequant, w8, scale, x.dtype, use_reentrant=False)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    triton_dequant = _triton_dequant()

    def dequant(w8: Any, scale: Any, dtype: Any) -> Any:
        """One fused pass on CUDA (read 1 byte, write 2 bytes per weight); plain torch elsewhere."""
        if w8.is_cuda and triton_dequant is not None and w8.is_contiguous():
            return triton_dequant(w8, scale, dtype)
        return _dequant(w8, scale, dtype)

    # Opaque custom ops for eager calls (sampling, evaluation, the layers outside the compiled blocks): autograd
    # would save a plain F.linear's bf16 weight for backward; these save the fp8 weight and its scale only.
    @torch.library.custom_op("lora_run::fp8_linear", mutates_args=(),
                             schema="(Tensor x, Tensor w8, Tensor scale, Tensor? bias) -> Tensor")
    def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, dequant(w8, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @fp8_linear.register_fake
    def _(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], w8.shape[0]))

    @torch.library.custom_op("lora_run::fp8_linear_grad_input", mutates_args=(),
                             schema="(Tensor grad, Tensor w8, Tensor scale) -> Tensor")
    def fp8_linear_grad_input(grad: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return grad @ dequant(w8, scale, grad.dtype)

    @fp8_linear_grad_input.register_fake
    def _(grad: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return grad.new_empty((*grad.shape[:-1], w8.shape[1]))

    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        _x, w8, scale, _bias = inputs
        ctx.save_for_backward(w8, scale)

    def backward(ctx: Any, grad: Any) -> Any:
        w8, scale = ctx.saved_tensors
        return fp8_linear_grad_input(grad, w8, scale), None, None, None

    fp8_linear.register_autograd(backward, setup_context=setup_context)
    fp8_matmul = _fp8_matmul_op()

    class Fp8Linear(torch.nn.Module):
        """A frozen Linear whose weight is stored as float8_e4m3fn with a per-output-channel scale. With
        `matmul = "fp8"` its forward and input-gradient matmuls run in float8 too (`fp8_matmul_linear`); else
        the weight is dequantised to the compute dtype for each matmul."""

        matmul = "dequant"

        def __init__(self, linear: Any, compute_dtype: Any, device: Any = None):
            super().__init__()
            w = linear.weight.detach().to(device=device or linear.weight.device, dtype=torch.float32)
            amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            scale = amax / torch.finfo(torch.float8_e4m3fn).max
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))
            self.register_buffer("scale", scale.to(torch.float32))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(w.device, copy=True))
            self.compute_dtype = compute_dtype

        @property
        def weight(self) -> Any:
            """Dequantised weight (allocates; used only by code that inspects the layer, e.g. peft merges)."""
            return (self.w8.float() * self.scale).to(self.compute_dtype)

        def forward(self, x: Any) -> Any:
            if self.matmul == "fp8":
                if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
                    x = x.to(self.compute_dtype)
                return fp8_matmul(x, self.w8, self.scale, self.bias)
            if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
                weight = self.w8.float() * self.scale     # float32 training (CPU tests): no rounding to bf16
                return F.linear(x, weight, None if self.bias is None else self.bias.float())
            if x.dtype == torch.float32:
                x = x.to(self.compute_dtype)
            if IN_GRAPH_DEQUANT and torch.compiler.is_compiling():
                return dequant_in_graph(x, self.w8, self.scale, self.bias)
            return fp8_linear(x, self.w8, self.scale, self.bias)

        def extra_repr(self) -> str:
            matmul = ", matmul=float8" if self.matmul == "fp8" else ""
            return (f"in_features={self.in_features}, out_features={self.out_features}, storage=float8_e4m3fn"
                    f"{matmul}")

    return Fp8Linear


# ------------------------------------------------------------------------------------------ fp8 matmuls
E4M3_MAX = 448.0


def quantise_rows(x: Any, column_scale: Any = None) -> tuple[Any, Any]:
    """Row-wise float8 (e4m3) quantisation of a 2-D tensor: `q[r] · s[r] ≈ x[r] · column_scale` with
    `s[r] = max|x[r] · column_scale| / 448`. Returns (q, s), `s` of shape (rows, 1) in float32. Plain torch
    ops: inside a compiled block, inductor fuses them into one pass over `x`."""
    import torch

    v = x.to(torch.float32)
    if column_scale is not None:
        v = v * column_scale.reshape(1, -1)
    scale = v.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (v / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul_supported(in_features: int, out_features: int) -> bool:
    """torch._scaled_mm's float8 GEMMs need both matrix dimensions to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def _fp8_matmul_op() -> Any:
    """y = x Wᵀ + b with x quantised row-wise to e4m3 and the stored e4m3 weight (per-output-channel scale),
    in one `torch._scaled_mm` (float32 accumulation, bf16 out). Backward (the base is frozen: only the input
    gradient): dx = dy W = (dy · s_w) W8 — the weight's per-output-channel scale `s_w` scales the contraction
    dimension, which row-wise scaling cannot, so it moves onto dy's columns before dy is quantised row-wise;
    W8 is copied to the column-major layout the GEMM needs (one fp8 copy of the layer, freed after). A
    `torch.autograd.Function` of plain torch ops, so a compiled block traces it whole (fused quantisation, no
    Python between the kernels); only the fp8 weight and its scale are saved for backward."""
    import torch

    def matmul(q: Any, scale_q: Any, b_colmajor: Any, scale_b: Any, dtype: Any) -> Any:
        out = torch._scaled_mm(q, b_colmajor, scale_a=scale_q, scale_b=scale_b, out_dtype=torch.bfloat16)
        return out if dtype == torch.bfloat16 else out.to(dtype)

    class Fp8MatmulLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, w8: Any, scale: Any, bias: Any) -> Any:
            q, scale_x = quantise_rows(x.reshape(-1, x.shape[-1]))
            out = matmul(q, scale_x, w8.t(), scale.reshape(1, -1), x.dtype)
            if bias is not None:
                out = out + bias.to(out.dtype)
            ctx.save_for_backward(w8, scale)
            return out.reshape(*x.shape[:-1], w8.shape[0])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w8, scale = ctx.saved_tensors
            q, scale_g = quantise_rows(grad.reshape(-1, grad.shape[-1]), column_scale=scale)
            ones = torch.ones((1, w8.shape[1]), dtype=torch.float32, device=w8.device)
            out = matmul(q, scale_g, w8.t().contiguous().t(), ones, grad.dtype)
            return out.reshape(*grad.shape[:-1], w8.shape[1]), None, None, None

    return Fp8MatmulLinear.apply


def _triton_dequant() -> Any:
    """A Triton kernel: out[r, c] = w8[r, c] · scale[r], one read of the fp8 weight, one bf16 write."""
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only installs: plain torch is used
        return None

    @triton.jit
    def dequant_e4m3_rows(w_ptr, s_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offset = row.to(tl.int64) * n_cols + cols
        w = tl.load(w_ptr + offset, mask=mask).to(tl.float32)
        scale = tl.load(s_ptr + row)
        tl.store(out_ptr + offset, (w * scale).to(out_ptr.dtype.element_ty), mask=mask)

    def run(w8: Any, scale: Any, dtype: Any) -> Any:
        rows, cols = w8.shape
        out = torch.empty((rows, cols), dtype=dtype, device=w8.device)
        block = 1024
        dequant_e4m3_rows[(rows, triton.cdiv(cols, block))](w8, scale, out, cols, BLOCK=block)
        return out

    return run


_FP8_LINEAR: type | None = None


def fp8_linear_class() -> type:
    global _FP8_LINEAR
    if _FP8_LINEAR is None:
        _FP8_LINEAR = _fp8_linear_class()
    return _FP8_LINEAR


def store_frozen_linears_in_fp8(model: Any, compute_dtype: Any, modules: Iterable[Any] | None = None,
                                device: Any = None) -> int:
    """Replace every frozen nn.Linear (LoRA base layers included) inside `modules` by an Fp8Linear. With
    `device`, each layer is quantised there, one layer at a time (fast on a GPU; never more than one bf16
    layer on it), and its fp8 weight stays there. The layers compute by dequantising their weight;
    `use_fp8_matmuls` switches them to float8 matmuls."""
    import torch

    Fp8Linear = fp8_linear_class()
    count = 0
    for root in (modules if modules is not None else [model]):
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and not child.weight.requires_grad \
                        and min(child.weight.shape) >= 64:
                    setattr(parent, name, Fp8Linear(child, compute_dtype, device))
                    count += 1
    return count


def use_fp8_matmuls(modules: Any) -> int:
    """Switch every Fp8Linear under `modules` (a module or a list of them) whose shape the float8 GEMM takes
    to float8 matmuls; returns how many compute in float8."""
    Fp8Linear = fp8_linear_class()
    count = 0
    for root in (modules if isinstance(modules, (list, tuple)) else [modules]):
        for layer in root.modules():
            if isinstance(layer, Fp8Linear) and fp8_matmul_supported(layer.in_features, layer.out_features):
                layer.matmul = "fp8"
                count += 1
    return count


# ------------------------------------------------------------------------------- checkpointing, compile
def checkpoint_indices(n_blocks: int, count: int) -> list[int]:
    """Spread `count` blocks evenly over `n_blocks` (so memory stays flat across the model)."""
    count = max(0, min(n_blocks, count))
    if count == 0:
        return []
    return sorted({min(n_blocks - 1, math.floor(i * n_blocks / count)) for i in range(count)})


class BlockOffloader:
    """Streams the fp8 weights of some blocks from pinned CPU memory, one block ahead, on a side stream.

    `load(i)` runs inside the (checkpointed) block function, so the recomputation in backward loads the
    weights again; it prefetches the next offloaded block in the direction of travel (forward order in the
    forward pass, reverse order in backward)."""

    def __init__(self, blocks: list[Any], offload: list[int], device: Any):
        import torch

        self.torch = torch
        self.device = device
        self.blocks = blocks
        self.n = len(blocks)
        self.offload = sorted(offload)
        self._stream: Any = None
        self.pending: dict[int, Any] = {}
        self.host: dict[int, list[tuple[Any, Any]]] = {}

    @property
    def stream(self) -> Any:
        if self._stream is None:
            self._stream = self.torch.cuda.Stream(device=self.device)
        return self._stream

    def park(self, i: int) -> None:
        """Move block `i`'s fp8 weights to pinned host memory, leaving empty placeholders on the device. Called
        right after the block is quantised (`place_frozen_weights`), so the offloaded blocks' weights never
        sit on the GPU together."""
        torch = self.torch
        if i in self.host:
            return
        pairs = []
        for layer in (m for m in self.blocks[i].modules() if isinstance(m, fp8_linear_class())):
            cpu = layer.w8.detach().to("cpu")
            if torch.cuda.is_available():
                cpu = cpu.pin_memory()
            layer.w8 = torch.empty(0, dtype=cpu.dtype, device=self.device)  # placeholder until loaded
            pairs.append((layer, cpu))
        self.host[i] = pairs

    def _copy(self, i: int) -> None:
        torch = self.torch
        if i in self.pending:
            return
        with torch.cuda.stream(self.stream):
            tensors = [cpu.to(self.device, non_blocking=True) for _, cpu in self.host[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (tensors, event)

    def load(self, i: int) -> None:
        torch = self.torch
        self._copy(i)
        tensors, event = self.pending.pop(i)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for (layer, _), tensor in zip(self.host[i], tensors):
            tensor.record_stream(current)
            layer.w8 = tensor
        backward = torch._C._current_graph_task_id() != -1
        k = self.offload.index(i) + (-1 if backward else 1)
        if 0 <= k < len(self.offload):
            self._copy(self.offload[k])

    def release(self, i: int) -> None:
        for layer, cpu in self.host[i]:  # autograd keeps what backward needs; drop the module's reference
            layer.w8 = self.torch.empty(0, dtype=cpu.dtype, device=self.device)


def mark_token_dims(args: Any, kwargs: Any) -> None:
    """Mark the token dimension of a block's inputs dynamic, so one compiled graph serves every aspect-ratio
    bucket: dim 1 of (batch, tokens, width) activations and dim 0 of 2-D per-token tables (rotary cos/sin,
    which have more rows than a batch has samples). `maybe_mark_dynamic` lets the compiler specialise a dim
    that turns out to be fixed (the text tokens) instead of failing."""
    import torch

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() == 3 and value.shape[1] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 1)
            elif value.dim() == 2 and value.shape[0] > 16:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        elif isinstance(value, (tuple, list)) and depth < 2:
            for item in value:
                visit(item, depth + 1)

    for value in (*args, *kwargs.values()):
        visit(value)


def compile_cache_dir() -> str:
    """Persistent compile caches under the user's cache folder, reused by the next run: inductor's FX-graph
    and AOT-autograd caches and Triton kernels (``TORCHINDUCTOR_CACHE_DIR``), dynamo's record of which
    dimensions were dynamic, and FlashAttention-4's compiled CuTe kernels. A variable the user set wins.
    ``$LORA_RUN_COMPILE_CACHE`` moves the whole folder (default ``~/.cache/lora-run/compile``). Where that folder
    cannot be written (a container's read-only or foreign home), the caches go to the temporary folder, as torch's
    own default does, instead of failing the first compilation."""
    import tempfile

    base = os.environ.get("LORA_RUN_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora-run", "compile")
    try:
        os.makedirs(base, exist_ok=True)
        writable = os.access(base, os.W_OK | os.X_OK)
    except (OSError, ValueError):
        writable = False
    if not writable:
        base = os.path.join(tempfile.gettempdir(), f"lora-run-compile-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, "inductor"))
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", os.path.join(base, "flash-attn-cute"))
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        functorch_config.enable_autograd_cache = True
    except Exception:  # noqa: BLE001 - an older torch without these caches compiles from scratch
        pass
    return base


def _wrap_block(block: Any, index: int, *, compile: bool, checkpoint: bool,
                offloader: BlockOffloader | None, compile_mode: str = "default", backend: Any = "inductor",
                dynamic_tokens: bool = False) -> None:
    """Replace ``block.forward`` by: weights loaded (offload) → compiled or eager call → checkpointing.

    Only training calls (grad enabled) run the compiled graph. Sampling and evaluation run the model under
    ``no_grad`` and get the eager block: with ``reduce-overhead`` a compiled call hands out outputs that live
    in the CUDA graph's static memory, and a diffusers pipeline that keeps a block output across the next
    replay reads overwritten memory (the crash "accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run"). The eager path also avoids a recompilation per LoRA strength, since
    peft's scale is a Python float that the compiled graph is specialised on."""
    import torch

    eager = block.forward
    forward = eager
    if compile:
        # one graph for every bucket shape: the token dimension is symbolic (mark_token_dims), the rest static
        options = {"mode": compile_mode} if backend == "inductor" else {}
        compiled = torch.compile(eager, dynamic=None if dynamic_tokens else False, backend=backend, **options)

        def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: F811 - compiled for training only
            if not torch.is_grad_enabled():
                return eager(*args, **kwargs)
            if dynamic_tokens:
                mark_token_dims(args, kwargs)
            return compiled(*args, **kwargs)
    if offloader is not None and index in offloader.host:
        loaded = forward

        def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: F811 - load weights around the call
            offloader.load(index)
            try:
                return loaded(*args, **kwargs)
            finally:
                offloader.release(index)
    if checkpoint:
        inner = forward

        def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: F811 - the checkpointed call
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)
    block._lora_run_eager_forward = eager
    block.forward = forward


def uses_cuda_graphs(model: Any) -> bool:
    return bool(getattr(model, "_lora_run_cuda_graphs", False))


def mark_step_begin(model: Any) -> None:
    """Tell CUDA-graph trees that a new training iteration starts (outputs of the last one are dead)."""
    if uses_cuda_graphs(model):
        import torch

        torch.compiler.cudagraph_mark_step_begin()


# ---------------------------------------------------------------------------------------------- apply
def place_frozen_weights(model: Any, plan: PerfPlan, device: Any, compute_dtype: Any) -> BlockOffloader | None:
    """fp8 storage and the move to `device`, block by block, for a host-loaded transformer whose LoRA is
    injected. Each frozen Linear is quantised on `device` one layer at a time (fast, never more than one bf16
    layer there); a block the plan offloads has its fp8 weights moved to pinned host memory as soon as it is
    quantised. So neither the bf16 model nor all the fp8 weights sit on the device at once: FLUX.1's fp8
    weights (about 11 GiB) do not fit an 8 GiB card, its resident share does. Returns the offloader (None when
    nothing is offloaded); `apply` wraps the blocks with it."""
    blocks = repeated_blocks(model)
    offload = checkpoint_indices(len(blocks), plan.offload_blocks)
    if offload and not plan.fp8:
        raise ValueError("offloading needs fp8 storage")
    offloader = BlockOffloader(blocks, offload, device) if offload else None
    if plan.fp8:
        for i, block in enumerate(blocks):
            store_frozen_linears_in_fp8(model, compute_dtype, modules=[block], device=device)
            if offloader is not None and i in offload:
                offloader.park(i)
        store_frozen_linears_in_fp8(model, compute_dtype, device=device)     # embedders and output layers
    model.to(device)
    if offloader is not None:
        import torch

        torch.cuda.empty_cache()
    return offloader


def apply(model: Any, plan: PerfPlan, device: Any, compute_dtype: Any,
          offloader: BlockOffloader | None = None) -> dict[str, Any]:
    """Apply a PerfPlan to a transformer whose LoRA is already injected. Returns what was done. `offloader`:
    the one `place_frozen_weights` made (else the offloaded blocks are parked here, after the fact)."""
    import torch

    blocks = repeated_blocks(model)
    done: dict[str, Any] = {"mode": plan.mode, "blocks": len(blocks)}
    if plan.fp8:
        done["fp8_linears"] = store_frozen_linears_in_fp8(model, compute_dtype)  # 0 if done before the move
    if plan.fp8_matmul:
        done["fp8_matmuls"] = use_fp8_matmuls(model)
    on_cuda = torch.device(device).type == "cuda"
    if hasattr(model, "disable_gradient_checkpointing") and getattr(model, "gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    ckpt = set(checkpoint_indices(len(blocks), plan.checkpoint_blocks))
    if plan.offload_blocks and on_cuda:
        if not plan.fp8:
            raise ValueError("offloading needs fp8 storage")
        if offloader is None:
            offloader = BlockOffloader(blocks, checkpoint_indices(len(blocks), plan.offload_blocks), device)
        offload = offloader.offload
        ckpt |= set(offload)  # an offloaded block must be recomputed, never keep its weights for backward
        for i in offload:     # parked already when place_frozen_weights made the offloader
            offloader.park(i)
        torch.cuda.empty_cache()
        model._lora_run_offloader = offloader  # kept alive with the model
        done["offloaded"] = len(offload)
    else:
        offloader = None
    for i, block in enumerate(blocks):
        _wrap_block(block, i, compile=plan.compile and on_cuda, checkpoint=i in ckpt, offloader=offloader,
                    compile_mode=plan.compile_mode, dynamic_tokens=plan.dynamic_tokens)
    done["checkpointed"] = len(ckpt)
    model._lora_run_cuda_graphs = bool(plan.compile and on_cuda and plan.compile_mode == "reduce-overhead")
    model._lora_run_step_graphs = bool(plan.compile and on_cuda and plan.step_graphs)
    model._lora_run_mode = plan.mode
    if plan.compile and on_cuda:
        import torch._dynamo

        done["compile_cache"] = compile_cache_dir()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        done["compiled"] = True
    return done


def _settings(torch: Any) -> tuple[bool, bool, bool, bool, bool]:
    """The process-wide torch settings a run or a generation sets (``torch_settings`` saves and restores them): TF32
    for matmuls and for cuDNN, and cuDNN's, flash and memory-efficient SDPA."""
    b = torch.backends
    return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cuda.cudnn_sdp_enabled(), b.cuda.flash_sdp_enabled(),
            b.cuda.mem_efficient_sdp_enabled())


def _set(torch: Any, matmul_tf32: bool, cudnn_tf32: bool, cudnn_sdp: bool = False, flash: bool = True,
         efficient: bool = True) -> None:
    """Set what ``_settings`` reads, in its order; SDPA as a run wants it unless given."""
    b = torch.backends
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    b.cuda.enable_cudnn_sdp(cudnn_sdp)
    b.cuda.enable_flash_sdp(flash)
    b.cuda.enable_mem_efficient_sdp(efficient)


@contextlib.contextmanager
def torch_settings(*, tf32: bool) -> Iterator[None]:
    """Fixed process-wide torch settings for a run (``tf32=False``: what it encodes into its caches is computed at
    full float32 precision) or a generation (``tf32=True``: as the training step and its samples), whatever this
    process set before, restored when it ends. cuDNN's SDPA stays off throughout (its backward crashes on H100 with
    torch 2.11 + CUDA 13), flash and memory-efficient SDPA on. Without it a second run in one process (the Python
    API, an agent's loop, the tests) encoded its caches with the TF32 matmuls the first run's training had left on,
    and trained on other numbers than the same run alone (Hunyuan-DiT's LoRA 6e-2 apart on an H100, 2026-12-06);
    the evaluation after a run generated with them while ``lora-run eval`` of the same LoRA did not. The allocator's
    per-process memory fraction (``[train] gpu_memory_gib``) is restored too: it held a later run in the same process
    to the first run's cap."""
    import torch

    saved = _settings(torch)
    fraction = _memory_fraction(torch)
    try:
        _set(torch, tf32, tf32)
        yield
    finally:
        _set(torch, *saved)
        if fraction is not None and torch.cuda.is_initialized() and _memory_fraction(torch) != fraction:
            torch.cuda.set_per_process_memory_fraction(fraction)


def _memory_fraction(torch: Any) -> float | None:
    """The current device's allocator fraction (1.0 before CUDA starts; None: no CUDA, or no getter in this torch)."""
    if not torch.cuda.is_available():
        return None
    if not torch.cuda.is_initialized():
        return 1.0
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return None if getter is None else float(getter())


def configure_cuda() -> None:
    """The training step's settings inside a run's ``torch_settings`` (restored when the run ends): TF32 matmuls on,
    after the caches are encoded at full precision."""
    import torch

    _set(torch, True, True)
