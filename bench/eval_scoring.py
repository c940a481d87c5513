"""The evaluation's scoring, in this process against in worker processes, side by side in one run, with the ratio
printed.

The protocol's grid is scored on the CPU: each generated image (and each subject photo) goes through dlib's face
detector, landmarks and descriptor (`lora_run_eval.faces`). `Embedder.embed_paths` spreads a list of images over
worker processes, one dlib each (threads gave 1.29× on 16 cores: dlib holds Python's lock). This bench embeds the
same images both ways, checks the results agree, and prints the seconds (the workers' start-up included) and the
ratio. The 2026-12-04 H200 run scored the fast recipe's 60 images and 20 subject photos in 16.1 s serially.

    python bench/eval_scoring.py [--images 80] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def images(folder: Path, count: int) -> list[Path]:
    """A face in a different 512² scene for each image (as a healthy LoRA's grid has), and other people."""
    from eval.conftest import astronaut_scene, other_person

    paths = []
    for i in range(count):
        image = astronaut_scene(i) if i % 4 else other_person(i).resize((512, 512))
        path = folder / f"img{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--workers", type=int, default=None, help="default: what embed_paths picks")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    from lora_run_eval.faces import DlibEmbedder

    with tempfile.TemporaryDirectory() as tmp:
        paths = images(Path(tmp), args.images)
        embedder = DlibEmbedder()
        started = time.perf_counter()
        serial = embedder.embed_paths(paths, workers=1)
        serial_s = time.perf_counter() - started
        started = time.perf_counter()
        spread = embedder.embed_paths(paths, workers=args.workers)
        spread_s = time.perf_counter() - started
    same = all(a.faces_found == b.faces_found and (a.face is None or (a.face.embedding == b.face.embedding).all())
               for a, b in zip(serial, spread))
    row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
           "images": len(paths), "faces": sum(r.face is not None for r in serial), "workers": args.workers,
           "how": "processes", "load_average": os.getloadavg()[0], "serial_s": round(serial_s, 2),
           "processes_s": round(spread_s, 2), "speedup": round(serial_s / spread_s, 2), "same_results": same}
    print(json.dumps(row))
    print(f"{len(paths)} images ({row['faces']} with a face) on {row['cores']} cores: in this process {serial_s:.1f} s, "
          f"in worker processes {spread_s:.1f} s, {row['speedup']:.2f}x; results the same: {same}")
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-scoring-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json").write_text(json.dumps(row, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
