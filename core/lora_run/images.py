"""Moved to ``lora_run_folder.images`` (the dataset plugin opens images); this name is kept for older imports."""
import sys

from lora_run_folder import images as _moved

sys.modules[__name__] = _moved
