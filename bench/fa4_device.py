"""On the lent GPU machine: install FlashAttention-4 from the tars bench/fa4_wheels.sh made, one per call.

    python3 bench/fa4_device.py .whl-fa4/cutlass-mlir.tar.xz           # call 1 (carry that file)
    python3 bench/fa4_device.py .whl-fa4/fa4-rest.tar.xz --check        # call 2, while the machine is warm

Each tar is unpacked into a staging folder that outlives the call (``/tmp/fa4-stage``, kept while the machine
stays warm). Once a distribution's files (its dist-info ``RECORD``) are all staged it is moved into
site-packages, unless the machine already has that distribution: nothing installed is replaced (the machine's
own protobuf or cuda-bindings stay as they are). A distribution whose files are missing (the machine went cold
between the calls) is named and the exit status is 3. ``--check`` imports ``flash_attn.cute`` afterwards.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

STAGE = Path("/tmp/fa4-stage")


def installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def staged_distributions() -> dict[str, tuple[Path, list[str]]]:
    """Distribution name → (its dist-info folder, the files its RECORD lists inside site-packages)."""
    found = {}
    for info in sorted(STAGE.glob("*.dist-info")):
        if not (info / "RECORD").is_file():     # moved into site-packages by an earlier call
            continue
        name = metadata.Distribution.at(info).metadata["Name"]
        with (info / "RECORD").open(newline="") as f:
            files = [row[0] for row in csv.reader(f) if row and not row[0].startswith("..")]
        found[name] = (info, files)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tar", type=Path)
    ap.add_argument("--check", action="store_true", help="import flash_attn.cute afterwards")
    args = ap.parse_args(argv)
    STAGE.mkdir(exist_ok=True)
    subprocess.run(["tar", "-xJf", str(args.tar), "-C", str(STAGE)], check=True)
    print(f"fa4_device: {args.tar} unpacked into {STAGE}")
    site = Path(sysconfig.get_paths()["purelib"])
    missing = 0
    for name, (info, files) in staged_distributions().items():
        if installed(name):
            print(f"fa4_device: {name} {metadata.version(name)} is installed already, kept")
            continue
        absent = [f for f in files if not (STAGE / f).exists()]
        if absent:
            print(f"fa4_device: {name}: {len(absent)} staged file(s) missing, e.g. {absent[0]} (carry the other tar "
                  "first, in the call just before, while the machine is warm)")
            missing += 1
            continue
        version = metadata.Distribution.at(info).version
        for rel in files:
            target = site / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(STAGE / rel), str(target))
        print(f"fa4_device: {name} {version} installed into {site}")
    if missing:
        return 3
    if args.check:
        probe = "import flash_attn.cute, importlib.metadata as m; print('fa4_device: flash-attn-4', m.version('flash-attn-4'), 'imports')"
        return subprocess.run([sys.executable, "-c", probe]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
