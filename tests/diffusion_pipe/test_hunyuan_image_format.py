"""lora_run_formats.hunyuan_image: ComfyUI (diffusion-pipe) ↔ kohya ↔ diffusers, checked on a tiny real model.

The reference below merges each ComfyUI LoRA into the weights it belongs to, using the row layout of
diffusers' own HunyuanImage conversion script (fused qkv = q|k|v; linear1 = q|k|v|mlp) written out here
independently of the converter. The converted LoRA, loaded with diffusers' `load_lora_adapter`, must give
the same transformer output as that merged model.
"""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_run_formats import hunyuan_image as hy  # noqa: E402

HEADS, HEAD_DIM, DOUBLE, SINGLE, RANK = 2, 8, 2, 2, 4
H = HEADS * HEAD_DIM
MLP = 4 * H

# ComfyUI module (inside a block) -> [(diffusers module, first row, last row)] of the fused output.
REFERENCE = {
    "double": {
        "img_attn.qkv": [("attn.to_q", 0, H), ("attn.to_k", H, 2 * H), ("attn.to_v", 2 * H, 3 * H)],
        "txt_attn.qkv": [("attn.add_q_proj", 0, H), ("attn.add_k_proj", H, 2 * H), ("attn.add_v_proj", 2 * H, 3 * H)],
        "img_attn.proj": [("attn.to_out.0", 0, H)], "txt_attn.proj": [("attn.to_add_out", 0, H)],
        "img_mlp.0": [("ff.net.0.proj", 0, MLP)], "img_mlp.2": [("ff.net.2", 0, H)],
        "txt_mlp.0": [("ff_context.net.0.proj", 0, MLP)], "txt_mlp.2": [("ff_context.net.2", 0, H)],
        "img_mod.lin": [("norm1.linear", 0, 6 * H)], "txt_mod.lin": [("norm1_context.linear", 0, 6 * H)],
    },
    "single": {
        "linear1": [("attn.to_q", 0, H), ("attn.to_k", H, 2 * H), ("attn.to_v", 2 * H, 3 * H),
                    ("proj_mlp", 3 * H, 3 * H + MLP)],
        "linear2": [("proj_out", 0, H)], "modulation.lin": [("norm.linear", 0, 3 * H)],
    },
}
SHAPES = {  # (out, in) of each ComfyUI module
    "img_attn.qkv": (3 * H, H), "txt_attn.qkv": (3 * H, H), "img_attn.proj": (H, H), "txt_attn.proj": (H, H),
    "img_mlp.0": (MLP, H), "img_mlp.2": (H, MLP), "txt_mlp.0": (MLP, H), "txt_mlp.2": (H, MLP),
    "img_mod.lin": (6 * H, H), "txt_mod.lin": (6 * H, H),
    "linear1": (3 * H + MLP, H), "linear2": (H, H + MLP), "modulation.lin": (3 * H, H),
}


def tiny_model():
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    return HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=DOUBLE,
        num_single_layers=SINGLE, num_refiner_layers=1, mlp_ratio=4.0, patch_size=(1, 1), text_embed_dim=12,
        text_embed_2_dim=None, rope_axes_dim=(4, 4)).eval()


