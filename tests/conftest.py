"""Shared test configuration. Fixtures for plugin authors live in `lora_run_devtools.testing` (a pytest plugin)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def run_cli(tmp_path):
    """Run `lora-run ARGS` in a real subprocess; returns CompletedProcess (text)."""
    def run(*args, env=None, cwd=None, timeout=300):
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", "lora_run.cli", *map(str, args)], capture_output=True,
                              text=True, env=full_env, cwd=cwd or tmp_path, timeout=timeout)
    return run
