"""The attention kernel of the native backend (``[train] attention``): FlashAttention-4 on Hopper/Blackwell.

FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL kernels for SM90 and SM100; ``pip install
'lora-run[hopper]'``) runs FLUX's attention about twice as fast as PyTorch's SDPA flash kernel
(FlashAttention-2) at 1024². It is wrapped here as a *registered* PyTorch op (``lora_run::fa4_attention``,
with its own backward op and a fake implementation), so ``torch.compile`` keeps it inside the compiled
block graph and CUDA graphs capture it, instead of breaking the graph at an opaque Python call.

The op reaches the model through diffusers' attention dispatch: a backend registered in diffusers'
registry, set on every attention processor that dispatches (FLUX, HunyuanImage-2.1, and Hunyuan-DiT through
the dispatching processor its family plugin installs). A boolean key mask (batch, 1, 1, keys) — HunyuanImage-2.1's
text padding — is served too: the valid keys are moved to the front (a stable sort of the mask, a gather of
k and v: no host sync, static shapes) and FA4 attends to the first ``keys_used`` of each row (its
``seqused_k``); the gradients of the masked keys are zero, as with SDPA. A call it cannot serve (any other
mask, a dtype other than bf16/fp16, a CPU tensor, an unsupported head size) runs PyTorch's SDPA instead, as
the default backend would.

Selection (``choose``): ``sdpa`` always runs SDPA; ``auto`` runs FA4 when it imports, the GPU is SM90 or
SM100 and a start-up check of FA4 against SDPA on a small random case (forward and backward) passes, and
SDPA otherwise; ``fa4`` is ``auto`` that stops the run (exit 2) when FA4 cannot run. cuDNN SDPA stays off
(its backward crashes on torch 2.11 + CUDA 13 inside the FLUX step).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import attrs

CHOICES = ("auto", "fa4", "sdpa")
BACKEND_VALUE = "lora_run_fa4"
#: start-up check: FA4's relative error against an fp32 reference must be at most this multiple of SDPA
#: flash's own error on the same bf16 inputs, plus an absolute slack (bf16 has an 8e-3 unit roundoff)
CHECK_FACTOR, CHECK_SLACK = 2.0, 2e-3
SUPPORTED_MAJOR = (9, 10)        # SM90 (Hopper), SM100 (Blackwell datacenter): FA4 has fwd + bwd there
#: `auto` without CUDA graphs: below this many tokens per call (batch × tokens) FA4's host-side dispatch
#: (Python, per call) costs more than its faster kernel saves. Measured on an H200 with eager calls: 0.74 ms vs SDPA flash's
#: 0.54 ms at 1536 tokens (FLUX 512²), 1.52 ms vs 3.20 ms at 4608 (1024²). CUDA graphs remove the dispatch.
FA4_MIN_TOKENS_WITHOUT_GRAPHS = 3072
#: `auto` uses FA4 only at these head sizes, where it was measured to win: 128 (FLUX.1 1024², 0.342 vs 0.430 s
#: per step; HunyuanImage-2.1). At Hunyuan-DiT's 88 the whole step was slower with FA4 (0.230 vs 0.199 s at
#: 1024², H200, 2026-12-03, bench/hunyuan_bench.py); `fa4` still runs it there when asked for.
FA4_AUTO_HEAD_SIZES = (128,)


@attrs.frozen
class AttentionChoice:
    kernel: str          # "fa4" | "sdpa"
    reason: str

    def describe(self) -> str:
        name = "FlashAttention-4" if self.kernel == "fa4" else "SDPA flash (FlashAttention-2)"
        return f"attention {name} ({self.reason})"


def fa4_import_error() -> str | None:
    """None when flash-attn-4's interface imports, else why not (one line)."""
    try:
        from flash_attn.cute import interface  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable
        return f"flash-attn-4 is not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return None


