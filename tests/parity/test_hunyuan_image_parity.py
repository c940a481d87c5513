"""HunyuanImage-2.1 parity with the references (diffusers' HunyuanImagePipeline, Tencent's pipeline and
sd-scripts' hunyuan_image_train_network), against their documented behaviour, each with a planted mistake:

- latents: the posterior mean × 0.75289, no shift (unlike FLUX);
- σ draws as for FLUX; the recommended `shift` draw with k = 5 (upstream's scheduler shift);
- x_t = (1−σ)·x0 + σ·ε, target ε − x0;
- the transformer gets **σ·1000** as `timestep` (it does not scale it; the pipeline passes the scheduler's
  timesteps), unpacked (B, 64, H/32, W/32) latents, the Qwen sequence + mask and the ByT5 glyph encoding + mask
  as `encoder_hidden_states_2` / `encoder_attention_mask_2`, and no guidance for the base model;
- glyph text: only "…", ‘…’ and “…” delimit it (Tencent's pipeline, sd-scripts); an ASCII apostrophe is not a
  quotation mark — diffusers 0.42.1's `extract_glyph_text` differs, and is the planted mistake here.
"""
from __future__ import annotations

import math

import pytest

from .conftest import minimal_recipe, transformer_inputs


def adapter_for(tmp_path, **train):
    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter

    return HunyuanImageAdapter(minimal_recipe("hunyuan-image-2.1", tmp_path, train={"mixed_precision": "no", **train},
                                              dataset={"resolution": 512, "bucket_min": 256, "bucket_max": 512}))


# ------------------------------------------------------------------------------------------- glyph text
CASES = [
    ("the man's face, the woman's hat", None),
    ('ohwx holding a sign that says "hello"', 'Text "hello". '),
    ("a poster reading \u201c\u4f60\u597d\u201d and \u2018ok\u2019", 'Text "ok". Text "\u4f60\u597d". '),
    ('it\'s "A" and "B", isn\'t it', 'Text "A". Text "B". '),
    ("no quotes at all", None),
]


def reference_glyph(caption: str):
    """The documented rule: double quotes first, then ‘…’, then “…”; each span as `Text "<span>". `."""
    import re

    spans = re.findall(r'"(.*?)"', caption) + re.findall("\u2018(.*?)\u2019", caption) \
        + re.findall("\u201c(.*?)\u201d", caption)
    return "".join(f'Text "{s}". ' for s in spans) or None


@pytest.mark.parametrize("caption, expected", CASES)
def test_glyph_text_quotes_like_the_reference(caption, expected):
    from lora_run_hunyuan_image.adapter import glyph_text

    assert reference_glyph(caption) == expected
    assert glyph_text(caption) == expected


def apostrophes_too(caption: str):
    """The planted mistake (diffusers 0.42.1's extract_glyph_text): ASCII single quotes delimit text as well."""
    import re

    spans = re.findall(r"'(.*?)'", caption) + re.findall(r'"(.*?)"', caption) \
        + re.findall("\u2018(.*?)\u2019", caption) + re.findall("\u201c(.*?)\u201d", caption)
    return "".join(f'Text "{s}". ' for s in spans) or None


def test_planted_mistake_apostrophes_as_quotes_are_caught():
    assert apostrophes_too("the man's face, the woman's hat") == 'Text "s face, the woman". '
    assert [c for c, e in CASES if apostrophes_too(c) != e] == [CASES[0][0], CASES[3][0]]


def tiny_byt5():
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)).eval()
    return tok, model


