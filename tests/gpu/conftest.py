"""GPU acceptance tests: collected everywhere, run only where CUDA is available (`-m gpu` selects them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU acceptance suite)")
    cuda = _cuda()
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def acceptance():
    """bench/gpu_acceptance.py as a module: the suite and the benchmark share one implementation."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "bench" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def acceptance_assets(acceptance, tmp_path_factory):
    work = tmp_path_factory.mktemp("acceptance")
    return work, acceptance.build_assets(work, {"tiny"})
