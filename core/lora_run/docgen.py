"""Moved to ``lora_run_devtools.docgen``; ``python -m lora_run.docgen [--check]`` still runs it."""
import sys

from lora_run_devtools.docgen import main, render  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
