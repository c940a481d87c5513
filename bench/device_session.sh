#!/bin/sh
# One session's GPU work as a single background pipeline (bench/device_bg.sh start NAME sh bench/device_session.sh):
# the phases run in priority order and each writes its own JSON under $BG_OUT, so whatever the device time
# allows is kept. The disk (64 GiB) holds one family's full-size assets at a time: each phase deletes the
# models the next does not need.
set -u
W=/tmp/acc
acc() { python3 bench/gpu_acceptance.py --work $W --out "$BG_OUT" "$@"; }
echo "phase A $(date -u +%T): the fp8/offload plans at one commit, FLUX.1 and Hunyuan-DiT shipped recipes"
acc --only full-flux-1024-memory full-flux-1024-low-vram budget-flux-1024-8gib budget-flux-1024-12gib \
    budget-flux-1024-16gib budget-flux-1024-24gib budget-flux-512-12gib budget-flux-512-16gib budget-flux-512-24gib \
    recipe-flux-identity-hifi recipe-hunyuan-dit-identity --full-jobs 4
echo "phase A2 $(date -u +%T): the offload placement's CUDA peak"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_offload_placement.py > "$BG_OUT/pytest-offload.txt" 2>&1
tail -3 "$BG_OUT/pytest-offload.txt"
echo "phase B $(date -u +%T): the fast recipe, 100 steps, alone: CUDA graphs on its 5 bucket shapes vs none"
acc --only whole-flux-fast-recipe-short whole-flux-fast-recipe-short-nographs
rm -rf $W/models/flux-full-encoders $W/models/dit-full
echo "phase C $(date -u +%T): FLUX.2 [klein] 4B at full size: shipped recipes and the modes"
acc --only recipe-flux2-identity-fast recipe-flux2-identity-hifi full-klein-4b-1024-speed full-klein-4b-1024-memory \
    full-klein-4b-1024-low-vram --full-jobs 3
rm -rf $W/models/klein-4b-full
echo "phase D $(date -u +%T): HunyuanImage-2.1 at full size"
acc --only full-image-1024-speed full-image-1024-memory recipe-hunyuan-image-identity
echo "done $(date -u +%T)"
