"""FLUX.2 LoRA files: every format we write is loaded by diffusers' own FLUX.2 LoRA loader
(`Flux2KleinPipeline.load_lora_weights`) with the same effective weight change ΔW = scale·B·A on every layer as
the trained peft LoRA; our reader (used for samples/evaluation) converts kohya and ComfyUI files back exactly.
A planted mistake (q and k swapped in the fused qkv) must be caught by the same comparison."""
from __future__ import annotations

import pytest

from lora_run_devtools.testing import parse_recipe_text


def _adapter(model, targets="all-linear", rank=4, alpha=2.0):
    from lora_run_native.adapters import adapter_class

    recipe = parse_recipe_text(f"""
[model]
family = "flux.2-klein"
source = "{model}"
[dataset]
path = "{model}"
trigger = "ohwx"
[lora]
rank = {rank}
alpha = {alpha}
targets = "{targets}"
[train]
steps = 1
mixed_precision = "no"
""")
    return adapter_class("flux.2-klein")(recipe)


def trained_lora(adapter, targets, modules=()):
    """A transformer with a LoRA whose A and B are both random (as after training); its peft state dict."""
    import torch
    from peft.utils import get_peft_model_state_dict

    transformer = adapter.load_transformer()
    names = adapter.lora_target_modules(transformer, targets, list(modules))
    adapter.inject_lora(transformer, names, rank=4, alpha=2.0, dropout=0.0, init="default")
    torch.manual_seed(3)
    for name, p in transformer.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn_like(p) * 0.1
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}
    return transformer, names, state


def expected_deltas(state, scale):
    out = {}
    for k, a in state.items():
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0]
            out[module] = scale * state[k.replace(".lora_A.", ".lora_B.")] @ a
    return out


def loaded_deltas(pipe, adapter_name):
    out = {}
    for name, module in pipe.transformer.named_modules():
        if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {}):
            a = module.lora_A[adapter_name].weight
            b = module.lora_B[adapter_name].weight
            out[name] = module.scaling[adapter_name] * b @ a
    return out


def same(loaded, expected) -> bool:
    import torch

    return set(loaded) == set(expected) and all(torch.allclose(loaded[m], expected[m], atol=1e-5) for m in expected)


def _pipe(adapter):
    import torch

    return adapter.load_pipeline("cpu", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, targets", [("diffusers", "all-linear"), ("comfyui", "all-linear"),
                                          ("kohya", "attention+mlp")])
