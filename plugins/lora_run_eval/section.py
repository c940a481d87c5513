"""The `[eval]` recipe table (``register_sections``), its rules, and running the evaluators it chooses after
training (``evaluate_run``). No heavy imports: `lora-run check` structures this class to validate a recipe."""
from __future__ import annotations

import time
from typing import Any

import attrs

from lora_run.schema import option
from lora_run_training.sections import MAX_SEED


DEFAULT_EVAL_PROMPTS = [
    "a close-up portrait photo of {trigger}, neutral expression, soft studio light",
    "a photo of {trigger} standing on a busy city street at night",
    "a photo of {trigger} wearing a red winter coat and a wool hat",
    "an oil painting of {trigger} in the style of an old master",
    "a close-up portrait photo of a person, neutral expression, soft studio light",
]


@attrs.frozen(kw_only=True)
class EvalSection:
    """The playbook's §7 evaluation protocol."""

    enabled: bool = option(True, "Evaluate at the end of the run.")
    prompts: list[str] = option(factory=lambda: list(DEFAULT_EVAL_PROMPTS), doc="Fixed prompt set: neutral "
                                "portrait, new environment, new outfit, new style, and the control prompt "
                                "(the last one: without `{trigger}` or the trigger itself). Each prompt once.")
    strengths: list[float] = option(factory=lambda: [0.5, 0.8, 1.0, 1.2], doc="LoRA strength sweep (0: the model "
                                    "without the LoRA).", ge=0.0)
    seeds: list[int] = option(factory=lambda: [1, 2, 3], doc="Seeds per prompt and strength.", ge=0, le=MAX_SEED)
    steps: int = option(28, "Inference steps.", ge=1, le=1000)
    guidance: float = option(3.5, "Inference guidance.", ge=0.0, le=100.0)
    width: int = option(768, "Image width.", ge=64, le=4096)
    height: int = option(768, "Image height.", ge=64, le=4096)
    embedder: str | None = option(None, "Embedder plugin the evaluation compares images with (`lora-run plugins` "
                                  "lists them). Unset: the installed embedder registered as the default.")
    embedder_options: dict[str, Any] = option(factory=dict, doc="Options of the embedder, checked by its options "
                                              "class.", path=("model", "detector"), keys="embedder")
    every_checkpoint: bool = option(False, "Also evaluate every saved checkpoint and pick the best.")
    evaluators: list[str] | None = option(None, "Evaluator plugins to run at the end, by name (`lora-run "
                                          "plugins` lists them); unset: every installed evaluator.")


def expand_prompt(template: str, trigger: str) -> str:
    """A prompt as generated: `{trigger}` replaced by the trigger token, runs of white space made one space."""
    return " ".join(template.replace("{trigger}", trigger.strip()).split())


def is_control(template: str, trigger: str) -> bool:
    """A control prompt is one without the token (playbook §7 "Control (no token)"): neither `{trigger}` nor the
    trigger itself written out, as a word in any case (the caption lint's rule for regularisation captions,
    ``lora_run_folder.has_trigger``). A prompt that writes
    "a photo of ohwx" names the subject as surely as "a photo of {trigger}" does."""
    from lora_run_folder import has_trigger

    token = " ".join(trigger.split())          # compared as generated: runs of white space are one space
    return "{trigger}" not in template and not (token and has_trigger(expand_prompt(template, token), token, True))


def with_defaults(section: EvalSection, plugins: Any) -> EvalSection:
    """An unset ``embedder`` becomes the installed embedder registered as the default."""
    if section.embedder is not None:
        return section
    return attrs.evolve(section, embedder=plugins.default("embedder"))


