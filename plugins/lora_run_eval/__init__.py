"""Built-in evaluation plugin: the playbook's §7 identity protocol.

Registers the `identity` evaluator (end of run: generation grid → face metrics → best checkpoint →
`<run>/eval/report.html` + `metrics.json`) and two face embedders, `dlib` (offline default) and `onnx`
(user-supplied ArcFace). The `eval` and `score` commands of `lora-run` reach this plugin through the
evaluator registration's `commands` meta. It also collects the training loss (`step_finished`) and the
saved checkpoints (`checkpoint_saved`). Heavy imports (numpy, dlib, onnxruntime, torch) happen inside
functions only.
"""
from __future__ import annotations

from typing import Any

from lora_run.hookspecs import hookimpl

from .options import DlibOptions, OnnxOptions


def _identity(ctx: Any) -> Any:
    from .evaluator import IdentityEvaluator

    return IdentityEvaluator(ctx)


def _dlib(options: DlibOptions | None = None) -> Any:
    from .faces import DlibEmbedder

    return DlibEmbedder(options)


def _onnx(options: OnnxOptions) -> Any:
    from .faces import OnnxEmbedder

    return OnnxEmbedder(options)


def _cmd_eval(args: Any, plugins: Any) -> int:
    from .evaluator import cmd_eval

    return cmd_eval(args, plugins)


def _cmd_score(args: Any, plugins: Any) -> int:
    from .evaluator import cmd_score

    return cmd_score(args, plugins)


@hookimpl
def register_evaluators(register):
    register("identity", _identity, kind="evaluator",
             description="playbook §7: prompt × strength × seed grid, face identity, leakage, diversity, "
                         "best checkpoint, HTML report",
             commands={"eval": _cmd_eval, "score": _cmd_score})
    register("dlib", _dlib, kind="embedder", options=DlibOptions,
             description="offline face embedder: dlib HOG detector, 5-point landmarks, 128-d ResNet (L2 < 0.6)")
    register("onnx", _onnx, kind="embedder", options=OnnxOptions,
             description="user-supplied ArcFace ONNX model (+ optional SCRFD detector), cosine similarity")


@hookimpl
def step_finished(run, step, metrics):
    from .losslog import log_for

    log = log_for(run)
    if log is not None and isinstance(metrics, dict):
        log.add(step, metrics)


@hookimpl
def checkpoint_saved(run, step, path):
    from .losslog import log_for

    log = log_for(run)
    if log is not None:
        log.checkpoints.append({"step": int(step), "path": str(path)})
        log.flush()


@hookimpl
def run_finished(run):
    from .losslog import finish

    finish(run)
