"""What a `[model.files]` file is, told from its header among the released files a user has side by side
(ComfyUI's and sd-scripts' downloads): FLUX.1's `ae.safetensors` passed as HunyuanImage-2.1's autoencoder (both are
LDM-style autoencoders: the names overlap), and an encoder of another model size in an encoder's slot (CLIP-G for
CLIP-L, T5-XXL for the ByT5 glyph encoder, Qwen3-8B for [klein] 4B's Qwen3-4B), passed `lora-run check` and failed
at model load, minutes later, or not at all. Each is named now, at the slot's key, with what the file is.

The files hold only the headers of the released files (`lora_run_devtools.testing.MODEL_FILES`: real names and
shapes; their data is a hole), and the first test proves each such header a part of the whole released header (the
model built on the meta device from its published config, written by the family's own single-file converter), on
which every check decides the same."""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_run_devtools.testing import MODEL_FILES, SLOT_FILES, header_only_weights
from lora_run_formats import layouts as L

#: the family -> slot -> kind of file it takes, and the kinds of other files (MODEL_FILES) a layout alone cannot
#: tell from it: the same layout at another width (each named once the transformer file is given too)
SAME_LAYOUT = {("flux.1-dev", "clip_l"): {"clip_g"}, ("flux.1-dev", "t5xxl"): {"byt5_small"},
               ("hunyuan-image-2.1", "byt5"): {"t5xxl"}, ("flux.2-klein", "qwen3"): {"qwen_3_8b"}}


def _adapter(family: str):
    from lora_run_native.adapters import adapter_class

    return adapter_class(family)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {kind: header_only_weights(root / f"{kind}.safetensors", tensors) for kind, tensors in MODEL_FILES.items()}


