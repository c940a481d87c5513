"""A grouped (foreach) Adafactor for the native backend: the update rule of transformers' ``Adafactor``
(Shazeer & Stern 2018, as the transformers implementation computes it) for many small tensors at once.

transformers' Adafactor loops over the parameters in Python, about 20 kernel launches each; an all-linear
rank-32 FLUX LoRA has about 1000 tensors, so its step is ~20 000 launches, and with ``scale_parameter`` a
host sync per tensor. Here the tensors with a gradient are grouped by (shape, dtype, device, step); each
group's gradients, parameters and second-moment factors are stacked and updated with a fixed number of
batched kernels, and written back with ``torch._foreach_copy_``. No host sync, the same arithmetic.

The optimizer state keeps transformers' per-parameter layout and names (``step``, ``exp_avg_sq_row`` and
``exp_avg_sq_col`` for tensors of 2+ dimensions, ``exp_avg_sq`` otherwise, ``exp_avg`` with ``beta1``), so
checkpoints written by either optimizer resume with the other (transformers' extra ``RMS`` entry is
recomputed every step by both and not stored here).
"""
from __future__ import annotations

import math
from typing import Any

import torch

#: elements per stacked chunk: bounds the optimizer step's transient memory (a few stacked copies of one chunk)
CHUNK_ELEMENTS = 1 << 24


class ForeachAdafactor(torch.optim.Optimizer):
    """transformers.optimization.Adafactor's update with grouped kernels. Same arguments and defaults."""

    def __init__(self, params: Any, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False):
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults)

    @staticmethod
    def _relative_step_size(group: dict[str, Any], step: int) -> float:
        size = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * step if group["warmup_init"] else 1e-2
            size = min(floor, 1.0 / math.sqrt(step))
        return size

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[Any, ...], list[Any]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(group, p, state)
                state["step"] += 1
                key = (tuple(p.shape), p.dtype, p.device, state["step"])
                buckets.setdefault(key, []).append(p)
            for (shape, _dtype, _device, step), params in buckets.items():
                per_chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape)))
                for start in range(0, len(params), per_chunk):
                    self._update(group, params[start:start + per_chunk], len(shape) >= 2, step)
        return loss

    def _init_state(self, group: dict[str, Any], p: Any, state: dict[str, Any]) -> None:
        shape = p.shape
        state["step"] = 0
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _states(self, params: list[Any], name: str) -> list[Any]:
        out = []
        for p in params:
            t = self.state[p][name]
            if t.dtype != torch.float32 or t.device != p.device:   # a loaded state: transformers keeps fp32
                t = self.state[p][name] = t.to(device=p.device, dtype=torch.float32)
            out.append(t)
        return out

    def _update(self, group: dict[str, Any], params: list[Any], factored: bool, step: int) -> None:
        n = len(params)
        dims = tuple(range(1, params[0].dim() + 1))
        numel = max(1, params[0].numel())
        grad = torch.stack([p.grad for p in params]).float()
        weights = torch.stack(params).float()                       # p_data_fp32 of every parameter
        size = self._relative_step_size(group, step)
        if group["scale_parameter"]:
            rms = weights.pow(2).sum(dim=dims).sqrt() / math.sqrt(numel) if dims else weights.abs()
            lr = rms.clamp(min=group["eps"][1]) * size               # (n,): one learning rate per parameter
        else:
            lr = None
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grad * grad + group["eps"][0]
        if factored:
            rows, cols = self._states(params, "exp_avg_sq_row"), self._states(params, "exp_avg_sq_col")
            row = torch.stack(rows).mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col = torch.stack(cols).mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            torch._foreach_copy_(rows, list(row.unbind(0)))
            torch._foreach_copy_(cols, list(col.unbind(0)))
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            sq_list = self._states(params, "exp_avg_sq")
            sq = torch.stack(sq_list).mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            torch._foreach_copy_(sq_list, list(sq.unbind(0)))
            update = sq.rsqrt().mul_(grad)
        view = (n,) + (1,) * (update.dim() - 1)
        update_rms = update.pow(2).sum(dim=dims).sqrt() / math.sqrt(numel) if dims else update.abs()
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0).view(view))
        update.mul_(lr.view(view) if lr is not None else size)
        if group["beta1"] is not None:
            avg_list = self._states(params, "exp_avg")
            avg = torch.stack(avg_list).mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            torch._foreach_copy_(avg_list, list(avg.unbind(0)))
            update = avg
        if group["weight_decay"] != 0:
            decay = (lr.view(view) if lr is not None else size) * -group["weight_decay"]
            weights.add_(weights * decay)
        weights.add_(-update)
        torch._foreach_copy_(params, list(weights.unbind(0)))


def make_adafactor(groups: Any, lr: float, weight_decay: float, foreach: bool = True) -> Any:
    """The recipes' Adafactor (relative_step, scale_parameter and warmup_init off: the recipe's LR is used):
    grouped by default, transformers' own with ``foreach=False``."""
    kw = dict(lr=lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=weight_decay)
    if not foreach:
        from transformers.optimization import Adafactor

        return Adafactor(groups, **kw)
    return ForeachAdafactor(groups, **kw)
