"""``python -m lora_run …`` is ``lora-run …``: the form launchers start on every process
(``torchrun --nproc-per-node 4 -m lora_run recipe.toml``, ``accelerate launch -m lora_run recipe.toml``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
