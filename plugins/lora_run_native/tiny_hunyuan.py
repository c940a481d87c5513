"""Tiny randomly initialised Hunyuan-architecture models, built offline (tests).

``build_tiny_hunyuan_image(folder)`` writes a complete diffusers ``HunyuanImagePipeline`` folder: an offline
byte-level Qwen2 tokenizer (with the chat special tokens the prompt template uses), a 3-layer
``Qwen2_5_VLForConditionalGeneration`` (text path; a 1-layer vision tower), a ``ByT5Tokenizer`` + 1-layer
``T5EncoderModel`` (the glyph encoder), a 64-channel **32×** ``AutoencoderKLHunyuanImage`` (6 levels, 32–128
channels) and a ``HunyuanImageTransformer2DModel`` with one double, one single and one refiner block.
``write_hunyuan_image_single_files(folder, out)`` writes the same model as the ComfyUI single files
(transformer and VAE in Tencent's layout, ``qwen_2.5_vl_7b``, ``byt5_small_glyphxl``) plus a folder with the
tokenizers and the tiny Qwen's config.

``build_tiny_hunyuan_dit(folder)`` writes a ``HunyuanDiTPipeline`` folder: BERT (WordPiece tokenizer, 77
tokens) + mT5-style T5 encoder (unigram tokenizer, 256 tokens), a 4-channel 8× ``AutoencoderKL`` with the
SDXL scaling factor, a 4-block ``HunyuanDiT2DModel`` (long skips, ``learn_sigma``) and a v-prediction
``DDPMScheduler`` written from the release's published scheduler config (v1.2: β_end 0.018; v1.1, with the
style/size-conditioned transformer: β_end 0.03) — literal values here, deliberately not the adapter's table, so
a wrong adapter default cannot hide behind the same constant. ``scheduler`` overrides the config (``False``:
no ``scheduler/`` folder). Nothing is downloaded.
"""
from __future__ import annotations

import string
from pathlib import Path

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


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + ",.!?'-{}":
        pieces += [(ch, -5.0), ("\u2581" + ch, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _seeded(seed: int):
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.random.set_rng_state(state)
    return scope()


def build_tiny_hunyuan_image(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random HunyuanImage-2.1-layout ``HunyuanImagePipeline`` to ``folder``; returns it."""
    from diffusers import (AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageTransformer2DModel)
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .adapters.base import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    qwen_tok = _qwen_tokenizer()
    byt5_tok = ByT5Tokenizer()
    with _seeded(seed):
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

    from safetensors.torch import load_file, save_file

    from .hunyuan_files import qwen_diffusers_to_comfy, transformer_diffusers_to_original, vae_diffusers_to_original

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def read(sub: str) -> dict:
        sd = {}
        for f in sorted((folder / sub).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    paths = {"transformer": out / "hunyuanimage2.1.safetensors", "vae": out / "hunyuan_image_2.1_vae.safetensors",
             "qwen": out / "qwen_2.5_vl_7b.safetensors", "byt5": out / "byt5_small_glyphxl.safetensors",
             "tokenizers": out / "tokenizers"}
    save_file({k: v.contiguous() for k, v in transformer_diffusers_to_original(read("transformer")).items()},
              str(paths["transformer"]))
    save_file({k: v.contiguous() for k, v in vae_diffusers_to_original(read("vae")).items()}, str(paths["vae"]))
    save_file({k: v.contiguous() for k, v in qwen_diffusers_to_comfy(read("text_encoder")).items()},
              str(paths["qwen"]))
    save_file({k: v.contiguous() for k, v in read("text_encoder_2").items()}, str(paths["byt5"]))
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, paths["tokenizers"] / sub, dirs_exist_ok=True)
    # the tiny Qwen is not Qwen2.5-VL-7B, so its config travels with the tokenizers (as a hub id would give it)
    (paths["tokenizers"] / "text_encoder").mkdir(exist_ok=True)
    shutil.copy(folder / "text_encoder" / "config.json", paths["tokenizers"] / "text_encoder" / "config.json")
    return paths


#: Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers and -v1.1-Diffusers ``scheduler/scheduler_config.json`` (the
#: values that matter for training; written out here on purpose, see the module docstring).
PUBLISHED_SCHEDULERS = {
    "1.2": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.018, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1},
    "1.1": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.03, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1},
}


def build_tiny_hunyuan_dit(folder: str | Path, seed: int = 0, version: str = "1.2",
                           scheduler: dict | bool = True) -> Path:
    """Write a tiny random Hunyuan-DiT ``HunyuanDiTPipeline`` of ``version`` ("1.2", or "1.1" with style and
    image-size conditioning) to ``folder``; returns it."""
    import shutil

    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5EncoderModel

    from .adapters.base import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits + ",.!?'-{}")
    words += ["##" + c for c in string.ascii_lowercase + string.digits]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
        bert_tok = BertTokenizer(str(vocab_file), model_max_length=77)
    t5_tok = _t5_tokenizer(256)
    with _seeded(seed):
        bert = BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=80), add_pooling_layer=False)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=32, scaling_factor=0.13025)
        transformer = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
                                        hidden_size=32, num_layers=4, mlp_ratio=2.0, learn_sigma=True,
                                        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=32,
                                        text_len=77, text_len_t5=256, sample_size=16,
                                        use_style_cond_and_image_meta_size=version == "1.1")
    config = scheduler if isinstance(scheduler, dict) else PUBLISHED_SCHEDULERS[version]
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=bert_tok, transformer=transformer,
                              scheduler=DDPMScheduler(**config), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=t5, tokenizer_2=t5_tok)
    pipe.save_pretrained(folder)
    if scheduler is False:
        shutil.rmtree(folder / "scheduler")
    return folder
