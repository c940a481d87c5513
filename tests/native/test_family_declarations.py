"""What a family registers (LoRA formats, σ samplers) agrees with what its native adapter does."""
from __future__ import annotations

from lora_run.plugins import load_plugins
from lora_run_native.adapters import adapter_classes


def test_registered_formats_and_samplers_match_the_native_adapters():
    plugins = load_plugins()
    families = plugins.registry["family"]
    classes = adapter_classes(families)
    assert classes, "no family with a native adapter installed"
    for name, cls in classes.items():
        reg = families[name]
        assert set(cls.lora_formats) <= set(reg.lora_formats), (name, cls.lora_formats, reg.lora_formats)
        assert set(reg.default_formats) <= set(reg.lora_formats), name
        for sampler in reg.samplers:   # a sampler a family registers is one its own adapter honours
            assert f"timestep_sampling:{sampler}" in cls.features, (name, sampler)
