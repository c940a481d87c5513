from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lora_run.dataset import ERROR, INFO, WARNING
from lora_run.recipe import load_recipe
from lora_run.run import lint
from lora_run_devtools.testing import make_images

from .conftest import GOOD


def findings(report, code):
    return [f for f in report.findings if f.code == code]


def test_clean_dataset_passes(recording, write_recipe):
    _, plugins = recording
    report = lint(load_recipe(write_recipe(GOOD)).recipe, plugins)
    assert not report.errors and not report.warnings and len(report.usable) == 4
    report = lint(load_recipe(write_recipe(GOOD), ["dataset.min_images=15"]).recipe, plugins)
    assert findings(report, "few-images")[0].level == WARNING


def test_corpus_of_bad_files(recording, write_recipe, subject_dataset, tmp_path):
    _, plugins = recording
    d = subject_dataset
    rng = np.random.default_rng(3)

    def img(name, arr, caption="ohwx, person", **save):
        Image.fromarray(arr).save(d / name, **save)
        if caption is not None:
            (d / name).with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())

    photo = (rng.random((300, 280, 3)) * 255).astype("uint8")
    (d / "empty.png").write_bytes(b"")
    (d / "empty.txt").write_text("ohwx")
    good = d / "img001.png"
    (d / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (d / "truncated.txt").write_text("ohwx, cut")
    (d / "notimage.jpg").write_text("hello, I am text")
    (d / "notimage.txt").write_text("ohwx")
    img("cmyk.jpg", photo)
    Image.open(d / "cmyk.jpg").convert("CMYK").save(d / "cmyk.jpg")
    img("deep.png", (rng.random((300, 300)) * 65535).astype("uint16"))
    img("alpha.png", np.dstack([photo, np.full(photo.shape[:2], 128, "uint8")]))
    img("nocap.png", photo[::-1].copy(), caption=None)
    img("emptycap.png", photo[:, ::-1].copy(), caption="   ")
    img("latin1.png", np.rot90(photo).copy(), caption="ohwx caf\xe9".encode("latin-1"))
    img("notrigger.png", (255 - photo), caption="a person")
    img("small.png", photo[:100, :100].copy())
    img("wide.png", (rng.random((300, 1200, 3)) * 255).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112] = 6
    img("rotated.jpg", (rng.random((320, 280, 3)) * 255).astype("uint8"), exif=exif)
    (d / "dup.png").write_bytes((d / "img002.png").read_bytes())
    (d / "dup.txt").write_text("ohwx, dup")
    near = np.asarray(Image.open(d / "img003.png")).astype(int) + 2
    img("near.png", near.clip(0, 255).astype("uint8"))
    if hasattr(os, "symlink"):
        (d / "loop").symlink_to(d, target_is_directory=True)
        (d / "dangling.png").symlink_to(d / "does-not-exist.png")
    report = lint(load_recipe(write_recipe(GOOD)).recipe, plugins)
    by_file = {}
    for f in report.findings:
        by_file.setdefault(os.path.basename(f.file), []).append((f.level, f.code))
    assert (ERROR, "bad-image") in by_file["empty.png"]
    assert (ERROR, "bad-image") in by_file["truncated.png"]
    assert (ERROR, "bad-image") in by_file["notimage.jpg"]
    assert (INFO, "converted") in by_file["cmyk.jpg"]
    assert (INFO, "converted") in by_file["deep.png"]
    assert (INFO, "converted") in by_file["alpha.png"]
    assert (INFO, "converted") in by_file["rotated.jpg"]
    assert (ERROR, "no-caption") in by_file["nocap.png"]
    assert (ERROR, "no-caption") in by_file["emptycap.png"]
    assert (ERROR, "bad-caption") in by_file["latin1.txt"]
    assert (ERROR, "trigger-missing") in by_file["notrigger.txt"]
    assert (WARNING, "too-small") in by_file["small.png"]
    assert (WARNING, "extreme-aspect") in by_file["wide.png"]
    dups = [f for f in report.findings if f.code == "duplicate"]
    assert len(dups) == 1 and {os.path.basename(dups[0].file), dups[0].message.rsplit("/", 1)[-1]} == {
        "dup.png", "img002.png"}
    assert (WARNING, "near-duplicate") in by_file["near.png"]
    assert (ERROR, "unreadable") in by_file["dangling.png"] or (ERROR, "bad-image") in by_file["dangling.png"]
    usable = {p.image.name for p in report.usable}
    assert {"cmyk.jpg", "deep.png", "alpha.png", "rotated.jpg", "img000.png"} <= usable
    assert not usable & {"empty.png", "truncated.png", "nocap.png", "small.png", "notrigger.png"}
    table = report.table()
    assert "ERROR" in table and "truncated image" in table


def test_regularisation_rules(recording, write_recipe, tmp_path):
    _, plugins = recording
    reg = tmp_path / "reg"
    make_images(reg, count=2, trigger="", seed=9, prefix="r")
    (reg / "r000.txt").write_text("ohwx, a person")
    (reg / "r001.txt").unlink()
    body = GOOD + f'[[dataset.regularization]]\npath = "{reg}"\n'
    report = lint(load_recipe(write_recipe(body)).recipe, plugins)
    codes = {(f.code, os.path.basename(f.file)) for f in report.findings}
    assert ("trigger-in-reg", "r000.txt") in codes
    assert ("default-caption", "r001.png") in codes
    assert report.counts["regularisation images"] == 2


def test_prepend_policy_and_empty_folder(recording, write_recipe, subject_dataset, tmp_path):
    _, plugins = recording
    (subject_dataset / "img000.txt").write_text("a person outdoors")
    report = lint(load_recipe(write_recipe(GOOD), ['dataset.trigger_policy="prepend"']).recipe, plugins)
    assert not report.errors
    from lora_run_folder import training_caption
    r = load_recipe(write_recipe(GOOD), ['dataset.trigger_policy="prepend"']).recipe
    item = next(i for i in report.usable if i.image.name == "img000.png")
    assert training_caption(item, r.dataset) == "ohwx, a person outdoors"
    empty = tmp_path / "empty"
    empty.mkdir()
    report = lint(load_recipe(write_recipe(GOOD), [f'dataset.path="{empty}"']).recipe, plugins)
    assert report.errors[0].code == "no-images"


def test_decompression_bomb_is_refused(recording, write_recipe, subject_dataset, monkeypatch):
    _, plugins = recording
    import lora_run_folder.images as images
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    report = lint(load_recipe(write_recipe(GOOD)).recipe, plugins)
    assert all(f.code == "bad-image" and "decompression bomb" in f.message for f in report.errors)
    assert len(report.errors) == 4


def test_missing_or_unusable_regularisation_folder_is_a_dataset_error(write_recipe, tmp_path):
    """A regularisation folder that is not there (or whose path the OS refuses: too long) is a dataset error
    naming its key, exit 2, no traceback; a real one passes."""
    import subprocess
    import sys

    recipe = write_recipe(GOOD)
    reg = tmp_path / "reg"
    make_images(reg, count=2, size=(64, 64))
    for path, code in ((tmp_path / "missing", 2), ("x" * 300, 2), (reg, None)):
        out = subprocess.run([sys.executable, "-m", "lora_run", "check", str(recipe), "--set",
                              f'dataset.regularization=[{{path="{path}"}}]'], capture_output=True, text=True)
        text = out.stdout + out.stderr
        assert "Traceback" not in text
        if code is None:
            assert "no-reg-folder" not in text, text
        else:
            assert out.returncode == code and "dataset.regularization[0].path: folder not found" in text, text


@pytest.mark.parametrize("what", ["missing", "a-file", "too-long"])
def test_a_dataset_path_that_is_no_folder_is_named_by_its_key(write_recipe, tmp_path, what, capsys):
    """`dataset.path` that does not exist or is a file: the lint names the key and says which (it said "no images
    found in …", as for an empty folder); a regularisation path that is a file says so too."""
    from lora_run.cli import main

    afile = tmp_path / "afile.png"
    afile.write_bytes(b"\x89PNG")
    path = {"missing": tmp_path / "nope", "a-file": afile, "too-long": "x" * 300}[what]
    code = main(["check", str(write_recipe(GOOD)), "--set", f'dataset.path="{path}"',
                 "--set", f'dataset.regularization=[{{path="{afile}"}}]'])
    text = capsys.readouterr().out
    assert code == 2
    expected = "is not a folder" if what == "a-file" else "folder not found"
    assert f"dataset.path: {expected}: " in text and "no images found" not in text, text
    assert f"dataset.regularization[0].path: is not a folder: {afile}" in text, text


def test_an_unusable_caption_extension_is_named_and_the_lint_does_not_run(write_recipe, capsys):
    """The `[dataset]` rules are the folder plugin's `check_recipe`: `check` reports them with every other problem,
    and the lint does not run with a caption file name that cannot be formed (`Path.with_suffix` would raise)."""
    from lora_run.cli import main

    recipe = str(write_recipe(GOOD))
    for sets in (["dataset.caption_extension='txt'"],
                 ["dataset.regularization=[{path='.', caption_extension='a/b'}]", "dataset.bucket_min=2048"]):
        code = main(["check", recipe, *(arg for value in sets for arg in ("--set", value))])
        captured = capsys.readouterr()
        assert code == 2 and "Traceback" not in captured.err, captured.err
        assert "dataset:" not in captured.out, captured.out          # no lint table
        if len(sets) == 1:
            assert "[dataset.caption_extension] must be a file extension such as \".txt\", got 'txt'" in captured.err
        else:
            assert "[dataset.regularization[0].caption_extension] must be a file extension" in captured.err
            assert "[dataset.bucket_min] must be <= bucket_max (1024), got 2048" in captured.err
            assert "[dataset.resolution] must lie between bucket_min (2048) and bucket_max (1024)" in captured.err
    # control: with a usable extension the lint runs (its table is printed; the test backend is not installed)
    main(["check", recipe, "--set", "dataset.caption_extension='.txt'"])
    captured = capsys.readouterr()
    assert "dataset: 4 subject images" in captured.out and "caption_extension" not in captured.err, captured


def _codes(report, code):
    return {os.path.basename(f.file): f for f in report.findings if f.code == code}


def test_the_trigger_counts_only_as_a_word_of_its_own(recording, write_recipe, subject_dataset, tmp_path):
    """Before: the trigger was found as a substring: "ohwxman" and "bohwx" passed as holding "ohwx" (and with
    `prepend` were not given it), while a regularisation caption "a man asks" was refused for holding "sks". A
    caption with the trigger in other letter case is still an error (T5 reads "OHWX" as another token), now named
    as such; in a regularisation caption any case is refused."""
    from lora_run_folder import has_trigger, training_caption

    _, plugins = recording
    d = subject_dataset
    (d / "img000.txt").write_text("ohwxman, a man outdoors")
    (d / "img001.txt").write_text("bohwx, a man indoors")
    (d / "img002.txt").write_text("OHWX, a man at night")
    (d / "img003.txt").write_text("a portrait of ohwx.")          # punctuation after the word: found
    reg = tmp_path / "reg"
    make_images(reg, count=3, trigger="", seed=9, prefix="r")
    (reg / "r000.txt").write_text("a man who asks")
    (reg / "r001.txt").write_text("a photo of SKS")
    (reg / "r002.txt").write_text("a photo of a man, sks")
    body = GOOD + f'[[dataset.regularization]]\npath = "{reg}"\n'
    report = lint(load_recipe(write_recipe(body), ['dataset.trigger="ohwx"']).recipe, plugins)
    missing = _codes(report, "trigger-missing")
    assert set(missing) == {"img000.txt", "img001.txt", "img002.txt"}, missing
    assert '"ohwxman", a different word' in missing["img000.txt"].message
    assert '"bohwx", a different word' in missing["img001.txt"].message
    assert '"OHWX", which differs in case' in missing["img002.txt"].message
    report = lint(load_recipe(write_recipe(body), ['dataset.trigger="sks"',
                                                   'dataset.trigger_policy="none"']).recipe, plugins)
    assert set(_codes(report, "trigger-in-reg")) == {"r001.txt", "r002.txt"}
    # prepend gives the trigger to a caption that holds it only inside another word
    recipe = load_recipe(write_recipe(GOOD), ['dataset.trigger_policy="prepend"']).recipe
    report = lint(recipe, plugins)
    item = next(i for i in report.usable if i.image.name == "img000.png")
    assert training_caption(item, recipe.dataset) == "ohwx, ohwxman, a man outdoors"
    # several words, and a trigger that ends in punctuation
    assert has_trigger("photo of ohwx  man, smiling", "ohwx man") and not has_trigger("ohwx manly", "ohwx man")
    assert has_trigger("a photo of <ohwx>", "<ohwx>") and has_trigger("x<ohwx>y", "<ohwx>")
    assert not has_trigger("anything", "") and has_trigger("ohwx_1", "ohwx_1") and not has_trigger("ohwx_12", "ohwx_1")


def test_a_default_caption_holding_the_trigger_is_a_recipe_error(write_recipe, tmp_path, capsys):
    """Before: a regularisation set whose `default_caption` held the trigger passed (the lint checked only caption
    files): every uncaptioned regularisation image was trained with the trigger."""
    from lora_run.cli import main

    reg = tmp_path / "reg"
    make_images(reg, count=2, captions=False, prefix="r")
    for default, bad in (("OHWX person", True), ("a person", False), ("a person asking", False)):
        code = main(["check", str(write_recipe(GOOD)), "--set",
                     f'dataset.regularization=[{{path="{reg}", default_caption="{default}"}}]'])
        err = capsys.readouterr().err
        line = "[dataset.regularization[0].default_caption] holds the trigger \"ohwx\""
        assert (line in err) == bad, err
        if bad:
            assert code == 2


def test_few_images_counts_the_images_that_train(recording, write_recipe, subject_dataset):
    """Before: `few-images` counted every image file, the broken and too-small ones too: 4 files of which one is
    skipped as too small passed `min_images = 4` with no word, and 3 images were trained."""
    _, plugins = recording
    Image.new("RGB", (100, 100), "gray").save(subject_dataset / "img003.png")
    report = lint(load_recipe(write_recipe(GOOD), ["dataset.min_images=4"]).recipe, plugins)
    few = findings(report, "few-images")
    assert few and few[0].level == WARNING and "only 3 of the 4 subject images" in few[0].message, report.table()
    report = lint(load_recipe(write_recipe(GOOD), ["dataset.min_images=3"]).recipe, plugins)
    assert not findings(report, "few-images")          # the threshold itself is enough
    report = lint(load_recipe(write_recipe(GOOD), ["dataset.min_images=5", "dataset.bucket_min=64"]).recipe, plugins)
    assert "only 4 subject images;" in findings(report, "few-images")[0].message


def test_a_dark_16_bit_png_stays_dark():
    """Before: a 16-bit image whose samples all lay below 256 (a dark photo) was scaled as if it were 8-bit: near
    black became mid grey."""
    import io

    from lora_run_folder.images import decode_rgb

    for value, expected in ((200, 1), (65535, 255), (32896, 128)):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, "uint16")).save(buf, "PNG")
        opened = decode_rgb(buf.getvalue())
        assert "16-bit converted to 8-bit" in opened.notes
        assert np.asarray(opened.image).max() == expected, (value, np.asarray(opened.image).max())


