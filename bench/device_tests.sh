#!/usr/bin/env bash
# On the lent GPU machine: GPU tests, each item in a Python process of its own, its whole output kept in
# $OUT/<name>.txt (never a grep of it), under a hard limit (`timeout -k 10 -s INT`: pytest still prints what failed,
# and a test that hangs is killed), with the seconds each ended at in $OUT/times.txt. A test that leaves its
# process's CUDA context unusable (an illegal memory access) cannot fail the items after it. An item that would start
# with less than a minute before DEADLINE (seconds from the start; default 570) is skipped and said so.
#   bash bench/device_tests.sh LIMIT "NAME=PYTEST ARGS" ...
#   bash bench/device_tests.sh 220 "dit=tests/gpu/test_step_graphs_families_gpu.py -k dit" "image=... -k image"
limit=$1; shift
deadline=${DEADLINE:-570}
for item in "$@"; do
  name=${item%%=*}; args=${item#*=}
  left=$((deadline - SECONDS))
  if [ $left -lt 60 ]; then echo "$name skipped: ${left} s left" >> "$OUT/times.txt"; continue; fi
  [ $left -lt "$limit" ] && this=$left || this=$limit
  # shellcheck disable=SC2086  # the item's pytest arguments are split on purpose
  timeout -k 10 -s INT "$this" python3 -m pytest -m gpu -rA -p no:cacheprovider $args > "$OUT/$name.txt" 2>&1
  echo "rc=$?" >> "$OUT/$name.txt"
  echo "$name ended at $SECONDS s ($(tail -1 "$OUT/$name.txt"))" >> "$OUT/times.txt"
done