def comfy_lora(seed=1):
    """A random LoRA in diffusion-pipe's saved layout (every Linear of every block, rank RANK)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind, count in (("double", DOUBLE), ("single", SINGLE)):
        for i in range(count):
            for name in REFERENCE[kind]:
                rows, cols = SHAPES[name]
                base = f"diffusion_model.{kind}_blocks.{i}.{name}"
                out[f"{base}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) * 0.3
                out[f"{base}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.3
    return out


def merged_reference(model, comfy):
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for kind, count in (("double", DOUBLE), ("single", SINGLE)):
        block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        for i in range(count):
            for name, targets in REFERENCE[kind].items():
                base = f"diffusion_model.{kind}_blocks.{i}.{name}"
                delta = comfy[f"{base}.lora_B.weight"] @ comfy[f"{base}.lora_A.weight"]
                for target, start, stop in targets:
                    with torch.no_grad():
                        modules[f"{block}.{i}.{target}"].weight += delta[start:stop]
    return ref


def forward(model):
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 4, 4, generator=g)
    text = torch.randn(1, 5, 12, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        return model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                     encoder_attention_mask=mask, return_dict=False)[0]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    comfy = comfy_lora()
    return model, comfy, forward(model), forward(merged_reference(model, comfy))


def load_and_run(model, diffusers_state):
    from peft.utils import get_peft_model_state_dict

    m = copy.deepcopy(model)
    m.load_lora_adapter(dict(diffusers_state), prefix="transformer", adapter_name="identity")
    loaded = get_peft_model_state_dict(m, adapter_name="identity")
    expected = {k[len("transformer."):] for k in diffusers_state}
    assert set(loaded) == expected, "every converted key must land in the model"
    for key, value in loaded.items():
        assert torch.equal(value, diffusers_state["transformer." + key].to(value.dtype)), key
    return forward(m)


def test_comfy_to_diffusers_loads_every_key_and_matches_merged_weights(setup):
    model, comfy, base_out, ref_out = setup
    converted = hy.comfy_to_diffusers(comfy)
    # 14 LoRA targets per double block, 6 per single block, two tensors each
    assert len(converted) == 2 * (14 * DOUBLE + 6 * SINGLE)
    out = load_and_run(model, converted)
    assert not torch.allclose(base_out, ref_out, atol=1e-4), "the test LoRA must change the output"
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)


def test_round_trips_are_exact(setup):
    _, comfy, _, _ = setup
    diffusers = hy.comfy_to_diffusers(comfy)
    back = hy.diffusers_to_comfy(diffusers)
    assert set(back) == set(comfy)
    for key in comfy:
        assert torch.equal(back[key], comfy[key]), key     # shared down matrices fuse back to rank RANK
    kohya = hy.comfy_to_kohya(comfy)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * H, RANK)
    assert float(kohya["lora_unet_single_blocks_1_linear1.alpha"]) == RANK
    assert hy.detect_layout(kohya) == "kohya" and hy.detect_layout(comfy) == "comfy"
    assert hy.detect_layout(diffusers) == "diffusers"
    again = hy.kohya_to_diffusers(kohya)
    assert set(again) == set(diffusers)
    for key in diffusers:
        assert torch.equal(again[key], diffusers[key]), key


def test_kohya_alpha_and_sd_scripts_names(setup):
    model, comfy, _, ref_out = setup
    kohya = hy.comfy_to_kohya(comfy)
    # halve every up matrix and double alpha: the same LoRA
    scaled = {}
    for key, value in kohya.items():
        if key.endswith(".lora_up.weight"):
            scaled[key] = value / 2
        elif key.endswith(".alpha"):
            scaled[key] = value * 2
        else:
            scaled[key] = value
    # sd-scripts' own names for the MLP and modulation layers
    renamed = {k.replace("img_mlp_0", "img_mlp_fc1").replace("txt_mod_lin", "txt_mod_linear")
                .replace("modulation_lin", "modulation_linear"): v for k, v in scaled.items()}
    assert any("img_mlp_fc1" in k for k in renamed)
    out = load_and_run(model, hy.kohya_to_diffusers(renamed))
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    assert set(hy.normalize_kohya(renamed)) == set(kohya)


def test_split_lora_with_independent_parts_fuses_exactly(setup):
    """A LoRA trained on diffusers' split layers (own down matrix per part) → kohya/ComfyUI → same output."""
    model, _, _, _ = setup
    g = torch.Generator().manual_seed(3)
    m = copy.deepcopy(model)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    m.add_adapter(LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights="gaussian",
                             target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "to_add_out"]))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    raw = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(m).items()
           if "token_refiner" not in k}
    assert any("context_embedder" in k for k in get_peft_model_state_dict(m)), "refiner layers exist too"
    # only block modules: drop the refiner's LoRA from the reference as well
    ref = copy.deepcopy(model)
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["attn.to_q", "attn.to_k", "attn.to_v",
                                                                               "proj_mlp", "to_add_out"]))
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(ref, {k[len("transformer."):]: v for k, v in raw.items()})
    expected = forward(ref)
    kohya = hy.diffusers_to_kohya(raw, alpha=2 * RANK, rank=RANK)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4 * RANK  # block-diagonal
    comfy = hy.kohya_to_comfy(kohya)
    out = load_and_run(model, hy.comfy_to_diffusers(comfy))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_unknown_keys_are_refused():
    with pytest.raises(hy.FormatError, match="byt5_in"):
        hy.comfy_to_kohya({"diffusion_model.byt5_in.fc1.lora_A.weight": torch.zeros(2, 3),
                           "diffusion_model.byt5_in.fc1.lora_B.weight": torch.zeros(3, 2)})
    with pytest.raises(hy.FormatError, match="no LoRA-able module named 'img_norm1'"):
        hy.comfy_to_kohya({"diffusion_model.double_blocks.0.img_norm1.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(hy.FormatError, match="has no lora_B"):
        hy.comfy_to_kohya({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(hy.FormatError, match="context_embedder"):
        hy.diffusers_to_kohya({"transformer.context_embedder.proj_in.lora_A.weight": torch.zeros(2, 3)})


def test_metadata_names_the_architecture():
    meta = hy.kohya_metadata(network_dim=16, title="x")
    assert meta["modelspec.architecture"] == "hunyuan-image-2.1/lora"
    assert meta["ss_network_module"] == "networks.lora_hunyuan_image"
    assert meta["ss_network_dim"] == "16" and meta["modelspec.title"] == "x"
    assert all(isinstance(v, str) for v in meta.values())


def test_kohya_output_uses_sd_scripts_names_and_round_trips():
    """Our `kohya` HunyuanImage file: sd-scripts' module names with alphas; reading it back gives the same
    products B·A as the ComfyUI file (ComfyUI's names are only renamed, never re-weighted)."""
    import torch

    from lora_run_formats import hunyuan_image as hi

    g = torch.Generator().manual_seed(0)
    comfy = {}
    for module, (i, o) in {"double_blocks.0.img_mlp.0": (8, 32), "double_blocks.0.img_mod.lin": (8, 48),
                           "double_blocks.0.txt_attn.qkv": (8, 24), "single_blocks.0.modulation.lin": (8, 24),
                           "single_blocks.0.linear2": (40, 8)}.items():
        comfy[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(2, i, generator=g)
        comfy[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(o, 2, generator=g)
    kohya = hi.to_sd_scripts_names(hi.comfy_to_kohya(comfy))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert modules == {"lora_unet_double_blocks_0_img_mlp_fc1", "lora_unet_double_blocks_0_img_mod_linear",
                       "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_single_blocks_0_modulation_linear",
                       "lora_unet_single_blocks_0_linear2"}
    assert all(kohya[f"{m}.alpha"].item() == 2.0 for m in modules)
    back = hi.kohya_to_comfy(kohya)               # sd-scripts' names are read back (normalize_kohya)
    assert set(back) == set(comfy)
    for key in comfy:
        torch.testing.assert_close(back[key], comfy[key])
