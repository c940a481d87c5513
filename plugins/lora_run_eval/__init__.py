"""Built-in evaluation plugin: the playbook's §7 identity protocol.

Registers the `identity` evaluator (end of run: generation grid → face metrics → best checkpoint →
`<run>/eval/report.html` + `metrics.json`) and two face embedders, `dlib` (offline default) and `onnx`
(user-supplied ArcFace). It adds the `[eval]` recipe table (``register_sections``, :mod:`.section`), runs the evaluators it
chooses after training (``evaluate_run``) and adds the `eval` and `score` commands to `lora-run` through
`register_commands`. It also collects the training loss (`step_finished`) and the
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


def _eval_arguments(p: Any) -> None:
    from lora_run_commands.arguments import path_argument, recipe_arguments

    recipe_arguments(p)
    p.add_argument("--lora", action="append", required=True, metavar="FILE", type=path_argument,
                   help="LoRA file; repeat to compare checkpoints and pick the best")
    p.add_argument("--output-dir", type=path_argument,
                   help="where the report goes (default: eval-<lora name> next to the LoRA)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in that folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _score_arguments(p: Any) -> None:
    from lora_run_commands.arguments import path_argument

    p.add_argument("--subject", required=True, metavar="DIR", type=path_argument, help="the subject's photos")
    p.add_argument("--images", required=True, metavar="DIR", type=path_argument, help="generated images to score")
    p.add_argument("--control", metavar="DIR", type=path_argument,
                   help="images generated without the trigger (leakage check)")
    p.add_argument("--embedder", default="dlib", help="face embedder plugin: dlib (default) or onnx")
    p.add_argument("--model", metavar="FILE", type=path_argument, help="onnx: ArcFace ONNX model")
    p.add_argument("--detector", metavar="FILE", type=path_argument, help="onnx: SCRFD ONNX face detector (optional)")
    p.add_argument("--report", metavar="FILE", type=path_argument, help="also write an HTML report to FILE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


@hookimpl
def register_commands(register):
    register("eval", _cmd_eval, configure=_eval_arguments,
             description="evaluate LoRA files with the recipe's [eval] protocol (grid, identity, report)")
    register("score", _cmd_score, configure=_score_arguments,
             description="score a folder of images against the subject's photos (any trainer)")


@hookimpl
def register_evaluators(register):
    register("identity", _identity, kind="evaluator",
             description="playbook §7: prompt × strength × seed grid, face identity, leakage, diversity, "
                         "best checkpoint, HTML report")
    register("dlib", _dlib, kind="embedder", options=DlibOptions, default=True,
             description="offline face embedder: dlib HOG detector, 5-point landmarks, 128-d ResNet (L2 < 0.6)")
    register("onnx", _onnx, kind="embedder", options=OnnxOptions,
             description="user-supplied ArcFace ONNX model (+ optional SCRFD detector), cosine similarity")


@hookimpl
def register_sections(register):
    from . import section

    register("eval", options=section.EvalSection, check=section.check, with_defaults=section.with_defaults,
             description="the identity evaluation after training (prompts, strengths, seeds, embedder)")


@hookimpl
def lint_dataset(recipe, items, report):
    from .section import lint_packages, lint_prompts

    lint_packages(recipe, report)
    lint_prompts(recipe, report)


@hookimpl
def evaluate_run(run):
    from .section import evaluate_run

    evaluate_run(run)


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
