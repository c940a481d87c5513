"""Several processes (GPUs, machines) for the native backend, on torch.distributed and accelerate.

How the processes start — lora-run has no launcher of its own:

- ``torchrun [--nnodes …] --nproc-per-node N -m lora_run recipe.toml`` or ``accelerate launch [--config_file …]
  -m lora_run recipe.toml``: the launcher starts every process, on one machine or several, with its usual
  rendezvous flags; each process runs the whole ``lora-run`` command and finds its rank in ``RANK`` /
  ``WORLD_SIZE`` (:meth:`lora_run.run.Processes.from_env`).
- ``lora-run recipe.toml --gpus N`` (``[train] gpus = N``) without a launcher: :func:`launch` starts that same
  command N times on this machine through torchrun's own Python entry (``torch.distributed.run``,
  ``--standalone``) and waits for it.

In every process the trainer's ``Accelerator`` creates the process group (NCCL with CUDA, gloo on CPU), owns
mixed precision and gradient accumulation, and synchronises the LoRA gradients: DDP over the trainable
parameters (the frozen base is neither broadcast nor reduced), or FSDP2 (``[backend.native] fsdp = true``) which
also shards the frozen base over the processes. :class:`Parallel` is the trainer's view of all that:

- the epoch plan is built with the *global* batch (``batch_size × processes``); rank ``r`` trains on items
  ``[r·batch_size, (r+1)·batch_size)`` of each global batch (:func:`shard`);
- noise and σ are drawn for the whole global batch from the one-process generator and each rank keeps its
  slice; each rank's loss is ``Σ(its samples) / global batch × processes`` and DDP/FSDP *average* the
  gradients, so the update equals the one-process update with the same global batch (float round-off);
  a rank whose slice of a short last batch is empty runs one sample with weight 0 (every rank must take part
  in the gradient reduction);
- the step's loss and a stop request are agreed on once per step (``accelerator.reduce``), so every rank stops
  at the same step and rank 0 saves the resumable state;
- rank 0 alone writes; caches are encoded by rank 0 while the others wait, then read by all (on several
  machines the run folder / cache folder must be on a shared filesystem).
"""
from __future__ import annotations

import glob
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

from lora_run.errors import BackendError, LoraRunError, RecipeError, TrainingInterrupted
from lora_run.recipe import resume_command

TAIL_CHARS = 4000


def validate_gpus(gpus: int, cuda_available: bool, device_count: int, shown: str = "recipe.toml") -> None:
    """Refuse more processes than CUDA devices on this machine (exit 2). Without CUDA any N is the gloo mode."""
    if cuda_available and gpus > device_count:
        raise RecipeError(f"{shown}: [train.gpus] asks for {gpus} GPUs but this machine has {device_count} CUDA "
                          f"device(s){' visible (CUDA_VISIBLE_DEVICES)' if os.environ.get('CUDA_VISIBLE_DEVICES') else ''}; "
                          f"use --gpus {device_count} or fewer (several machines: see `lora-run docs multi-gpu`)")


def shard(global_size: int, per_rank: int, rank: int) -> tuple[int, int]:
    """The ``[lo, hi)`` slice of a global batch that ``rank`` trains on (empty when the batch is short)."""
    return min(global_size, rank * per_rank), min(global_size, (rank + 1) * per_rank)


# --------------------------------------------------------------------------------------- lora-run --gpus N
class LaunchFailed(LoraRunError):
    """A launched run failed; carries the exit code that the failing rank reported."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def torchrun_arguments(processes: int, argv: list[str], log_dir: str) -> list[str]:
    """torchrun's command line for ``lora-run --gpus N``: one machine, a free local port, every rank's
    output in ``log_dir`` and rank 0's also on the console."""
    return ["--standalone", f"--nproc-per-node={processes}", f"--log-dir={log_dir}", "--redirects=3", "--tee=3",
            "--local-ranks-filter=0", *argv]


