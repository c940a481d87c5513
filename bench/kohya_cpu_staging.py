"""The kohya backend's staged dataset view against the real sd-scripts on CPU: names that do not depend on an image's
place, and sd-scripts' caches carried into a new staged folder where they are valid (docs/backend-kohya.md, "The staged
dataset view on CPU").

usage: python bench/kohya_cpu_staging.py WORK OUT [--src TREE]

WORK is a scratch folder (made afresh), OUT the results folder. TREE is the lora-run tree to run (default: this
checkout; give an exported commit to keep the code fixed while the runs take their ~10 minutes). The engine is taken
from LORA_RUN_SD_SCRIPTS, LORA_RUN_ENGINE_PY and LORA_RUN_FLUX_FILES (defaults /work/engines/sd-scripts,
/work/engines/venv/bin/python, /work/engines/flux-files: bench/engines_gpu.md §1 and bench/engine_models.py
`flux --double 1 --single 1 --t5-layers 1`). Each run is `python -m lora_run recipe.toml --output-dir runs/<x>`.

Runs (4 images 192×160 with captions; `resolution = 128`, 2 steps, latents and text-encoder outputs cached to disk):
  a   first run, `[train] cache_dir` set
  a2  the same under an empty cache_dir (a fresh encode in a's order: `a_against_a2`)
  b   img002's caption edited: a new folder
  c   img001 removed (a middle image): a new folder
  d   an image added (new000, its own caption) and img003's pixels changed (caption kept): a new folder
  f   the dataset of d under an empty cache_dir: nothing to carry, every cache encoded afresh (the reference the
      carried caches of d are compared with, array for array)
  g1  no cache_dir: the dataset of d, in the run folder's own kohya/data
  g2  `--resume --allow-dataset-change`, img000 removed (the first image)
  g3  `--resume --allow-dataset-change`, img002's caption edited again (in place: its latents keep)
  h   the dataset of d again (img000 and d's caption back), `[backend.kohya] remove_old_staging = true`, while another
      process holds c's folder as a running run holds its own: d's folder is used again, a's and b's are removed,
      c's stays, and sd-scripts encodes nothing
The carried caches of d are compared with f's, array for array (`d_against_f`): sd-scripts samples the VAE's posterior
(`library/flux_models.py` DiagonalGaussian, `sample=True`) from its seeded generator, so a latents cache is the same
bit for bit only where the image was encoded at the same place in the run's order; g1 (a fresh encode in f's order)
against f shows that (`g1_against_f`), and a against a2 that the caches d carries from a are what sd-scripts writes.
After each run: `listing-<x>.txt` (`find -printf '%i %n %T@ %y %p'`: inode, links, mtime, type, path of everything in
the cache folder or the run's kohya/data), `lora-run-<x>.out`, `train-<x>.log` (sd-scripts' log) and, in
`summary.json`, per run the staged folder, the caches sd-scripts wrote (a new inode) and the caches carried (an inode
of an earlier folder), and sd-scripts' caching lines.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SD_SCRIPTS = Path(os.environ.get("LORA_RUN_SD_SCRIPTS", "/work/engines/sd-scripts"))
ENGINE_PY = Path(os.environ.get("LORA_RUN_ENGINE_PY", "/work/engines/venv/bin/python"))
FLUX = Path(os.environ.get("LORA_RUN_FLUX_FILES", "/work/engines/flux-files"))

RECIPE = """# CPU proof of the kohya backend's staged dataset view against the real sd-scripts (bench/kohya_cpu_staging.py)
description = "kohya staging proof: reduced random FLUX.1, 4 images, fp32 on CPU"
[model]
family = "flux.1-dev"
offline = true
[model.files]
transformer = "{flux}/flux1-dev.safetensors"
clip_l = "{flux}/clip_l.safetensors"
t5xxl = "{flux}/t5xxl.safetensors"
vae = "{flux}/ae.safetensors"
[dataset]
path = "{work}/data/subject"
trigger = "ohwx"
min_images = 2
resolution = 128
bucket_min = 64
bucket_max = 256
bucket_step = 64
[lora]
targets = "attention+mlp"
rank = 4
alpha = 2.0
[optimizer]
name = "adamw"
lr = 1e-4
[train]
steps = 2
save_every_steps = 2
keep_last = 2
mixed_precision = "no"
timestep_sampling = "sigmoid"
cache_dir = "{work}/cache"
[output]
dir = "{work}/runs/{{name}}"
name = "cpuproof"
formats = ["kohya"]
[eval]
enabled = false
[backend]
name = "kohya"
[backend.kohya]
sd_scripts = "{sd_scripts}"
python = "{work}/python-shim"
tokenizer_cache_dir = "{flux}/tokenizers"
"""

CACHING = re.compile(r"set image size from cache files|caching latents|Text Encoder outputs|checking cache validity|"
                     r"found directory|\d+/\d+ \[")


def listing(root: Path, rel_to: Path) -> list[str]:
    out = []
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        out.append(f"{st.st_ino} {st.st_nlink} {st.st_mtime_ns / 1e9:.9f} {kind} {path.relative_to(rel_to)}")
    return out


def caching_lines(log: Path, start: int) -> list[str]:
    text = log.read_bytes()[start:].decode("utf-8", "replace")
    lines = [" ".join(line.split()) for line in re.split(r"[\r\n]+", text)]
    return [line for line in lines if CACHING.search(line) and "steps:" not in line]


COMPARE = r"""
import json, sys
from pathlib import Path
import numpy as np
ours, theirs = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
load = lambda p: (lambda z: {k: z[k] for k in z.files})(np.load(p))
latents = {p.name: load(p)[next(k for k in load(p) if k.startswith("latents"))] for p in theirs.glob("*_flux.npz")}
for path in sorted(ours.glob("*.npz")):
    other = theirs / path.name
    if not other.exists():
        out[path.name] = "no such cache"
        continue
    a, b = load(path), load(other)
    row = {"same_keys": sorted(a) == sorted(b),
           "identical": sorted(k for k in a if k in b and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])),
           "different": sorted(k for k in a if k not in b or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))}
    key = next((k for k in a if k.startswith("latents")), None)
    if key is not None:
        rel = lambda x, y: round(float(np.linalg.norm(x - y) / np.linalg.norm(y)), 4)
        row["latents_rel_l2_same_image"] = rel(a[key], b[key])
        row["latents_rel_l2_nearest_other_image"] = min(rel(a[key], v) for n, v in latents.items() if n != path.name)
    out[path.name] = row
