"""FLUX.1's kohya file through sd-scripts' own loader (``networks.lora_flux.create_network_from_weights``, as
``flux_minimal_inference.py`` and ``flux_merge_lora.py`` build the network), run by the engine interpreter on a
tiny BFL-layout ``Flux`` of sd-scripts: each module sd-scripts creates applies up·down·(alpha/dim), which must
equal the trained peft LoRA's ΔW = (alpha/rank)·B·A in the BFL layout (fused qkv / linear1 included), for the
transformer and the CLIP-L LoRA (its own rank), at fp32 and bf16. A layer sd-scripts does not load must be one
that ``lora-run plan`` announces. Planted mistakes (a wrong alpha, q and k swapped) must fail the comparison.
Needs the sd-scripts checkout and its interpreter (LORA_RUN_SD_SCRIPTS, LORA_RUN_ENGINE_PY); skipped without."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

SD_SCRIPTS = Path(os.environ.get("LORA_RUN_SD_SCRIPTS", "/work/engines/sd-scripts"))
ENGINE_PY = Path(os.environ.get("LORA_RUN_ENGINE_PY", "/work/engines/venv/bin/python"))
HAVE = (SD_SCRIPTS / "networks" / "lora_flux.py").is_file() and ENGINE_PY.is_file()

PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
from networks import lora_flux
from library import flux_models
from transformers import CLIPTextConfig, CLIPTextModel
d = sys.argv[2]
base = load_file(f"{d}/base_bfl.safetensors")
hidden, head = base["img_in.weight"].shape[0], int(sys.argv[4])
params = flux_models.FluxParams(
    in_channels=base["img_in.weight"].shape[1], vec_in_dim=base["vector_in.in_layer.weight"].shape[1],
    context_in_dim=base["txt_in.weight"].shape[1], hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // head,
    depth=1, depth_single_blocks=1, axes_dim=[head // 8, head * 7 // 16, head * 7 // 16], theta=10000,
    qkv_bias=True, guidance_embed=True)
flux = flux_models.Flux(params)
flux.load_state_dict(base, strict=True)
cfg = json.load(open(f"{d}/clip.json"))
clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}))
net, sd = lora_flux.create_network_from_weights(1.0, f"{d}/{sys.argv[3]}", None, [clip, None], flux)
net.apply_to([clip, None], flux, apply_text_encoder=True, apply_unet=True)
info = net.load_state_dict(sd, False)
name_of = {}
for prefix, model in (("lora_unet_", flux), ("lora_te1_", clip)):
    for n, _ in model.named_modules():
        name_of[prefix + n.replace(".", "_")] = n + ".weight"
out = {"unexpected": sorted(info.unexpected_keys), "missing": sorted(info.missing_keys), "deltas": {}}
for lora in net.text_encoder_loras + net.unet_loras:
    delta = (lora.lora_up.weight.float() @ lora.lora_down.weight.float()) * lora.scale * lora.multiplier
    out["deltas"][name_of[lora.lora_name]] = delta.tolist()
json.dump(out, open(f"{d}/result.json", "w"))
'''


def _engine_ok() -> str | None:
    if not HAVE:
        return "no sd-scripts checkout / engine interpreter (bench/engines_gpu.md)"
    probe = subprocess.run([str(ENGINE_PY), "-c", "import torch, transformers, safetensors, accelerate"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"{ENGINE_PY}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"


LACKS = _engine_ok()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(LACKS is not None, reason=LACKS or "")]


def _trained(folder: Path, modules: list[str], rank: int, alpha: float, te_rank: int):
    """A tiny FLUX.1 with random peft LoRAs (A and B both random) on ``modules`` and CLIP-L's attention; the
    base transformer in BFL layout, the expected ΔW per BFL / CLIP weight, the peft state dicts."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    from lora_run_flux.adapter import FluxAdapter
    from lora_run_flux.files import transformer_diffusers_to_bfl
    from lora_run_flux.tiny import TINY, build_tiny_flux
    from lora_run_native.adapters.base import matches_module
    from lora_run_native.outputs import lora_state_dict

    src = build_tiny_flux(folder / "tiny")
    transformer = FluxTransformer2DModel.from_pretrained(str(src), subfolder="transformer")
    clip = CLIPTextModel.from_pretrained(str(src), subfolder="text_encoder")
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and matches_module(n, modules)]
    FluxAdapter.inject_lora(None, transformer, names, rank=rank, alpha=alpha, dropout=0.0, init="gaussian")
    te_names = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.Linear)
                and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
    FluxAdapter.inject_lora(None, clip, te_names, rank=te_rank, alpha=alpha * te_rank / rank, dropout=0.0,
                            init="gaussian")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in [*transformer.named_parameters(), *clip.named_parameters()]:
            if ".lora_B." in n:
                p.normal_(0, 0.2)

    def deltas(model):
        return {n: m.get_delta_weight("default").detach().clone() for n, m in model.named_modules()
                if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}

    base = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if ".lora_" not in k}
    plus = dict(base)
    for n, d in deltas(transformer).items():
        plus[f"{n}.weight"] = plus[f"{n}.weight"] + d
    bfl, bfl_plus = transformer_diffusers_to_bfl(base), transformer_diffusers_to_bfl(plus)
    expected = {k: bfl_plus[k] - bfl[k] for k in bfl if not torch.equal(bfl_plus[k], bfl[k])}
    for n, d in deltas(clip).items():
        expected[(n if n.startswith("text_model.") else f"text_model.{n}") + ".weight"] = d
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bfl.items()}, str(folder / "base_bfl.safetensors"))
    (folder / "clip.json").write_text((src / "text_encoder" / "config.json").read_text())
    return expected, lora_state_dict(transformer), lora_state_dict(clip), TINY["head_dim"]