def choose(requested: str, *, cuda: bool, capability: tuple[int, int] | None, import_error: str | None,
           check: Callable[[], str | None] | None, tokens: int | None = None,
           graphs: bool = False, head_sizes: tuple[int, ...] = ()) -> AttentionChoice:
    """Which kernel runs and why. `check` runs the start-up numeric check (None when it passes, else why);
    it is called only when everything else allows FA4. `tokens` (batch × tokens, largest bucket) and `graphs`
    (the blocks replay CUDA graphs) let `auto` keep SDPA where FA4's dispatch cost outweighs its kernel;
    `head_sizes` (the model's) where FA4 was measured slower (FA4_AUTO_HEAD_SIZES)."""
    if requested == "sdpa":
        return AttentionChoice("sdpa", '[train.attention] = "sdpa"')
    if not cuda:
        return AttentionChoice("sdpa", "no CUDA device")
    if capability is None or capability[0] not in SUPPORTED_MAJOR:
        sm = f"SM{capability[0]}{capability[1]}" if capability else "unknown GPU"
        return AttentionChoice("sdpa", f"{sm}: FlashAttention-4 needs SM90 (Hopper) or SM100 (Blackwell)")
    if import_error:
        return AttentionChoice("sdpa", import_error + " (pip install 'lora-run[hopper]')")
    if requested == "auto" and not graphs and tokens is not None and tokens < FA4_MIN_TOKENS_WITHOUT_GRAPHS:
        return AttentionChoice("sdpa", f"{tokens} tokens without CUDA graphs: FlashAttention-4's per-call "
                                       f"dispatch costs more than it saves below {FA4_MIN_TOKENS_WITHOUT_GRAPHS}")
    slower = [size for size in head_sizes if size not in FA4_AUTO_HEAD_SIZES]
    if requested == "auto" and slower:
        return AttentionChoice("sdpa", f"head size {slower[0]}: FlashAttention-4 measured slower than SDPA flash "
                                       "there ([train.attention] = \"fa4\" runs it anyway)")
    problem = check() if check is not None else None
    if problem:
        return AttentionChoice("sdpa", f"FlashAttention-4 failed the start-up check: {problem}")
    sm = f"SM{capability[0]}{capability[1]}"
    return AttentionChoice("fa4", f"{sm}, flash-attn-4 passed the start-up check against SDPA")


# ------------------------------------------------------------------------------------------- the op
def define_op(namespace: str, forward_kernel: Callable, backward_kernel: Callable,
              device_types: Any = None) -> Callable:
    """Register ``{namespace}::fa4_attention(q, k, v, keys_used, scale) -> (out, lse)`` and its backward op.

    Layout (batch, tokens, heads, head_dim) for q/k/v/out, lse (batch, heads, tokens) in float32. ``keys_used``
    is None (every key) or an int32 tensor (batch,): each row attends to its first ``keys_used[b]`` keys.
    ``forward_kernel(q, k, v, keys_used, scale) -> (out, lse)``; ``backward_kernel(dout, q, k, v, out, lse,
    keys_used, scale) -> (dq, dk, dv)``; the gradients of the unused keys are set to zero here, whatever the
    kernel leaves there (FA4 at head size 88 left non-finite values there on an H200, 2026-12-03). The real
    kernels are FA4's; tests register a stand-in under another namespace."""
    import torch

    @torch.library.custom_op(f"{namespace}::fa4_attention", mutates_args=(), device_types=device_types,
                             schema="(Tensor q, Tensor k, Tensor v, Tensor? keys_used, float scale) -> (Tensor, Tensor)")
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_used: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = forward_kernel(q, k, v, keys_used, scale)
        return out, lse

    @attention_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_used: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, heads, _ = q.shape
        return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((batch, heads, tokens), dtype=torch.float32)

    @torch.library.custom_op(f"{namespace}::fa4_attention_backward", mutates_args=(), device_types=device_types,
                             schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                    "Tensor? keys_used, float scale) -> (Tensor, Tensor, Tensor)")
    def backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, keys_used: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = backward_kernel(dout.contiguous(), q, k, v, out, lse, keys_used, scale)
        if keys_used is not None:
            used = (torch.arange(k.shape[1], device=k.device)[None, :] < keys_used[:, None])[:, :, None, None]
            dk, dv = (torch.where(used, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g in (dk, dv))
        return dq, dk, dv

    @backward_op.register_fake
    def _(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
          lse: torch.Tensor, keys_used: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        q, k, v, keys_used, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, keys_used)
        ctx.scale = scale

    def backward(ctx: Any, dout: Any, _dlse: Any) -> Any:
        q, k, v, out, lse, keys_used = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = backward_op(dout, q, k, v, out, lse, keys_used, ctx.scale)
        return dq, dk, dv, None, None

    attention_op.register_autograd(backward, setup_context=setup_context)
    return attention_op


#: host seconds of the first call of each FlashAttention-4 kernel variant in this process, keyed by (direction,
#: dtype, tokens, head size, keys masked): FA4 compiles a variant on its first call, so this is its JIT time
FIRST_CALLS: dict[tuple[str, str, int, int, bool], float] = {}


@contextlib.contextmanager
def _first_call(direction: str, q: Any, keys_used: Any) -> Iterator[None]:
    key = (direction, str(q.dtype), int(q.shape[1]), int(q.shape[-1]), keys_used is not None)
    started = time.perf_counter()
    yield
    if key not in FIRST_CALLS:
        FIRST_CALLS[key] = time.perf_counter() - started


def _fa4_kernels() -> tuple[Callable, Callable]:
    def forward(q: Any, k: Any, v: Any, keys_used: Any, scale: float) -> Any:
        from flash_attn.cute.interface import _flash_attn_fwd

        with _first_call("forward", q, keys_used):
            out, lse, *_ = _flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), seqused_k=keys_used,
                                           softmax_scale=scale, causal=False, return_lse=True)
        return out, lse

    def backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, keys_used: Any, scale: float) -> Any:
        from flash_attn.cute.interface import _flash_attn_bwd

        with _first_call("backward", q, keys_used):
            dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=False,
                                         seqused_k=keys_used)[:3]
        return dq, dk, dv

    return forward, backward


