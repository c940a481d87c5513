#!/usr/bin/env bash
# The real engines on the lent GPU in as few `run` calls as possible (bench/engines_gpu.md, "The calls").
#
# Here (a machine with the checkouts and wheels of bench/engines_gpu.md §1, e.g. /work/engines):
#   bash bench/engines_device.sh pack            # → engines/pack/kohya.tar.xz, engines/pack/dpipe.tar.xz[.<i>of<n>]
# On the GPU machine, one argument per `run` call (results go to $OUT):
#   bash bench/engines_device.sh kohya-flux      # carry engines/pack/kohya.tar.xz (kohya-flux, native-flux rows)
#   bash bench/engines_device.sh kohya-hunyuan   # carry engines/pack/kohya.tar.xz (again: each call stands alone)
#   bash bench/engines_device.sh dpipe-part      # carry engines/pack/dpipe.tar.xz.1of2 (only when split)
#   bash bench/engines_device.sh dpipe           # carry engines/pack/dpipe.tar.xz.2of2 (or dpipe.tar.xz)
#   bash bench/engines_device.sh dpipe-flux      # the same carry, only the FLUX.1 row (EXTRA_SET=KEY=VALUE: one --set)
#
# Each pack is one xz-compressed tar of *installed* packages (pip --target here, for the machine's Python
# 3.12), not wheels: xz shrinks the unpacked files much better than a wheel's zip (sd-scripts' 68 MiB of
# wheels become a 39 MiB part), and nothing is installed on the GPU machine, it is only unpacked.
#   kohya.tar.xz: sd-scripts 48d368f (with a .git holding that one commit, so the manifest names it),
#                 site-sd-scripts (its pinned transformers 4.54.1, accelerate 1.6.0, diffusers 0.32.1, opencv, …),
#                 site-lora-run (cattrs, tomli-w, stevedore, diffusers: lora-run's packages the machine lacks)
#   dpipe.tar.xz: diffusion-pipe 8f83dbf with its submodules, site-diffusion-pipe, site-lora-run
# sd-scripts 48d368f cannot use the machine's transformers 5.17: library/lpw_stable_diffusion.py line 12
# imports CLIPFeatureExtractor, which transformers 5 removed (and its diffusers 0.32.1 imports
# FLAX_WEIGHTS_NAME from transformers.utils, also gone), so its own versions travel.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: engines_device.sh pack|kohya-flux|kohya-hunyuan|dpipe-part|dpipe|unpack NAME}
PART=$((48 * 1024 * 1024))   # a call carries at most 64 MiB with the working tree (3.4 MiB on 2026-12-03, growing)

unpack() {   # unpack engines/pack/$1.tar.xz (or all its parts, <name>.tar.xz.<i>of<n>) into engines/, once per machine
  local name=$1 files n i
  if [ -f "engines/.unpacked-$name" ]; then return; fi
  if [ -f "engines/pack/$name.tar.xz" ]; then
    files=engines/pack/$name.tar.xz
  else
    n=$(ls engines/pack/ 2>/dev/null | sed -n "s/^$name\.tar\.xz\.[0-9]*of\([0-9]*\)$/\1/p" | head -1)
    if [ -z "$n" ]; then echo "engines_device: engines/pack/$name.tar.xz was not carried" >&2; exit 2; fi
    files=
    for i in $(seq 1 "$n"); do
      if [ ! -f "engines/pack/$name.tar.xz.${i}of$n" ]; then
        echo "engines_device: engines/pack/$name.tar.xz.${i}of$n is missing (the machine went cold between the" \
             "calls: carry the parts again, one call each, back to back)" >&2
        exit 2
      fi
      files="$files engines/pack/$name.tar.xz.${i}of$n"
    done
  fi
  mkdir -p engines
  # shellcheck disable=SC2086
  cat $files | xz -d -T0 | tar -x -C engines
  touch "engines/.unpacked-$name"
}

rows() {   # run bench/engines_gpu.py with the engines' folders
  export PYTHONPATH="$PWD/engines/site-lora-run${PYTHONPATH:+:$PYTHONPATH}"
  python3 bench/engines_gpu.py --steps "${STEPS:-24}" --size "${SIZE:-reduced}" --out "${BG_OUT:-${OUT:-bench/results}}" \
    --work "${WORK:-/tmp/engines-gpu}" ${EXTRA_SET:+--extra-set "$EXTRA_SET"} --rows "$@"
}

