"""ComfyUI's own loader reads the LoRA files lora-run writes, completely and with the trained update.

For every file docs/lora-formats.md says ComfyUI loads (FLUX.1-dev kohya and diffusers, FLUX.2 [klein]/[dev]
kohya and comfyui, HunyuanImage-2.1 comfyui), a LoRA with random A and B is written through the family
adapter's ``lora_files`` + ``save_lora`` (what a run does). ComfyUI (a checkout, not a package: set
``LORA_RUN_COMFYUI``, default ``/work/comfyui``) then runs in a subprocess (``comfyui_probe.py``): it loads the
tiny transformer from its single file with its "Load Diffusion Model" path (layout and config detected from the
tensors), the LoRA with its "LoraLoaderModelOnly" path, and computes each patched weight. The test asserts
that ComfyUI consumed every tensor of the file (no "lora key not loaded" or other warning), patched exactly the
weights the LoRA changes, and that each weight's change equals the trained ΔW = (alpha/rank)·B·A carried into the
single file's layout by the same converter that wrote the model file.

The tiny transformers keep the real models' constants that ComfyUI's detection assumes (head dim 128, RoPE
axes, MLP ratio, 256 timestep channels, latent channels, two token-refiner blocks for HunyuanImage) and shrink
width (one head) and depth (one double and one single block). Planted mistakes (q and k swapped in a fused
qkv, a dropped alpha, a misnamed module) must be caught by the same comparison.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_run_devtools.testing import parse_recipe_text

COMFYUI = Path(os.environ.get("LORA_RUN_COMFYUI", "/work/comfyui"))
PROBE = Path(__file__).with_name("comfyui_probe.py")
RANK, ALPHA = 4, 2.0

#: packages ComfyUI imports that lora-run's environment does not otherwise have
COMFY_PACKAGES = {"comfy_aimdo": "comfy-aimdo==0.4.11", "comfy_kitchen": "comfy-kitchen==0.2.26",
                  "torchsde": "torchsde", "einops": "einops"}
_MISSING = [pip for module, pip in COMFY_PACKAGES.items() if importlib.util.find_spec(module) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (COMFYUI / "comfy" / "lora.py").is_file(), reason=(
        f"no ComfyUI checkout at {COMFYUI} (set LORA_RUN_COMFYUI): write one as docs/lora-formats.md "
        "'Proven in ComfyUI' says (commit 9a9fdb10 from the kat3ri/ComfyUI snapshot) or git clone "
        "https://github.com/comfyanonymous/ComfyUI")),
    pytest.mark.skipif(bool(_MISSING), reason=f"ComfyUI needs pip install {' '.join(_MISSING)}"),
]


def _flux1():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                  pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _flux2(guidance: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=1, joint_attention_dim=48,
                                   timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                                   guidance_embeds=guidance)


def _hunyuan_image():
    from diffusers import HunyuanImageTransformer2DModel

    return HunyuanImageTransformer2DModel(in_channels=64, out_channels=64, num_attention_heads=1,
                                          attention_head_dim=128, num_layers=1, num_single_layers=1,
                                          num_refiner_layers=2, mlp_ratio=4.0, text_embed_dim=32,
                                          text_embed_2_dim=1472, rope_axes_dim=(64, 64))


def _family(name: str) -> dict:
    """What differs per family: the tiny diffusers folder, the ComfyUI-shaped transformer, the single-file layout
    (converter, key prefix), the files docs/lora-formats.md claims for ComfyUI and the LoRA cases."""
    if name == "flux.1-dev":
        from lora_run_flux.files import transformer_diffusers_to_bfl
        from lora_run_flux.tiny import build_tiny_flux

        return dict(build=build_tiny_flux, transformer=_flux1, to_file=transformer_diffusers_to_bfl,
                    prefix="model.diffusion_model.", formats=("kohya", "diffusers"),
                    cases={"all-linear": ("all-linear", ()), "attention": ("attention", ()),
                           "every-linear": ("all-linear", (r".*",)), "text-encoder": ("all-linear", ())})
    if name.startswith("flux.2"):
        from lora_run_flux2.files import transformer_diffusers_to_bfl
        from lora_run_flux2.tiny import build_tiny_flux2

        variant = name.split("-")[1]
        return dict(build=lambda folder: build_tiny_flux2(folder, variant),
                    transformer=lambda: _flux2(variant == "dev"), to_file=transformer_diffusers_to_bfl,
                    prefix="model.diffusion_model.", formats=("kohya", "comfyui"), unclaimed=("diffusers",),
                    cases={"all-linear": ("all-linear", ()), "attention": ("attention", ()),
                           "every-linear": ("all-linear", (r".*",))})
    from lora_run_hunyuan_image.files import transformer_diffusers_to_original
    from lora_run_hunyuan_image.tiny import build_tiny_hunyuan_image

    return dict(build=build_tiny_hunyuan_image, transformer=_hunyuan_image, to_file=transformer_diffusers_to_original,
                prefix="", formats=("comfyui",), unclaimed=("kohya", "diffusers"),
                cases={"all-linear": ("all-linear", ()), "attention": ("attention", ())})


def _adapter(family: str, folder: Path):
    from lora_run_native.adapters import adapter_class

    recipe = parse_recipe_text(f"""
