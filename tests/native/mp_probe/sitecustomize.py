"""Test-only instrumentation of launched lora-run processes (never imported by lora-run itself).

tests/native/test_multi_process.py puts this folder on PYTHONPATH of the processes a launcher starts; Python imports
``sitecustomize`` at start-up, and this one does nothing unless ``LORA_RUN_PROBE`` is set. Then, once
``lora_run_native.train`` is imported, it wraps the trainer (the training code itself runs unchanged):

- ``LORA_RUN_PROBE=DIR``: every micro-step's forward/backward appends one JSON line to ``DIR/rank<R>.jsonl``: the
  step, the item indices this rank trains, their loss scale (0: the padding sample of an empty slice), the latent
  shape, and a digest of torch's global generator state (what LoRA dropout draws from); after it, one line to
  ``DIR/grads<R>.jsonl``: how many LoRA gradients there are and how many storages hold them;
- ``LORA_RUN_PROBE_RAISE=R:N``: rank R raises a RuntimeError (as an out-of-memory error would) in step N;
- ``LORA_RUN_PROBE_SLOW_STOP=R:SECONDS``: rank R, asked to stop (Ctrl-C), takes that much longer to finish its
  step (a slow step: it sleeps before the ranks agree on the stop), and 3 s longer to write each checkpoint (a
  large one);
- ``LORA_RUN_PROBE_PLANT=sum-gradients``: a planted mistake: DDP sums the ranks' gradients instead of averaging them.
"""
from __future__ import annotations

import os

if os.environ.get("LORA_RUN_PROBE"):
    import hashlib
    import importlib.abc
    import importlib.machinery
    import json
    import sys
    import time

    def _rank() -> int:
        return int(os.environ.get("RANK", "0"))

    def _pair(name: str) -> tuple[int, float] | None:
        value = os.environ.get(name)
        if not value:
            return None
        rank, _, number = value.partition(":")
        return int(rank), float(number)

    def _instrument(module) -> None:
        import torch

        trainer = module.Trainer
        real_fb = trainer._forward_backward
        out = os.path.join(os.environ["LORA_RUN_PROBE"], f"rank{_rank()}.jsonl")
        failing, slow = _pair("LORA_RUN_PROBE_RAISE"), _pair("LORA_RUN_PROBE_SLOW_STOP")
        slept = []

        def forward_backward(self, state, batch, x0, noise, t, text, step, te_active, accum, global_size,
                             scale=1.0):
            generator = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "items": [s.index for s in batch], "scale": scale,
                                     "shape": list(x0.shape[1:]), "global": global_size, "rng": generator}) + "\n")
            if failing and failing[0] == _rank() and step + 1 == failing[1]:
                raise RuntimeError(f"probe: out of memory on rank {_rank()} in step {step + 1}")
            loss = real_fb(self, state, batch, x0, noise, t, text, step, te_active, accum, global_size, scale)
            grads = [p.grad for p in state.params.values() if p.grad is not None]
            with open(os.path.join(os.environ["LORA_RUN_PROBE"], f"grads{_rank()}.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "grads": len(grads),
                                     "storages": len({g.untyped_storage().data_ptr() for g in grads})}) + "\n")
            return loss

        trainer._forward_backward = forward_backward
        from lora_run_native import distributed

        real_agree = distributed.Parallel.agree

        def agree(self, loss, stop):
            if slow and slow[0] == _rank() and stop and not slept:
                slept.append(True)
                time.sleep(slow[1])
            return real_agree(self, loss, stop)

        distributed.Parallel.agree = agree
        if slow and slow[0] == _rank():
            from lora_run_native import checkpoint

            real_save = checkpoint.save

            def save(*args, **kwargs):
                time.sleep(3)
                return real_save(*args, **kwargs)

            checkpoint.save = save
        if os.environ.get("LORA_RUN_PROBE_PLANT") == "sum-gradients":
            real_ddp = distributed.Parallel._ddp

            def summed(self, *args, **kwargs):
                forward, optimizer = real_ddp(self, *args, **kwargs)

                def hook(_state, bucket):
                    import torch.distributed as dist

                    work = dist.all_reduce(bucket.buffer(), async_op=True)      # a sum, not divided by the ranks
                    return work.get_future().then(lambda fut: fut.value()[0])

                forward._wrapped.register_comm_hook(None, hook)
                return forward, optimizer

            distributed.Parallel._ddp = summed

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "lora_run_native.train":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                _instrument(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
