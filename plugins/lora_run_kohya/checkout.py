"""Finding and verifying the user's sd-scripts checkout (no torch, no shell).

sd-scripts is not on PyPI: the user clones kohya-ss/sd-scripts and names it with ``[backend.kohya]
sd_scripts = "<path>"`` or the ``LORA_RUN_SD_SCRIPTS`` environment variable. Before anything starts we
check that the folder holds the trainer script and network module the run needs, that the trainer knows
every option our generated config uses (an older sd-scripts silently ignores unknown config-file keys),
and record ``git rev-parse HEAD`` plus a dirty flag for the manifest.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import attrs

import lora_run_engines as engines

ENV = "LORA_RUN_SD_SCRIPTS"


class CheckoutError(Exception):
    """The sd-scripts checkout is missing, incomplete or too old; the message says what to do."""


@attrs.frozen
class Checkout:
    path: Path
    script: Path
    commit: str | None
    dirty: bool | None

    def manifest(self) -> dict[str, object]:
        return {"path": str(self.path), "script": self.script.name, "commit": self.commit, "dirty": self.dirty}


def configured_path(option: str | None, base: Path | None = None) -> tuple[Path | None, str]:
    """The checkout path from the recipe option or the environment, and where it came from."""
    path, env = engines.configured_path(option, base if base is not None else Path.cwd(), ENV)
    return path, f"${env}" if env else ""


def verify(path: Path | None, origin: str, script: str, network_module: str) -> Path:
    """The trainer script's path, or CheckoutError naming what is missing."""
    if path is None:
        raise CheckoutError(f"no sd-scripts checkout configured: clone https://github.com/kohya-ss/sd-scripts "
                            f"(with its own Python environment) and set [backend.kohya] sd_scripts = \"<path>\" "
                            f"or the {ENV} environment variable")
    where = f"{origin} = {path}" if origin else str(path)
    if not path.is_dir():
        raise CheckoutError(f"{where}: not a folder (expected a kohya-ss/sd-scripts checkout)")
    trainer = path / script
    module = path / (network_module.replace(".", "/") + ".py")
    missing = [p.relative_to(path).as_posix() for p in (trainer, module, path / "library" / "train_util.py")
               if not p.is_file()]
    if missing:
        raise CheckoutError(f"{where}: not a usable sd-scripts checkout for this run; missing "
                            f"{', '.join(missing)} (FLUX.1 needs sd-scripts v0.10 or newer, where the sd3 branch "
                            "was merged into main; HunyuanImage-2.1 needs a main branch from 2025-09-23 or later)")
    return trainer


def missing_options(path: Path, trainer: Path, keys: Iterable[str]) -> list[str]:
    """Options among ``keys`` that no parser definition in the checkout mentions (an older sd-scripts)."""
    texts = []
    for p in [trainer, path / "train_network.py", *sorted((path / "library").glob("*.py"))]:
        try:
            texts.append(p.read_text("utf-8", errors="replace"))
        except OSError:
            continue
    corpus = "\n".join(texts)
    defined = set(re.findall(r"""["']--([A-Za-z0-9_]+)["']""", corpus))
    return sorted(k for k in set(keys) if k not in defined)


def locate(option: str | None, base: Path | None, script: str, network_module: str,
           needed_options: Iterable[str] = ()) -> Checkout:
    path, origin = configured_path(option, base)
    trainer = verify(path, origin, script, network_module)
    assert path is not None
    unknown = missing_options(path, trainer, needed_options)
    if unknown:
        where = f"{origin} = {path}" if origin else str(path)
        raise CheckoutError(f"{where}: this sd-scripts is too old for the generated config: its "
                            f"{script} defines no {', '.join('--' + k for k in unknown)} (sd-scripts would "
                            "silently ignore them); update it with `git pull` in that folder")
    commit, dirty = engines.git_state(path)
    return Checkout(path, trainer, commit, dirty)
