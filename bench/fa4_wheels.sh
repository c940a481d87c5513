#!/bin/sh
# Here (with network), from the repo root: prepare FlashAttention-4 for the lent GPU machine (Python 3.12,
# torch 2.11+cu130, no network) in the git-ignored .whl-fa4/ folder. A call carries at most 64 MiB with the
# working tree, and the CUDA 13 CuTe DSL libraries alone are a 92 MB wheel (237 MB installed), so FA4 travels
# as two xz tars of *installed* packages (xz packs them far better than the wheels' zip):
#   .whl-fa4/cutlass-mlir.tar.xz  the CUDA 13 DSL's MLIR library (one 193 MB file, about 48 MiB)
#   .whl-fa4/fa4-rest.tar.xz      the rest of nvidia-cutlass-dsl-libs-cu13, flash-attn-4 4.0.0b36 and its other
#                                 dependencies, each with its dist-info
# On the machine, one per call while it stays warm (bench/fa4_device.py):
#   python3 bench/fa4_device.py .whl-fa4/cutlass-mlir.tar.xz
#   python3 bench/fa4_device.py .whl-fa4/fa4-rest.tar.xz --check
#   sh bench/fa4_wheels.sh
set -eu
W=.whl-fa4
rm -rf "$W" && mkdir -p "$W/dl" "$W/site"
get() { pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$W/dl" "$1"; }
# The machine's image has einops, protobuf, cuda-bindings and cuda-pathfinder (device KINDS.md), so they
# do not travel. nvidia-cutlass-dsl 4.8.1 names the CUDA 12 libraries as a dependency; the machine has CUDA 13, so the cu13
# libraries (the package's `cu13` extra) come instead, and everything is installed --no-deps
for spec in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
            nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 "apache-tvm-ffi>=0.1.11,<0.2" \
            torch-c-dlpack-ext "quack-kernels>=0.5.3"; do
  get "$spec"
done
pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    --target "$W/site" "$W"/dl/*.whl
mlir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
tar -C "$W/site" -cf - "$mlir" | xz -T2 -9 > "$W/cutlass-mlir.tar.xz"
tar -C "$W/site" --exclude "$mlir" -cf - . | xz -T2 -9 > "$W/fa4-rest.tar.xz"
rm -rf "$W/dl" "$W/site"
ls -l "$W"
