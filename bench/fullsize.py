"""Full-size model folders with random weights, in the layouts users load (for the GPU benchmarks).

No weights can be downloaded here, so the benchmarks build the real architectures with random bf16 weights,
save them as a diffusers folder and let lora-run load them exactly as it loads a user's model folder:

* ``build_flux(folder, encoders="tiny" | "full")``: FLUX.1-dev's transformer (19 double + 38 single blocks,
  3072 wide, 11.9 B parameters) with either small text encoders of FLUX's widths (T5 4096 / CLIP-L 768, one
  layer each: they only fill the cache) or the full-size CLIP-L (123 M) and T5-XXL encoder (4.7 B, 9.5 GB in
  bf16), and FLUX's 16-channel VAE at full size when ``encoders="full"``.
* ``build_hunyuan_dit(folder)``: Hunyuan-DiT v1.2's transformer (40 blocks, 1408 wide, 1.5 B) with small
  encoders of its widths.
* ``build_hunyuan_image(folder)``: HunyuanImage-2.1's transformer (20 + 40 blocks, 3584 wide, 17 B) with
  small encoders of its widths.

Each build is skipped when the folder is already complete (a ``.complete`` marker written last).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

FLUX = {"head_dim": 128, "heads": 24, "double": 19, "single": 38}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


@contextlib.contextmanager
def _tiny_sizes(module, **sizes):
    saved = dict(module.TINY)
    module.TINY.update(sizes)
    try:
        yield
    finally:
        module.TINY.clear()
        module.TINY.update(saved)


def _shrink(model) -> None:
    """Default init, weights halved: activations stay finite through 57 random blocks."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(0.5)


def _save(model, folder: Path) -> None:
    """``model`` saved into ``folder`` in shards, replacing the weights the tiny builder left there (a single file
    beside a shard index is ambiguous: diffusers reads the index, transformers the single file)."""
    import torch

    for old in [*Path(folder).glob("*.safetensors"), *Path(folder).glob("*.safetensors.index.json")]:
        old.unlink()
    model.save_pretrained(folder, max_shard_size="10GB")
    del model
    torch.cuda.empty_cache()


def build_flux(folder: Path, encoders: str = "tiny") -> Path:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_run_native import tiny

    folder = Path(folder)
    if (folder / ".complete").is_file():
        return folder
    with _tiny_sizes(tiny, clip_hidden=768, t5_d_model=4096, t5_heads=32):
        tiny.build_tiny_flux(folder)
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=FLUX["double"], num_single_layers=FLUX["single"],
            attention_head_dim=FLUX["head_dim"], num_attention_heads=FLUX["heads"], joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
    _shrink(transformer)
    _save(transformer, folder / "transformer")
    if encoders == "full":
        clip_tok_size = len(tiny._tokenizers()[0])
        with torch.device("cuda"):
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=max(clip_tok_size, 49408), max_position_embeddings=77,
                                                hidden_act="quick_gelu", projection_dim=768, bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1, **CLIP_L)).to(torch.bfloat16)
        _save(clip, folder / "text_encoder")
        with torch.device("cuda"):
            t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         use_cache=False, **T5_XXL)).to(torch.bfloat16)
        _save(t5, folder / "text_encoder_2")
        with torch.device("cuda"):
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).to(torch.bfloat16)
        _save(vae, folder / "vae")
    (folder / ".complete").write_text("ok")
    return folder


def _hunyuan(folder: Path, family: str) -> Path:
    """The tiny builder's folder (encoders, VAE, tokenizers, scheduler) with its transformer replaced by the
    full-size one. The text-input widths follow the small encoders (32 wide): only the projections that read
    encoder outputs are smaller than in the real model; blocks, widths and token counts are full size."""
    import shutil

    import torch

    from lora_run_native import tiny_hunyuan

    folder = Path(folder)
    if (folder / ".complete").is_file():
        return folder
    torch.manual_seed(0)
    if family == "hunyuan-image-2.1":
        from diffusers import HunyuanImageTransformer2DModel

        tiny_hunyuan.build_tiny_hunyuan_image(folder)
        with torch.device("cuda"):
            model = HunyuanImageTransformer2DModel(**IMAGE_CONFIG).to(torch.bfloat16)
    else:
        from diffusers import HunyuanDiT2DModel

        tiny_hunyuan.build_tiny_hunyuan_dit(folder)
        with torch.device("cuda"):
            model = HunyuanDiT2DModel(**DIT_CONFIG).to(torch.bfloat16)
    _shrink(model)
    shutil.rmtree(folder / "transformer")
    _save(model, folder / "transformer")
    (folder / ".complete").write_text("ok")
    return folder


IMAGE_CONFIG = dict(in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=(1, 1),
                    qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=32, text_embed_2_dim=32,
                    rope_theta=256.0, rope_axes_dim=(64, 64))
DIT_CONFIG = dict(num_layers=40, hidden_size=1408, num_attention_heads=16, attention_head_dim=88, patch_size=2,
                  in_channels=4, learn_sigma=True, mlp_ratio=4.3637, cross_attention_dim=32,
                  cross_attention_dim_t5=32, pooled_projection_dim=32, text_len=77, text_len_t5=256,
                  sample_size=128, use_style_cond_and_image_meta_size=False)


def build_hunyuan_dit(folder: Path) -> Path:
    return _hunyuan(folder, "hunyuan-dit-1.2")


def build_hunyuan_image(folder: Path) -> Path:
    return _hunyuan(folder, "hunyuan-image-2.1")