[model]
family = "{family}"
source = "{folder}"
[dataset]
path = "{folder}"
trigger = "ohwx"
[lora]
rank = {RANK}
alpha = {ALPHA}
[train]
steps = 1
mixed_precision = "no"
""")
    return adapter_class(family)(recipe)


def _trained(adapter, module, names: list[str], seed: int):
    """The peft state dict of a LoRA with random A and B (as after training) on ``names`` of ``module`` (which is
    left as it is)."""
    import copy

    import torch
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(module)
    adapter.inject_lora(model, names, rank=RANK, alpha=ALPHA, dropout=0.0, init="default")
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = torch.randn_like(p) * 0.1
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _expected_in_file_layout(base: dict, state: dict, to_file) -> dict:
    """ΔW = (alpha/rank)·B·A per trained module, in the single file's layout: to_file(W + ΔW) − to_file(W)
    (exact for fused and swapped tensors; weights the LoRA leaves alone drop out)."""
    import torch

    merged = dict(base)
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            merged[f"{module}.weight"] = base[f"{module}.weight"] + ALPHA / RANK * state[
                key.replace(".lora_A.", ".lora_B.")] @ a
    before, after = to_file(base), to_file(merged)
    return {k: (after[k] - before[k]).contiguous() for k in after if not torch.equal(after[k], before[k])}


def _planted(fmt: str, tensors: dict) -> dict[str, dict]:
    """Mistakes the comparison must catch: q and k swapped in the first fused qkv, and for kohya files a dropped
    alpha, for the others a module renamed to one the model does not have."""
    import torch

    up_suffix = {"kohya": ".lora_up.weight"}.get(fmt, ".lora_B.weight")
    out = {}
    fused = sorted(k for k in tensors if "attn" in k and "qkv" in k and k.endswith(up_suffix))
    if fused:
        key = fused[0]
        third = tensors[key].shape[0] // 3
        up = tensors[key]
        out["swap-qk"] = dict(tensors, **{key: torch.cat([up[third:2 * third], up[:third], up[2 * third:]])})
    else:                                                      # separate q/k modules (diffusers file)
        q = sorted(k for k in tensors if k.endswith(".attn.to_q.lora_B.weight"))[0]
        k = q.replace(".to_q.", ".to_k.")
        out["swap-qk"] = dict(tensors, **{q: tensors[k], k: tensors[q]})
    if fmt == "kohya":
        alpha = sorted(k for k in tensors if k.endswith(".alpha"))[0]
        out["drop-alpha"] = {k: v for k, v in tensors.items() if k != alpha}
    else:
        module = sorted(k for k in tensors if k.endswith(up_suffix))[0][:-len(up_suffix)]
        out["misnamed"] = {(k.replace(module, module + "_typo", 1) if k.startswith(module + ".") else k): v
                           for k, v in tensors.items()}
    return out


def _problems(report: dict, name: str, delta: dict, expected: dict) -> list[str]:
    """Everything that makes ComfyUI's reading of the file differ from the trained LoRA."""
    import torch

    found = [f"ComfyUI: {w}" for w in report["loras"][name]["warnings"]]
    if set(delta) != set(expected):
        found.append(f"patched {sorted(set(delta) - set(expected))} not trained; "
                     f"trained {sorted(set(expected) - set(delta))} not patched")
    for key in sorted(set(delta) & set(expected)):
        if not torch.allclose(delta[key], expected[key], atol=1e-5, rtol=1e-4):
            found.append(f"{key}: max |ΔW difference| {float((delta[key] - expected[key]).abs().max()):.3g}")
    return found


