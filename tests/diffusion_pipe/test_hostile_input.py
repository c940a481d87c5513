"""Hostile dataset file names through diffusion-pipe's staging: the staged names are lora-run's, whatever the user's."""
from __future__ import annotations

from PIL import Image

from lora_run.dataset import Item
from lora_run.recipe import load_recipe
from lora_run_diffusion_pipe.stage import stage, wanted_sets


def test_staged_names_fit_the_file_system_whatever_the_image_is_called(dp_recipe, tmp_path):
    """A 240-byte stem plus the staged prefix exceeded NAME_MAX: the run crashed (`OSError: File name too long`,
    exit 1) after the disk check; a line break or quote in a name was passed on to the engine's file list."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    stems = ["L" * 240, "new\nline \"q' #=[x]", "ünï"]
    items = []
    for stem in stems:
        image = folder / f"{stem}.png"
        Image.new("RGB", (64, 64), (9, 9, 9)).save(image)
        items.append(Item(image=image, caption="ohwx, a photo", caption_file=None, subset="subject"))
    recipe = load_recipe(dp_recipe()).recipe
    counts = stage(wanted_sets(recipe, items, ["subject"]), tmp_path / "staged")
    assert counts == {"subject": 3}
    names = sorted(p.name for p in (tmp_path / "staged" / "subject").iterdir())
    assert len(names) == 6 and all(len(n.encode()) <= 110 for n in names)
    assert all(n.isascii() and "\n" not in n and '"' not in n and "'" not in n for n in names)
    assert sorted(p.read_text() for p in (tmp_path / "staged" / "subject").glob("*.txt")) == ["ohwx, a photo"] * 3
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.png" for s in stems)    # the user's untouched
