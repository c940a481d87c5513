"""FLUX LoRA format conversion: exactness on a tiny model, diffusers' own kohya loader, sd-scripts' key set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from lora_run_formats import detect_format, load_lora, save_lora  # noqa: E402
from lora_run_flux.lora import (FormatError, diffusers_to_kohya, kohya_metadata,  # noqa: E402
                                   kohya_to_diffusers)

SHARED_KEYS = Path(__file__).resolve().parents[2].parent / "shared/tools-data/sd-scripts/flux_lora_keys_rank16.json"

# peft full-matches one regex string against module names
DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)" \
         r"|norm1(_context)?\.linear)"
SINGLE_ATTN = r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)"
SINGLE_REST = r"single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
TOP = r"x_embedder|context_embedder|norm_out\.linear|proj_out|time_text_embed\.timestep_embedder\.linear_1" \
      r"|time_text_embed\.guidance_embedder\.linear_2"
ATTENTION_ONLY = r"(single_)?transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0)"


def targets(*patterns: str) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


def tiny_flux(width_heads: int = 2, head_dim: int = 16, double: int = 2, single: int = 2, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=double, num_single_layers=single,
                                   attention_head_dim=head_dim, num_attention_heads=width_heads,
                                   joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                   axes_dims_rope=rope)
    return model.eval()


def forward(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    seq, txt = 16, 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(-1, 3)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, seq, 4, generator=gen),
                     encoder_hidden_states=torch.randn(1, txt, 32, generator=gen),
                     pooled_projections=torch.randn(1, 32, generator=gen),
                     timestep=torch.tensor([0.7]), guidance=torch.tensor([1.0]),
                     img_ids=img_ids, txt_ids=torch.zeros(txt, 3), return_dict=False)[0]


def random_lora(model, pattern: str, rank: int = 4, alpha: float = 2.0, seed: int = 3) -> dict:
    """A diffusers-format LoRA (``transformer.`` keys) with non-zero A and B for the given targets."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern), adapter_name="scratch")
    gen = torch.Generator().manual_seed(seed)
    sd = {f"transformer.{k}": torch.randn(v.shape, generator=gen) * 0.05
          for k, v in get_peft_model_state_dict(model, adapter_name="scratch").items()}
    model.delete_adapters("scratch")
    return sd


def output_with(model, diffusers_sd, name: str, alpha: float | None = None, rank: int | None = None):
    """Load a diffusers-format LoRA through diffusers (scale alpha/rank when given), run, remove it."""
    from diffusers import FluxPipeline

    sd = dict(diffusers_sd)
    if alpha is not None:  # diffusers reads alpha from network_alphas keyed by module
        alphas = {k.replace(".lora_A.weight", ".alpha"): alpha for k in sd if k.endswith(".lora_A.weight")}
    else:
        alphas = None
    FluxPipeline.load_lora_into_transformer(sd, alphas, transformer=model, adapter_name=name)
    out = forward(model)
    model.delete_adapters(name)
    return out


