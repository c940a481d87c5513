#!/bin/sh
# sd-scripts' venv python with bench/engine_shim (LORA_RUN_T5_LAYERS=1: the reduced random T5 file has 1 block)
export PYTHONPATH="/work/wt-real/bench/engine_shim${PYTHONPATH:+:$PYTHONPATH}"
export LORA_RUN_T5_LAYERS=1
exec /work/engines/venv/bin/python "$@"
