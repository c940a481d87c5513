"""Moved to ``lora_run_flux.lora`` (the family owns its LoRA layouts); this name is kept for the engine backends."""
import sys

from lora_run_flux import lora as _moved

sys.modules[__name__] = _moved
