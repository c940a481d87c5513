"""Real faces available offline: `skimage.data.astronaut()` (one person, a real photograph) and the bundled
LFW subset (`skimage.data.lfw_subset()`: 25×25 crops of other people's faces, upscaled onto a canvas so that
the HOG detector finds them). Face-free images are skimage's cat, coffee and rocket photographs."""
from __future__ import annotations

from pathlib import Path

import pytest

import skimage.data as skdata
from PIL import Image, ImageEnhance, ImageOps


def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


def astronaut_variants() -> dict[str, Image.Image]:
    """Copies of the one real face that must score as the same identity."""
    a = astronaut()
    return {
        "original": a,
        "flipped": ImageOps.mirror(a),
        "cropped": a.crop((60, 10, 420, 400)),
        "recoloured": ImageEnhance.Color(a).enhance(0.35),
        "grey": ImageOps.grayscale(a).convert("RGB"),
        "brighter": ImageEnhance.Brightness(a).enhance(1.25),
        "rotated": a.rotate(7, resample=Image.Resampling.BILINEAR),
        "smaller": a.resize((320, 320), Image.Resampling.LANCZOS),
    }


def other_person(index: int) -> Image.Image:
    """A different real person: one LFW face (index into the 100 face crops), upscaled on a grey canvas."""
    faces = skdata.lfw_subset()[:100]
    face = Image.fromarray((faces[index % 100] * 255).astype("uint8")).convert("RGB")
    canvas = Image.new("RGB", (256, 256), (128, 128, 128))
    canvas.paste(face.resize((120, 120), Image.Resampling.BICUBIC), (68 + (index % 3) * 8, 60 + (index % 5) * 6))
    return canvas


def face_free() -> dict[str, Image.Image]:
    return {name: Image.fromarray(getattr(skdata, name)()) for name in ("chelsea", "coffee", "rocket")}


def save(images: dict[str, Image.Image], folder: Path, ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, img in images.items():
        path = folder / f"{name}{ext}"
        img.save(path)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def dlib_embedder():
    from lora_run_eval.faces import DlibEmbedder

    return DlibEmbedder()


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    """The subject's "training photos": three different copies of the astronaut, with captions."""
    folder = tmp_path_factory.mktemp("subject")
    v = astronaut_variants()
    paths = save({"a0": v["original"], "a1": v["flipped"], "a2": v["cropped"]}, folder)
    for p in paths:
        p.with_suffix(".txt").write_text("ohwx, a woman in a space suit", encoding="utf-8")
    return folder


def astronaut_scene(index: int) -> Image.Image:
    """The astronaut's face (a real face) in a different picture each time: other background, place, size,
    sometimes mirrored — "the same person, a different image", as a healthy LoRA produces across seeds."""
    backgrounds = list(face_free().values())
    bg = backgrounds[index % len(backgrounds)].resize((512, 512)).convert("RGB")
    face = astronaut().crop((120, 20, 320, 260))
    if index % 2:
        face = ImageOps.mirror(face)
    scale = 1.0 + 0.25 * (index % 3)
    face = face.resize((int(200 * scale), int(240 * scale)), Image.Resampling.LANCZOS)
    x = [20, 250, 120, 60, 200][index % 5]
    y = [10, 150, 60, 200, 30][index % 5]
    bg.paste(face, (min(x, 512 - face.width), min(y, 512 - face.height)))
    return bg


def make_grid(folder: Path, trigger, control, *, prompts: int = 3, strengths=(0.8, 1.0), seeds=(1, 2, 3)):
    """Samples laid out like the evaluation grid: `trigger(prompt_index, strength, seed)` and
    `control(strength, seed)` return the image for each cell (the control prompt comes last)."""
    from lora_run_eval.metrics import Sample

    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for pi in range(prompts + 1):
        is_control = pi == prompts
        for st in strengths:
            for seed in seeds:
                image = control(st, seed) if is_control else trigger(pi, st, seed)
                name = f"p{pi}-s{st:g}-seed{seed}"
                path = folder / f"{name}.png"
                image.save(path)
                samples.append(Sample(str(path), name, pi, "a person" if is_control else f"ohwx prompt {pi}",
                                      is_control, st, seed))
    return samples
