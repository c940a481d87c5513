#!/usr/bin/env bash
# Download the Python wheels the real engines need on the lent GPU machine (Python 3.12, no network; it has
# torch 2.11+cu130, transformers 5.17, peft 0.21, accelerate 1.15). Run here (with network), from the repo root:
#
#   bash bench/engine_wheels.sh            # → engines/wheels/{sd-scripts,diffusion-pipe}/*.whl (git-ignored)
#
# sd-scripts 48d368f pins transformers 4.54.1 / accelerate 1.6.0 / diffusers 0.32.1; they are installed with
# `pip install --no-index --no-deps --target engines/site-sd-scripts` on the GPU machine and put first on
# PYTHONPATH for sd-scripts only, so the machine's own packages (which lora-run uses) are not touched.
# diffusion-pipe needs deepspeed, which PyPI ships as a source archive only: it is built here into a
# pure-Python wheel (DS_BUILD_OPS=0: deepspeed compiles its CUDA ops at run time when they are used).
# See bench/engines_gpu.md for sizes and the command that carries them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-engines/wheels}
PY=${PY:-python3}
common=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64
        --platform any --only-binary=:all: --no-deps)

# what sd-scripts imports (requirements.txt at 48d368f, minus the optional optimizers and bitsandbytes)
SD_SCRIPTS=(
  "transformers==4.54.1" "tokenizers==0.21.4" "huggingface-hub==0.34.3" "accelerate==1.6.0"
  "diffusers==0.32.1" "safetensors==0.4.5" "toml==0.10.2" "voluptuous==0.15.2" "einops==0.7.0"
  "imagesize==1.4.1" "ftfy==6.3.1" "wcwidth" "opencv-python-headless==4.10.0.84" "rich==14.1.0"
  "markdown-it-py" "mdurl" "sentencepiece==0.2.1"
)
# what diffusion-pipe 8f83dbf imports at start-up (train.py, models/base.py, utils/*, its ComfyUI submodule at
# 9a9fdb10, and models/flux.py / models/hunyuan_image.py) that the GPU machine does not already have, found by
# importing them on CPU (see bench/engines_gpu.md). Left out on purpose, because the machine has them:
# huggingface-hub (its transformers 5.17 refuses an older one at import), pyarrow, pandas, xxhash, fsspec,
# msgpack, ninja, imageio, einops, sentencepiece, portalocker, py-cpuinfo, peft, torchaudio, scipy, aiohttp.
DIFFUSION_PIPE=(
  "diffusers==0.36.0" "datasets==4.4.1" "multiprocess==0.70.19" "dill==0.4.1" "toml==0.10.2" "loguru"
  "omegaconf==2.4.0" "hydra-core==1.3.8" "easydict" "termcolor" "iopath" "torch-optimi" "pytorch-optimizer"
  "ftfy" "wcwidth" "hjson" "av==19.0.2" "wandb==0.31.0"
  "comfy-kitchen==0.2.26" "comfy-aimdo==0.4.11" "kornia==0.9.0" "kornia-rs==0.2.0"   # ComfyUI 9a9fdb10's pins
  "torchsde==0.2.6" "trampoline"                                                    # ComfyUI's requirements
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types" "typing-inspection" "platformdirs"  # wandb
  "opentelemetry-api==1.45.2" "opentelemetry-sdk==1.45.2" "opentelemetry-semantic-conventions==0.66b2"
  "importlib-metadata"
)

mkdir -p "$DEST/sd-scripts" "$DEST/diffusion-pipe"
"$PY" -m pip download "${common[@]}" -d "$DEST/sd-scripts" "${SD_SCRIPTS[@]}"
"$PY" -m pip download "${common[@]}" -d "$DEST/diffusion-pipe" "${DIFFUSION_PIPE[@]}"
# deepspeed and antlr4 4.9.3 (omegaconf's pin) are source-only on PyPI: build py3-none-any wheels (deepspeed needs torch in $PY's environment)
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST/diffusion-pipe" "deepspeed==0.18.4" "antlr4-python3-runtime==4.9.3"
# the GPU runner carries at most 64 MiB per call: split each engine's wheels into parts of at most 60 MiB
"$PY" - "$DEST" <<'PYEOF'
import shutil, sys
from pathlib import Path
dest = Path(sys.argv[1])
for engine in ("sd-scripts", "diffusion-pipe"):
    parts, sizes = [], []
    for whl in sorted((dest / engine).glob("*.whl"), key=lambda p: -p.stat().st_size):
        size = whl.stat().st_size
        for i, used in enumerate(sizes):
            if used + size <= 60 * 2**20:
                break
        else:
            i = len(sizes); sizes.append(0)
        sizes[i] += size
        part = dest / f"{engine}-{i + 1}"
        part.mkdir(exist_ok=True)
        shutil.copy2(whl, part / whl.name)
    for i, used in enumerate(sizes):
        print(f"{dest}/{engine}-{i + 1}: {used / 2**20:.1f} MiB")
PYEOF
