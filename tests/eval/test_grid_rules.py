"""The image grids' rules (`[eval]`'s and `[sample]`'s: the fields' bounds, and one rule for the rest,
`lora_run_training.sections.check_grid`), checked before training: every prompt × strength × seed image has its own file, so a
strength or seed given twice (or two strengths that print alike in the file name) would overwrite an image and be
scored as its own carbon copy; an empty list would evaluate nothing; a seed out of the training seed's range and a
negative strength are refused. Each rule is shown by the command line a user runs, exit 2, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

RECIPE = """
backend = "native"
[model]
family = "flux.1-dev"
source = "{model}"
[dataset]
path = "{dataset}"
trigger = "ohwx"
min_images = 2
[train]
steps = 2
"""


@pytest.fixture()
def recipe(tmp_path, subject_dir):
    (tmp_path / "model").mkdir()
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(model=tmp_path / "model", dataset=subject_dir), encoding="utf-8")
    return path


def check(recipe, *sets):
    args = [sys.executable, "-m", "lora_run", "check", str(recipe)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, cwd=recipe.parent)


@pytest.mark.parametrize("assignment, message", [
    ("eval.seeds=[1, 2, 1]", "[eval.seeds] 1, 1 name the same images: give each value once"),
    ("eval.strengths=[1.0, 0.5, 1.0000001]", "[eval.strengths] 1.0, 1.0000001 name the same images"),
    ("eval.strengths=[]", "[eval.strengths] must not be empty when eval is enabled"),
    ("eval.seeds=[]", "[eval.seeds] must not be empty when eval is enabled"),
    ("eval.seeds=[3, -1]", "[eval.seeds[1]] must be >= 0, got -1"),
    ("eval.seeds=[4294967296]", "[eval.seeds[0]] must be <= 4294967295, got 4294967296"),
    ("eval.strengths=[-0.5]", "[eval.strengths[0]] must be >= 0"),
    ("sample.seeds=[7, 7]", "[sample.seeds] 7, 7 name the same images"),
    ("sample.seeds=[99999999999999999999]", "[sample.seeds[0]] must be <= 4294967295"),
    ("sample.strengths=[1.0, 1.0]", "[sample.strengths] 1.0, 1.0 name the same images"),
    ("sample.strengths=[-1.0]", "[sample.strengths[0]] must be >= 0"),
    # a prompt given twice (as generated: the trigger filled in, white space folded) would be read as "ignored"
    ('eval.prompts=["a photo of {trigger}", "a photo of  ohwx", "a person"]',
     "[eval.prompts[1]] the same prompt as [eval.prompts[0]] once the trigger is filled in"),
    # only strength 0: the LoRA itself is never evaluated
    ("eval.strengths=[0.0]", "[eval.strengths] only strength 0 (the model without the LoRA)"),
    # no prompt names the subject: nothing to measure
    ('eval.prompts=["a photo of a person", "a man"]', "[eval.prompts] no prompt names the subject"),
    # τ = 1 − min_similarity must stay above 0 (the identity score divides by it)
    ('eval.embedder_options={model = "arcface.onnx", min_similarity = 1.0}\neval.embedder="onnx"',
     "[eval.embedder_options.min_similarity] must be < 1.0, got 1.0"),
])
def test_a_grid_that_would_overwrite_or_evaluate_nothing_is_refused(recipe, assignment, message):
    done = check(recipe, *assignment.split("\n"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("assignment", ["eval.strengths=[1e-05, 1e-06, 0.0, 2.0]", "eval.seeds=[0, 4294967295]",
                                        "eval.seeds=[1, 1]\neval.enabled=false",
                                        'eval.prompts=["a photo of {trigger}", "a photo of ohwx, smiling", "a person"]'])
def test_distinct_values_and_a_disabled_evaluation_pass(recipe, assignment):
    """Controls: values that differ in the file name, the seed range's ends, and the rules off with eval off."""
    done = check(recipe, *assignment.split("\n"))
    assert "[eval." not in done.stderr, done.stderr


def test_a_prompt_set_without_a_control_prompt_is_warned_about(recipe):
    """Playbook §7: the fixed set has a control prompt (no token); without one the leakage check cannot run."""
    done = check(recipe, 'eval.prompts=["a photo of {trigger}", "ohwx at the beach"]')
    assert "eval-no-control-prompt" in done.stdout + done.stderr
    done = check(recipe)        # control: the default prompts have one
    assert "eval-no-control-prompt" not in done.stdout + done.stderr
