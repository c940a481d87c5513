#!/bin/sh
# A run longer than one device call (10 minutes): the device keeps a process that started its own session
# running while the machine stays warm (30 s between calls), so a timed run can span two calls untouched.
#   bench/device_bg.sh start NAME CMD...   start CMD (stdout+stderr -> /tmp/bg/NAME/log) in a new session
#   bench/device_bg.sh wait NAME SECONDS   wait until it ends or SECONDS pass; copy its log and what it wrote
#                                          under /tmp/bg/NAME/out (folders too) into $OUT; exit 0 if it ended
#   bench/device_bg.sh after NAME CMD...   start CMD (as `start NAME-next` would) once NAME has ended: a second
#                                          job queued behind the first without a call having to wait for it
# CMD finds its own results folder in $BG_OUT (= /tmp/bg/NAME/out).
set -u
verb=$1; name=$2; shift 2
dir=/tmp/bg/$name
case $verb in
start)
  mkdir -p "$dir/out"
  BG_OUT="$dir/out" setsid sh -c '"$@"; echo $? > "$0/rc"' "$dir" "$@" > "$dir/log" 2>&1 < /dev/null &
  echo "started $name (pid $!)";;
after)
  first=$dir
  BG_OUT="$dir-next/out"; mkdir -p "$BG_OUT"
  BG_OUT="$BG_OUT" setsid sh -c 'while [ ! -f "$1/rc" ]; do sleep 5; done; shift; "$@"; echo $? > "$0/rc"' \
    "$dir-next" "$first" "$@" > "$dir-next/log" 2>&1 < /dev/null &
  echo "queued $name-next behind $name (pid $!)";;
wait)
  end=$(( $(date +%s) + $1 ))
  while [ ! -f "$dir/rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 2; done
  mkdir -p "$OUT"
  cp "$dir/log" "$OUT/$name.log" 2>/dev/null
  cp -r "$dir"/out/. "$OUT/" 2>/dev/null
  tail -n 25 "$dir/log"
  if [ -f "$dir/rc" ]; then echo "$name ended: exit $(cat "$dir/rc")"; else echo "$name still running"; exit 1; fi;;
esac