@pytest.mark.parametrize("count,code", [(19, "few-reg-images"), (20, None), (50, None), (51, "many-reg-images")])
def test_the_regularisation_images_number_20_to_50(recording, write_recipe, tmp_path, count, code):
    """Playbook §6: "20–50 generic people"; a set outside that range was not mentioned."""
    _, plugins = recording
    reg = tmp_path / "reg"
    make_images(reg, count=count, size=(64, 64), captions=False, prefix="r")
    body = GOOD + f'[[dataset.regularization]]\npath = "{reg}"\n'
    report = lint(load_recipe(write_recipe(body), ["dataset.bucket_min=64"]).recipe, plugins)
    got = {f.code for f in report.findings} & {"few-reg-images", "many-reg-images"}
    assert got == ({code} if code else set()), report.table()
    if code:
        assert findings(report, code)[0].level == WARNING and f"{count} usable regularisation images" in \
            findings(report, code)[0].message


def test_identical_captions_and_a_class_word_trigger_are_warnings(recording, write_recipe, subject_dataset):
    """Playbook §6: "avoid repeating identical phrasing" and "use a unique, uncommon string" were not checked."""
    _, plugins = recording
    for n in range(3):
        (subject_dataset / f"img00{n}.txt").write_text("ohwx, a man " if n else "OHWX,  A man")
    report = lint(load_recipe(write_recipe(GOOD), ['dataset.trigger_policy="none"']).recipe, plugins)
    same = findings(report, "same-caption")
    assert len(same) == 1 and same[0].level == WARNING and "3 subject images" in same[0].message
    assert "img000.png, img001.png, img002.png" in same[0].message
    for trigger, warned in (("man", True), ("Person", True), ("ohwx", False), ("ohwx man", False)):
        report = lint(load_recipe(write_recipe(GOOD), [f'dataset.trigger="{trigger}"',
                                                       'dataset.trigger_policy="none"']).recipe, plugins)
        assert bool(findings(report, "common-trigger")) == warned, trigger


