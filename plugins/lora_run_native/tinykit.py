"""Helpers for the tiny model builders of the family plugins (tests and the demo): offline tokenizers and a
seeded scope. torch and transformers are imported inside the functions."""
from __future__ import annotations

import contextlib
import string
from typing import Any, Iterator


def t5_tokenizer(max_length: int) -> Any:
    """An offline unigram T5 tokenizer over lower-case letters, digits and a few punctuation marks."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + ",.!?'-{}":
        pieces += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Module initialisation inside is seeded with ``seed``; torch's global generator is restored after."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def read_component(folder: Any, sub: str) -> dict[str, Any]:
    """Every tensor of a diffusers component folder (``folder/sub/*.safetensors``), merged."""
    from pathlib import Path

    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted((Path(folder) / sub).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def save_tensors(state: dict[str, Any], path: Any) -> None:
    """A state dict as one safetensors file (tensors made contiguous first)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
