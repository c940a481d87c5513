"""lora-run: a declarative, plugin-based identity-LoRA trainer.

The core imports no torch: recipes, plugins, the CLI and run orchestration live here; everything that
trains, converts or evaluates lives in plugins.
"""
from __future__ import annotations

__version__ = "0.1.0"