def test_images_in_a_sub_folder_are_named_and_caption_extensions_match_in_any_case(recording, write_recipe,
                                                                                    subject_dataset):
    """Before: images in a sub-folder (kohya's `10_ohwx` layout) were left out without a word, and `a.png` beside
    `a.TXT` (a dataset made on Windows) was a missing caption although image extensions match in any case."""
    _, plugins = recording
    d = subject_dataset
    (d / "10_ohwx").mkdir()
    for n in range(2):
        (d / f"img00{n}.png").rename(d / "10_ohwx" / f"img00{n}.png")
    (d / "img002.txt").rename(d / "img002.TXT")
    (d / "loop").symlink_to(d, target_is_directory=True)       # not looked into
    report = lint(load_recipe(write_recipe(GOOD)).recipe, plugins)
    sub = _codes(report, "sub-folder")
    assert set(sub) == {"10_ohwx"} and sub["10_ohwx"].level == WARNING and "2 images" in sub["10_ohwx"].message
    assert not report.errors, report.table()
    assert {i.image.name for i in report.usable} == {"img002.png", "img003.png"}
    item = next(i for i in report.usable if i.image.name == "img002.png")
    assert item.caption_file.name == "img002.TXT" and item.caption.startswith("ohwx")


def test_the_text_encoder_policy_and_fp16_are_warnings(recording, write_recipe, tmp_path):
    """Playbook §5 (TE LR 0.3–0.5 × the transformer's, trained for ≤ 50 % of the steps, with prior regularisation,
    not under ~15 images) and §9 (fp16 overflow → NaNs): recipes breaking them passed without a word."""
    _, plugins = recording

    def codes(*sets):
        report = lint(load_recipe(write_recipe(GOOD), list(sets)).recipe, plugins)
        return {f.code: f for f in report.findings if f.code.startswith(("te-", "fp16"))}

    assert codes() == {}
    assert codes("text_encoder.lr_ratio=0.9", "text_encoder.train_fraction=1.0") == {}   # TE not trained
    on = "text_encoder.train=true"
    assert set(codes(on, "text_encoder.lr_ratio=0.3", "text_encoder.train_fraction=0.5")) == {"te-no-reg",
                                                                                               "te-few-images"}
    assert set(codes(on, "text_encoder.lr_ratio=0.5")) >= {"te-no-reg"}
    found = codes(on, "text_encoder.lr_ratio=0.51", "text_encoder.train_fraction=0.51")
    assert {"te-lr-ratio", "te-train-fraction"} <= set(found)
    assert "[text_encoder.lr_ratio] is 0.51" in found["te-lr-ratio"].message
    assert "te-lr-ratio" in codes(on, "text_encoder.lr_ratio=0.29")
    assert "4 usable subject images" in found["te-few-images"].message
    assert found["te-few-images"].level == WARNING
    assert codes('train.mixed_precision="fp16"')["fp16"].level == WARNING


