"""`lora-run score` and `lora-run eval` as a user runs them (real subprocesses)."""
from __future__ import annotations

import json

import pytest

from .conftest import astronaut_scene, face_free, other_person, save


def folders(tmp_path, subject_dir):
    images = save({f"gen{i}": astronaut_scene(i) for i in range(3)}, tmp_path / "images")[0].parent
    control = save({f"ctl{i}": other_person(i) for i in range(2)}, tmp_path / "control")[0].parent
    return images, control


def test_score_folders_human_and_json(run_cli, tmp_path, subject_dir):
    images, control = folders(tmp_path, subject_dir)
    done = run_cli("score", "--subject", subject_dir, "--images", images, "--control", control,
                   "--report", tmp_path / "score.html")
    assert done.returncode == 0, done.stderr
    assert "identity score: 0.8" in done.stdout or "identity score: 0.9" in done.stdout, done.stdout
    assert "leakage: 0% of 2 control faces" in done.stdout and "no failure signal" in done.stdout
    html = (tmp_path / "score.html").read_text()
    assert "data:image/jpeg;base64," in html and "<script" not in html
    again = run_cli("score", "--subject", subject_dir, "--images", images, "--report", tmp_path / "score.html")
    assert again.returncode == 2 and "exists; use --overwrite" in again.stderr
    # --overwrite replaces our own report, never a file lora-run did not write (it was replaced by the HTML)
    again = run_cli("score", "--subject", subject_dir, "--images", images, "--report", tmp_path / "score.html",
                    "--overwrite")
    assert again.returncode == 0, again.stderr
    photo = next(p for p in sorted(images.iterdir()) if p.is_file())
    kept = photo.read_bytes()
    again = run_cli("score", "--subject", subject_dir, "--images", images, "--report", photo, "--overwrite")
    assert again.returncode == 2 and "replaces only a report lora-run wrote" in again.stderr, again.stderr
    assert photo.read_bytes() == kept

    done = run_cli("score", "--subject", subject_dir, "--images", images, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    result = data["results"]["images"]
    assert data["ok"] and data["embedder"]["name"] == "dlib"
    assert result["identity"]["face_rate"] == 1.0 and result["identity"]["match_rate"] == 1.0
    assert len(result["images"]) == 3 and all(r["match"] for r in result["images"])


def test_score_report_never_goes_among_the_subject_photos_nor_over_a_page_lora_run_did_not_write(run_cli, tmp_path,
                                                                                                  subject_dir):
    """`score --report` wrote its page into the `--subject` folder (the subject's photos: a dataset folder, which
    lora-run never writes into), and `--overwrite` replaced any HTML page that began as lora-run's reports then did
    (`<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>`, the head of any minified page). Each is
    now exit 2 naming the path, before any model loads, nothing written; a report lora-run wrote is still replaced."""
    import shutil

    subject = tmp_path / "subject"
    shutil.copytree(subject_dir, subject)
    images, _ = folders(tmp_path, subject_dir)
    page = tmp_path / "gallery.html"
    page.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>My gallery</title></head>'
                    "<body>mine</body></html>", encoding="utf-8")

    def state():
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = state()
    for report, overwrite, says in ((subject / "report.html", [], f"--report {subject / 'report.html'}: lies in the "
                                     f"--subject folder {subject}; lora-run never writes among the subject's photos"),
                                    (subject / "new" / "r.html", [], "lies in the --subject folder"),
                                    (subject / "a0.png", ["--overwrite"], "lies in the --subject folder"),
                                    (page, ["--overwrite"], f"--report {page}: --overwrite replaces only a report "
                                                            "lora-run wrote")):
        done = run_cli("score", "--subject", subject, "--images", images, "--report", report, *overwrite)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1 and says in errors[0], done.stderr
        assert "Traceback" not in done.stderr and state() == before
    # the control: a report of lora-run's, outside the subject's folder, is written and then replaced
    ours = tmp_path / "score.html"
    assert run_cli("score", "--subject", subject, "--images", images, "--report", ours).returncode == 0
    again = run_cli("score", "--subject", subject, "--images", images, "--report", ours, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in state().items() if k != "score.html"} == before


