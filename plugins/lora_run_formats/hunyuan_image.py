"""Moved to ``lora_run_hunyuan_image.lora`` (the family owns its LoRA layouts); kept for the engine backends."""
import sys

from lora_run_hunyuan_image import lora as _moved

sys.modules[__name__] = _moved
