"""Data-parallel training for the native backend: the launcher (parent) and the rank helper (workers).

``[train] gpus = N`` (or ``lora-run --gpus N``) with N > 1: after the orchestrator has validated, linted and
written the run folder, ``NativeBackend.run`` calls :func:`launch`, which starts N worker processes
(``python -m lora_run_native.worker RUN_DIR``; no shell, each in its own session so that a terminal Ctrl-C
reaches the parent only). Every worker reloads the resolved ``recipe.toml`` of the run folder and runs the
ordinary :class:`~lora_run_native.train.Trainer` with a :class:`Dist` helper:

- the epoch plan is built with the *global* batch (``batch_size × N``), so every global batch holds one
  bucket; rank ``r`` trains on items ``[r·batch_size, (r+1)·batch_size)`` of it (a short last batch leaves
  the high ranks with fewer or no samples, which is exact, see below);
- noise and σ are drawn for the whole global batch from the same (seed, step, micro-batch) generator as a
  one-process run, and each rank keeps its slice; each rank's loss is ``Σ(its samples) / global batch``, and
  the LoRA gradients are **summed** over ranks with one all-reduce: the update equals the one-process update
  with the same global batch up to float round-off;
- the loss, a stop request (Ctrl-C) and non-finite losses are agreed on by every rank in the same all-reduce,
  so all ranks stop (and rank 0 checkpoints) at the same step;
- rank 0 alone writes: caches (the others wait at a barrier, then read them), checkpoints, samples, logs,
  TensorBoard and the LoRA files. It reports lifecycle events as JSON lines on its stdout; the parent calls
  ``step_finished`` / ``checkpoint_saved`` / ``samples_written`` with the run's own context.

CUDA: one GPU per rank (``CUDA_VISIBLE_DEVICES`` narrowed to that GPU), NCCL. No CUDA: N CPU processes with
gloo — a testing and debugging mode that proves launch, sharding and equivalence without GPUs.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lora_run.errors import BackendError, NonFiniteLoss, RecipeError, TrainingInterrupted

EVENT = "@lora-run-event "          # prefix of a JSON event line on a worker's stdout
ENV_RANK, ENV_WORLD, ENV_ADDR, ENV_PORT, ENV_PARENT = (
    "LORA_RUN_RANK", "LORA_RUN_WORLD_SIZE", "LORA_RUN_MASTER_ADDR", "LORA_RUN_MASTER_PORT", "LORA_RUN_PARENT_PID")
TAIL_CHARS = 4000
GRACE_S = 20.0
#: After a stop request, the workers finish the step and rank 0 saves; past this they are killed.
STOP_TIMEOUT_S = 600.0


def validate_gpus(gpus: int, cuda_available: bool, device_count: int, shown: str = "recipe.toml") -> None:
    """Refuse more data-parallel processes than CUDA devices (exit 2). Without CUDA any N is the gloo mode."""
    if cuda_available and gpus > device_count:
        raise RecipeError(f"{shown}: [train.gpus] asks for {gpus} GPUs but this machine has {device_count} CUDA "
                          f"device(s){' visible (CUDA_VISIBLE_DEVICES)' if os.environ.get('CUDA_VISIBLE_DEVICES') else ''}; "
                          f"use --gpus {device_count} or fewer")


def shard(global_size: int, per_rank: int, rank: int) -> tuple[int, int]:
    """The ``[lo, hi)`` slice of a global batch that ``rank`` trains on (empty when the batch is short)."""
    return min(global_size, rank * per_rank), min(global_size, (rank + 1) * per_rank)


# ------------------------------------------------------------------------------------------------ worker
class Dist:
    """The rank's view of the process group (created in a worker from the launcher's environment)."""

    def __init__(self, rank: int, world: int, addr: str = "127.0.0.1", port: int = 0):
        self.rank, self.world, self.addr, self.port = rank, world, addr, port
        self.initialized = False

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ[ENV_RANK]), int(os.environ[ENV_WORLD]), os.environ.get(ENV_ADDR, "127.0.0.1"),
                   int(os.environ[ENV_PORT]))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: Any) -> None:
        import datetime

        import torch.distributed as dist

        backend = "nccl" if getattr(device, "type", "cpu") == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{self.addr}:{self.port}", rank=self.rank,
                                 world_size=self.world, timeout=datetime.timedelta(hours=2))
        self.device = device
        self.initialized = True

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.initialized:
            dist.barrier()

    def shard(self, global_size: int, per_rank: int) -> tuple[int, int]:
        return shard(global_size, per_rank, self.rank)

    def reduce_step(self, params: list[Any], loss: float, stop: bool) -> tuple[float, bool]:
        """Sum the gradients of ``params`` over ranks (a rank without samples contributes zeros) and agree on
        the step's loss (sum of the ranks' partial losses) and on a stop request. Every rank ends with the
        same gradients."""
        import torch
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        if grads:
            flat = torch.cat(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        device = grads[0].device if grads else self.device
        agreed = torch.tensor([loss, 1.0 if stop else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.SUM)
        return float(agreed[0].item()), bool(agreed[1].item() > 0)

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
            self.initialized = False


def emit(kind: str, **data: Any) -> None:
    """One event line on stdout for the parent (rank 0's lifecycle events, any rank's error)."""
    sys.stdout.write(EVENT + json.dumps({"kind": kind, **data}, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ parent
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    def __init__(self, rank: int, proc: subprocess.Popen, events: queue.Queue, passthrough: bool):
        self.rank, self.proc, self.events = rank, proc, events
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self.error: dict[str, Any] | None = None
        self.threads = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, args=(passthrough,), daemon=True)]
        for t in self.threads:
            t.start()

    def _read_stdout(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith(EVENT):
                try:
                    event = json.loads(line[len(EVENT):])
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    if event.get("kind") == "error":
                        self.error = event
                    self.events.put((self.rank, event))
                    continue
            self.tail.append(line)
            if self.rank == 0:
                self.events.put((0, {"kind": "echo", "text": line}))

    def _read_stderr(self, passthrough: bool) -> None:
        fd = self.proc.stderr.fileno()
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            text = chunk.decode("utf-8", "replace")
            self.tail.append(text)
            if passthrough:
                try:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass

    def tail_text(self) -> str:
        text = "".join(x if x.endswith(("\n", "\r")) else x + "\n" for x in self.tail)
        return text[-TAIL_CHARS:].strip()


def worker_command(run_dir: Path, shown: str, resume: bool, debug: bool) -> list[str]:
    return [sys.executable, "-m", "lora_run_native.worker", str(run_dir), "--shown", shown,
            *(["--resume"] if resume else []), *(["--debug"] if debug else [])]


def launch(ctx: Any) -> None:
    """Start ``[train.gpus]`` workers, relay rank 0's events to the run's hooks, wait, and turn the outcome
    into the orchestrator's result (nothing, or the LoraRunError of the failing rank)."""
    import torch

    recipe = ctx.recipe
    n = recipe.train.gpus
    shown = ctx.loaded.shown if ctx.loaded else "recipe.toml"
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    validate_gpus(n, cuda, count, shown)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()] \
        or [str(i) for i in range(count)]
    port = _free_port()
    argv = worker_command(ctx.run_dir.path, shown, ctx.resume, ctx.debug)
    mode = f"{n} GPU processes (NCCL)" if cuda else f"{n} CPU processes (gloo; testing mode)"
    ctx.echo(f"data-parallel: {mode}; global batch {recipe.train.batch_size * n * recipe.train.gradient_accumulation} "
             f"= {recipe.train.batch_size} per device × {n} × {recipe.train.gradient_accumulation} accumulation")
    ctx.run_dir.log(f"data-parallel launch: {mode}: {' '.join(argv)}")
    events: queue.Queue = queue.Queue()
    workers: list[_Worker] = []
    threads = max(1, (os.cpu_count() or 1) // n)
    for rank in range(n):
        env = {**os.environ, ENV_RANK: str(rank), ENV_WORLD: str(n), ENV_ADDR: "127.0.0.1", ENV_PORT: str(port),
               ENV_PARENT: str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = visible[rank]
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        workers.append(_Worker(rank, proc, events, passthrough=rank == 0))
    ctx.run_dir.update_manifest(workers={"count": n, "backend": "nccl" if cuda else "gloo",
                                         "pids": [w.proc.pid for w in workers]})
    failed: _Worker | None = None
    interrupts = 0
    killed_at: float | None = None
    stop_at: float | None = None
    try:
        while True:
            try:
                _drain(ctx, events, timeout=0.2)
                for w in workers:
                    code = w.proc.poll()
                    if failed is None and code not in (None, 0):
                        failed = w
                        if code != TrainingInterrupted.exit_code:   # a stop: the others stop at the same step
                            for other in workers:      # a crash: the others would wait in the next all-reduce
                                if other is not w and other.proc.poll() is None:
                                    _signal(other.proc, signal.SIGTERM)
                        killed_at = time.time()
                grace = GRACE_S * (3 if failed is not None and failed.proc.returncode == 130 else 1)
                if stop_at is not None and killed_at is None and time.time() - stop_at > STOP_TIMEOUT_S:
                    killed_at = time.time() - grace - 1    # a stop that never completes: do not wait forever
                if killed_at is not None and time.time() - killed_at > grace:
                    for w in workers:
                        if w.proc.poll() is None:
                            _signal(w.proc, signal.SIGKILL)
                if all(w.proc.poll() is not None for w in workers):
                    break
            except KeyboardInterrupt:
                interrupts += 1
                stop_at = stop_at or time.time()
                if interrupts == 1:
                    ctx.echo("\nstopping all workers after this step; rank 0 saves a resumable state "
                             "(press Ctrl-C again to abort)")
                for w in workers:
                    if w.proc.poll() is None:
                        _signal(w.proc, signal.SIGINT if interrupts < 3 else signal.SIGKILL)
    finally:
        for w in workers:                              # an exception in a hook: do not leave workers behind
            if w.proc.poll() is None:
                _signal(w.proc, signal.SIGKILL)
                w.proc.wait()
        for w in workers:
            for t in w.threads:
                t.join(timeout=5)
        _drain(ctx, events, timeout=0)
    _outcome(ctx, workers, failed, interrupts, shown)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _drain(ctx: Any, events: queue.Queue, timeout: float) -> None:
    try:
        rank, event = events.get(timeout=timeout) if timeout else events.get_nowait()
    except queue.Empty:
        return
    while True:
        _handle(ctx, rank, event)
        try:
            rank, event = events.get_nowait()
        except queue.Empty:
            return


def _handle(ctx: Any, rank: int, event: dict[str, Any]) -> None:
    kind = event.get("kind")
    if rank != 0 or kind == "error":
        return
    if kind == "echo":
        ctx.echo(event["text"])
    elif kind == "artifacts":
        ctx.artifacts.update(event["artifacts"])
    elif kind == "step":
        ctx.hook.step_finished(run=ctx, step=event["step"], metrics=event["metrics"])
    elif kind == "checkpoint":
        ctx.hook.checkpoint_saved(run=ctx, step=event["step"], path=Path(event["path"]))
    elif kind == "samples":
        ctx.hook.samples_written(run=ctx, step=event["step"], paths=list(event["paths"]))


def _outcome(ctx: Any, workers: list[_Worker], failed: _Worker | None, interrupts: int, shown: str) -> None:
    codes = [w.proc.returncode for w in workers]
    if all(c == 0 for c in codes):
        return
    primary = failed or next(w for w in workers if w.proc.returncode != 0)
    if workers[0].error and (interrupts or workers[0].error.get("code") == primary.proc.returncode):
        primary = workers[0]                           # rank 0's message names the checkpoint
    error = primary.error
    summary = ", ".join(f"rank {w.rank}: {w.proc.returncode}" for w in workers)
    if error is not None:
        message, code, name = error.get("message", ""), error.get("code"), error.get("type")
        if code == TrainingInterrupted.exit_code:
            raise TrainingInterrupted(message)
        if name == "NonFiniteLoss":
            raise NonFiniteLoss(message)
        if code == RecipeError.exit_code:
            raise RecipeError(message)
        raise BackendError(f"{shown}: worker rank {primary.rank} failed: {message} (exit codes: {summary}); its "
                           f"last output:\n{primary.tail_text()}")
    if interrupts:
        raise TrainingInterrupted(f"aborted; workers ended with {summary}; resume with: lora-run {shown} --resume "
                                  f"--output-dir {ctx.run_dir.path}")
    raise BackendError(f"{shown}: worker rank {primary.rank} ended with exit code {primary.proc.returncode} "
                       f"(exit codes: {summary}); its last output:\n{primary.tail_text() or '(nothing)'}")
