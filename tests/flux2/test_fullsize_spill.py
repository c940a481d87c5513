"""bench/flux2_fullsize.save_sharded: a transformer larger than the disk is saved partly into a second folder
(on the GPU machine, RAM-backed /dev/shm) and still loads as a plain diffusers folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESERVE = 4096      # bytes the disk must keep free


def _bench():
    spec = importlib.util.spec_from_file_location("flux2_fullsize", REPO / "bench" / "flux2_fullsize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                                   axes_dims_rope=(4, 4, 4, 4))


def test_shards_over_the_disk_budget_go_to_the_spill_folder_and_the_model_loads(tmp_path):
    from diffusers import Flux2Transformer2DModel

    bench = _bench()
    model = _model()
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    capacity = size // 2 + RESERVE          # the disk holds about half the shards

    def free(path: Path) -> int:
        disk = sum(f.stat().st_size for f in (tmp_path / "model").glob("*.safetensors") if not f.is_symlink())
        return capacity - disk if "model" in str(path) else 10 * 2**30

    folder, spill = tmp_path / "model", tmp_path / "shm"
    spilled = bench.save_sharded(model, folder, spill, reserve_gib=RESERVE / 2**30,
                                 max_shard_size="20KB", free_bytes=free)
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and spilled and len(spilled) < len(shards)
    assert all((folder / p.name).is_symlink() for p in spilled)
    on_disk = sum(f.stat().st_size for f in shards if not f.is_symlink())
    assert on_disk <= capacity - RESERVE
    loaded = Flux2Transformer2DModel.from_pretrained(folder)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_control_without_a_spill_folder_everything_stays_on_disk(tmp_path):
    bench = _bench()
    spilled = bench.save_sharded(_model(), tmp_path / "model", None, max_shard_size="20KB",
                                 free_bytes=lambda path: 0)
    assert spilled == [] and not any(p.is_symlink() for p in (tmp_path / "model").iterdir())