def test_a_trigger_in_text_written_without_spaces_is_found(recording, write_recipe, subject_dataset):
    """Hunyuan's families read Chinese captions: a whole-word rule that wanted a word break beside the trigger found
    no "ohwx" in "一张ohwx男人的照片" and no "小明" in "一张小明的照片" (both refused as missing the trigger)."""
    from lora_run_folder import has_trigger

    assert has_trigger("一张ohwx男人的照片", "ohwx") and has_trigger("一张小明的照片", "小明")
    assert has_trigger("홍길동이 웃는다", "홍길동") and has_trigger("ภาพของสมชายยิ้ม", "สมชาย")
    assert not has_trigger("ohwx男人", "ohwxm") and not has_trigger("一张ohwxman的照片", "ohwx")   # controls
    assert not has_trigger("ohwx2 portrait", "ohwx") and not has_trigger("café ohwxé", "ohwx")
    _, plugins = recording
    d = subject_dataset
    for i, caption in enumerate(["一张ohwx男人的照片", "ohwx在海边", "穿红衣服的ohwx"]):
        (d / f"img00{i}.txt").write_text(caption, encoding="utf-8")
    report = lint(load_recipe(write_recipe(GOOD), ['dataset.trigger="ohwx"']).recipe, plugins)
    assert not _codes(report, "trigger-missing")
