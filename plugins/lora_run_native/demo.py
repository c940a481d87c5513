"""`lora-run demo`: a tiny FLUX-architecture model, a small synthetic captioned dataset and a recipe.

``build_demo(assets_dir) -> recipe path`` writes into ``assets_dir``:

- ``tiny-flux/``: a randomly initialised FLUX.1-dev-layout ``FluxPipeline`` (see ``tiny.py``);
- ``data/subject/``: 12 drawings of one cartoon character ("ohwx": a green face with a red hat) in varied
  poses, sizes and backgrounds, each with a caption containing the trigger;
- ``data/reg/``: 20 generic cartoon faces without the trigger (a regularisation set of the size the playbook asks
  for), each caption its own;
- ``tiny-flux.toml``: a copy of the shipped ``recipes/demo/tiny-flux.toml``;
- ``recipe.toml``: ``extends`` that copy and fills in these paths, all relative to the assets folder: the demo's
  recipe (and the resume command an interrupted demo prints) never reads a file of the installation, so it still
  loads, and resumes the same run, after the venv moved or lora-run was upgraded, and the demo folder may move.

Everything is deterministic and offline. It shows the pipeline end to end; it does not make a useful LoRA.
"""
from __future__ import annotations

import os
import random
import shlex
from collections.abc import Callable
from pathlib import Path

from lora_run import __version__
from lora_run.errors import BackendError
from lora_run.files import resolved, shown
from lora_run_rundir import atomic_write_text
from lora_run_rundir.atomic import folder_lock
from lora_run_rundir.output import folder_problem, refuse_empty_output_dir

TRIGGER = "ohwx"
SUBJECT_IMAGES = 12     # drawings of the "ohwx" character
REG_IMAGES = 20         # the playbook's 20–50 (§6): the demo's lint shows no warning of its own making
SHIPPED = Path("demo") / "tiny-flux.toml"
BACKGROUNDS = [(70, 110, 200), (230, 220, 160), (120, 180, 120), (200, 120, 160), (90, 90, 90), (240, 240, 240)]
PLACES = ["on a blue background", "on a sandy background", "in a green field", "on a pink wall",
          "in a dark room", "on a white background"]


def shipped_recipe() -> Path:
    from lora_run_recipes import recipe_roots

    for root in recipe_roots():
        candidate = root / SHIPPED
        if candidate.is_file():
            return candidate
    raise BackendError(f"the shipped recipe recipes/{SHIPPED} was not found next to the lora_run package")