def test_training_encodes_the_reference_glyph_text(tmp_path):
    import torch
    from diffusers import HunyuanImagePipeline

    adapter = adapter_for(tmp_path)
    tok, model = tiny_byt5()
    adapter.tokenizers["byt5"], adapter.encoders["byt5"] = tok, model
    captions = ["ohwx, the man's face, the woman's hat", 'ohwx holding a sign that says "hello"']
    out = adapter.encode_captions(captions, encoders=("byt5",))
    assert out["prompt_embeds_mask_2"][0].sum() == 0 and not out["prompt_embeds_2"][0].any()
    e, m = HunyuanImagePipeline._get_byt5_prompt_embeds(None, tokenizer=tok, text_encoder=model,
                                                        prompt='Text "hello". ', device="cpu", dtype=torch.float32,
                                                        tokenizer_max_length=128)
    assert torch.equal(out["prompt_embeds_mask_2"][1], m[0].long())
    assert torch.allclose(out["prompt_embeds_2"][1], e[0], atol=1e-6)


def test_sampling_with_a_prompt_uses_the_same_glyph_rule(tmp_path):
    """generate() with a prompt hands the pipeline ByT5 inputs computed with our rule (the pipeline's own
    extraction would quote the apostrophes)."""
    import torch
    from PIL import Image

    adapter = adapter_for(tmp_path)
    tok, model = tiny_byt5()

    class Recorder:                     # stands in for HunyuanImagePipeline.__call__; records its inputs
        tokenizer_2, text_encoder_2 = tok, model
        _execution_device = torch.device("cpu")
        _lora_run_dtype = torch.float32
        transformer = type("T", (), {"config": type("C", (), {"in_channels": 64})()})()

        def __call__(self, **kwargs):
            self.kwargs = kwargs
            return type("R", (), {"images": [Image.new("RGB", (8, 8))]})()

    pipe = Recorder()
    adapter.generate(pipe, prompt="ohwx, the man's face", seed=1, steps=1, guidance=1.0, width=64, height=64,
                     lora_scale=1.0)
    assert pipe.kwargs["prompt"] == "ohwx, the man's face"
    assert pipe.kwargs["prompt_embeds_mask_2"].sum() == 0 and not pipe.kwargs["prompt_embeds_2"].any()
    adapter.generate(pipe, prompt='a sign "hi"', seed=1, steps=1, guidance=1.0, width=64, height=64, lora_scale=1.0)
    assert pipe.kwargs["prompt_embeds_mask_2"].sum() == len('Text "hi". ') + 1      # bytes + </s>


# ---------------------------------------------------------------------------------- latents and σ draws
def test_latents_are_the_mean_times_the_scaling_factor_without_shift(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    adapter = adapter_for(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), latent_channels=4, norm_num_groups=32,
                        scaling_factor=0.75289).eval()
    adapter.encoders["vae"] = vae
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    z = adapter.encode_images(pixels)
    assert torch.allclose(z, mean * 0.75289, atol=1e-6)
    assert not torch.allclose(z, (mean - 0.1159) * 0.75289, atol=1e-3), "a FLUX-style shift would be caught"


def test_shift_five_draw(tmp_path):
    import torch

    adapter = adapter_for(tmp_path, timestep_sampling="shift", shift=5.0)
    drawn = adapter.sample_timesteps(6, torch.Generator().manual_seed(4), torch.zeros(6, 64, 8, 8))
    u = torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(4)))
    assert torch.allclose(drawn, (5 * u / (1 + 4 * u)).clamp(1e-4, 1 - 1e-4), atol=1e-6)


def test_noisy_input_and_target(tmp_path):
    import torch

    adapter = adapter_for(tmp_path)
    x0, eps = torch.randn(2, 64, 2, 2), torch.randn(2, 64, 2, 2)
    sigma = torch.tensor([0.2, 0.9])
    noisy, target = adapter.noisy_and_target(x0, eps, sigma)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * x0 + s * eps) and torch.allclose(target, eps - x0)
    assert not torch.allclose(-target, eps - x0), "a flipped target would be caught"


# ------------------------------------------------------------------------------ what the model is fed
def tiny_transformer():
    import torch
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    return HunyuanImageTransformer2DModel(
        in_channels=64, out_channels=64, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=32,
        rope_axes_dim=(16, 16)).eval()


