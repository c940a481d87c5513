"""Moved to ``lora_run_devtools.testing`` (the pytest plugin for plugin authors); kept for older imports."""
import sys

from lora_run_devtools import testing as _moved

sys.modules[__name__] = _moved
