"""Test-only worker for the kill/resume suite (never imported by lora-run itself).

``python fault_worker.py JOBS.json RESULTS.json`` imports torch and lora-run once, then runs each job in a
forked child (so 40 runs pay the import once). A job is ``{"argv": [...CLI args], "log": path, "fault": F}``;
F is null (run to the end) or one of:

- ``{"kind": "write", "at": N}``: the N-th safetensors file written (cache entry, checkpoint file, LoRA) gets
  only the first half of its bytes, then the process is SIGKILLed (a torn write);
- ``{"kind": "replace", "at": N}``: SIGKILL just before the N-th ``os.replace`` (an atomic rename);
- ``{"kind": "step", "at": N}``: SIGKILL after the N-th training micro-step's backward pass (mid-step:
  gradients computed, optimizer not yet stepped);
- ``{"kind": "signal", "at": N, "signal": "SIGTERM" | "SIGINT", "twice": bool}``: the process sends itself
  that signal during the N-th micro-step (once, or twice for an abort).

Before killing, the child writes what it was doing to ``<log>.fault.json``. The result per job is the
child's exit code, or the negative signal number that ended it.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys


EVENTS: list = []


def _note(job: dict, **info) -> None:
    with open(job["log"] + ".fault.json", "w", encoding="utf-8") as fh:
        json.dump(info, fh)


def _install(job: dict) -> None:
    """Wrap safetensors writes, os.replace and the micro-step; count each; kill or signal where asked.
    Every event is also recorded, and ``{"kind": "trace"}`` only records (written to <log>.trace.json)."""
    import safetensors.torch as st
    from lora_run_native.train import Trainer

    fault = job.get("fault") or {}
    kind, at = fault.get("kind"), int(fault.get("at", 0))
    if fault.get("signal") == "SIGHUP":    # a suite run under `nohup` passes SIGHUP ignored; a terminal does not
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    counts = {"write": 0, "replace": 0, "step": 0}
    events = EVENTS

    def due(event: str, **info) -> bool:
        counts[event] += 1
        events.append({"event": event, "n": counts[event], **info})
        return (kind == event or (kind == "signal" and event == "step")) and counts[event] == at

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        if due("write", path=str(filename)):
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            _note(job, kind=kind, at=at, path=str(filename))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(tensors, filename, metadata=metadata)
    st.save_file = save_file

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if due("replace", path=str(dst)):
            _note(job, kind=kind, at=at, src=str(src), path=str(dst))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)
    os.replace = replace

    real_micro = Trainer._micro_step

    def micro(self, state, batch, step, *a, **kw):
        hit = due("step", path=f"step {step + 1}")
        if hit and kind == "signal":
            sig = getattr(signal, fault["signal"])
            os.kill(os.getpid(), sig)
            if fault.get("twice"):
                os.kill(os.getpid(), sig)
        value = real_micro(self, state, batch, step, *a, **kw)
        if hit and kind == "step":
            _note(job, kind=kind, at=at, path=f"step {step + 1}")
            os.kill(os.getpid(), signal.SIGKILL)
        return value
    Trainer._micro_step = micro


def _child(job: dict) -> int:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = sys.stdout
    _install(job)
    from lora_run.cli import main

    try:
        return main(job["argv"])
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if (job.get("fault") or {}).get("kind") == "trace":
            with open(job["log"] + ".trace.json", "w", encoding="utf-8") as fh:
                json.dump(EVENTS, fh)


def main() -> None:
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    # import everything the children need once; no torch computation happens in this parent
    import torch  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    import peft  # noqa: F401
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import lora_run.cli  # noqa: F401
    import lora_run.plugins
    import lora_run_native.train  # noqa: F401
    import lora_run_flux.adapter  # noqa: F401

    lora_run.plugins.load_plugins()
    results = []
    for job in jobs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = _child(job)
            finally:
                try:
                    sys.stdout.flush()
                except Exception:  # noqa: BLE001
                    pass
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        results.append(code)
        with open(sys.argv[2], "w", encoding="utf-8") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
