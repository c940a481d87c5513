"""The shipped sd-scripts option data and the validators built on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_run_kohya import refresh_data, spec

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "tools-data" / "sd-scripts"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared tools-data not present")
def test_shipped_data_matches_the_shared_extraction():
    fresh = refresh_data.render(refresh_data.build(SHARED))
    assert spec.DATA.read_text("utf-8") == fresh, "run `python -m lora_run_kohya.refresh_data`"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared tools-data not present")
def test_every_shared_option_is_known_with_its_type():
    for script, name in refresh_data.SCRIPTS.items():
        for entry in json.loads((SHARED / name).read_text()):
            ours = spec.options(script)[entry["dest"]]
            assert ours["type"] == entry["type"]
            assert ours.get("nargs") == (entry["nargs"] if entry["nargs"] not in (None, 0) else None)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "1e-4", "expects float"),          # sd-scripts would keep the string and crash later
    ("learning_rate", 1, "write 1.0, not 1"),
    ("network_dim", 16.0, "expects int"),
    ("timestep_sampling", "bogus", "must be one of"),     # sd-scripts accepts it silently
    ("unknown_key_xyz", 1, "not an option"),
    ("lerning_rate", 1e-4, "did you mean `learning_rate`"),
    ("network_args", "train_blocks=all", "takes a list"),
    ("text_encoder_lr", [1e-4, "x"], "list of float"),
    ("cache_latents", "true", "expects bool"),
    ("huber_schedule", "snr ", "must be one of"),
])
def test_check_option_refuses_what_sd_scripts_would_swallow(key, value, message):
    why = spec.check_option("flux_train_network.py", key, value)
    assert why is not None and message in why


@pytest.mark.parametrize("key, value", [("learning_rate", 1e-4), ("lr_warmup_steps", 10), ("lr_warmup_steps", 0.1),
                                        ("network_args", ["split_qkv=True"]), ("text_encoder_lr", [1e-5]),
                                        ("guidance_scale", 1.0), ("dataset_config", "/x.toml"), ("fp8_base", True)])
def test_check_option_accepts_native_types(key, value):
    assert spec.check_option("flux_train_network.py", key, value) is None


def test_script_specific_options():
    assert spec.check_option("hunyuan_image_train_network.py", "fp8_scaled", True) is None
    assert "not an option" in spec.check_option("flux_train_network.py", "fp8_scaled", True)
    assert "not an option" in spec.check_option("hunyuan_image_train_network.py", "guidance_scale", 1.0)


def test_check_config_flattens_sections_and_finds_repeats():
    problems = spec.check_config("flux_train_network.py", {"a": {"learning_rate": 1e-4},
                                                           "b": {"learning_rate": 2e-4, "nested": {"x": 1}},
                                                           "seed": 3})
    assert any("repeats [a]" in p for p in problems)
    assert any("nested tables" in p for p in problems)
    assert not any("seed" in p for p in problems)


def test_check_dataset_mirrors_the_voluptuous_schema():
    good = {"general": {"resolution": 512, "caption_extension": ".txt", "enable_bucket": True},
            "datasets": [{"batch_size": 1, "subsets": [{"image_dir": "/d", "is_reg": False, "num_repeats": 2}]}]}
    assert spec.check_dataset(good) == []
    bad = {"general": {"interpolation_type": "lanczos", "validation_split": 0},
           "datasets": [{"subsets": [{"num_repeats": 1.5, "caption_extention": ".txt"}]}], "extra": {}}
    problems = "\n".join(spec.check_dataset(bad))
    assert "`interpolation_type`: extra keys not allowed" in problems     # the doc bug sd-scripts.md notes
    assert "`validation_split` expects float, got int 0" in problems      # 0 fails, 0.0 passes
    assert "`num_repeats` expects int" in problems
    assert "`image_dir` is required" in problems
    assert "top level `extra`" in problems
    assert "non-empty" in "\n".join(spec.check_dataset({"general": {}}))
    assert spec.check_dataset({"datasets": [{"resolution": [512, 768], "subsets": [{"image_dir": "/d"}]}]}) == []
