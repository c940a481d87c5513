"""Moved to ``lora_run_flux.tiny`` (the family owns its tiny builder); this name is kept for bench/ scripts."""
import sys

from lora_run_flux import tiny as _moved

sys.modules[__name__] = _moved