def _real_headers() -> dict[str, dict[str, list[int]]]:
    """The whole header of each released kind: its model on the meta device, with its published config (the
    single-file layouts written by the families' converters, as the tiny models' single files are)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanImage, Flux2Transformer2DModel, FluxTransformer2DModel
    from diffusers import HunyuanImageTransformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM, T5Config,
                              T5EncoderModel, UMT5Config, UMT5EncoderModel)

    from lora_run_flux import files as f1
    from lora_run_flux2 import files as f2
    from lora_run_hunyuan_image import files as hy

    def shapes(module, convert=lambda sd: sd, drop=()):
        return {k: list(v.shape) for k, v in convert(module.state_dict()).items() if k not in drop}

    def clip(width, layers, ff, cls=CLIPTextModel):
        model = cls(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                                   num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width))
        return {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v   # transformers 5
                for k, v in shapes(model).items()}

    def t5(vocab, width, ff, layers, heads, config=T5Config, cls=T5EncoderModel):
        return shapes(cls(config(vocab_size=vocab, d_model=width, d_kv=64, d_ff=ff, num_layers=layers, num_heads=heads,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
                      drop=("encoder.embed_tokens.weight",))                  # tied to shared.weight, not saved

    def autoencoder(latent, quant):
        return shapes(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                    layers_per_block=2, latent_channels=latent, use_quant_conv=quant,
                                    use_post_quant_conv=quant), f1.vae_diffusers_to_ldm)

    def flux1(in_channels):
        return shapes(FluxTransformer2DModel(in_channels=in_channels, out_channels=64, num_layers=19,
                                             num_single_layers=38, joint_attention_dim=4096, pooled_projection_dim=768,
                                             guidance_embeds=True), f1.transformer_diffusers_to_bfl)

    def qwen3(width, ff):
        return shapes(Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=width, intermediate_size=ff,
                                                   num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                                   head_dim=128, tie_word_embeddings=True)), drop=("lm_head.weight",))

    with torch.device("meta"):
        return {
            "flux1-dev": flux1(64), "ae": autoencoder(16, False), "sdxl_vae": autoencoder(4, True),
            "hunyuan_image_2.1_vae": shapes(AutoencoderKLHunyuanImage(
                in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(128, 256, 512, 512, 1024, 1024),
                layers_per_block=2, spatial_compression_ratio=32, sample_size=384), hy.vae_diffusers_to_original),
            "hunyuanimage2.1": shapes(HunyuanImageTransformer2DModel(
                in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
                num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=3584, text_embed_2_dim=1472,
                rope_axes_dim=(64, 64)), hy.transformer_diffusers_to_original),
            "clip_l": clip(768, 12, 3072), "clip_g": clip(1280, 32, 5120, CLIPTextModelWithProjection),
            "t5xxl": t5(32128, 4096, 10240, 24, 64),
            "umt5_xxl": t5(256384, 4096, 10240, 24, 64, UMT5Config, UMT5EncoderModel),
            "byt5_small": t5(384, 1472, 3584, 12, 6),
            "qwen_2.5_vl_7b": shapes(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                             "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
                vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                               "out_hidden_size": 3584}, vocab_size=152064, tie_word_embeddings=False)),
                hy.qwen_diffusers_to_comfy),
            "qwen_3_4b": qwen3(2560, 9728), "qwen_3_8b": qwen3(4096, 12288),
            "flux-2-klein-4b": shapes(Flux2Transformer2DModel(
                in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, guidance_embeds=False), f2.transformer_diffusers_to_bfl),
        }


def test_each_kind_is_a_part_of_its_released_file_and_decides_alike():
    """The headers the tests write are the released files' (names and shapes), and every check (what the file is,
    each slot's layouts, each width a file shares with its transformer) says the same of the part as of the whole;
    a planted wrong shape is caught (the control)."""
    pytest.importorskip("diffusers")
    real = _real_headers()
    assert set(real) == set(MODEL_FILES)
    for kind, part in MODEL_FILES.items():
        whole = real[kind]
        assert {n: list(s) for n, s in part.items()} == {n: whole.get(n) for n in part}, kind
        assert L.identify(part) == L.identify(whole) is not None, kind
        for family in SLOT_FILES:
            adapter = _adapter(family)
            for slot, accepted in adapter.file_layouts.items():
                assert [x.matches(part) for x in accepted] == [x.matches(whole) for x in accepted], (kind, slot)
            transformer = SLOT_FILES[family]["transformer"]
            for link in adapter.file_links:
                args = (link, part, MODEL_FILES[transformer], "t")
                assert L.link_problem(*args) == L.link_problem(link, whole, real[transformer], "t"), (kind, link)
    planted = {**MODEL_FILES["ae"], "decoder.conv_in.weight": (512, 4, 3, 3)}       # an SD autoencoder's latents
    assert {n: list(s) for n, s in planted.items()} != {n: real["ae"].get(n) for n in planted}


@pytest.mark.parametrize("family", list(SLOT_FILES))
def test_every_slot_takes_its_file_and_names_each_other_kind(family, kinds):
    """Each released kind in each slot, alone: the slot's own file passes; a file of another kind is named with what
    it is, except a file of the same layout at another width (named once the transformer is given: below)."""
    adapter = _adapter(family)
    for slot, own in SLOT_FILES[family].items():
        wanted = " or ".join(layout.what for layout in adapter.file_layouts[slot])
        for kind, path in kinds.items():
            said = adapter.single_file_problems({slot: path})
            if kind == own or kind in SAME_LAYOUT.get((family, slot), ()):
                assert said == [], (slot, kind, said)
            else:
                assert said == [(("model", "files", slot), f"{path} is {L.identify(MODEL_FILES[kind]).what}, not "
                                                           f"{wanted}")], (slot, kind, said)


def test_flux1_ae_is_named_as_hunyuan_images_autoencoder(kinds):
    """The audit's case: `vae = "ae.safetensors"` under HunyuanImage-2.1 passed (the Tencent layout's names are
    the LDM ones); its 16 latent channels are not HunyuanImage's 64. So are a Stable Diffusion autoencoder (4) in
    either family's slot, and HunyuanImage's in FLUX.1's (its resampling convolutions change their channels)."""
    hunyuan, flux = _adapter("hunyuan-image-2.1"), _adapter("flux.1-dev")
    assert hunyuan.single_file_problems({"vae": kinds["ae"]}) == [(("model", "files", "vae"), (
        f"{kinds['ae']} is a FLUX.1 autoencoder (LDM layout, 16 latent channels, as ae.safetensors), not a "
        "HunyuanImage-2.1 autoencoder (32×, 64 latent channels, as hunyuan_image_2.1_vae_fp16.safetensors)"))]
    sd = "is a Stable Diffusion autoencoder (LDM layout, 4 latent channels: SD 1.x, 2.x or SDXL's, as sdxl_vae"
    for adapter in (hunyuan, flux):
        (said,) = adapter.single_file_problems({"vae": kinds["sdxl_vae"]})
        assert said[1].startswith(f"{kinds['sdxl_vae']} {sd}")
    (said,) = flux.single_file_problems({"vae": kinds["hunyuan_image_2.1_vae"]})
    assert said[1].startswith(f"{kinds['hunyuan_image_2.1_vae']} is a HunyuanImage-2.1 autoencoder")
    assert hunyuan.single_file_problems({"vae": kinds["hunyuan_image_2.1_vae"]}) == []        # the controls
    assert flux.single_file_problems({"vae": kinds["ae"]}) == []


