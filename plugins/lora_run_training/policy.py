"""The playbook's training rules a recipe may break on purpose (its keys' ranges allow it): §5's text-encoder
policy and §9's failure causes that show in a recipe. Warnings in the dataset lint's table (``lint_dataset``, run
by `lora-run check` and before every run), each naming the key and the rule; none stops a run."""
from __future__ import annotations

from typing import Any

#: §5: "LR = 0.3–0.5 × UNet LR"
TE_LR_RATIO = (0.3, 0.5)
#: §5: "Train TE for ≤50% of steps"
TE_TRAIN_FRACTION = 0.5
#: §5: "Do NOT train TE when: Dataset < ~15 images"
TE_MIN_IMAGES = 15


def lint_policy(recipe: Any, report: Any) -> None:
    """Add the policy warnings to ``report`` (after the dataset's own lint: it counts the usable subject images)."""
    te, train = getattr(recipe, "text_encoder", None), getattr(recipe, "train", None)
    if te is not None and te.train:
        low, high = TE_LR_RATIO
        if not low <= te.lr_ratio <= high:
            report.add("warning", "te-lr-ratio", f"[text_encoder.lr_ratio] is {te.lr_ratio:g}; the playbook trains "
                       f"the text encoder at {low:g}–{high:g} × the transformer LR (§5)")
        if te.train_fraction > TE_TRAIN_FRACTION:
            report.add("warning", "te-train-fraction", f"[text_encoder.train_fraction] is {te.train_fraction:g}: "
                       f"the text encoder trains for more than {TE_TRAIN_FRACTION:.0%} of the steps; the playbook "
                       "freezes it by then for the final refinement (§5; an overfit text encoder makes prompts "
                       "brittle, §9)")
        if not recipe.dataset.regularization:
            report.add("warning", "te-no-reg", "[text_encoder.train] is on without regularisation images; the "
                       "playbook trains the text encoder with prior regularisation (§5): add a "
                       "[[dataset.regularization]] set")
        subject = sum(1 for item in report.usable if not item.is_reg)
        if 0 < subject < TE_MIN_IMAGES:
            report.add("warning", "te-few-images", f"[text_encoder.train] is on with {subject} usable subject "
                       f"image{'s' * (subject != 1)}; the playbook does not train the text encoder on fewer than "
                       f"~{TE_MIN_IMAGES} (§5)")
    if train is not None and train.mixed_precision == "fp16":
        report.add("warning", "fp16", "[train.mixed_precision] is \"fp16\": fp16 overflow is a cause of NaNs "
                   "(playbook §9); use \"bf16\"")