def test_score_reports_no_face_and_weak_identity(run_cli, tmp_path, subject_dir):
    mixed = save({**face_free(), **{f"other{i}": other_person(i) for i in range(4)}}, tmp_path / "mixed")[0].parent
    done = run_cli("score", "--subject", subject_dir, "--images", mixed, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"]["images"]
    notes = {r["name"]: r["note"] for r in result["images"]}
    assert notes["coffee"] == "no face found" and notes["chelsea"] == "no face found"
    assert "weak identity" in [f["name"] for f in result["failures"]]


def test_score_bad_input_exits_2_without_traceback(run_cli, tmp_path, subject_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (
            (("--subject", tmp_path / "nope", "--images", subject_dir), "--subject"),
            (("--subject", subject_dir, "--images", empty), "no images"),
            (("--subject", subject_dir, "--images", subject_dir, "--embedder", "onnx"), "needs --model"),
            (("--subject", subject_dir, "--images", subject_dir, "--embedder", "onxx", "--model", "m.onnx"),
             'did you mean "onnx"'),
            (("--subject", subject_dir, "--images", subject_dir, "--embedder", "onnx", "--model",
              tmp_path / "missing.onnx"), "ONNX model not found")):
        done = run_cli("score", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def _safetensors(path, *names):
    """A .safetensors file of 1 × 1 tensors written by hand (no torch)."""
    import json
    import struct

    header = json.dumps({name: {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * n, 4 * n + 4]}
                         for n, name in enumerate(names)}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0" * len(names))


#: the tensors of a (1 × 1) LoRA module: both matrices (half a LoRA is refused before anything loads)
LORA_MODULE = ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")


def test_eval_bad_input_exits_2(run_cli, tmp_path, subject_dir):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "black-forest-labs/FLUX.1-dev"\n[dataset]\npath = "{subject_dir}"\n'
                      'trigger = "ohwx"\nmin_images = 2\n[train]\nsteps = 2\n[eval]\nembedder = "onnx"\n',
                      encoding="utf-8")
    done = run_cli("eval", recipe, "--lora", tmp_path / "missing.safetensors")
    assert done.returncode == 2 and "--lora" in done.stderr and "no such file" in done.stderr, done.stderr
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"x")        # refused before any model loads (it loaded the model, then failed)
    done = run_cli("eval", recipe, "--lora", lora)
    assert done.returncode == 2 and "not a LoRA file: too short to be a safetensors file" in done.stderr, done.stderr
    weights = tmp_path / "model.safetensors"
    _safetensors(weights, "transformer_blocks.0.attn.to_q.weight")
    done = run_cli("eval", recipe, "--lora", weights)
    assert done.returncode == 2 and "not a LoRA file: holds no LoRA tensors" in done.stderr, done.stderr
    _safetensors(lora, *LORA_MODULE)
    done = run_cli("eval", recipe, "--lora", lora)
    assert done.returncode == 2 and "[eval.embedder_options.model]" in done.stderr, done.stderr
    recipe.write_text(recipe.read_text().replace('embedder = "onnx"', 'embedder = "dlib"'))
    (tmp_path / "eval-x").mkdir()
    (tmp_path / "eval-x" / "report.html").write_text("earlier")
    done = run_cli("eval", recipe, "--lora", lora)
    assert done.returncode == 2 and "not empty" in done.stderr, done.stderr
    assert (tmp_path / "eval-x" / "report.html").read_text() == "earlier"


def test_embedder_model_paths_are_relative_to_the_recipe(tmp_path, subject_dir, monkeypatch):
    from lora_run.recipe import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.toml").write_text(f'[model]\nsource = "black-forest-labs/FLUX.1-dev"\n[dataset]\n'
                                   f'path = "{subject_dir}"\ntrigger = "ohwx"\n[train]\nsteps = 1\n'
                                   '[eval]\nembedder = "onnx"\nembedder_options = { model = "models/arc.onnx", '
                                   'min_similarity = 0.3 }\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    options = load_recipe(folder / "r.toml").recipe.eval.embedder_options
    assert options == {"model": str(folder / "models" / "arc.onnx"), "min_similarity": 0.3}


def test_score_control_images_do_not_hide_a_copy_of_a_training_photo(run_cli, tmp_path, subject_dir):
    """One of three generated images is a training photo (33 % ≥ 25 %): flagged with and without control
    images, with the same counts in the text output, the JSON and the HTML report (issue 14: the control
    images used to dilute the rate to 1 of 5 = 20 % and the report showed the copy next to "No failure")."""
    from PIL import Image

    copy = Image.open(sorted(subject_dir.glob("*.png"))[0]).convert("RGB")
    images = save({"copy": copy, **{f"gen{i}": astronaut_scene(i) for i in range(2)}}, tmp_path / "images")[0].parent
    control = save({f"ctl{i}": other_person(i) for i in range(2)}, tmp_path / "control")[0].parent
    for extra in ([], ["--control", str(control)]):
        report = tmp_path / f"score{len(extra)}.html"
        done = run_cli("score", "--subject", subject_dir, "--images", images, *extra, "--report", report)
        assert done.returncode == 0, done.stderr
        assert "copies of training photos: 1 of 3 trigger images (33%)" in done.stdout, done.stdout
        assert "sameface:" in done.stdout and "1 of 3 trigger images (33%) are near copies" in done.stdout
        assert "no failure signal" not in done.stdout
        html = report.read_text()
        assert "No failure signal" not in html and "1 of 3 trigger images: copy" in html
        data = json.loads(run_cli("score", "--subject", subject_dir, "--images", images, *extra, "--json").stdout)
        div = data["results"]["images"]["diversity"]
        assert div["memorised"] == ["copy"] and div["memorised_compared"] == 3
        assert abs(div["memorised_rate"] - 1 / 3) < 1e-3
        assert "sameface" in [f["name"] for f in data["results"]["images"]["failures"]]
        if extra:
            assert div["memorised_control"] == [] and div["memorised_control_compared"] == 2
            assert div["memorised_control_rate"] == 0.0


def test_score_called_from_python_refuses_an_empty_folder_path(tmp_path, monkeypatch, subject_dir):
    """The CLI refuses `--subject ""` before it reaches the command; a Python caller of `cmd_score` gets the same
    refusal instead of scoring the images of the current folder (Path("") is ".")."""
    import argparse

    import pytest

    from lora_run.errors import RecipeError
    from lora_run.plugins import load_plugins
    from lora_run_eval.evaluator import cmd_score

    save(face_free(), tmp_path / "cwd_image.png")      # what an empty path would have scored
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(subject="", images=str(subject_dir), control=None, embedder="dlib", model=None,
                              detector=None, report=None, overwrite=False, json=True)
    with pytest.raises(RecipeError, match=r"--subject: an empty path"):
        cmd_score(args, load_plugins())
    with pytest.raises(RecipeError, match=r"--images: an empty path"):
        cmd_score(argparse.Namespace(**{**vars(args), "subject": str(subject_dir), "images": " "}), load_plugins())


def test_an_output_folder_named_with_a_line_break_is_named_on_one_line(tmp_path):
    """The refusals of a non-empty evaluation folder name it escaped, as every other message does: a line break in
    the name must not split the one-line error."""
    from lora_run.errors import OutputError
    from lora_run_eval.evaluator import _check_output

    folder = tmp_path / "eval\nout"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError) as caught:
            _check_output(folder, overwrite)
        assert "\n" not in str(caught.value) and "eval" in str(caught.value), str(caught.value)
    assert (folder / "notes.txt").read_text() == "mine"