#: (family, slot, the kind given, what the message says of it and of what the transformer is built for)
WIDTHS = [
    ("flux.1-dev", "clip_l", "clip_g", "is 1280 wide (CLIP-G's), but the transformer {t} is built for 768 (CLIP-L's; "
                                       "its vector_in.in_layer.weight is [3072, 768])"),
    ("flux.1-dev", "t5xxl", "byt5_small", "is 1472 wide (ByT5-small's, HunyuanImage-2.1's glyph encoder), but the "
                                          "transformer {t} is built for 4096 (T5-XXL's; its txt_in.weight is "
                                          "[3072, 4096])"),
    ("hunyuan-image-2.1", "byt5", "t5xxl", "is 4096 wide (T5-XXL's), but the transformer {t} is built for 1472 "
                                           "(ByT5-small's, HunyuanImage-2.1's glyph encoder; its byt5_in.fc1.weight "
                                           "is [2048, 1472])"),
    ("flux.2-klein", "qwen3", "qwen_3_8b", "is 4096 wide (Qwen3-8B's), but the transformer {t} is built for 2560 "
                                          "(Qwen3-4B's; its txt_in.weight is [3072, 7680])"),
]


@pytest.mark.parametrize("family, slot, kind, says", WIDTHS, ids=[f"{w[2]}-as-{w[1]}" for w in WIDTHS])
def test_an_encoder_of_another_width_is_named_against_the_transformer_file(family, slot, kind, says, kinds):
    """A file of the slot's layout but another model size: named at its slot when the transformer is given as a
    file too; the released pair passes (the control), and without the transformer file nothing is said (its
    config, against a `[model] source`, is `file_fits`')."""
    adapter = _adapter(family)
    own = {s: kinds[k] for s, k in SLOT_FILES[family].items()}
    assert adapter.single_file_problems(own) == []
    transformer = own["transformer"]
    assert adapter.single_file_problems({**own, slot: kinds[kind]}) == [(("model", "files", slot), (
        f"{kinds[kind]} {says.format(t=transformer)}: one of the two files is of another model or model size"))]
    assert adapter.single_file_problems({slot: kinds[kind]}) == []


def test_a_flux1_tools_transformer_is_named_against_its_autoencoder(tmp_path, kinds):
    """FLUX.1 Fill takes 384 input channels (the latents, the masked image and the mask), not 64: with `ae`, the
    pair is named at the autoencoder's key, with both widths."""
    fill = header_only_weights(tmp_path / "flux1-fill-dev.safetensors",
                               {**MODEL_FILES["flux1-dev"], "img_in.weight": (3072, 384)})
    files = {s: kinds[k] for s, k in SLOT_FILES["flux.1-dev"].items()}
    assert _adapter("flux.1-dev").single_file_problems({**files, "transformer": fill}) == [(("model", "files", "vae"), (
        f"{kinds['ae']} has 16 latent channels (FLUX.1's), but the transformer {fill} is built for 96 (its "
        "img_in.weight is [3072, 384]): one of the two files is of another model or model size"))]


def test_a_umt5_or_an_openclip_file_is_named_in_a_t5_or_clip_slot(tmp_path, kinds):
    """Wan's UMT5-XXL is as wide as T5-XXL (a relative attention bias in every block tells it apart); OpenCLIP's
    own layout (a checkpoint's text tower) is not the CLIP text model the loader reads."""
    flux = _adapter("flux.1-dev")
    (said,) = flux.single_file_problems({"t5xxl": kinds["umt5_xxl"]})
    assert said[1] == f"{kinds['umt5_xxl']} is {L.UMT5_ENCODER.what}, not a T5 encoder"
    open_clip = header_only_weights(tmp_path / "open_clip.safetensors", {
        "token_embedding.weight": (49408, 1280), "positional_embedding": (77, 1280),
        "transformer.resblocks.0.attn.in_proj_weight": (3840, 1280), "ln_final.weight": (1280,)})
    (said,) = flux.single_file_problems({"clip_l": open_clip})
    assert said[1] == f"{open_clip} is {L.OPEN_CLIP.what}, not a CLIP text encoder"
