"""The diffusion-pipe backend against the first run of the real diffusion-pipe 8f83dbf to completion (one H200).

fixtures/diffusion-pipe-8f83dbf/gpu-h200-20261203/README.md says what ran (bench/engines_gpu.py, 24 steps of a tiny
random FLUX.1, a save every 8 steps, keep_last = 2) and what each file is. The engine's own train.log did not come
back, so the stand-in train.py prints its run (the real engine's lines, recorded on 2026-12-02, with this run's
numbers) and the tests hold lora-run's side to what lora-run printed and left on the GPU, where that was right, and
to the fixed behaviour where it was not. Every run goes through the whole backend: launch, supervisor, parser,
watcher, collection.
"""
from __future__ import annotations

import re

from .conftest import RECORDED_RUN


def test_the_fixture_readme_names_the_commit_gpu_date_and_command():
    readme = (RECORDED_RUN / "README.md").read_text("utf-8")
    for fact in ("8f83dbf25d03219df705570ec03e62be04bc402f", "H200", "2026-12-03", "18:49 UTC",
                 "bash bench/engines_device.sh dpipe",
                 "bench/engines_gpu.py --steps 24 --size reduced --rows dpipe-flux dpipe-hunyuan", "random"):
        assert fact in readme, fact
    for name in sorted(p.name for p in RECORDED_RUN.iterdir() if p.name != "README.md"):
        assert f"`{name}`" in readme, f"{name} is not described in the README"
    for path in RECORDED_RUN.iterdir():       # local paths are replaced everywhere
        assert not re.search(r"/(tmp|work|opt|root|home)/", path.read_text("utf-8")), path.name
