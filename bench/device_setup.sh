#!/bin/sh
# On the lent GPU machine (no network): install the carried wheels (.whl/, an ignored folder: diffusers,
# cattrs, tomli-w, stevedore, dlib for the identity evaluation, and lora-run's own freshly built wheel) and
# put dlib's face models on the path. Source it: `. bench/device_setup.sh`. `sh bench/device_wheels.sh` fills
# .whl/ here (a new checkout has none).
python3 -m pip install -q --no-index --no-deps $(ls .whl/*.whl | grep -v dlib_bin) $(ls .whl/dlib_bin*-cp312-*.whl) 2>&1 | grep -v "WARNING: Running pip as" || true
export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
