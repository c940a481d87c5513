"""lora-run, a declarative plugin-based identity-LoRA trainer: its torch-free core (docs/architecture.md)."""

__version__ = "0.1.0"
