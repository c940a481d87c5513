"""Tiny randomly initialised Hunyuan-DiT models, built offline (tests).

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

from lora_run_native.tinykit import seeded, t5_tokenizer


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

    from lora_run_native.adapters.base import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits + ",.!?'-{}")
    words += ["##" + c for c in string.ascii_lowercase + string.digits]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
        bert_tok = BertTokenizer(str(vocab_file), model_max_length=77)
    t5_tok = t5_tokenizer(256)
    with seeded(seed):
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
