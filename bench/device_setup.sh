#!/bin/sh
# On the lent GPU machine (no network): install the carried wheels (.whl/, an ignored folder: diffusers,
# cattrs, tomli-w, stevedore, dlib for the identity evaluation, and lora-run's own freshly built wheel) and
# copy dlib's face models into site-packages. Source it: `. bench/device_setup.sh`. `sh bench/device_wheels.sh` fills
# .whl/ here (a new checkout has none).
# Split calls carry .whl-lite/ (the wheels without the evaluation's) in one and .whl-eval/ (dlib and the face models)
# in another: each installs what is there, and the face models are copied into site-packages so later calls of the
# same warm machine have them without carrying them again.
for d in .whl .whl-lite; do
  [ -d $d ] && python3 -m pip install -q --no-index --no-deps --force-reinstall $(ls $d/*.whl | grep -v dlib_bin) 2>&1 | grep -v "WARNING: Running pip as"
done
for d in .whl .whl-eval; do
  if [ -d $d/site ]; then
    python3 -m pip install -q --no-index --no-deps $(ls $d/dlib_bin*-cp312-*.whl) 2>&1 | grep -v "WARNING: Running pip as"
    cp -r $d/site/face_recognition_models "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/
  fi
done
true
