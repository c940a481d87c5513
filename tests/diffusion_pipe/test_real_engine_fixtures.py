"""The diffusion-pipe backend against output recorded from the real diffusion-pipe 8f83dbf (no engine needed).

See fixtures/diffusion-pipe-8f83dbf/README.md for what ran and where it stopped (a CPU machine: diffusion-pipe
needs CUDA before it trains). Training progress and checkpoints are recorded by bench/engines_gpu.py.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lora_run_diffusion_pipe.backend import HINTS, _checkout_problem, _flux_transformer_problem
from lora_run_diffusion_pipe.supervise import LogParser, PhaseEvent, SaveEvent, StepEvent
from lora_run_engines import explain
from lora_run_engines.supervise import Supervisor

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "diffusion-pipe-8f83dbf"


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text("utf-8").splitlines()


def replay(name: str, tmp_path: Path) -> Supervisor:
    """The recorded output, printed by a child process and read by the shared Supervisor."""
    source = FIXTURES / name
    sup = Supervisor([sys.executable, "-c", f"import sys; sys.stdout.write(open({str(source)!r}, encoding='utf-8').read())"],
                     log_path=tmp_path / "train.log", on_line=lambda _line: None)
    assert sup.run().returncode == 0
    return sup


def test_launcher_and_startup_lines_are_no_steps_and_caching_is_a_phase():
    parser = LogParser()
    events = [e for name in ("launch_no_gpu.log", "startup_and_caching_cpu.log") for line in lines(name)
              for e in parser.feed(line)]
    assert not [e for e in events if isinstance(e, (StepEvent, SaveEvent))]
    assert PhaseEvent("caching latents and text embeddings") in events
    # planted-mistake control: the recorded output is full of progress bars (`20/20`, `4/4`, `0/7`) that a parser
    # matching any `n/N` bar would take for training steps
    naive = [m for name in ("launch_no_gpu.log", "startup_and_caching_cpu.log") for line in lines(name)
             for m in re.finditer(r"\|\s*(\d+)/(\d+)", line)]
    assert len(naive) >= 5


def test_the_caching_phase_is_recognised_on_diffusion_pipes_own_lines():
    real = [line for line in lines("startup_and_caching_cpu.log") if line.startswith(("caching latents:", "[CACHE]"))]
    assert real, "the fixture lost its caching lines"
    for line in real:
        assert LogParser().feed(line) == [PhaseEvent("caching latents and text embeddings")]


def test_no_gpu_failure_is_explained_with_the_engines_own_error(tmp_path):
    sup = replay("launch_no_gpu.log", tmp_path)
    why = explain(sup.tail, HINTS)
    assert why.startswith(": RuntimeError: Found no NVIDIA driver on your system.")
    assert why.endswith("(diffusion-pipe needs an NVIDIA GPU with CUDA: ComfyUI's model management and DeepSpeed "
                        "start on the GPU)")
    # the launcher's own last line (`… exits with return code = 1`) is not taken for the cause
    assert any("exits with return code = 1" in line for line in sup.tail) and "return code" not in why


def test_missing_flash_attn_gets_its_own_hint_before_the_generic_one(tmp_path):
    sup = replay("hunyuan_image_without_flash_attn.log", tmp_path)
    why = explain(sup.tail, HINTS)
    assert why.startswith(": ModuleNotFoundError: No module named 'flash_attn'") and "install flash-attn" in why
    # planted-mistake control: with the generic "a module is missing" hint first, the specific one is lost
    assert "install flash-attn" not in explain(sup.tail, HINTS[::-1])


def _safetensors(path: Path, keys: list[str]) -> Path:
    header = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, k in enumerate(keys)}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4 * len(keys)))
    return path


def test_a_diffusers_layout_transformer_is_refused_before_diffusers_crashes_on_it(tmp_path):
    crash = "\n".join(lines("flux_transformer_diffusers_layout.log"))
    assert "from_single_file" in crash and "IndexError: list index out of range" in crash   # what it would do
    key = ("model", "files", "transformer")
    diffusers = _safetensors(tmp_path / "diffusion_pytorch_model.safetensors",
                             ["x_embedder.weight", "transformer_blocks.0.attn.to_q.weight"])
    (problem,) = _flux_transformer_problem(key, diffusers)
    assert problem[0] == key and "not a FLUX.1 transformer in BFL's single-file layout" in problem[1]
    bfl = _safetensors(tmp_path / "flux1-dev.safetensors", ["img_in.weight", "double_blocks.0.img_attn.qkv.weight"])
    comfy = _safetensors(tmp_path / "comfy.safetensors", ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"])
    assert _flux_transformer_problem(key, bfl) == [] and _flux_transformer_problem(key, comfy) == []
    (garbage,) = _flux_transformer_problem(key, tmp_path / "flux1-dev.safetensors.part")
    assert "not a readable .safetensors file" in garbage[1]


def test_a_checkout_without_the_submodules_it_imports_is_refused(tmp_path):
    (tmp_path / "train.py").write_text("")
    problem = _checkout_problem(tmp_path, "flux.1-dev")
    assert problem and "submodules/ComfyUI/comfy/sd.py" in problem and "git submodule update --init" in problem
    for rel in ("submodules/ComfyUI/comfy/sd.py", "submodules/HunyuanVideo/hyvideo/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert _checkout_problem(tmp_path, "flux.1-dev") is None
    assert "HunyuanImage-2.1" in _checkout_problem(tmp_path, "hunyuan-image-2.1")


def test_check_refuses_a_checkout_without_submodules_from_the_cli(dp_recipe, run_cli, tmp_path):
    bare = tmp_path / "diffusion-pipe"
    bare.mkdir()
    (bare / "train.py").write_text("")     # cloned without --recurse-submodules
    out = run_cli("check", dp_recipe(), "--set", f"backend.diffusion-pipe.path={bare}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "[backend.diffusion-pipe.path]" in out.stderr and "git submodule update --init --recursive" in out.stderr