def _face(size: tuple[int, int], rng: random.Random, skin: tuple[int, int, int], hat: tuple[int, int, int] | None,
          background: tuple[int, int, int]) -> object:
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    r = int(min(w, h) * rng.uniform(0.28, 0.38))
    cx = int(w * rng.uniform(0.4, 0.6))
    cy = int(h * rng.uniform(0.5, 0.62))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=skin, outline=(30, 30, 30))
    eye = max(2, r // 6)
    tilt = rng.randint(-r // 6, r // 6)
    for dx in (-r // 2.5, r // 2.5):
        ex, ey = cx + int(dx), cy - r // 4 + (tilt if dx > 0 else 0)
        draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(250, 250, 250))
        draw.ellipse((ex - eye // 2, ey - eye // 2, ex + eye // 2, ey + eye // 2), fill=(20, 20, 20))
    smile = rng.choice([(200, 340), (20, 160), (0, 180)])
    draw.arc((cx - r // 2, cy, cx + r // 2, cy + r // 2), smile[0], smile[1], fill=(60, 20, 20), width=max(1, r // 10))
    if hat is not None:
        draw.polygon([(cx - r, cy - r // 2), (cx + r, cy - r // 2), (cx, cy - int(r * 1.7))], fill=hat)
    return img


def build_dataset(folder: Path, seed: int = 7) -> tuple[Path, Path]:
    subject, reg = folder / "subject", folder / "reg"
    rng = random.Random(seed)
    sizes = [(96, 96), (96, 80), (80, 96), (96, 96), (112, 96), (96, 112)]
    for i in range(SUBJECT_IMAGES):
        bg = i % len(BACKGROUNDS)
        img = _face(sizes[i % len(sizes)], rng, (90, 200, 90), (210, 40, 40), BACKGROUNDS[bg])
        subject.mkdir(parents=True, exist_ok=True)
        img.save(subject / f"{TRIGGER}_{i:02d}.png")
        mood = ["smiling", "surprised", "calm", "winking"][i % 4]     # with the places: no caption twice
        (subject / f"{TRIGGER}_{i:02d}.txt").write_text(f"{TRIGGER}, a cartoon face, {mood}, {PLACES[bg]}\n",
                                                          encoding="utf-8")
    for i in range(REG_IMAGES):
        skin = rng.choice([(240, 200, 170), (180, 130, 90), (250, 220, 120), (150, 160, 230)])
        bg = (i + 2) % len(BACKGROUNDS)
        img = _face((96, 96), rng, skin, None, BACKGROUNDS[bg])
        reg.mkdir(parents=True, exist_ok=True)
        img.save(reg / f"face_{i:02d}.png")
        mood = ["smiling", "surprised", "calm", "winking", "sleepy"][i % 5]
        (reg / f"face_{i:02d}.txt").write_text(f"a cartoon face, {mood}, {PLACES[bg]}\n", encoding="utf-8")
    return subject, reg


def _build_whole(target: Path, build: Callable[[Path], object]) -> None:
    """``build(folder)`` into a temporary sibling, renamed to ``target`` when complete: a demo interrupted while
    building (Ctrl-C) leaves no half-written model or dataset that the next `lora-run demo` would reuse. So the demo
    itself never leaves ``target`` incomplete: one that is there, short of what the demo builds (its `reg/` or the
    model's `model_index.json` gone), was changed by someone else and may hold their files (notes, their own photos
    beside the drawings), which deleting it to build anew took with it; it is refused instead, named (exit 2)."""
    import shutil

    from lora_run.errors import OutputError

    if os.path.lexists(target):
        raise OutputError(f"{shown(target)}: is not the demo's {'model' if target.name != 'data' else 'dataset'} as "
                          "`lora-run demo` builds it (parts of it are missing) and may hold files of yours; the demo "
                          "never deletes it: move it away (or delete it) and run the demo again to have it built anew")
    building = target.with_name(f".{target.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    build(building)
    building.rename(target)


def build_demo(assets_dir: str | Path) -> Path:
    """Build (or reuse) the demo assets in ``assets_dir`` and return the demo recipe's path."""
    import tomli_w

    from lora_run_flux.tiny import build_tiny_flux

    assets = resolved(assets_dir)
    assets.mkdir(parents=True, exist_ok=True)
    model = assets / "tiny-flux"
    if not (model / "model_index.json").is_file():
        print(f"demo: building a tiny random FLUX-architecture model in {model}")
        _build_whole(model, build_tiny_flux)
    subject, reg = assets / "data" / "subject", assets / "data" / "reg"
    if not subject.is_dir() or not reg.is_dir():
        print(f"demo: drawing a synthetic captioned dataset in {assets / 'data'}")
        _build_whole(assets / "data", build_dataset)
    shipped = f"recipes/{SHIPPED.as_posix()}"
    base = assets / SHIPPED.name     # a copy of the shipped recipe: its own relative paths name these assets too
    atomic_write_text(base, f"# Copied by `lora-run demo` (lora-run {__version__}) from the shipped {shipped};\n"
                      f"# the demo's recipe.toml extends this copy.\n{shipped_recipe().read_text(encoding='utf-8')}")
    recipe = {
        "extends": base.name,
        "model": {"source": f"./{model.name}"},
        "dataset": {"path": subject.relative_to(assets).as_posix(), "regularization": [
            {"path": reg.relative_to(assets).as_posix(), "weight": 0.5, "default_caption": "a cartoon face"}]},
        "output": {"dir": "../run"},
    }
    path = assets / "recipe.toml"
    header = (f"# Written by `lora-run demo`: the shipped {shipped} (copied beside this file as\n"
              f"# {base.name}) with this demo's model and dataset paths, relative to this folder.\n"
              "# Run it again with: lora-run " + shlex.quote(str(path)) + " --overwrite\n\n")
    atomic_write_text(path, header + tomli_w.dumps(recipe))     # replaces a link there, never writes through it
    return path


#: The file that marks a folder as the demo's own: only such a folder (or a new or empty one) is written into.
MARK = ".lora-run-demo"


def _own_file(path: Path) -> bool:
    """A regular file that is no link: a link under the mark's or the recipe's name (to a user's file) neither marks
    the folder as the demo's nor is written through."""
    return path.is_file() and not path.is_symlink()


def _make(out: Path) -> None:
    """``out`` made where missing (a new folder is empty: the demo's to use), or refused (exit 2)."""
    from lora_run.errors import RecipeError

    unusable = folder_problem(out)
    if unusable:
        raise RecipeError(f"--output-dir {shown(out)}: {unusable}; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"--output-dir {out}: cannot write there ({exc.strerror or exc})") from None


def _claim(out: Path) -> None:
    """Make ``out`` the demo's folder, or refuse (exit 2) before anything is written: the demo rebuilds its
    model, dataset and recipe in there, so a folder of the user's own files is never used."""
    from lora_run.errors import RecipeError

    recipe = out / "assets" / "recipe.toml"
    try:
        if out.is_dir() and any(out.iterdir()) and not _own_file(out / MARK):
            written = _own_file(recipe) and recipe.read_text(encoding="utf-8", errors="replace").startswith(
                "# Written by `lora-run demo`")          # a demo folder from before the mark existed
            if not written:
                raise RecipeError(f"--output-dir {out}: the folder holds files `lora-run demo` did not write; "
                                  "give a new or empty folder")
        if not _own_file(out / MARK):    # written anew, never through a link (its target is never written)
            atomic_write_text(out / MARK, "This folder was written by `lora-run demo`.\n")
    except OSError as exc:
        raise RecipeError(f"--output-dir {out}: cannot write there ({exc.strerror or exc})") from None


def run_demo(output_dir: str, plugins: object, *, overwrite: bool = False, debug: bool = False) -> int:
    """Build the assets under ``output_dir/assets`` and train them into ``output_dir/run``; the exit code."""
    from lora_run.errors import RecipeError
    from lora_run.recipe import load_recipe
    from lora_run.run import execute

    from .backend import missing_packages

    refuse_empty_output_dir(output_dir)      # resolved("") is the working folder
    if (why := missing_packages()) is not None:     # before anything is built: the tiny model needs them too
        raise RecipeError(f"lora-run demo: {why}")
    out = resolved(output_dir)
    _make(out)
    # one demo per folder, for the whole demo: a second one rebuilt the model and the dataset under the first (its
    # `.building` folders deleted each other's: "unexpected FileNotFoundError", exit 1, either demo) before the run
    # folder's own lock refused it
    with folder_lock(out, "a demo"):
        _claim(out)
        run_out = out / "run"
        if not overwrite and run_out.is_dir() and any(run_out.iterdir()):
            raise RecipeError(f"an earlier demo run is in {run_out}: `lora-run demo --overwrite` replaces it, or "
                              "`lora-run demo --output-dir OTHER` runs it elsewhere")
        recipe_path = build_demo(out / "assets")
        ctx = execute(load_recipe(recipe_path, plugins=plugins), plugins, output_dir=str(run_out), overwrite=overwrite,
                      debug=debug)
    print(f"demo done: {ctx.run_dir.path if ctx.run_dir else out}")
    print("This shows the pipeline end to end on a tiny random model; it is not a useful LoRA. The evaluation "
          "report's failures are expected: the model is random and the photos are cartoons.\n" + NEXT_STEPS)
    return 0


#: The demo's closing lines: only what every install has (commands and shipped recipes; a wheel has no docs/).
NEXT_STEPS = ("Next: your own photos with a shipped recipe. `lora-run recipes` lists them; copy one with\n"
              "  lora-run recipes flux/identity-fast > my.toml\n"
              "then set [dataset] path and trigger in my.toml, and run `lora-run check my.toml`, then `lora-run my.toml`.")
