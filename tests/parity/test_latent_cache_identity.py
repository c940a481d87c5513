"""The latent cache's key covers what normalises a latent: a VAE given as a `[model.files]` file takes its config —
FLUX.1's ``scaling_factor`` and ``shift_factor``, HunyuanImage's scaling factor, FLUX.2's batch-norm eps — from
`[model] source`, so that config is part of the VAE's identity, as it is for a VAE loaded from a folder (whose
JSON files are hashed). Otherwise a shared `[train] cache_dir` served latents normalised with another config's
factors to a run whose source says otherwise.
"""
from __future__ import annotations

import json
import shutil

import pytest

from .conftest import minimal_recipe


@pytest.fixture(scope="module")
def flux_with_files(tmp_path_factory):
    from lora_run_flux.tiny import build_tiny_flux, write_single_files

    root = tmp_path_factory.mktemp("latent-identity")
    folder = build_tiny_flux(root / "flux")
    return folder, write_single_files(folder, root / "files")


def source_copy(folder, to, **vae_config):
    """A copy of the model folder whose vae/config.json has ``vae_config`` changed."""
    shutil.copytree(folder, to)
    path = to / "vae" / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, **vae_config}), encoding="utf-8")
    return to


def adapter(source, vae_file):
    from lora_run_flux.adapter import FluxAdapter

    return FluxAdapter(minimal_recipe("flux.1-dev", source, train={"mixed_precision": "no"},
                                      model={"files": {"vae": str(vae_file)}, "offline": True}))


def latents(a):
    import torch

    a.load_encoders(only=("vae",))
    pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    try:
        return a.encode_images(pixels)
    finally:
        a.unload_encoders()


def test_a_vae_files_latent_identity_covers_its_sources_config(flux_with_files, tmp_path):
    import torch

    folder, files = flux_with_files
    same = adapter(source_copy(folder, tmp_path / "same"), files["vae"])
    scaled = adapter(source_copy(folder, tmp_path / "scaled", scaling_factor=0.5), files["vae"])
    unshifted = adapter(source_copy(folder, tmp_path / "unshifted", shift_factor=None), files["vae"])
    base = adapter(folder, files["vae"])

    # the source's config normalises the file's latents: another scaling or shift factor, other latents …
    z = latents(base)
    assert torch.allclose(latents(same), z)
    assert not torch.allclose(latents(scaled), z, atol=1e-4)
    assert not torch.allclose(latents(unshifted), z, atol=1e-4)
    # … so another cache identity (a shared cache_dir must not serve one for the other)
    identity = base.encoder_identity("latents")
    assert scaled.encoder_identity("latents") != identity, "the scaling factor is not in the latent cache key"
    assert unshifted.encoder_identity("latents") != identity, "the shift factor is not in the latent cache key"
    # control: a source with the same config (another folder) gives the same latents and the same identity
    assert same.encoder_identity("latents") == identity