def test_ctrl_c_while_scoring_in_worker_processes_exits_130_without_a_traceback(tmp_path, subject_dir):
    """Ctrl-C in a terminal reaches the whole process group: `lora-run score` and its embedding workers. The
    workers ignore it, the command says "interrupted" and exits 130, no traceback is printed by anyone, and no
    worker process is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    images = save({f"gen{i}": astronaut_scene(i) for i in range(48)}, tmp_path / "images")[0].parent
    proc = subprocess.Popen([sys.executable, "-m", "lora_run.cli", "score", "--subject", str(subject_dir),
                             "--images", str(images)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)

    def workers() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid:           # the parent pid
                found.append(int(stat.parent.name))
        return found

    deadline = time.monotonic() + 120
    while len(workers()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and len(workers()) >= 2, "the scoring finished or never started its workers"
    time.sleep(1.0)                                   # the workers are embedding
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err + out, err[-2000:]
    def group() -> list[str]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = text.rsplit(")", 1)[1].split()
            if int(fields[2]) == proc.pid and fields[0] != "Z":     # a live process of the command's group
                found.append(f"{stat.parent.name} {fields[0]} {cmd[:200]}")
        return found

    deadline = time.monotonic() + 5                  # an exited worker may stay a zombie until init reaps it
    while group() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group(), group()


def test_score_skips_other_files_and_refuses_an_image_that_does_not_decode(run_cli, tmp_path, subject_dir):
    """`score` counted a file with an image extension that does not decode as an image without a face (exit 0, the
    face rate and the verdict lowered unseen). Files that are not images by extension (captions, JSON beside the
    samples) are neither scored nor counted; an image file that does not decode, in any of the folders, is bad input:
    exit 2 before any model loads, one line naming each file (escaped), nothing written."""
    import shutil

    images, control = folders(tmp_path, subject_dir)
    (images / "gen0.txt").write_text("ohwx, a caption", encoding="utf-8")
    (images / "samples.json").write_text("{}", encoding="utf-8")
    done = run_cli("score", "--subject", subject_dir, "--images", images, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"]["images"]
    assert len(result["images"]) == 3 and result["identity"]["face_rate"] == 1.0      # the .txt and .json: not counted

    subject = tmp_path / "subject"
    shutil.copytree(subject_dir, subject)
    (images / "notes.png").write_text("not a picture", encoding="utf-8")
    (subject / "empty.jpg").write_bytes(b"")
    (control / "cut\nshort.png").write_bytes((control / "ctl0.png").read_bytes()[:200])
    report = tmp_path / "score.html"
    done = run_cli("score", "--subject", subject, "--images", images, "--control", control, "--report", report)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in done.stderr, done.stderr
    assert "--subject" in lines[0] and "empty.jpg: cannot be scored: empty file (0 bytes)" in lines[0], lines
    assert "--images" in lines[1] and "notes.png: cannot be scored: not an image Pillow can read" in lines[1], lines
    assert "--control" in lines[2] and "cut\\nshort.png\": cannot be scored: truncated" in lines[2], lines
    assert "eval: subject" not in done.stdout and not report.exists()
    # the control: with the bad files gone the same folders score
    for bad in (images / "notes.png", subject / "empty.jpg", control / "cut\nshort.png"):
        bad.unlink()
    assert run_cli("score", "--subject", subject, "--images", images, "--control", control).returncode == 0


def test_an_image_that_does_not_decode_is_never_scored_as_no_face(tmp_path, subject_dir, dlib_embedder):
    """The last guard, for images a generator wrote (`eval`, the run's evaluation): one that does not decode stops the
    evaluation naming it (exit 1: lora-run's own output), instead of counting as a generated image without a face."""
    from lora_run.errors import BackendError
    from lora_run_eval.evaluator import Evaluation
    from lora_run_eval.metrics import Sample

    good = save({"gen0": astronaut_scene(0)}, tmp_path / "grid")[0]
    broken = tmp_path / "grid" / "gen1.png"
    broken.write_bytes(good.read_bytes()[:100])
    ev = Evaluation(dlib_embedder, sorted(subject_dir.glob("*.png")), tmp_path / "eval", echo=lambda _m: None)
    with pytest.raises(BackendError) as caught:
        ev.add("final", None, "lora", [Sample(str(good), "gen0"), Sample(str(broken), "gen1")])
    assert "gen1.png: the image to score cannot be scored: truncated" in str(caught.value), str(caught.value)
    assert ev.add("final", None, "lora", [Sample(str(good), "gen0")])["identity"]["face_rate"] == 1.0   # the control


def test_eval_names_the_subject_photos_the_lint_could_not_decode_without_reading_any_again(tmp_path, subject_dir,
                                                                                            monkeypatch):
    """`eval` named the subject photos that do not decode by scanning the dataset again and decoding the ones the lint
    left out. It now takes them from the lint of the one scan: its findings for an image that cannot be read or
    decoded, the scan's items saying which are subject photos. Every image is read once (by the lint); a regularisation
    image that does not decode and a subject photo left out for another reason (too small) are not named."""
    import argparse
    import shutil

    from PIL import Image

    from lora_run.errors import DatasetError
    from lora_run.plugins import load_plugins
    import lora_run_folder.images as images
    import lora_run_folder.lint as lint_module
    from lora_run_eval.evaluator import cmd_eval

    data = tmp_path / "subject"
    shutil.copytree(subject_dir, data)
    (data / "broken.png").write_text("not a picture", encoding="utf-8")
    (data / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(data / "tiny.png")
    for name in ("broken", "empty", "tiny"):
        (data / f"{name}.txt").write_text("ohwx, a photo", encoding="utf-8")
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "bad.png").write_text("not a picture either", encoding="utf-8")
    model = tmp_path / "FLUX.1-dev"          # a local diffusers folder: nothing is looked up on the hub
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (model / part).mkdir()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{model}"\n[dataset]\npath = "{data}"\n'
                      f'trigger = "ohwx"\nmin_images = 2\n[[dataset.regularization]]\npath = "{reg}"\n'
                      '[train]\nsteps = 2\n[eval]\nembedder = "dlib"\n', encoding="utf-8")
    lora = tmp_path / "x.safetensors"
    _safetensors(lora, *LORA_MODULE)
    reads: list[str] = []
    real = images.read_image_bytes

    def counted(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(images, "read_image_bytes", counted)
    monkeypatch.setattr(lint_module, "read_image_bytes", counted)
    args = argparse.Namespace(recipe=str(recipe), sets=[], unsets=[], lora=[str(lora)], output_dir=None,
                              overwrite=False, json=False)
    with pytest.raises(DatasetError) as caught:
        cmd_eval(args, load_plugins())
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and all("[dataset.path]" in line for line in lines), lines
    assert "broken.png: cannot be scored: not an image Pillow can read" in lines[0], lines
    assert "empty.jpg: cannot be scored: empty file (0 bytes)" in lines[1], lines
    assert sorted(reads) == sorted(["a0.png", "a1.png", "a2.png", "broken.png", "empty.jpg", "tiny.png", "bad.png"])
    assert not (tmp_path / "eval-x").exists()
