"""Single-file text encoders and layout helpers shared by the family plugins' single-file loaders.

CLIP and T5 text encoders travel as single files in transformers' own key layout (``text_model.…`` /
``encoder.block.N…``), sometimes under another tool's prefix; their configs are inferred from the tensor
shapes when none is available. torch is not imported here.
"""
from __future__ import annotations

import re
from typing import Any


class LayoutError(ValueError):
    """The tensors do not have the expected layout (the message says what is missing)."""


def strip_prefixes(sd: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """``sd`` without the first of ``prefixes`` its keys carry (only the keys under it are kept)."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def count_blocks(sd: dict[str, Any], pattern: str) -> int:
    """How many numbered blocks ``pattern`` (one group: the number) finds among the keys."""
    found = {int(m[1]) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


_CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "clip_l.", "te1.")
_T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.", "te2.")


def clip_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """CLIP-L text-model tensors under their canonical ``text_model.`` names (prefixes of other tools removed)."""
    sd = strip_prefixes(dict(sd), _CLIP_PREFIXES)
    if "embeddings.token_embedding.weight" in sd:           # transformers 5 saves without `text_model.`
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise LayoutError("no text_model.embeddings.token_embedding.weight: not a CLIP text encoder")
    return {k: v for k, v in sd.items() if k.startswith("text_model.")}


def t5_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    sd = strip_prefixes(dict(sd), _T5_PREFIXES)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "shared.weight" not in sd or not any(k.startswith("encoder.block.") for k in sd):
        raise LayoutError("no shared.weight / encoder.block.* tensors: not a T5 encoder")
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    return {k: v for k, v in sd.items() if k.startswith(("encoder.", "shared."))}


def infer_clip_config(sd: dict[str, Any], *, bos: int, eos: int, pad: int) -> dict[str, Any]:
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": count_blocks(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": hidden,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
    }


def infer_t5_config(sd: dict[str, Any]) -> dict[str, Any]:
    vocab, d_model = sd["shared.weight"].shape
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = "wi_0" if gated else "wi"
    return {
        "model_type": "t5", "vocab_size": vocab, "d_model": d_model,
        "d_kv": sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        "d_ff": sd[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"].shape[0],
        "num_layers": count_blocks(sd, r"encoder\.block\.(\d+)\."), "num_heads": heads,
        "relative_attention_num_buckets":
            sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False,
        "use_cache": False, "tie_word_embeddings": False,
    }