_OPS: dict[str, Callable] = {}


def fa4_op() -> Callable:
    """``torch.ops.lora_run.fa4_attention`` (registered once per process)."""
    if "fa4" not in _OPS:
        forward, backward = _fa4_kernels()
        _OPS["fa4"] = define_op("lora_run", forward, backward, device_types="cuda")
    return _OPS["fa4"]


# ----------------------------------------------------------------------------------- start-up check
def relative_error(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def numeric_check(op: Callable, device: Any, tokens: int = 333, heads: int = 4, head_dim: int = 128,
                  dtype: Any = None) -> str | None:
    """FA4 (`op`) against SDPA on two small random cases, forward and backward: None when every output and
    gradient is within CHECK_FACTOR × SDPA's own error (both against an fp32 reference) + CHECK_SLACK.

    Both run through the dispatch function (`make_backend_fn`); the second is its masked path: a batch of two
    with boolean key masks that are not prefixes (every other key of one row masked, the tail of the other)."""
    import torch

    dtype = dtype or torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    scale = head_dim ** -0.5
    keys = torch.ones(2, tokens, dtype=torch.bool)
    keys[0, 1::2] = False
    keys[1, tokens // 3:] = False
    cases = {"": (1, None), "masked ": (2, keys.view(2, 1, 1, tokens).to(device))}
    dispatch = make_backend_fn(op, serves=lambda *_: True)     # the path a dispatched call takes, mask included

    def grads(fn: Callable, cast: Any, inputs: list[Any], dout: Any) -> list[Any]:
        leaves = [t.detach().to(cast).requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(dout.to(cast))
        return [out.detach()] + [t.grad for t in leaves]

    for label, (batch, mask) in cases.items():
        *qkv, dout = (torch.randn(batch, tokens, heads, head_dim, generator=g).to(device, dtype) for _ in range(4))

        def sdpa(a: Any, b: Any, c: Any, mask: Any = mask) -> Any:
            return _sdpa(a, b, c, mask, 0.0, False, scale)

        def candidate_fn(a: Any, b: Any, c: Any, mask: Any = mask) -> Any:
            return dispatch(a, b, c, attn_mask=mask, scale=scale)

        try:
            reference = grads(sdpa, torch.float32, qkv, dout)
            baseline = grads(sdpa, dtype, qkv, dout)
            candidate = grads(candidate_fn, dtype, qkv, dout)
        except Exception as exc:  # noqa: BLE001 - a kernel that raises fails the check
            return f"{label}{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        for name, ref, base, cand in zip(("out", "dq", "dk", "dv"), reference, baseline, candidate):
            if cand is None or cand.shape != ref.shape or not torch.isfinite(cand).all():
                return f"{label}{name}: missing, misshaped or non-finite"
            bound = CHECK_FACTOR * relative_error(base, ref) + CHECK_SLACK
            err = relative_error(cand, ref)
            if not err <= bound:
                return f"{label}{name} relative error {err:.2e} > bound {bound:.2e}"
    return None


# ------------------------------------------------------------------------------- diffusers dispatch
def _sdpa(query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: float, is_causal: bool,
          scale: float | None) -> Any:
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def key_mask(attn_mask: Any, batch: int, keys: int) -> Any:
    """The (batch, keys) boolean key mask of a dispatched (batch, 1, 1, keys) mask, or None when the mask is not
    one (a float mask, one that differs between queries or heads, e.g. HunyuanImage-2.1's token refiner, or a 2-D
    mask, which SDPA reads as queries × keys)."""
    import torch

    if attn_mask.dtype != torch.bool or attn_mask.shape != (batch, 1, 1, keys):
        return None
    return attn_mask.reshape(batch, keys)


def fa4_serves(query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: float, is_causal: bool) -> bool:
    """Whether a dispatched call can run on the FA4 op (else SDPA runs it)."""
    import torch

    return ((attn_mask is None or key_mask(attn_mask, key.shape[0], key.shape[1]) is not None)
            and dropout_p == 0.0 and not is_causal and query.is_cuda
            and query.dtype in (torch.bfloat16, torch.float16) and query.dtype == key.dtype == value.dtype
            and query.dim() == 4 and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and value.shape[-1] % 8 == 0 and query.shape[2] == key.shape[2])


def valid_keys_first(key: Any, value: Any, mask: Any) -> tuple[Any, Any, Any]:
    """(key, value, keys_used): each row's unmasked keys moved to the front, in order (a stable sort of the
    mask, then a gather: static shapes, no host sync), and how many there are (int32). Attention does not
    depend on the order of its keys, and the gather's backward puts each key's gradient back in its place."""
    import torch

    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    index = order[:, :, None, None]
    key = key.gather(1, index.expand(-1, -1, *key.shape[2:]))
    value = value.gather(1, index.expand(-1, -1, *value.shape[2:]))
    return key, value, mask.sum(dim=1, dtype=torch.int32)


def make_backend_fn(op: Callable, serves: Callable = fa4_serves) -> Callable:
    """A diffusers attention backend (layout batch, tokens, heads, head_dim) that runs `op` on the calls
    `serves` accepts and SDPA on the others. A boolean key mask reaches the op as `valid_keys_first`."""

    def lora_run_fa4(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, return_lse: bool = False,
                     _parallel_config: Any = None) -> Any:
        if serves(query, key, value, attn_mask, dropout_p, is_causal):
            keys_used = None
            if attn_mask is not None:
                key, value, keys_used = valid_keys_first(key, value, key_mask(attn_mask, key.shape[0], key.shape[1]))
            out, lse = op(query, key, value, keys_used, float(scale if scale is not None else query.shape[-1] ** -0.5))
            return (out, lse.transpose(1, 2)) if return_lse else out
        if return_lse:
            raise ValueError("lora_run_fa4: return_lse needs the FlashAttention-4 path")
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale)

    return lora_run_fa4


def register_backend(op: Callable, value: str = BACKEND_VALUE, serves: Callable = fa4_serves) -> Any:
    """Register `op` in diffusers' attention-backend registry under `value`; returns the backend name to set
    on processors. diffusers' backend names form an enum; one member is added for this backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName._value2member_map_.get(value)
    if member is None:
        member = str.__new__(AttentionBackendName, value)
        member._name_ = value.upper()
        member._value_ = value
        AttentionBackendName._value2member_map_[value] = member
    _AttentionBackendRegistry.register(member, constraints=[])(make_backend_fn(op, serves))
    return member


def set_backend(model: Any, backend: Any) -> int:
    """Set `backend` on every attention processor of `model` that dispatches through diffusers' registry
    (those with an ``_attention_backend`` attribute); returns how many. Others keep their own attention."""
    count = 0
    for module in dispatching_modules(model):
        module.processor._attention_backend = backend
        count += 1
    return count


def dispatching_modules(model: Any) -> Iterator[Any]:
    """The attention modules of `model` whose processor dispatches through diffusers' registry."""
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_attention_backend"):
            yield module


def head_dims(model: Any) -> list[int]:
    """The head sizes of `model`'s dispatching attention modules (FLUX 128, HunyuanImage-2.1 128, Hunyuan-DiT 88):
    the start-up check runs at each, so a size the kernel gets wrong is caught before training."""
    sizes = {int(getattr(module, "head_dim", 0) or module.to_q.out_features // module.heads)
             for module in dispatching_modules(model) if getattr(module, "heads", None)}
    return sorted(sizes) or [128]


def setup(model: Any, requested: str, device: Any, tokens: int | None = None, graphs: bool = False) -> AttentionChoice:
    """Choose the kernel for this run and route `model`'s attention to it."""
    import torch

    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(device) if cuda else None
    import_error = fa4_import_error() if cuda and requested != "sdpa" else None
    op: list[Callable] = []
    sizes = head_dims(model)

    def check() -> str | None:
        try:
            op.append(fa4_op())
        except Exception as exc:  # noqa: BLE001
            return f"registering the op failed: {type(exc).__name__}: {exc}"
        for size in sizes:
            problem = numeric_check(op[0], device, head_dim=size)
            if problem:
                return f"head size {size}: {problem}"
        return None

    choice = choose(requested, cuda=cuda, capability=capability, import_error=import_error, check=check,
                    tokens=tokens, graphs=graphs, head_sizes=tuple(sizes))
    if choice.kernel == "fa4":
        routed = set_backend(model, register_backend(op[0]))
        if not routed:
            choice = AttentionChoice("sdpa", "this model's attention does not dispatch through diffusers' "
                                             "backend registry")
    return choice
