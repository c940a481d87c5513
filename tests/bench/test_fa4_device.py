"""bench/fa4_device.py, which installs FlashAttention-4 on the GPU machine from two tars carried in two calls:
a distribution is installed only once all its files are staged, nothing the machine has is replaced, and a
second call finds the distributions the first one already moved (the first GPU use of the script, 2026-12-03,
crashed there on a dist-info folder left empty by the move)."""
from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dist(root: Path, name: str, files: dict[str, bytes]) -> None:
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    listed = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD", "../../bin/outside-site"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in listed))


def _tar(path: Path, root: Path, members: list[str]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for member in members:
            tar.add(root / member, arcname=member)
    return path


@pytest.fixture()
def device(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fa4_device_under_test", ROOT / "bench" / "fa4_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(module, "STAGE", tmp_path / "stage")
    monkeypatch.setattr(module.sysconfig, "get_paths", lambda: {"purelib": str(site)})
    return module, site


def test_two_tars_in_either_order_install_each_distribution_once(device, tmp_path):
    module, site = device
    src = tmp_path / "src"
    (src / "bigpkg").mkdir(parents=True)
    (src / "bigpkg" / "huge.so").write_bytes(b"\0" * 1000)
    (src / "bigpkg" / "__init__.py").write_text("")
    (src / "smallpkg").mkdir()
    (src / "smallpkg" / "__init__.py").write_text("x = 1\n")
    (src / "pluggy").mkdir()                     # a distribution this environment has: never replaced
    (src / "pluggy" / "__init__.py").write_text("raise ImportError('replaced')\n")
    _dist(src, "lora-run-test-bigpkg", {"bigpkg/huge.so": b"", "bigpkg/__init__.py": b""})
    _dist(src, "lora-run-test-smallpkg", {"smallpkg/__init__.py": b""})
    _dist(src, "pluggy", {"pluggy/__init__.py": b""})
    big = _tar(tmp_path / "big.tar.xz", src, ["bigpkg/huge.so"])
    rest = _tar(tmp_path / "rest.tar.xz", src, ["bigpkg/__init__.py", "smallpkg", "pluggy",
                                                 "lora-run-test-bigpkg-1.0.dist-info",
                                                 "lora-run-test-smallpkg-1.0.dist-info", "pluggy-1.0.dist-info"])
    # the small tar first: its own distribution goes in, the big one waits for its missing file (exit 3)
    assert module.main([str(rest)]) == 3
    assert (site / "smallpkg" / "__init__.py").is_file() and not (site / "bigpkg").exists()
    assert not (site / "pluggy").exists()
    # the big tar next: the waiting distribution is complete now; the one moved before is not read again
    assert module.main([str(big)]) == 0
    assert (site / "bigpkg" / "huge.so").stat().st_size == 1000
    assert (site / "lora-run-test-bigpkg-1.0.dist-info" / "RECORD").is_file()
    assert not (site.parent / "bin").exists()
    # and a third call (the same tar again) is harmless
    assert module.main([str(big)]) == 0