def text_inputs(b: int):
    import torch

    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(b, 7, dtype=torch.long)
    mask[:, :4] = 1
    mask2 = torch.zeros(b, 5, dtype=torch.long)
    mask2[0, :3] = 1
    return {"prompt_embeds": torch.randn(b, 7, 32, generator=g), "prompt_embeds_mask": mask,
            "prompt_embeds_2": torch.randn(b, 5, 32, generator=g), "prompt_embeds_mask_2": mask2}


def timestep_is_sigma_times_1000(predict, model) -> bool:
    import torch

    sigma = torch.tensor([0.125, 0.75])
    seen, _ = transformer_inputs(predict, model, torch.randn(2, 64, 2, 2), sigma, text_inputs(2))
    return bool(torch.allclose(seen["timestep"], sigma * 1000.0))


def test_the_transformer_gets_sigma_times_1000_and_both_encodings(tmp_path):
    import torch

    adapter = adapter_for(tmp_path)
    model = tiny_transformer()
    assert timestep_is_sigma_times_1000(adapter.predict, model)
    bare_sigma = lambda m, x, t, text, g: adapter.predict(m, x, t / 1000.0, text, g)  # noqa: E731  planted
    assert not timestep_is_sigma_times_1000(bare_sigma, model)
    text = text_inputs(2)
    noisy = torch.randn(2, 64, 2, 3)
    seen, out = transformer_inputs(adapter.predict, model, noisy, torch.tensor([0.5, 0.5]), text)
    assert torch.equal(seen["hidden_states"], noisy) and out.shape == noisy.shape       # unpacked
    assert torch.equal(seen["encoder_hidden_states"], text["prompt_embeds"])
    assert torch.equal(seen["encoder_attention_mask"], text["prompt_embeds_mask"])
    assert torch.equal(seen["encoder_hidden_states_2"], text["prompt_embeds_2"])
    assert torch.equal(seen["encoder_attention_mask_2"], text["prompt_embeds_mask_2"])
    assert seen["guidance"] is None
    assert math.isclose(float(seen["timestep"][0]), 500.0)


def test_bf16_training_feeds_the_exact_timestep(tmp_path):
    """Under bf16 mixed precision the timestep is σ·1000 exactly, as the training references feed it: sd-scripts
    (`hunyuan_image_train_network.py`: the integer ⌊σ·1000⌋ into a float32 sinusoid), diffusion-pipe (float32
    σ·1000) and Tencent's model (`timestep_embedding` of float t). diffusers' transformer computes the sinusoid in
    float32 from whatever it is given; a bf16 timestep (σ·1000 cast to the compute dtype, what the old code did)
    would be rounded to a multiple of 4 above 512 — σ up to 0.002 off the noise level of x_t. The embedding is still
    computed in the compute dtype under autocast (the step runs under it), so nothing else changes."""
    import torch

    from lora_run_hunyuan_image.adapter import HunyuanImageAdapter

    adapter = HunyuanImageAdapter(minimal_recipe("hunyuan-image-2.1", tmp_path, train={"mixed_precision": "bf16"}))
    assert adapter.compute_dtype == torch.bfloat16
    model = tiny_transformer().to(torch.bfloat16)
    sigma = torch.tensor([0.9973, 0.5181])
    text = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in text_inputs(2).items()}
    embedded = {}
    hook = model.time_guidance_embed.register_forward_pre_hook(
        lambda m, args, kwargs: embedded.update(t=(args[0] if args else kwargs["timestep"]).detach().clone()),
        with_kwargs=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = adapter.predict(model, torch.randn(2, 64, 2, 2), sigma, text, 1.0)
    finally:
        hook.remove()
    assert out.shape == (2, 64, 2, 2) and out.dtype == torch.bfloat16
    assert torch.equal(embedded["t"].double(), (sigma * 1000).double()), embedded["t"]
    planted = (sigma * 1000).to(torch.bfloat16)                    # the compute-dtype cast
    assert not torch.equal(embedded["t"].double(), planted.double()), "the planted bf16 timestep is caught"
    assert planted.tolist() == [996.0, 520.0]
