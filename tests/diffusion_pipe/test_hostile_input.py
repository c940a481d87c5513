"""Hostile dataset file names through diffusion-pipe's staging: the staged names are lora-run's, whatever the user's."""
from __future__ import annotations

import json

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


def test_paths_the_engines_reader_cannot_read_are_refused_at_check_by_key(dp_recipe, tmp_path):
    """diffusion-pipe reads its configs with `toml` 0.10.2, which stops at a string holding a control character and,
    after it, a backslash-u. A model folder, run folder or cache folder named so passed `check`, and `plan` / the run
    then failed with "generated a config diffusion-pipe would not accept" (a translation bug, exit 1). `check` now
    refuses it at the recipe key that holds the path."""
    import pytest

    from lora_run.errors import RecipeError
    from lora_run.plugins import load_plugins
    from lora_run.run import validate

    odd = tmp_path / "x\x1b\\user"
    odd.mkdir()
    (odd / "model_index.json").write_text("{}")
    cases = [(f"model.source={json.dumps(str(odd))}", "[model.source]"),
             (f"train.cache_dir={json.dumps(str(odd / 'cache'))}", "[train.cache_dir]"),
             (f"output.dir={json.dumps(str(odd / 'runs'))}", "[output.dir]")]
    for setting, key in cases:
        with pytest.raises(RecipeError) as info:
            validate(load_recipe(dp_recipe(), [setting]), load_plugins())
        line, = [p for p in info.value.problems if key in p]
        assert "toml 0.10.2" in line and "diffusion-pipe/" in line, info.value.problems
    validate(load_recipe(dp_recipe(), [f"output.dir={json.dumps(str(tmp_path / 'a b #q'))}"]), load_plugins())


def test_a_recipe_file_named_with_braces_or_a_control_character_plans(dp_recipe, tmp_path):
    """The files' comment header names the recipe: it went through str.format, so `lora-run plan r{x}.toml` stopped
    with "unexpected KeyError: 'x'", and a control character in the name was written into the comment, where TOML
    forbids it (tomllib refused the file; the values were fine)."""
    import tomllib

    from lora_run.plugins import load_plugins
    from lora_run.run import make_backend, validate
    from lora_run_rundir import RunDir

    for name in ("r{x}.toml", "r{0}.toml", "r\x1b{}.toml"):
        path = dp_recipe(name=name)
        plugins = load_plugins()
        prepared = validate(load_recipe(path), plugins)
        plan = make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "run")).plan()
        for rel, text in plan.files.items():
            assert text.startswith("# diffusion-pipe ") and name.replace("\x1b", "\\x1b") in text.splitlines()[0]
            assert tomllib.loads(text), rel
            assert "\x1b" not in text


def test_a_run_folder_from_output_dir_the_reader_cannot_read_is_refused_by_key(dp_recipe, tmp_path):
    """`--output-dir` is not seen by check(), so a run folder `toml` 0.10.2 cannot read reached plan(), which
    reported it as "a bug in the translation" (exit 1); it is now a recipe error naming [output.dir] (exit 2)."""
    import pytest

    from lora_run.errors import RecipeError
    from lora_run.plugins import load_plugins
    from lora_run.run import make_backend, validate
    from lora_run_rundir import RunDir

    plugins = load_plugins()
    prepared = validate(load_recipe(dp_recipe()), plugins)
    with pytest.raises(RecipeError) as info:
        make_backend(prepared, plugins, run_dir=RunDir(tmp_path / "r\x1b\\u")).plan()
    assert "[output.dir]" in str(info.value) and "toml 0.10.2" in str(info.value)
