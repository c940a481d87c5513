#!/bin/sh
# Here (with network), from the repo root: fill the git-ignored .whl/ folder that every GPU call carries
# (bench/device_setup.sh installs it there). A new checkout has no .whl/, so run this once per session:
#   sh bench/device_wheels.sh [PYTHON]     # PYTHON builds lora-run's own wheel (default .venv/bin/python)
# What the lent machine lacks (it has torch 2.11+cu130, transformers, peft, accelerate, safetensors; Python 3.12):
# diffusers 0.42.1, cattrs, tomli-w, stevedore; dlib-bin for the identity evaluation and the three dlib model
# files of face_recognition_models (put on PYTHONPATH from .whl/site: the package's wheel is 93 MB, over a
# call's 64 MiB carry, and the 68-point landmark model the evaluation does not use is most of it).
set -eu
PY=${1:-.venv/bin/python}
W=.whl
mkdir -p "$W"
rm -f "$W"/lora_run-*.whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$W" \
    diffusers==0.42.1 cattrs tomli-w stevedore dlib-bin
tmp=$(mktemp -d)
pip download -q --no-deps --no-binary=:all: -d "$tmp" "face_recognition_models>=0.3"
tar -xzf "$tmp"/face_recognition_models-*.tar.gz -C "$tmp"
src=$(echo "$tmp"/face_recognition_models-*/face_recognition_models)
rm -rf "$W/site" && mkdir -p "$W/site/face_recognition_models/models"
cp "$src/__init__.py" "$W/site/face_recognition_models/"
for m in dlib_face_recognition_resnet_model_v1 shape_predictor_5_face_landmarks mmod_human_face_detector; do
  cp "$src/models/$m.dat" "$W/site/face_recognition_models/models/"
done
rm -rf "$tmp"
"$PY" -m pip wheel -q --no-deps . -w "$W"
rm -rf build ./*.egg-info core/*.egg-info
# .whl-lite/: lora-run's wheels without the evaluation's (dlib, face models), for a call that also carries a
# 48-MiB tar (FlashAttention-4's first part): the bench rows that do not evaluate need only these
rm -rf .whl-lite && mkdir -p .whl-lite
cp "$W"/cattrs-*.whl "$W"/diffusers-*.whl "$W"/stevedore-*.whl "$W"/tomli_w-*.whl "$W"/lora_run-*.whl .whl-lite/
# .whl-eval/: the evaluation's part (dlib-bin and the face models' site folder), to ride beside FlashAttention-4's
# second tar (19 MiB) in the next call; `. bench/device_setup.sh` installs it when .whl/ is not there
rm -rf .whl-eval && mkdir -p .whl-eval
cp "$W"/dlib_bin-*.whl .whl-eval/ && cp -r "$W/site" .whl-eval/site
du -sh "$W" .whl-lite .whl-eval
ls "$W"
