#!/bin/sh
# On the lent GPU machine: the evaluation of the fast FLUX.1 recipe after one step (gpu_acceptance.py's
# `whole-flux-fast-recipe-evalonly` row, full-size model with random weights) for two builds of lora-run, one after
# the other on one warm machine: the A/B of a change to generation. Each LABEL names a folder .whl-ab/LABEL/ holding
# one lora_run wheel and a COMMIT file; the results go to $OUT/LABEL/ and the row's `evaluate_s` is the figure.
#
#     sh bench/eval_ab.sh main branch       # carry .whl-ab (an ignored folder); the wheels already installed stay
#
# Fill .whl-ab here, at each build's checkout: `python -m pip wheel -q --no-deps . -w .whl-ab/LABEL` and
# `git rev-parse --short HEAD > .whl-ab/LABEL/COMMIT`. A label named twice runs twice (the second from a warm
# compile cache). The first call of a machine also needs `. bench/device_setup.sh` with .whl-lite and .whl-eval.
set -u
for label in "$@"; do
  python3 -m pip install -q --no-index --no-deps --force-reinstall .whl-ab/"$label"/lora_run-*.whl 2>&1 \
    | grep -v "WARNING: Running pip as"
  LORA_RUN_COMMIT=$(cat .whl-ab/"$label"/COMMIT) python3 bench/gpu_acceptance.py \
    --only whole-flux-fast-recipe-evalonly --work /tmp/acc-ab --out "$OUT/$label" --doc "/tmp/ab-$label.md" \
    --deadline "${AB_DEADLINE:-280}" 2>&1 | tail -4
  grep -ho '"evaluate_s": [0-9.]*' "$OUT/$label"/*.json | head -1 | sed "s/^/$label: /"
done