def test_round_trip_is_exact_on_every_module_type():
    model = tiny_flux()
    sd = random_lora(model, targets(DOUBLE, SINGLE_ATTN, SINGLE_REST, TOP), rank=4, alpha=2.0)
    base = forward(model)
    expected = output_with(model, sd, "peft", alpha=2.0)
    assert not torch.allclose(base, expected, atol=1e-4), "the LoRA must change the output"

    kohya = diffusers_to_kohya(sd, alpha=2.0, rank=4)
    assert all(v.dim() == 0 for k, v in kohya.items() if k.endswith(".alpha"))
    # fused layers: rank = sum of the parts, alpha/rank kept at 2/4
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape == (12, 32)
    assert kohya[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert kohya[f"{qkv}.alpha"].item() == pytest.approx(6.0)
    assert kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (32 * 3 + 128, 16)
    assert "lora_unet_final_layer_linear.lora_down.weight" in kohya
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in kohya

    back = kohya_to_diffusers(kohya)
    assert set(back) == set(sd)
    for key in sd:  # split back into the original ranks
        assert back[key].shape == sd[key].shape, key
    got = output_with(model, back, "back")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_attention_only_lora_writes_no_all_zero_block():
    model = tiny_flux()
    sd = random_lora(model, ATTENTION_ONLY, rank=4, alpha=4.0)
    expected = output_with(model, sd, "peft", alpha=4.0)
    kohya = diffusers_to_kohya(sd, 4.0, 4)
    up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    down = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert up.shape == (32 * 3 + 128, 12) and down.shape == (12, 32), "proj_mlp has no LoRA: it adds no rank"
    assert not up[96:].any(), "the MLP rows of linear1 are unchanged"
    assert all(down[i].any() for i in range(12)) and all(up[:, i].any() for i in range(12)), "no zero rank"
    assert kohya["lora_unet_single_blocks_0_linear1.alpha"].item() == 12.0      # alpha/rank = 4/4 kept
    assert not up[:32, 4:].any(), "q's rows only see q's down rows (block diagonal)"
    for key, value in kohya.items():
        if not key.endswith(".alpha"):
            assert value.any(), f"{key} is all zero"
    back = kohya_to_diffusers(kohya)
    assert not any("proj_mlp" in k for k in back)
    got = output_with(model, back, "back")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_kohya_file_loads_in_diffusers_with_the_same_outputs(tmp_path):
    """A kohya file we write → diffusers' own kohya converter → same transformer output as our diffusers LoRA.

    diffusers hard-codes FLUX.1's full width (3072/12288) for ``linear1``, so the tiny model leaves the
    single blocks' q/k/v/mlp out here; the slow test below covers linear1 at full width. The top-level
    layers (img_in, txt_in, final_layer, ...) are left out too: diffusers 0.42 converts them without the
    ``transformer.`` prefix and ignores the alpha of final_layer (see docs/lora-formats.md).
    """
    from diffusers import FluxPipeline

    model = tiny_flux()
    sd = random_lora(model, targets(DOUBLE, SINGLE_REST), rank=4, alpha=8.0)
    expected = output_with(model, sd, "peft", alpha=8.0)

    path = save_lora(tmp_path / "ohwx.safetensors", diffusers_to_kohya(sd, 8.0, 4),
                     kohya_metadata(network_dim=4, network_alpha=8.0, output_name="ohwx"))
    tensors, metadata = load_lora(path)
    assert detect_format(tensors) == "kohya"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    converted = FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert all(k.startswith("transformer.") for k in converted)
    got = output_with(model, converted, "diffusers-kohya")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    # and our own converter agrees with diffusers' one on every product B·A
    ours = kohya_to_diffusers(tensors)
    for key in converted:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(ours[b] @ ours[key], converted[b] @ converted[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pattern, fused_rank", [(targets(SINGLE_ATTN, SINGLE_REST), 8),
                                                 (r"single_transformer_blocks\.\d+\.attn\.to_[qkv]", 6)])
def test_full_width_single_block_linear1_through_diffusers(tmp_path, pattern, fused_rank):
    """FLUX.1's real width (24 heads × 128) so that diffusers' fixed linear1 split applies; one single block.
    Attention only: linear1 carries q/k/v (rank 3×2, no zero block for proj_mlp) and still loads exactly."""
    from diffusers import FluxPipeline

    model = tiny_flux(width_heads=24, head_dim=128, double=0, single=1)
    sd = random_lora(model, pattern, rank=2, alpha=1.0)
    expected = output_with(model, sd, "peft", alpha=1.0)
    kohya = diffusers_to_kohya(sd, 1.0, 2)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, fused_rank)
    path = save_lora(tmp_path / "wide.safetensors", kohya, kohya_metadata())
    converted = FluxPipeline.lora_state_dict(str(path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    got = output_with(model, converted, "diffusers-kohya")
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)


def _full_size_diffusers_lora(rank: int, device: str = "meta") -> dict:
    """Every module sd-scripts' lora_flux trains, full FLUX.1-dev sizes, as separate diffusers LoRAs."""
    d, mlp = 3072, 12288
    out_in = {"attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "attn.to_out.0": (d, d),
              "attn.add_q_proj": (d, d), "attn.add_k_proj": (d, d), "attn.add_v_proj": (d, d),
              "attn.to_add_out": (d, d), "ff.net.0.proj": (mlp, d), "ff.net.2": (d, mlp),
              "ff_context.net.0.proj": (mlp, d), "ff_context.net.2": (d, mlp), "norm1.linear": (6 * d, d),
              "norm1_context.linear": (6 * d, d)}
    single = {"attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "proj_mlp": (mlp, d),
              "proj_out": (d, d + mlp), "norm.linear": (3 * d, d)}
    sd = {}
    for blocks, count, table in (("transformer_blocks", 19, out_in), ("single_transformer_blocks", 38, single)):
        for i in range(count):
            for module, (o, n) in table.items():
                sd[f"transformer.{blocks}.{i}.{module}.lora_A.weight"] = torch.empty(rank, n, device=device)
                sd[f"transformer.{blocks}.{i}.{module}.lora_B.weight"] = torch.empty(o, rank, device=device)
    return sd


@pytest.mark.skipif(not SHARED_KEYS.is_file(), reason="shared tools-data not present")
def test_key_names_and_shapes_match_sd_scripts():
    reference = json.loads(SHARED_KEYS.read_text())
    kohya = diffusers_to_kohya(_full_size_diffusers_lora(16), 16, 16)
    assert set(kohya) == set(reference)
    for key, shape in reference.items():
        got = tuple(kohya[key].shape)
        fused = "_attn_qkv." in key or "_linear1." in key
        if not fused or key.endswith(".alpha"):
            assert got == tuple(shape), key
        elif key.endswith("lora_down.weight"):  # stacked parts: 3 (qkv) or 4 (linear1) × rank 16
            parts = 3 if "_attn_qkv." in key else 4
            assert got == (shape[0] * parts, shape[1]), key
        else:
            parts = 3 if "_attn_qkv." in key else 4
            assert got == (shape[0], shape[1] * parts), key


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_KEYS.is_file(), reason="shared tools-data not present")
def test_sd_scripts_shaped_file_converts_like_diffusers_does():
    """A file with exactly sd-scripts' keys and shapes (rank 16, fused, dense): ours == diffusers' conversion."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    reference = json.loads(SHARED_KEYS.read_text())
    gen = torch.Generator().manual_seed(0)
    # sd-scripts' names and module widths, at rank 2 instead of 16 (8× less memory; the names are the point)
    kohya = {k: (torch.tensor(1.0) if not shape else torch.randn(*[2 if n == 16 else n for n in shape],
                                                                 generator=gen) * 0.01)
             for k, shape in reference.items()}
    ours = kohya_to_diffusers(kohya)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert set(ours) == set(theirs)
    assert len(ours) == 988
    for key in [k for k in ours if k.endswith("lora_A.weight")][::37]:
        b = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(ours[b] @ ours[key], theirs[b] @ theirs[key], atol=1e-6, rtol=1e-4)


def test_text_encoder_keys_round_trip():
    sd = {"text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight": torch.randn(2, 8),
          "text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_B.weight": torch.randn(8, 2),
          "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_A.weight": torch.randn(2, 16),
          "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight": torch.randn(8, 2),
          "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_A.weight": torch.randn(2, 8),
          "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_B.weight": torch.randn(8, 2)}
    kohya = diffusers_to_kohya(sd, 1.0, 2)
    assert "lora_te1_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_up.weight" in kohya
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0.alpha" in kohya
    back = kohya_to_diffusers(kohya)
    assert set(back) == set(sd)
    for key in sd:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(back[b] @ back[key], 0.5 * sd[b] @ sd[key])


def test_alpha_conventions():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    sd = {"x_embedder.lora_A.weight": a, "x_embedder.lora_B.weight": b}  # no prefix is accepted
    assert diffusers_to_kohya(sd)["lora_unet_img_in.alpha"].item() == 4.0  # alpha None: already folded
    assert diffusers_to_kohya(sd, 16, 16)["lora_unet_img_in.alpha"].item() == 4.0
    assert diffusers_to_kohya(sd, 1.0, None)["lora_unet_img_in.alpha"].item() == 1.0  # per-module rank
    kohya = {"lora_unet_img_in.lora_down.weight": a, "lora_unet_img_in.lora_up.weight": b}  # no alpha: scale 1
    back = kohya_to_diffusers(kohya, prefix=False)
    torch.testing.assert_close(back["x_embedder.lora_B.weight"] @ back["x_embedder.lora_A.weight"], b @ a)
    kohya["lora_unet_img_in.alpha"] = torch.tensor(1.0)
    back = kohya_to_diffusers(kohya)
    torch.testing.assert_close(back["transformer.x_embedder.lora_B.weight"]
                               @ back["transformer.x_embedder.lora_A.weight"], b @ a / 4)


def test_untrained_fused_lora_keeps_every_part():
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 8),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(24, 4),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    back = kohya_to_diffusers(kohya)
    assert len(back) == 6 and back["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape == (4, 8)


@pytest.mark.parametrize("sd, match", [
    ({"transformer.foo.lora_A.weight": 1}, "lora_B"),
    ({"transformer.pos_embed.lora_A.weight": torch.zeros(2, 4), "transformer.pos_embed.lora_B.weight":
      torch.zeros(4, 2)}, "no kohya"),
    ({"transformer.x_embedder.lora_magnitude_vector": torch.zeros(4)}, "DoRA"),
    ({"transformer.x_embedder.weight": torch.zeros(4)}, "not a diffusers"),
    ({"unet.down.lora_A.weight": torch.zeros(2, 4), "unet.down.lora_B.weight": torch.zeros(4, 2)}, "UNet"),
])
def test_diffusers_to_kohya_refuses_what_it_cannot_place(sd, match):
    with pytest.raises(FormatError, match=match):
        diffusers_to_kohya(sd)


@pytest.mark.parametrize("sd, match", [
    ({"lora_unet_img_in.hada_w1_a": torch.zeros(2)}, "LoHa"),
    ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 4)}, "both"),
    ({"lora_unet_mystery_block.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_mystery_block.lora_up.weight": torch.zeros(4, 2)}, "not a FLUX kohya"),
    ({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 4),
      "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(12, 2)}, "3×4"),
])
def test_kohya_to_diffusers_refuses_what_it_cannot_place(sd, match):
    with pytest.raises(FormatError, match=match):
        kohya_to_diffusers(sd)


def test_metadata_is_all_strings_in_sd_scripts_names():
    meta = kohya_metadata(network_dim=16, network_alpha=8.0, network_args={"train_blocks": "all"}, seed=None,
                          title="ohwx person", resolution="1024x1024", ss_output_name="ohwx",
                          sshs_model_hash="abc", gradient_checkpointing=True)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"train_blocks": "all"}
    assert meta["ss_seed"] == "None" and meta["ss_gradient_checkpointing"] == "True"
    assert meta["modelspec.title"] == "ohwx person" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_output_name"] == "ohwx" and meta["sshs_model_hash"] == "abc"


def test_save_is_atomic_and_keeps_metadata(tmp_path):
    target = tmp_path / "out.safetensors"
    save_lora(target, {"lora_unet_img_in.lora_down.weight": torch.ones(2, 3).t()}, {"ss_a": "b"})
    tensors, meta = load_lora(target)
    assert meta == {"ss_a": "b"} and tensors["lora_unet_img_in.lora_down.weight"].shape == (3, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert detect_format({"a.lora_A.weight": 0}) == "diffusers" and detect_format({"x": 0}) == "unknown"
