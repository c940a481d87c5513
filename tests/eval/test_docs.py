"""docs/evaluation.md documents every embedder option and the thresholds the code uses."""
from __future__ import annotations

from pathlib import Path

import attrs

from lora_run_eval import metrics as M
from lora_run_eval.options import DlibOptions, OnnxOptions

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")


def test_every_embedder_option_is_in_a_table():
    for cls in (DlibOptions, OnnxOptions):
        for field in attrs.fields(cls):
            assert f"| `{field.name}` |" in PAGE, f"{cls.__name__}.{field.name} missing from docs/evaluation.md"
            assert field.metadata.get("doc")


def test_the_thresholds_on_the_page_are_the_code_s():
    expected = {
        "1 − SSIM < 0.08": M.CARBON_SSIM_DISTANCE == 0.08,
        "≤ 4 bits": M.CARBON_HASH_BITS == 4,
        "spread **< 0.03**": M.SAME_POSE_SPREAD == 0.03,
        "leak_rate ≥ 0.5": M.LEAK_RATE_MAX == 0.5,
        "**≥ 25 %**": M.MEMORISED_RATE == 0.25,
        "quality = identity − 0.5 · leak_rate − 0.5 · carbon_copy_rate":
            M.PENALTY_LEAK == M.PENALTY_CARBON == 0.5,
        "within **0.01**": M.TIE == 0.01,
        "< 0.01` **and**": M.IDENTITY_FLAT == 0.01,
        "> 0.05`": M.LOSS_FALLING == 0.05,
        "\\|yaw\\| < 0.15": M.FRONTAL_YAW == 0.15,
        "more than 0.05 below the peak": M.STRENGTH_DROP == 0.05,
        "1 − d̄ / (2τ)": M.score_from_distance(0.3, 0.6) == 0.75,
    }
    for text, same in expected.items():
        assert text in PAGE, text
        assert same, text