def check(recipe: Any, plugins: Any, problems: Any) -> None:
    """The evaluators named exist; with eval enabled, prompts are given and the embedder and its options are right."""
    from lora_run.run import structure_options, unset_message
    from lora_run_training.sections import check_grid

    ev = recipe.eval
    for n, name in enumerate(ev.evaluators or ()):
        plugins.find("evaluator", name, ("eval", "evaluators", n), problems)
    if not ev.enabled:
        return
    for key, values in (("prompts", ev.prompts), ("strengths", ev.strengths), ("seeds", ev.seeds)):
        if not values:
            problems.add(("eval", key), "must not be empty when eval is enabled")
    check_grid(problems, "eval", ev.strengths, ev.seeds)
    check_prompts(problems, ev.prompts, recipe.dataset.trigger)
    if ev.strengths and not any(ev.strengths):
        problems.add(("eval", "strengths"), "only strength 0 (the model without the LoRA): add the strengths to "
                     "evaluate the LoRA at, e.g. [0.5, 0.8, 1.0, 1.2] (0 may stay as the control)")
    if plugins.registry["embedder"] and ev.embedder is None:
        problems.add(("eval", "embedder"), unset_message("embedder", plugins))
    elif plugins.registry["embedder"]:
        reg = plugins.find("embedder", ev.embedder, ("eval", "embedder"), problems)
        if reg is not None:
            structure_options(reg, ev.embedder_options, ("eval", "embedder_options"), problems)


def check_prompts(problems: Any, prompts: list[str], trigger: str) -> None:
    """Each prompt once (as generated: a prompt given twice would be scored against itself as "the prompt is
    ignored", and its images count twice), and at least one prompt that names the subject: without one there is no
    identity to measure."""
    seen: dict[str, int] = {}
    for n, template in enumerate(prompts):
        text = expand_prompt(template, trigger)
        if text in seen:
            problems.add(("eval", "prompts", n), f"the same prompt as [eval.prompts[{seen[text]}]] once the trigger is "
                         "filled in: give each prompt once (two copies would be compared as different prompts and "
                         "read as \"the prompt is ignored\")")
        else:
            seen[text] = n
    if prompts and all(is_control(p, trigger) for p in prompts):
        problems.add(("eval", "prompts"), "no prompt names the subject (with `{trigger}` or the trigger "
                     f"\"{trigger.strip()}\"): every prompt is a control prompt and identity cannot be measured")


def lint_packages(recipe: Any, report: Any) -> None:
    """A warning before training when the evaluation the recipe asks for could not run: its face embedder's packages
    are missing (a plain `pip install lora-run` has no `eval` extra). The run would train and then skip the
    evaluation with a warning; `lora-run check` says so first."""
    from .faces import missing_packages

    ev = getattr(recipe, "eval", None)
    if ev is None or not ev.enabled or ev.embedder is None or (ev.evaluators is not None and "identity" not in ev.evaluators):
        return
    missing = missing_packages(ev.embedder)
    if missing:
        report.add("warning", "eval-packages-missing",
                   f"[eval] is enabled but the \"{ev.embedder}\" face embedder needs {', '.join(missing)}, not "
                   "installed: the run would train and then skip its evaluation. Install them with "
                   "pip install 'lora-run[eval]', or set [eval] enabled = false")


def lint_prompts(recipe: Any, report: Any) -> None:
    """A warning when the prompt set has no control prompt (playbook §7: "Control (no token)"): the evaluation could
    not tell a LoRA that draws the subject for every prompt (leakage, overtraining) from a healthy one."""
    ev = getattr(recipe, "eval", None)
    if ev is None or not ev.enabled or not ev.prompts:
        return
    if not any(is_control(p, recipe.dataset.trigger) for p in ev.prompts):
        report.add("warning", "eval-no-control-prompt",
                   "[eval] prompts has no control prompt (one without `{trigger}` and without the trigger "
                   f"\"{recipe.dataset.trigger.strip()}\"): the leakage check cannot run. Add one, e.g. \"a close-up "
                   "portrait photo of a person, neutral expression, soft studio light\"")


def evaluate_run(ctx: Any) -> None:
    """The evaluators ``[eval] evaluators`` names (unset: every installed one), in that order; the time they
    took goes to the run's ``timing``."""
    ev = getattr(ctx.recipe, "eval", None)
    if ev is None or not ev.enabled:
        return
    started = time.perf_counter()
    with ctx.run_dir.writing("eval"):          # what the evaluators write there is the run's
        for name in ev.evaluators if ev.evaluators is not None else ctx.plugins.names("evaluator"):
            ctx.plugins.get("evaluator", name, "eval.evaluators").factory(ctx).evaluate()
    ctx.artifacts.setdefault("timing", {})["evaluate_s"] = round(time.perf_counter() - started, 2)
