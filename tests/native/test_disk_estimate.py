"""`outputs.lora_files_bytes` (the disk-space check's LoRA size) against the files
`write_loras` really writes, for every built-in family and every LoRA format it writes: a conversion that lays
tensors out differently (kohya's fused layers, ComfyUI's names) must be counted as written."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from lora_run_devtools.testing import build_tiny, parse_recipe_text  # noqa: E402

FAMILIES = ("flux.1-dev", "hunyuan-image-2.1", "hunyuan-dit-1.2", "flux.2-klein")


def _tensor_bytes(path) -> int:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_estimate_is_what_write_loras_writes(family, precision, tmp_path):
    from lora_run_native.adapters import adapter_class
    from lora_run_native.outputs import HEADER_BYTES, lora_files_bytes, lora_state_dict, write_loras

    formats = adapter_class(family).lora_formats         # every format the native backend writes for it
    model = build_tiny(family, tmp_path / "model")
    recipe = parse_recipe_text(f'[model]\nfamily = "{family}"\nsource = "{model}"\noffline = true\n'
                               f'[dataset]\npath = "{tmp_path}"\n[lora]\nrank = 4\ntargets = "all-linear"\n'
                               f'[output]\nsave_precision = "{precision}"\nformats = {json.dumps(list(formats))}\n')
    adapter = adapter_class(family)(recipe, device="cpu")
    transformer = adapter.load_transformer()
    targets = adapter.lora_target_modules(transformer, "all-linear", recipe.lora.modules)
    adapter.inject_lora(transformer, targets, rank=4, alpha=4.0, dropout=0.0, init=recipe.lora.init)
    written = write_loras(adapter, tmp_path / "out", "x", lora_state_dict(transformer), {}, recipe=recipe,
                          metadata={})
    assert sorted(written) == sorted(formats)
    files = [p for path in written.values() for p in ([path] if path.is_file() else path.rglob("*.safetensors"))]
    real = sum(_tensor_bytes(p) for p in files)
    estimate = lora_files_bytes(adapter, lora_state_dict(transformer), {}, recipe=recipe)
    assert estimate - len(files) * HEADER_BYTES == real
    assert sum(p.stat().st_size for p in files) <= estimate