def launch(processes: int, argv: list[str], ctx: Any, overwrite: bool = False) -> None:
    """``[train] gpus = N`` without a launcher: run ``python -m lora_run …`` (``argv``) as N processes through
    ``torch.distributed.run`` and wait. A failing rank ends the run (torchrun stops the others); the error
    names it and shows the end of its output."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    shown = ctx.loaded.shown if ctx.loaded else "recipe.toml"
    cuda = torch.cuda.is_available()
    validate_gpus(processes, cuda, torch.cuda.device_count() if cuda else 0, shown)
    ctx.run_dir.prepare(overwrite=overwrite, resume=ctx.resume)     # folder problems: exit 2 before any start
    ctx.run_dir.release()       # rank 0 takes the run folder's lock itself (one lora-run per folder)
    r = ctx.recipe.train
    mode = f"{processes} GPU processes (NCCL)" if cuda else f"{processes} CPU processes (gloo; testing mode)"
    ctx.echo(f"data-parallel through torchrun: {mode}; global batch {r.batch_size * processes * r.gradient_accumulation}"
             f" = {r.batch_size} per process × {processes} × {r.gradient_accumulation} accumulation")
    settings = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:"}     # rank 0's console lines
    if not cuda:
        settings["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)                    # torchrun reads them from this process's environment
    with tempfile.TemporaryDirectory(prefix="lora-run-ranks-") as logs:
        try:
            run(parse_args(torchrun_arguments(processes, argv, logs)))
        except ChildFailedError as exc:
            raise _failure(exc, logs, shown) from None
        except KeyboardInterrupt:
            raise TrainingInterrupted(_interrupted(ctx)) from None
        except Exception as exc:  # noqa: BLE001 - torchrun's SignalException (SIGTERM / SIGINT to the agent)
            if type(exc).__name__ == "SignalException":
                raise TrainingInterrupted(_interrupted(ctx)) from None
            raise
        finally:
            for key in added:
                os.environ.pop(key, None)


def _interrupted(ctx: Any) -> str:
    from .checkpoint import latest_checkpoint

    found = latest_checkpoint(ctx.run_dir.file("checkpoints"))
    return (f"interrupted; the last checkpoint is {found}" if found else "interrupted before the first checkpoint") \
        + f"; resume with: {resume_command(ctx.loaded, ctx.run_dir.path)}"


def _rank_output(logs: str, local_rank: int) -> str:
    """The end of one rank's stderr and stdout (torchrun's --log-dir layout: <run>/attempt_N/<rank>/)."""
    parts = []
    for name in ("stderr.log", "stdout.log"):
        for path in sorted(glob.glob(os.path.join(logs, "**", str(local_rank), name), recursive=True)):
            try:
                parts.append(Path(path).read_text("utf-8", "replace"))
            except OSError:
                pass
    return "\n".join(p.strip() for p in parts if p.strip())[-TAIL_CHARS:]


def _failure(exc: Any, logs: str, shown: str) -> LoraRunError:
    failures = getattr(exc, "failures", {}) or {}
    codes = {rank: f.exitcode for rank, f in failures.items()}
    summary = ", ".join(f"rank {rank}: {code}" for rank, code in sorted(codes.items()))
    if codes and all(c == TrainingInterrupted.exit_code for c in codes.values()):
        return TrainingInterrupted(_last_error(_rank_output(logs, 0)) or "interrupted")
    rank, failure = min(failures.items(), key=_cause_first) if failures else (0, None)
    code = failure.exitcode if failure is not None else 1
    tail = _rank_output(logs, failure.local_rank if failure is not None else rank)
    message = _last_error(tail)
    if not message and failure is not None and isinstance(failure.message, str) and failure.error_file_data:
        message = failure.message          # what the rank wrote to torchrun's error file (lora_run_commands.run)
    if code == 2 and message:              # bad input found in the run (the output folder, a model file)
        return LaunchFailed(message, 2)
    if code < 0:
        what = f"was killed by {signal.Signals(-code).name}" if -code in signal.Signals._value2member_map_ \
            else f"ended with exit code {code}"
    else:
        what = f"failed with exit code {code}"
    return BackendError(f"{shown}: rank {rank} {what}" + (f": {message}" if message else "")
                        + f" (exit codes: {summary}); its last output:\n{tail or '(nothing)'}")


def _cause_first(item: tuple[int, Any]) -> tuple[int, int, int]:
    """The order in which failed ranks are taken for the cause: one killed by a signal (SIGKILL from the kernel's
    out-of-memory killer or a user, a crash) before one that exited with an error (a peer's death breaks the others'
    collectives, and they fail too), and last the ranks torchrun stopped (SIGTERM; 130, a run interrupted by it); the
    earliest, then the lowest rank, within each. The timestamps alone cannot order them: a rank that wrote torchrun's
    error file carries the second it failed, a rank killed by a signal the second torchrun noticed it."""
    rank, failure = item
    code = failure.exitcode
    kind = 2 if code in (-signal.SIGTERM, TrainingInterrupted.exit_code) else 0 if code < 0 else 1
    return kind, failure.timestamp, rank


def _last_error(text: str) -> str:
    """The ``error: …`` lines lora-run printed last (the user-facing message of a LoraRunError)."""
    lines = [m[1] for m in re.finditer(r"^(?:\[\w+\]:)?error: (.*)$", text, re.MULTILINE)]
    return "\n".join(lines[-5:])


# ---------------------------------------------------------------------------------------------- trainer side
class Parallel:
    """The trainer's view of the processes, created once the ``Accelerator`` exists."""

    def __init__(self, accelerator: Any, fsdp: bool = False):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.main = accelerator.is_main_process
        self.active = accelerator.distributed_type != DistributedType.NO     # started by a launcher
        self.accelerate_fsdp = accelerator.distributed_type == DistributedType.FSDP
        if self.accelerate_fsdp and accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise RecipeError("the accelerate config asks for FSDP version 1 (distributed_type: FSDP); lora-run "
                              "shards with FSDP2: set fsdp_version: 2 there, or use distributed_type: MULTI_GPU with "
                              "[backend.native] fsdp = true")
        # accelerate's own switch (distributed_type: FSDP, fsdp_version: 2) turns it on as well
        self.fsdp = (bool(fsdp) or self.accelerate_fsdp) and self.active

    def describe(self) -> str:
        kind = "FSDP2 (frozen base sharded)" if self.fsdp else "DDP (LoRA gradients)"
        return f"{self.world} process(es), {kind}, {self.acc.state.backend or 'no'} backend"

    def shard(self, global_size: int, per_rank: int) -> tuple[int, int]:
        return shard(global_size, per_rank, self.rank)

    def barrier(self) -> None:
        if self.active:
            self.acc.wait_for_everyone()

    def agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        """Every rank's partial loss summed and the stop requests or-ed: one small reduction per step."""
        if not self.active:
            return loss, stop
        import torch

        value = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=self.acc.device)
        total = self.acc.reduce(value, reduction="sum")
        return float(total[0].item()), bool(total[1].item() > 0)

    def close(self) -> None:
        """After the last collective (the final LoRA is gathered): leave the process group."""
        if self.active:
            self.acc.state.destroy_process_group()

    # ------------------------------------------------------------------------------------- wrapping
    def wrap(self, transformer: Any, te_module: Any, optimizer: Any, te_train: bool) -> tuple[Any, Any]:
        """Hand the model to the accelerator: (the callable the forward pass goes through, the optimizer).
        One process without a launcher: unchanged."""
        if not self.active:
            return transformer, optimizer
        if self.fsdp:
            return self._fsdp(transformer, optimizer)
        return self._ddp(transformer, te_module, optimizer)

    def _ddp(self, transformer: Any, te_module: Any, optimizer: Any) -> tuple[Any, Any]:
        import torch

        class Trainable(torch.nn.Module):
            """The modules holding LoRA parameters under one DDP; its forward is the transformer's."""

            def __init__(self, transformer: Any, text_encoder: Any):
                super().__init__()
                self.transformer = transformer
                if text_encoder is not None:
                    self.text_encoder = text_encoder

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return self.transformer(*args, **kwargs)

        holder = Trainable(transformer, te_module)
        # every rank loads the same base and draws the same LoRA init: broadcast nothing at start, reduce only
        # the LoRA gradients
        frozen = [n for n, p in holder.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in holder.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, frozen)
        wrapped = self.acc.prepare_model(holder, device_placement=False)
        optimizer = self.acc.prepare_optimizer(optimizer, device_placement=False)
        return _ForwardThrough(wrapped, transformer), optimizer

    def _fsdp(self, transformer: Any, optimizer: Any) -> tuple[Any, Any]:
        from .accel import repeated_blocks

        blocks = repeated_blocks(transformer)
        if self.accelerate_fsdp:            # GPUs: accelerate's FSDP2 (plugin from accelerator_options)
            plugin = self.acc.state.fsdp_plugin
            if blocks:                      # shard each repeated block, then the rest with the root
                plugin.transformer_cls_names_to_wrap = sorted({type(b).__name__ for b in blocks})
            transformer, optimizer = self.acc.prepare(transformer, optimizer, device_placement=[False, False])
            return transformer, optimizer
        # gloo on CPU: accelerate enables FSDP on accelerators only; the same FSDP2 (torch's fully_shard,
        # each repeated block then the root) keeps the CPU tests honest about sharded state.
        fully_shard = _fsdp2()
        policy = mixed_precision_policy(self.acc.mixed_precision)
        kwargs = {"mp_policy": policy} if policy is not None else {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names = {id(p): n for n, p in transformer.named_parameters()}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(transformer, **kwargs)
        by_name = dict(transformer.named_parameters())
        for group in optimizer.param_groups:      # the optimizer must step the sharded parameters
            group["params"] = [by_name[names[id(p)]] for p in group["params"]]
        assert len(params) == sum(len(g["params"]) for g in optimizer.param_groups)
        return transformer, self.acc.prepare_optimizer(optimizer, device_placement=False)

    # ------------------------------------------------------------------------------------ full state
    @staticmethod
    def full(tensor: Any) -> Any:
        """The whole tensor of a sharded (DTensor) parameter or state; a collective: every rank calls it."""
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def lora_state_dict(self, module: Any) -> dict[str, Any]:
        """:func:`outputs.lora_state_dict` of the whole (unsharded) LoRA — the same on disk whatever the sharding."""
        from .outputs import _ADAPTER_NAME

        out = {}
        for name, p in module.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                out[_ADAPTER_NAME.sub(r".\1.weight", name)] = self.full(p.detach()).to("cpu").float().clone()
        return out

    def trainable_full(self, named: dict[str, Any]) -> dict[str, Any]:
        return {k: self.full(p.detach()) for k, p in named.items()}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict with whole tensors (the one-process layout)."""
        sd = optimizer.state_dict()
        if not self.fsdp:
            return sd
        sd = dict(sd)
        sd["state"] = {pid: {k: self.full(v) for k, v in entry.items()} for pid, entry in sd["state"].items()}
        return sd

    def load_trainable(self, param: Any, value: Any) -> None:
        import torch

        with torch.no_grad():
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
            else:
                param.copy_(value.to(param.device, param.dtype))

    def load_optimizer_state(self, optimizer: Any, sd: dict[str, Any]) -> None:
        """Load a whole-tensor optimizer state into a (possibly sharded) optimizer."""
        if self.fsdp:
            from torch.distributed.tensor import distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {}
            for pid, entry in sd["state"].items():
                p = params[int(pid)]
                state[pid] = {k: (distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
                                  if hasattr(p, "device_mesh") and hasattr(v, "dim") and v.dim() > 0 else v)
                              for k, v in entry.items()}
            sd = {**sd, "state": state}
        optimizer.load_state_dict(sd)


class _ForwardThrough:
    """What ``adapter.predict`` calls under DDP: the call goes through the DDP wrapper (so the gradients are
    reduced), attribute reads go to the transformer itself."""

    def __init__(self, wrapped: Any, module: Any):
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def accelerator_options(recipe: Any, options: Any, block_names: list[str] | None = None) -> dict[str, Any]:
    """Extra ``Accelerator`` arguments for a launched run: a long collective timeout (rank 0 samples while the
    others wait), DDP settings, and the FSDP2 plugin where asked for and available."""
    import datetime

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    te_train = bool(recipe.text_encoder.train)
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2)),
                # the text-encoder LoRA stops getting gradients after train_fraction of the steps; the gradients
                # are views into DDP's reduction buckets, not a second copy of them (0.6 GiB a GPU for the fast
                # FLUX.1 recipe's LoRA, 1.3 GiB for the high-fidelity one, which the memory plan does not count)
                DistributedDataParallelKwargs(find_unused_parameters=te_train, gradient_as_bucket_view=True)]
    out: dict[str, Any] = {"kwargs_handlers": handlers,
                           "gradient_accumulation_steps": recipe.train.gradient_accumulation}
    if getattr(options, "fsdp", False):
        import torch

        if torch.cuda.is_available():
            from accelerate.utils import FullyShardedDataParallelPlugin

            _fsdp2()
            try:
                out["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                    fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                    auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=block_names or None,
                    cpu_ram_efficient_loading=False,
                    mixed_precision_policy=mixed_precision_policy(recipe.train.mixed_precision))
            except TypeError:
                raise RecipeError(f"[backend.{recipe.backend.name}] fsdp = true needs accelerate with FSDP2 "
                                  "(pip install -U accelerate)") from None
    return out


def _fsdp2() -> Any:
    """torch's FSDP2 ``fully_shard`` (public in torch 2.6 and later)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RecipeError("[backend.native] fsdp = true needs torch 2.6 or later (FSDP2)") from None
    return fully_shard


def mixed_precision_policy(mixed_precision: str) -> Any:
    """FSDP2: gather and compute in the training precision (the fp32 LoRA and the bf16 base become one
    dtype), reduce the gradients in fp32. None for float32 training."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
