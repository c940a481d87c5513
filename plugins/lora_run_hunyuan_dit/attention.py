"""Hunyuan-DiT's attention through diffusers' attention dispatch.

diffusers' ``HunyuanAttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` itself, so an attention backend
set on the model (``_attention_backend``, as the native backend sets FlashAttention-4) never reaches it.
``DispatchingHunyuanAttnProcessor`` computes the same attention — q/k layer norms, rotary embeddings on the
self-attention's query and key and on the cross-attention's query only, the output projection — in the
(batch, tokens, heads, head_dim) layout of ``dispatch_attention_fn``, with the backend set on it. With no
backend set, dispatch runs PyTorch's SDPA, as diffusers' processor does. A call outside what the Hunyuan-DiT
blocks make (an attention mask, 4-D input, a spatial or group norm, a residual connection or output rescale)
goes to diffusers' own processor unchanged.
"""
from __future__ import annotations

from typing import Any


class DispatchingHunyuanAttnProcessor:
    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self) -> None:
        from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

        self.fallback = HunyuanAttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.residual_connection or attn.rescale_output_factor != 1.0):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(context).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(context).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def use_dispatching_attention(transformer: Any) -> int:
    """Give every attention module of a ``HunyuanDiT2DModel`` the dispatching processor; returns how many."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in transformer.modules():
        if isinstance(module, Attention):
            module.set_processor(DispatchingHunyuanAttnProcessor())
            count += 1
    return count