def _recipe(precision: str, rank: int, alpha: float, te_rank: int, modules: list[str]):
    from types import SimpleNamespace as NS

    return NS(output=NS(save_precision=precision, formats=["kohya"]), text_encoder=NS(rank=te_rank),
              lora=NS(rank=rank, alpha=alpha, modules=modules))


def _sd_scripts(folder: Path, name: str, head: int) -> dict:
    done = subprocess.run([str(ENGINE_PY), "-c", PROBE, str(SD_SCRIPTS), str(folder), name, str(head)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "result.json").read_text())


def _worst(result: dict, expected: dict) -> float:
    import torch

    worst = 0.0
    for key, want in expected.items():
        got = torch.tensor(result["deltas"][key])
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


EVERY_LINEAR = [".*"]


@pytest.mark.parametrize("modules, precision, rank, alpha, te_rank", [
    ("all-linear", "fp32", 4, 2.0, 2), ("attention", "bf16", 1, 8.0, 3), (EVERY_LINEAR, "fp32", 3, 6.0, 3)])
def test_sd_scripts_applies_the_trained_delta(modules, precision, rank, alpha, te_rank, tmp_path):
    from lora_run_flux.adapter import FluxAdapter
    from lora_run_formats import save_lora
    from lora_run_native.adapters.base import MMDIT_TARGET_PRESETS
    from lora_run_native.outputs import _format_tensors

    explicit = modules if isinstance(modules, list) else []
    patterns = explicit or MMDIT_TARGET_PRESETS[modules]
    expected, tsd, esd, head = _trained(tmp_path, patterns, rank, alpha, te_rank)
    recipe = _recipe(precision, rank, alpha, te_rank, explicit)
    adapter = FluxAdapter.__new__(FluxAdapter)
    adapter.recipe = recipe
    [(_, tensors, meta)] = list(_format_tensors(adapter, tsd, esd, recipe=recipe, metadata={}))
    save_lora(tmp_path / "kohya.safetensors", tensors, meta)
    result = _sd_scripts(tmp_path, "kohya.safetensors", head)
    assert not result["missing"]
    # a layer sd-scripts does not load is one `lora-run plan` names, and nothing else is dropped
    dropped = sorted({k.split(".")[0] for k in result["unexpected"]})
    notes = " ".join(adapter.lora_format_notes())
    assert all(f"{module}" in notes for module in dropped), (dropped, notes)
    if explicit:
        assert dropped == ["lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear"]
        expected = {k: v for k, v in expected.items() if not k.startswith("final_layer.")}
    else:
        assert not dropped and not notes
    assert set(result["deltas"]) == set(expected)
    assert any(k.startswith("text_model.") for k in expected) and any(".qkv." in k for k in expected)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert _worst(result, expected) < tolerance

    if precision == "fp32":      # planted mistakes: a wrong alpha, q and k swapped in the fused qkv
        import torch

        key = next(k for k in tensors if k.endswith(".alpha") and "lora_unet_" in k)
        save_lora(tmp_path / "bad.safetensors", dict(tensors, **{key: tensors[key] * 2}), meta)
        assert _worst(_sd_scripts(tmp_path, "bad.safetensors", head), expected) > 0.1
        up = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
        third = tensors[up].shape[0] // 3
        swapped = torch.cat([tensors[up][third:2 * third], tensors[up][:third], tensors[up][2 * third:]])
        save_lora(tmp_path / "bad.safetensors", dict(tensors, **{up: swapped}), meta)
        assert _worst(_sd_scripts(tmp_path, "bad.safetensors", head), expected) > 0.1


def test_plan_names_the_layers_a_tool_drops_from_the_kohya_file():
    """Fails without lora_format_notes: `[lora] modules` on FLUX.1's final layer wrote keys sd-scripts drops."""
    from types import SimpleNamespace as NS

    from lora_run_flux.adapter import FluxAdapter

    def notes(modules, formats=("kohya", "diffusers")):
        adapter = FluxAdapter.__new__(FluxAdapter)
        adapter.recipe = NS(output=NS(formats=list(formats)), lora=NS(modules=modules))
        return adapter.lora_format_notes()

    assert notes([]) == [] and notes([r"transformer_blocks\.\d+\.attn\.to_q"]) == []
    assert notes([".*"], formats=("diffusers",)) == []
    every = notes([".*"])
    assert len(every) == 2 and "lora_unet_final_layer_linear" in every[0] and "sd-scripts" in every[0]
    assert "x_embedder" in every[1] and "diffusers file" in every[1]
    assert notes(["proj_out"])[0].count("final_layer") == 1        # the bare name is the top-level layer too
    assert len(notes(["x_embedder"])) == 1                         # sd-scripts loads img_in
