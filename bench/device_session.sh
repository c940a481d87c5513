#!/bin/sh
# One session's GPU work as a single background pipeline (bench/device_bg.sh start NAME sh bench/device_session.sh):
# the phases run in priority order and each writes its own JSON under $BG_OUT, so whatever the device time
# allows is kept. The disk (64 GiB) holds one family's full-size assets at a time: each phase deletes the
# models the next does not need (gpu_acceptance deletes each measured row's checkpoints).
# Sessions of 2026-12-02 16:14 ran the fp8/offload plans, four shipped recipes and FLUX.2 [klein] 4B; this one
# (20:30) runs what is left, in this order. The real engines (bench/engines_device.sh) run beside phase A as
# their own background jobs: their models are reduced, and phase A's timings are not this issue's targets.
set -u
W=/tmp/acc
PHASES=${PHASES:-A B C D}   # e.g. PHASES="B C D" skips what an earlier session already measured
has() { case " $PHASES " in *" $1 "*) return 0;; esac; return 1; }
acc() {   # then keep the rows' logs (lora-run's output, and each run folder's run.log) with the JSON
  python3 bench/gpu_acceptance.py --work $W --out "$BG_OUT" "$@"
  mkdir -p "$BG_OUT/logs"
  cp $W/logs/*.log "$BG_OUT/logs/" 2>/dev/null
  for f in $W/runs/*/run.log; do [ -f "$f" ] && cp "$f" "$BG_OUT/logs/$(basename "$(dirname "$f")").run.log"; done
}
if has A; then
echo "phase A $(date -u +%T): HunyuanImage-2.1 at full size (a 17 B transformer, 34 GB on disk)"
acc --only full-image-1024-speed full-image-1024-memory recipe-hunyuan-image-identity
rm -rf $W/models/image-full $W/runs
fi
if has B; then
echo "phase B $(date -u +%T): the shipped fast recipe's whole 1500-step run with its default plan (CUDA graphs)"
acc --only whole-flux-fast-recipe --whole-steps 1500 --whole-timeout 1700
rm -rf $W/runs
fi
if has C; then
echo "phase C $(date -u +%T): the fast recipe, 100 steps, alone, compile caches warm from phase B: graphs vs none"
acc --only whole-flux-fast-recipe-short whole-flux-fast-recipe-short-nographs
rm -rf $W/models/flux-full-encoders $W/runs
fi
if has D; then
echo "phase D $(date -u +%T): FLUX.2 [dev] 32 B at full size; shards the disk cannot hold go to /dev/shm"
df -h / /dev/shm
LORA_RUN_BENCH_SPILL=/dev/shm/lora-run acc --only full-dev-1024-memory full-dev-1024-low-vram budget-dev-1024-24gib \
    full-dev-1024-speed
fi
echo "done $(date -u +%T)"
