"""bench/engines_device.sh's unpacking on the GPU machine: a pack split into parts is joined and unpacked
once; a part that did not arrive (the machine went cold between calls) is refused with a message."""
from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("xz")), reason="needs bash and xz")


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "bench").mkdir()
    shutil.copy2(ROOT / "bench" / "engines_device.sh", tmp_path / "bench" / "engines_device.sh")
    (tmp_path / "engines" / "pack").mkdir(parents=True)
    return tmp_path


def _pack(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(raw.getvalue())


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/engines_device.sh", *args], cwd=repo, capture_output=True, text=True,
                          timeout=60)


def test_split_pack_is_joined_in_order_and_unpacked_once(tmp_path):
    repo = _repo(tmp_path)
    data = _pack({"site-x/mod.py": b"VALUE = 1\n" * 5000, "diffusion-pipe/train.py": b"print('x')\n"})
    half = len(data) // 2
    (repo / "engines/pack/dpipe.tar.xz.1of2").write_bytes(data[:half])
    (repo / "engines/pack/dpipe.tar.xz.2of2").write_bytes(data[half:])
    done = _run(repo, "unpack", "dpipe")
    assert done.returncode == 0, done.stderr
    assert (repo / "engines/site-x/mod.py").read_bytes() == b"VALUE = 1\n" * 5000
    assert (repo / "engines/.unpacked-dpipe").is_file()
    # once per machine: a second call does not unpack again over what the first left
    (repo / "engines/site-x/mod.py").write_text("changed")
    assert _run(repo, "unpack", "dpipe").returncode == 0
    assert (repo / "engines/site-x/mod.py").read_text() == "changed"


def test_a_missing_part_or_pack_is_refused_with_a_message(tmp_path):
    repo = _repo(tmp_path)
    data = _pack({"a.txt": b"a" * 1000})
    (repo / "engines/pack/dpipe.tar.xz.2of2").write_bytes(data[len(data) // 2:])
    done = _run(repo, "unpack", "dpipe")
    assert done.returncode == 2 and "dpipe.tar.xz.1of2 is missing" in done.stderr
    assert not (repo / "engines/.unpacked-dpipe").exists()
    done = _run(repo, "unpack", "kohya")
    assert done.returncode == 2 and "kohya.tar.xz was not carried" in done.stderr
    # control: the same parts in the wrong order do not unpack (the order of the parts matters)
    (repo / "engines/pack/dpipe.tar.xz.1of2").write_bytes(data[len(data) // 2:])
    (repo / "engines/pack/dpipe.tar.xz.2of2").write_bytes(data[:len(data) // 2])
    assert _run(repo, "unpack", "dpipe").returncode != 0
