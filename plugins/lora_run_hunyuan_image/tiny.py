"""Tiny randomly initialised HunyuanImage-2.1 models, built offline (tests).

``build_tiny_hunyuan_image(folder)`` writes a complete diffusers ``HunyuanImagePipeline`` folder: an offline
byte-level Qwen2 tokenizer (with the chat special tokens the prompt template uses), a 3-layer
``Qwen2_5_VLForConditionalGeneration`` (text path; a 1-layer vision tower), a ``ByT5Tokenizer`` + 1-layer
``T5EncoderModel`` (the glyph encoder), a 64-channel **32×** ``AutoencoderKLHunyuanImage`` (6 levels, 32–128
channels) and a ``HunyuanImageTransformer2DModel`` with one double, one single and one refiner block.
``write_hunyuan_image_single_files(folder, out)`` writes the same model as the ComfyUI single files
(transformer and VAE in Tencent's layout, ``qwen_2.5_vl_7b``, ``byt5_small_glyphxl``) plus a folder with the
tokenizers and the tiny Qwen's config. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from lora_run_native.tinykit import read_component, save_tensors, seeded

QWEN_HIDDEN = 32
BYT5_DIM = 32


def _qwen_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok



def build_tiny_hunyuan_image(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random HunyuanImage-2.1-layout ``HunyuanImagePipeline`` to ``folder``; returns it."""
    from diffusers import (AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageTransformer2DModel)
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lora_run_native.adapters.base import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    qwen_tok = _qwen_tokenizer()
    byt5_tok = ByT5Tokenizer()
    with seeded(seed):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"vocab_size": len(qwen_tok), "hidden_size": QWEN_HIDDEN, "intermediate_size": 64,
                         "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "max_position_embeddings": 2048, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                         "tie_word_embeddings": False},
            vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": QWEN_HIDDEN, "fullatt_block_indexes": [0]},
            vocab_size=len(qwen_tok), tie_word_embeddings=False))
        byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tok), d_model=BYT5_DIM, d_kv=16, d_ff=64, num_layers=1,
                                       num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                       use_cache=False))
        vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=64,
                                        block_out_channels=(32, 32, 32, 32, 64, 128), layers_per_block=1,
                                        spatial_compression_ratio=32, sample_size=64, scaling_factor=0.75289)
        transformer = HunyuanImageTransformer2DModel(
            in_channels=64, out_channels=64, num_attention_heads=2, attention_head_dim=32, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=QWEN_HIDDEN,
            text_embed_2_dim=BYT5_DIM, rope_axes_dim=(16, 16))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = HunyuanImagePipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=qwen_tok,
                                text_encoder_2=byt5, tokenizer_2=byt5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def write_hunyuan_image_single_files(folder: str | Path, out: str | Path) -> dict[str, Path]:
    """The tiny HunyuanImage model in ``folder`` as ComfyUI-style single files: ``hunyuanimage2.1.safetensors``
    (HunyuanImage's own transformer layout), ``hunyuan_image_2.1_vae.safetensors``,
    ``qwen_2.5_vl_7b.safetensors``, ``byt5_small_glyphxl.safetensors``, plus ``tokenizers/`` (``tokenizer``,
    ``tokenizer_2``). Returns the paths keyed ``transformer``, ``vae``, ``qwen``, ``byt5``, ``tokenizers``."""
    import shutil

    from .files import qwen_diffusers_to_comfy, transformer_diffusers_to_original, vae_diffusers_to_original

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"transformer": out / "hunyuanimage2.1.safetensors", "vae": out / "hunyuan_image_2.1_vae.safetensors",
             "qwen": out / "qwen_2.5_vl_7b.safetensors", "byt5": out / "byt5_small_glyphxl.safetensors",
             "tokenizers": out / "tokenizers"}
    save_tensors(transformer_diffusers_to_original(read_component(folder, "transformer")), paths["transformer"])
    save_tensors(vae_diffusers_to_original(read_component(folder, "vae")), paths["vae"])
    save_tensors(qwen_diffusers_to_comfy(read_component(folder, "text_encoder")), paths["qwen"])
    save_tensors(read_component(folder, "text_encoder_2"), paths["byt5"])
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, paths["tokenizers"] / sub, dirs_exist_ok=True)
    # the tiny Qwen is not Qwen2.5-VL-7B, so its config travels with the tokenizers (as a hub id would give it)
    (paths["tokenizers"] / "text_encoder").mkdir(exist_ok=True)
    shutil.copy(folder / "text_encoder" / "config.json", paths["tokenizers"] / "text_encoder" / "config.json")
    return paths
