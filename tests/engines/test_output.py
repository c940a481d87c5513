"""`lora_run_engines.output`: the one check of a LoRA an engine wrote before lora-run reports it as the run's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_run_engines.output import lora_problem, module_pattern

#: one module of each layout, as the engines write them (sd-scripts' kohya names; diffusion-pipe's FLUX.1 diffusers
#: and HunyuanImage-2.1 ComfyUI keys)
LAYOUTS = {("flux.1-dev", "kohya"): ("lora_unet_double_blocks_0_img_attn_qkv", "lora_down.weight", "lora_up.weight"),
           ("hunyuan-image-2.1", "kohya"): ("lora_unet_single_blocks_3_modulation_linear", "lora_down.weight",
                                            "lora_up.weight"),
           ("flux.1-dev", "diffusers"): ("transformer.single_transformer_blocks.1.proj_mlp", "lora_A.weight",
                                         "lora_B.weight"),
           ("hunyuan-image-2.1", "comfyui"): ("diffusion_model.double_blocks.2.img_attn.qkv", "lora_A.weight",
                                              "lora_B.weight")}


def write(path: Path, module: str, down: str, up: str, rank: int = 4, value: float = 0.1) -> Path:
    tensors = {f"{module}.{down}": np.full((rank, 8), 0.1, np.float16), f"{module}.{up}": np.full((24, rank), value,
                                                                                                  np.float16)}
    if down == "lora_down.weight":
        tensors[f"{module}.alpha"] = np.array(2.0, np.float16)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("family, layout", list(LAYOUTS))
def test_a_whole_lora_of_the_family_and_rank_passes_and_every_damage_is_named(tmp_path, family, layout):
    module, down, up = LAYOUTS[(family, layout)]

    def problem(path: Path, rank: int = 4) -> str | None:
        return lora_problem(path, family=family, layout=layout, rank=rank)

    good = write(tmp_path / "good.safetensors", module, down, up)
    assert problem(good) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in problem(cut)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "too short" in problem(empty)
    nan = write(tmp_path / "nan.safetensors", module, down, up, value=float("nan"))
    assert "holds NaN or inf" in problem(nan)
    assert "rank 4, not the recipe's [lora] rank = 8" in problem(good, rank=8)
    other = write(tmp_path / "sdxl.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down.weight",
                  "lora_up.weight")
    assert f"is not a module of a {family} LoRA in the {layout} layout" in problem(other)


def test_the_module_names_come_from_the_families_conversion_tables():
    """FLUX.1's kohya names are not HunyuanImage-2.1's sd-scripts spellings (`img_mlp_fc1`), nor the other way round
    for FLUX.1's `img_mlp_0`… which HunyuanImage's converter reads too; a module outside the blocks is no module."""
    flux, hunyuan = module_pattern("flux.1-dev", "kohya"), module_pattern("hunyuan-image-2.1", "kohya")
    assert flux.fullmatch("lora_unet_double_blocks_18_txt_mlp_2") and flux.fullmatch("lora_unet_single_blocks_37_linear1")
    assert not flux.fullmatch("lora_unet_double_blocks_0_img_mlp_fc1")
    assert hunyuan.fullmatch("lora_unet_double_blocks_0_img_mlp_fc1") and hunyuan.fullmatch("lora_unet_double_blocks_0_img_mlp_0")
    assert not hunyuan.fullmatch("lora_unet_double_blocks_0_img_attn_to_q")
    diffusers = module_pattern("flux.1-dev", "diffusers")
    assert diffusers.fullmatch("transformer.transformer_blocks.0.attn.to_add_out")
    assert diffusers.fullmatch("single_transformer_blocks.0.attn.to_q")       # diffusion-pipe may leave the prefix out
    assert not diffusers.fullmatch("transformer.down_blocks.0.attn.to_q")
    with pytest.raises(ValueError):
        module_pattern("hunyuan-dit-1.2", "kohya")