def _clip_l(adapter, tmp: Path, seed: int) -> tuple[dict, dict, str]:
    """FLUX.1's text-encoder LoRA on the tiny CLIP-L: its peft state, the CLIP-L file ComfyUI loads (with its
    config) and the expected ΔW under ComfyUI's names (``clip_l.transformer.text_model.…``)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from lora_run_flux.tiny import write_single_files

    folder = Path(adapter.recipe.model.source)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = _trained(adapter, clip, adapter.text_encoder_targets(clip), seed)
    expected = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("text_model.")
            expected[f"clip_l.transformer.text_model.{module}.weight"] = (
                ALPHA / RANK * state[key.replace(".lora_A.", ".lora_B.")] @ a).contiguous()
    save_file(expected, str(tmp / "clip_l.expected.safetensors"))
    clip_file = write_single_files(folder, tmp / "single")["clip_l"]
    tensors = load_file(str(clip_file))                # ComfyUI's CLIP-L has CLIP's 49408-token vocabulary
    embedding = "text_model.embeddings.token_embedding.weight"
    tensors[embedding] = torch.cat([tensors[embedding], tensors[embedding].new_zeros(
        49408 - tensors[embedding].shape[0], tensors[embedding].shape[1])])
    save_file(tensors, str(clip_file))
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    return state, {"file": str(clip_file), "config": config}, str(tmp / "clip_l.expected.safetensors")


@pytest.fixture(scope="module")
def comfyui_runs(tmp_path_factory):
    """Per family: ComfyUI's report and, per LoRA file, its ΔW and the expected ΔW (computed once, lazily)."""
    cache: dict[str, dict] = {}

    def run(family: str) -> dict:
        if family in cache:
            return cache[family]
        import torch
        from safetensors.torch import load_file, save_file

        from lora_run_formats import save_lora

        spec = _family(family)
        tmp = tmp_path_factory.mktemp(family)
        adapter = _adapter(family, spec["build"](tmp / "model"))
        torch.manual_seed(0)
        transformer = spec["transformer"]()
        base = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        model_file = tmp / "transformer.safetensors"
        save_file({spec["prefix"] + k: v.contiguous() for k, v in spec["to_file"](base).items()}, str(model_file))
        job: dict = {"model": str(model_file), "clip_l": None, "loras": {}}
        for seed, (case, (targets, modules)) in enumerate(spec["cases"].items()):
            state = _trained(adapter, transformer, adapter.lora_target_modules(transformer, targets, list(modules)),
                             seed)
            expected_file = tmp / f"{case}.expected.safetensors"
            save_file(_expected_in_file_layout(base, state, spec["to_file"]), str(expected_file))
            te_state, clip_files = {}, {}
            if case == "text-encoder":
                te_state, job["clip_l"], clip_files["expected_clip_l"] = _clip_l(adapter, tmp, seed)
            for fmt in spec["formats"] + spec.get("unclaimed", ()):
                tensors, meta = adapter.lora_files(fmt, state, te_state, rank=RANK, alpha=ALPHA, te_rank=None,
                                                   metadata={"title": "t"})
                files = {f"{fmt}-{case}": tensors}
                if case == "all-linear" and fmt in spec["formats"]:
                    files.update({f"{fmt}-{case}-{p}": t for p, t in _planted(fmt, tensors).items()})
                for name, t in files.items():
                    path = save_lora(tmp / f"{name}.safetensors", t, meta)
                    job["loras"][name] = {"file": str(path), "expected": str(expected_file), **clip_files}
        (tmp / "job.json").write_text(json.dumps(job))
        out = tmp / "comfyui"
        out.mkdir()
        done = subprocess.run([sys.executable, str(PROBE), str(COMFYUI), str(tmp / "job.json"), str(out)],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads((out / "report.json").read_text())
        loras = {name: (load_file(str(out / f"{name}.delta.safetensors")),
                        load_file(str(out / f"{name}.expected.safetensors"))) for name in job["loras"]}
        cache[family] = {"report": report, "loras": loras, "base": base}
        return cache[family]

    return run


FAMILIES = {"flux.1-dev": "Flux", "flux.2-klein": "Flux2", "flux.2-dev": "Flux2", "hunyuan-image-2.1": "HunyuanImage21"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyui_detects_and_loads_the_tiny_model(family, comfyui_runs):
    """ComfyUI recognises the single file as the family's model and loads every tensor into it."""
    report = comfyui_runs(family)["report"]
    assert report["model_config"] == FAMILIES[family], report.get("unet_config")
    assert report["model_warnings"] == []            # no "unet missing" / "unet unexpected"
    # FLUX.1's CLIP-L file (text-encoder case) lacks only the projection, as ComfyUI's usual clip_l files do
    assert report.get("clip_warnings", []) in ([], ["clip missing: ['text_projection.weight']"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyui_applies_our_lora_files_exactly(family, comfyui_runs):
    run = comfyui_runs(family)
    spec = _family(family)
    for case in spec["cases"]:
        for fmt in spec["formats"]:
            name = f"{fmt}-{case}"
            delta, expected = run["loras"][name]
            assert expected, name
            assert _problems(run["report"], name, delta, expected) == [], name
            entry = run["report"]["loras"][name]
            worst = max(float((delta[k] - expected[k]).abs().max()) for k in expected)
            print(f"{family} {name}: {entry['keys']}/{entry['keys']} keys loaded, {len(delta)} weights patched, "
                  f"max |ΔW difference| {worst:.2e}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_planted_mistakes_are_caught(family, comfyui_runs):
    run = comfyui_runs(family)
    planted = [n for n in run["loras"] if n.endswith(("swap-qk", "drop-alpha", "misnamed"))]
    assert len(planted) == 2 * len(_family(family)["formats"])
    for name in planted:
        delta, expected = run["loras"][name]
        found = _problems(run["report"], name, delta, expected)
        print(f"{family} {name}: {found[:2]}")
        assert found, name


#: files docs/lora-formats.md does not claim for ComfyUI: the modules ComfyUI drops from them (it logs "lora key not
#: loaded" for each tensor); everything else in them it applies exactly
UNCLAIMED = {
    ("flux.2-klein", "diffusers"): r"^transformer\.(double_stream_modulation_(img|txt)|single_stream_modulation"
                                   r"|time_guidance_embed)\.",
    ("hunyuan-image-2.1", "kohya"): r"_(img|txt)_mlp_fc[12]\.|_(img|txt)_mod_linear\.|_modulation_linear\.",
    ("hunyuan-image-2.1", "diffusers"): r".",                  # no key of the diffusers layout is read
}


@pytest.mark.parametrize("family, fmt", list(UNCLAIMED))
def test_files_not_claimed_for_comfyui_are_read_as_documented(family, fmt, comfyui_runs):
    import re

    import torch
    from safetensors import safe_open

    run = comfyui_runs(family)
    for case in _family(family)["cases"]:
        name = f"{fmt}-{case}"
        entry = run["report"]["loras"][name]
        delta, expected = run["loras"][name]
        dropped = {w.removeprefix("lora key not loaded: ") for w in entry["warnings"]}
        assert all(w.startswith("lora key not loaded: ") for w in entry["warnings"]), name
        with safe_open(entry["file"], "pt") as f:
            keys = set(f.keys())
        assert dropped == {k for k in keys if re.search(UNCLAIMED[family, fmt], k)}, name
        assert set(delta) <= set(expected), name
        assert all(torch.allclose(delta[k], expected[k], atol=1e-5, rtol=1e-4) for k in delta), name
        print(f"{family} {name}: {len(keys) - len(dropped)}/{len(keys)} keys loaded, {len(delta)} of "
              f"{len(expected)} trained weights patched")