def test_diffusers_flux2_loader_loads_our_files(fmt, targets, tiny_klein, tmp_path):
    from lora_run_formats import save_lora

    adapter = _adapter(tiny_klein, targets)
    _, names, state = trained_lora(adapter, targets)
    tensors, meta = adapter.lora_files(fmt, state, {}, rank=4, alpha=2.0, te_rank=None, metadata={"title": "t"})
    path = save_lora(tmp_path / f"{fmt}.safetensors", tensors, meta)
    pipe = _pipe(adapter)
    pipe.load_lora_weights(str(path), adapter_name="ours")          # diffusers' own reader, no help from us
    expected = expected_deltas(state, 2.0 / 4)
    assert set(expected) == set(names)
    assert same(loaded_deltas(pipe, "ours"), expected)
    if fmt == "kohya":                       # planted: q and k blocks of the fused qkv swapped
        import torch

        key = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
        up = tensors[key]
        third = up.shape[0] // 3
        bad = dict(tensors, **{key: torch.cat([up[third:2 * third], up[:third], up[2 * third:]])})
        bad_path = save_lora(tmp_path / "bad.safetensors", bad, meta)
        pipe.load_lora_weights(str(bad_path), adapter_name="bad")
        assert not same(loaded_deltas(pipe, "bad"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_our_reader_is_exact_for_every_format(fmt, tiny_klein, tmp_path):
    """Every Linear of the transformer (modulation, embedders and the output layers included; diffusers' kohya
    reader drops some of those, ours keeps them)."""
    from lora_run_formats import save_lora

    adapter = _adapter(tiny_klein)
    _, names, state = trained_lora(adapter, "all-linear", modules=[r".*"])
    assert "norm_out.linear" in names and "proj_out" in names and "x_embedder" in names
    tensors, meta = adapter.lora_files(fmt, state, {}, rank=4, alpha=2.0, te_rank=None, metadata={})
    path = save_lora(tmp_path / f"{fmt}.safetensors", tensors, meta)
    pipe = _pipe(adapter)
    adapter.load_lora_into_pipeline(pipe, path, adapter_name="ours")
    assert same(loaded_deltas(pipe, "ours"), expected_deltas(state, 0.5))


def test_kohya_metadata_and_alpha(tiny_klein):
    adapter = _adapter(tiny_klein)
    _, _, state = trained_lora(adapter, "attention")
    tensors, meta = adapter.lora_files("kohya", state, {}, rank=4, alpha=2.0, te_rank=None, metadata={"title": "x"})
    assert meta["ss_base_model_version"] == "flux2_klein" and meta["modelspec.title"] == "x"
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape[0] == 12            # three rank-4 parts
    assert float(tensors[f"{qkv}.alpha"]) == pytest.approx(6.0)         # alpha/rank stays 0.5
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == pytest.approx(2.0)


def test_unknown_module_is_refused_with_its_name():
    import torch

    from lora_run_flux2.formats import FormatError, diffusers_to_kohya, to_diffusers

    with pytest.raises(FormatError, match="pos_embed"):
        diffusers_to_kohya({"transformer.pos_embed.lora_A.weight": torch.zeros(2, 4),
                            "transformer.pos_embed.lora_B.weight": torch.zeros(4, 2)}, alpha=2, rank=2)
    with pytest.raises(FormatError, match="lora_unet_vector_in"):
        to_diffusers({"lora_unet_vector_in_in_layer.lora_down.weight": torch.zeros(2, 4)})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_evaluation_generation_applies_the_lora_at_its_strength(fmt, tiny_klein, tmp_path):
    """The generation API the evaluator calls: the base pipeline from the recipe, our file loaded, strength 0 is
    the base model's image and strength 1 differs; the same seed gives the same image."""
    import numpy as np
    from PIL import Image

    from lora_run_formats import save_lora
    from lora_run_native.generate import generate_images

    adapter = _adapter(tiny_klein)
    _, _, state = trained_lora(adapter, "all-linear")
    tensors, meta = adapter.lora_files(fmt, state, {}, rank=4, alpha=2.0, te_rank=None, metadata={})
    lora = save_lora(tmp_path / f"{fmt}.safetensors", tensors, meta)
    job = {"prompt": "a photo of ohwx", "seed": 3, "steps": 2, "guidance": 2.0, "width": 64, "height": 64}
    jobs = [{**job, "name": "off", "strength": 0.0}, {**job, "name": "on", "strength": 1.0},
            {**job, "name": "on-again", "strength": 1.0}]
    done = generate_images(adapter.recipe, lora, jobs, tmp_path / "out", device="cpu")
    base = generate_images(adapter.recipe, None, [{**job, "name": "base", "strength": 1.0}], tmp_path / "out",
                           device="cpu")
    pixels = {r["name"]: np.asarray(Image.open(r["path"]), dtype=np.int16) for r in done + base}
    assert np.abs(pixels["off"] - pixels["base"]).max() <= 1
    assert np.abs(pixels["on"] - pixels["base"]).max() > 1
    assert np.array_equal(pixels["on"], pixels["on-again"])


def test_kohya_and_comfyui_deltas_are_the_bfl_model_layout(tiny_klein):
    """Every module's ΔW in our kohya/ComfyUI file equals the trained ΔW carried into BFL's layout by the
    model's own diffusers → BFL conversion (q/k/v stacked, the final modulation's halves swapped)."""
    import torch

    from lora_run_flux2.files import transformer_diffusers_to_bfl

    adapter = _adapter(tiny_klein)
    _, _, state = trained_lora(adapter, "all-linear", modules=[r".*"])
    expected = transformer_diffusers_to_bfl({f"{m}.weight": d for m, d in expected_deltas(state, 0.5).items()})

    def kohya_deltas(tensors):
        out = {}
        for key, down in tensors.items():
            if key.endswith(".lora_down.weight"):
                base = key[:-len(".lora_down.weight")]
                scale = float(tensors[f"{base}.alpha"]) / down.shape[0]
                out[base] = scale * tensors[f"{base}.lora_up.weight"] @ down
        return out

    kohya, _ = adapter.lora_files("kohya", state, {}, rank=4, alpha=2.0, te_rank=None, metadata={})
    comfy, _ = adapter.lora_files("comfyui", state, {}, rank=4, alpha=2.0, te_rank=None, metadata={})
    ours = kohya_deltas(kohya)
    comfy_deltas = {k[len("diffusion_model."):-len(".lora_A.weight")]: comfy[k.replace("lora_A", "lora_B")] @ v
                    for k, v in comfy.items() if k.endswith(".lora_A.weight")}
    assert len(ours) == len(expected) == len(comfy_deltas)
    for key, delta in expected.items():
        module = key[:-len(".weight")]
        assert torch.allclose(ours["lora_unet_" + module.replace(".", "_")], delta, atol=1e-6), module
        assert torch.allclose(comfy_deltas[module], delta, atol=1e-6), module
    # planted: without the swap the final modulation would not match the model's layout
    final = expected["final_layer.adaLN_modulation.1.weight"]
    half = final.shape[0] // 2
    assert not torch.allclose(torch.cat([final[half:], final[:half]]), final, atol=1e-6)
