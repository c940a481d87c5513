"""Tiny randomly initialised FLUX-architecture models, built offline (tests and the demo).

``build_tiny_flux(folder)`` writes a complete diffusers ``FluxPipeline`` folder: offline-built CLIP (byte
level BPE) and T5 (unigram) tokenizers, a 1-layer CLIP text model, a 1-layer T5 encoder, a 16-channel 8×
``AutoencoderKL`` with the FLUX scaling/shift, and a ``FluxTransformer2DModel`` with one double and one single
block and the guidance embedder (FLUX.1-dev's layout). ``write_single_files(folder, out)`` writes the same
model as the single files ComfyUI users have (BFL transformer, LDM ``ae``, ``clip_l``, ``t5xxl``) plus a
folder with only the tokenizers. Nothing is downloaded; the whole build takes about a second.
"""
from __future__ import annotations

from pathlib import Path

from lora_run_native.tinykit import read_component, save_tensors, seeded, t5_tokenizer

#: Sizes of the tiny model; the FLUX conventions ``flux_files`` uses to infer configs hold for them.
TINY = {
    "clip_hidden": 64, "clip_layers": 1, "clip_max_tokens": 77,
    "t5_d_model": 32, "t5_heads": 2, "t5_layers": 1,
    "vae_channels": (32, 32, 32, 32),
    "head_dim": 32, "heads": 2, "double": 1, "single": 1,
}


def _tokenizers():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY["clip_max_tokens"])
    return clip, t5_tokenizer(512)


def build_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-dev-layout ``FluxPipeline`` to ``folder`` (diffusers layout); returns it."""
    from lora_run_native.adapters.base import quiet_libraries

    quiet_libraries()       # before diffusers' import: without torchvision, transformers 5 warns on it (`lora-run demo`)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    clip_tok, t5_tok = _tokenizers()
    with seeded(seed):
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TINY["clip_hidden"], intermediate_size=2 * TINY["clip_hidden"],
            num_hidden_layers=TINY["clip_layers"], num_attention_heads=max(1, TINY["clip_hidden"] // 64),
            max_position_embeddings=TINY["clip_max_tokens"], hidden_act="quick_gelu", projection_dim=TINY["clip_hidden"],
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=TINY["t5_d_model"], d_kv=TINY["t5_d_model"] // TINY["t5_heads"],
            d_ff=2 * TINY["t5_d_model"], num_layers=TINY["t5_layers"], num_heads=TINY["t5_heads"],
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
        channels = TINY["vae_channels"]
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels, layers_per_block=1,
            latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False)
        hd = TINY["head_dim"]
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=TINY["double"], num_single_layers=TINY["single"],
            attention_head_dim=hd, num_attention_heads=TINY["heads"], joint_attention_dim=TINY["t5_d_model"],
            pooled_projection_dim=TINY["clip_hidden"], guidance_embeds=True,
            axes_dims_rope=(hd // 8, hd * 7 // 16, hd * 7 // 16))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def write_single_files(folder: str | Path, out: str | Path) -> dict[str, Path]:
    """Write the model in ``folder`` as single files: ``flux1-dev.safetensors`` (BFL layout, under
    ``model.diffusion_model.``), ``ae.safetensors`` (LDM layout), ``clip_l.safetensors``,
    ``t5xxl.safetensors``, plus ``tokenizers/`` (only ``tokenizer`` and ``tokenizer_2``). Returns the paths
    keyed ``transformer``, ``vae``, ``clip_l``, ``t5xxl``, ``tokenizers``."""
    import shutil

    from .files import transformer_diffusers_to_bfl, vae_diffusers_to_ldm

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"transformer": out / "flux1-dev.safetensors", "vae": out / "ae.safetensors",
             "clip_l": out / "clip_l.safetensors", "t5xxl": out / "t5xxl.safetensors", "tokenizers": out / "tokenizers"}
    bfl = transformer_diffusers_to_bfl(read_component(folder, "transformer"))
    save_tensors({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, paths["transformer"])
    save_tensors(vae_diffusers_to_ldm(read_component(folder, "vae")), paths["vae"])
    clip = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in read_component(folder, "text_encoder").items()}
    save_tensors(clip, paths["clip_l"])           # ComfyUI's clip_l.safetensors names tensors text_model.*
    t5 = read_component(folder, "text_encoder_2")
    t5.pop("encoder.embed_tokens.weight", None)
    save_tensors(t5, paths["t5xxl"])
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, paths["tokenizers"] / sub, dirs_exist_ok=True)
    return paths