print(json.dumps(out))
"""


def compare(ours: Path, theirs: Path) -> dict:
    """Each cache of ``ours`` against the same name in ``theirs`` (with the engine's numpy): the arrays the same bit for
    bit and those not; for latents, their relative L2 distance to the same image's and to the nearest other image's."""
    return json.loads(subprocess.run([str(ENGINE_PY), "-c", COMPARE, str(ours), str(theirs)], check=True,
                                     capture_output=True, text=True).stdout)


def main() -> int:
    args = sys.argv[1:]
    src = HERE
    if "--src" in args:
        at = args.index("--src")
        src = Path(args[at + 1]).resolve()
        del args[at:at + 2]
    work, out = (Path(a).resolve() for a in args)
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    shim = work / "python-shim"
    shim.write_text(f'#!/bin/sh\n# the engine\'s python with bench/engine_shim (the random T5 file has 1 block)\n'
                    f'export PYTHONPATH="{src}/bench/engine_shim${{PYTHONPATH:+:$PYTHONPATH}}"\n'
                    f'export LORA_RUN_T5_LAYERS=1\nexec {ENGINE_PY} "$@"\n')
    shim.chmod(0o755)
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(flux=FLUX, work=work, sd_scripts=SD_SCRIPTS))
    shutil.copy(recipe, out / "recipe.toml")
    env = {**os.environ, "PYTHONPATH": f"{src}/core:{src}/plugins"}
    sys.path[:0] = [f"{src}/core", f"{src}/plugins"]
    from lora_run_devtools.testing import make_images

    data = work / "data" / "subject"
    make_images(data, count=4, size=(192, 160))
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    summary: dict = {"lora_run_tree": str(src), "checkout_head": commit, "runs": {}}
    seen_inodes: dict[tuple[int, int], str] = {}    # (inode, mtime) -> the first path it was seen at
    seen_files: dict[str, tuple[int, int]] = {}     # path -> (inode, mtime) when last seen

    def run(name: str, *extra: str, folder: str = "cache", rerun_of: str | None = None) -> None:
        out_dir = work / "runs" / (rerun_of or name)
        log = out_dir / "kohya" / "train.log"
        start = log.stat().st_size if log.exists() else 0
        argv = [sys.executable, "-m", "lora_run", str(recipe), "--output-dir", str(out_dir), *extra]
        t0 = time.time()
        start_ns = time.time_ns()
        done = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True)
        seconds = round(time.time() - t0, 1)
        (out / f"lora-run-{name}.out").write_text(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}"
                                                  f"\nexit {done.returncode}, {seconds} s\n")
        if log.exists():
            (out / f"train-{name}.log").write_bytes(log.read_bytes()[start:])
        root = work / "cache" if folder == "cache" else out_dir / "kohya" / "data"
        if folder in ("fresh", "fresh-a"):
            root = work / ("fresh-cache" if folder == "fresh" else "fresh-a")
        lines = listing(root, work) if root.exists() else []
        (out / f"listing-{name}.txt").write_text("\n".join(lines) + "\n")
        dataset = tomllib.loads((out_dir / "kohya" / "dataset.toml").read_text("utf-8"))
        staged = Path(dataset["datasets"][0]["subsets"][0]["image_dir"])
        # a cache sd-scripts wrote in this run is newer than the run's start; one linked in (or renamed in place)
        # keeps its file: the same inode and mtime as a file seen before (inode numbers alone are reused once a file
        # is removed)
        written, carried, kept, other = [], [], [], []
        for cache in sorted(staged.glob("*.npz")):
            st = cache.stat()
            ident = (st.st_ino, st.st_mtime_ns)
            if st.st_mtime_ns >= start_ns:
                written.append(cache.name)
            elif seen_files.get(str(cache)) == ident:
                kept.append(cache.name)
            elif ident in seen_inodes:
                carried.append(f"{cache.name} <- {Path(seen_inodes[ident]).relative_to(work)}")
            else:
                other.append(cache.name)
        for path in root.rglob("*.npz"):
            st = path.stat()
            seen_inodes.setdefault((st.st_ino, st.st_mtime_ns), str(path))
            seen_files[str(path)] = (st.st_ino, st.st_mtime_ns)
        summary["runs"][name] = {"argv": argv[2:], "exit": done.returncode, "seconds": seconds,
                                 "staged": str(staged.relative_to(work)),
                                 "caches_written_by_sd_scripts": written, "caches_carried": carried,
                                 "caches_kept_in_place": kept, "caches_unexplained": other,
                                 "sd_scripts_caching_lines": caching_lines(log, start) if log.exists() else []}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: exit {done.returncode} in {seconds} s; written {len(written)}, carried {len(carried)}, "
              f"kept {len(kept)}, unexplained {len(other)} ({staged.relative_to(work)})", flush=True)
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)

    run("a")
    run("a2", "--set", f"train.cache_dir='{work / 'fresh-a'}'", folder="fresh-a")
    summary["a_against_a2"] = compare(work / summary["runs"]["a"]["staged"], work / summary["runs"]["a2"]["staged"])
    (data / "img002.txt").write_text("ohwx, a photo number 2, edited", "utf-8")
    run("b")
    for path in data.glob("img001.*"):
        path.rename(work / path.name)
    run("c")
    make_images(data, count=1, size=(192, 160), seed=7, prefix="new")
    (data / "new000.txt").write_text("ohwx, a new photo", "utf-8")
    from PIL import Image
    with Image.open(data / "img003.png") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "img003.png")
    run("d")
    run("f", "--set", f"train.cache_dir='{work / 'fresh-cache'}'", folder="fresh")
    # the carried caches of d against sd-scripts' own encode of the same files (f), array for array
    summary["d_against_f"] = compare(work / summary["runs"]["d"]["staged"], work / summary["runs"]["f"]["staged"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    run("g1", "--unset", "train.cache_dir", folder="run")
    summary["g1_against_f"] = compare(work / summary["runs"]["g1"]["staged"], work / summary["runs"]["f"]["staged"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    for path in data.glob("img000.*"):
        path.rename(work / path.name)
    run("g2", "--unset", "train.cache_dir", "--resume", "--allow-dataset-change", "--set", "train.steps=4",
        folder="run", rerun_of="g1")
    (data / "img002.txt").write_text("ohwx, a photo number 2, edited twice", "utf-8")
    run("g3", "--unset", "train.cache_dir", "--resume", "--allow-dataset-change", "--set", "train.steps=6",
        folder="run", rerun_of="g1")
    for path in work.glob("img000.*"):
        path.rename(data / path.name)
    (data / "img002.txt").write_text("ohwx, a photo number 2, edited", "utf-8")
    prune(work, out, summary, run, src)
    digest = hashlib.sha256((out / "summary.json").read_bytes()).hexdigest()[:12]
    print(f"done: {out} (summary {digest})")
    return 0


def prune(work: Path, out: Path, summary: dict, run, src: Path) -> None:
    """h: the dataset of d again with `remove_old_staging`, while another process holds c's folder as a running run
    does (`lora_run_engines.stage.use`): a's and b's folders go, c's and d's stay, and sd-scripts finds every cache
    of d (some linked from the removed folders) and encodes nothing."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from lora_run_engines.stage import use\nuse(Path(sys.argv[1]))\nprint('held', flush=True)\n"
                               "time.sleep(3600)", str((work / summary["runs"]["c"]["staged"]).parent)],
                              env={**os.environ, "PYTHONPATH": f"{src}/core:{src}/plugins"},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    before = sorted(p.name for p in (work / "cache" / "kohya-data").iterdir())
    try:
        run("h", "--set", "backend.kohya.remove_old_staging=true")
    finally:
        holder.kill()
        holder.wait()
    after = sorted(p.name for p in (work / "cache" / "kohya-data").iterdir())
    summary["runs"]["h"]["kohya_data_before"] = before
    summary["runs"]["h"]["kohya_data_after"] = after
    summary["runs"]["h"]["held_by_another_process"] = str(Path(summary["runs"]["c"]["staged"]).parent)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"h: kohya-data before {before}, after {after}", flush=True)




if __name__ == "__main__":
    raise SystemExit(main())