case "$what" in
pack)
  ENG=${ENGINES:-/work/engines}
  LR_WHEELS=${LORA_RUN_WHEELS:-/work/main/.whl}
  PY=${PY:-$ENG/venv/bin/python}
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  pipt() {   # install wheels into a folder for CPython 3.12 on x86-64 Linux, whatever Python runs pip here
    local target=$1; shift
    "$PY" -m pip install -q --no-deps --no-index --only-binary :all: --ignore-requires-python --no-compile \
      --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_12_x86_64 \
      --platform manylinux2010_x86_64 --platform any --target "$target" "$@"
  }
  slim_git() {   # a checkout's .git reduced to the objects of HEAD (status and rev-parse still work)
    local repo=$1
    git -C "$repo" rev-list --objects --missing=allow-any HEAD | cut -d' ' -f1 |
      git -C "$repo" pack-objects -q "$repo/.git/objects/pack/slim" >/dev/null
    find "$repo/.git/objects/pack" -name 'pack-*' -delete
  }
  mkdir -p engines/pack
  for engine in kohya dpipe; do
    dir=$stage/$engine
    mkdir -p "$dir"
    pipt "$dir/site-lora-run" "$LR_WHEELS"/cattrs-*.whl "$LR_WHEELS"/tomli_w-*.whl "$LR_WHEELS"/stevedore-*.whl
    if [ $engine = kohya ]; then
      pipt "$dir/site-lora-run" "$LR_WHEELS"/diffusers-*.whl   # for the native-flux row of the kohya-flux call
      cp -a "$ENG/sd-scripts" "$dir/sd-scripts"
      slim_git "$dir/sd-scripts"
      pipt "$dir/site-sd-scripts" "$ENG"/wheels/sd-scripts-[0-9]/*.whl
    else
      cp -a "$ENG/diffusion-pipe" "$dir/diffusion-pipe"
      pipt "$dir/site-diffusion-pipe" "$ENG"/wheels/diffusion-pipe-[0-9]/*.whl
    fi
    find "$dir" -name __pycache__ -prune -exec rm -rf {} +
    rm -f engines/pack/$engine.tar.xz engines/pack/$engine.tar.xz.*of*
    tar -C "$dir" -cf - . | xz -T0 -6 > "engines/pack/$engine.tar.xz"
    size=$(stat -c %s "engines/pack/$engine.tar.xz")
    if [ "$size" -gt "$PART" ]; then   # carried over several calls: parts of at most 48 MiB, <i>of<n>
      split -b "$PART" -d -a 2 "engines/pack/$engine.tar.xz" "engines/pack/$engine.split."
      rm "engines/pack/$engine.tar.xz"
      n=$(ls engines/pack/$engine.split.* | wc -l)
      i=0
      for f in engines/pack/$engine.split.*; do
        i=$((i + 1))
        mv "$f" "engines/pack/$engine.tar.xz.${i}of$n"
      done
    fi
  done
  ls -l engines/pack
  ;;
kohya-flux)
  unpack kohya
  rows kohya-flux native-flux   # native: the comparison row, lora-run's own trainer (diffusers from site-lora-run)
  ;;
kohya-hunyuan)
  unpack kohya
  rows kohya-hunyuan
  ;;
unpack)   # only unpack a pack (kohya or dpipe)
  unpack "${2:?usage: engines_device.sh unpack kohya|dpipe}"
  ;;
dpipe-part)   # an earlier part of a split pack: it only has to arrive (the machine keeps it while warm)
  ls -l engines/pack/
  ;;
dpipe)
  unpack dpipe
  rows dpipe-flux dpipe-hunyuan
  ;;
dpipe-flux)   # only the FLUX.1 row (EXTRA_SET=model.base_precision=bf16: diffusion-pipe without its fp8 transformer)
  unpack dpipe
  rows dpipe-flux
  ;;
*)
  echo "engines_device: unknown step $what" >&2
  exit 2
  ;;
esac
