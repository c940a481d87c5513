"""What a new user or an automation agent meets first (the audit of issue 46): copies of the shipped recipes,
the commands the demo and the CLI print for a person to paste, and `lora-run score`'s arguments. Each test
is a defect that audit found, fixed at its root."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lora_run.cli import main
from lora_run.recipe import load_recipe, to_dict
from lora_run_recipes import recipe_roots, shipped_name, shipped_recipes

from .conftest import run_cli


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("name", [shipped_name(p) for p in shipped_recipes()])
def test_a_copied_recipe_never_points_into_the_installation(name, tmp_path, capsys, monkeypatch, figures):
    """`lora-run recipes flux/identity-hifi > my.toml` gave a recipe whose `dataset.path`, inherited from the
    shipped identity-fast.toml it extends, was the installation's recipes/flux/data/subject: `check` sent the
    user to a folder inside site-packages while the hifi recipe's own regularisation folder was next to the copy."""
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", name]) == 0
    copy = tmp_path / "mine" / "my.toml"
    copy.parent.mkdir()
    copy.write_text(capsys.readouterr().out, encoding="utf-8")
    recipe = load_recipe(copy).recipe
    roots = [str(r.resolve()) for r in recipe_roots()]
    inside = [s for s in _strings(to_dict(recipe)) if any(s.startswith(r) for r in roots)]
    assert not inside, f"{name}: a copy resolves {inside} inside the shipped recipes"
    assert recipe.dataset.path == str(copy.parent / "data" / "subject")
    figures("first use (copied recipes, pasted commands, score arguments)", cases=1, faults=1)


def test_the_demo_recipe_names_a_command_that_pastes(tmp_path, monkeypatch, capsys, figures):
    """The demo's recipe told the user to run it again with `lora-run <path> --overwrite`, the path unquoted:
    under a folder with a space the pasted line names two files."""
    from lora_run_native.demo import build_demo

    assets = tmp_path / "my demo ü" / "assets"
    (assets / "tiny-flux").mkdir(parents=True)      # an earlier demo's assets: reused, not rebuilt
    (assets / "tiny-flux" / "model_index.json").write_text("{}")
    for part in ("subject", "reg"):
        (assets / "data" / part).mkdir(parents=True)
    path = build_demo(assets)
    line = next(line for line in path.read_text("utf-8").splitlines() if "Run it again with:" in line)
    argv = shlex.split(line.split("Run it again with:", 1)[1])
    assert argv == ["lora-run", str(path), "--overwrite"]
    figures("first use (copied recipes, pasted commands, score arguments)", cases=1, faults=1)


def test_the_demo_recipe_reads_nothing_of_the_installation(tiny_model, tmp_path, monkeypatch, capsys, figures):
    """`lora-run demo` wrote a recipe that `extends` the shipped recipes/demo/tiny-flux.toml by its absolute path in
    the installation (site-packages for a wheel): once the venv moved or lora-run was upgraded, the demo's recipe and
    the resume command an interrupted demo prints failed ("[extends] file not found", exit 2) or read another
    recipe than the run's. The demo now copies the shipped recipe into its own folder and extends the copy, with every
    path relative to that folder: the run resumes with the installation's recipe gone, and the demo folder may move."""
    import shutil

    from lora_run_native import demo

    installed = tmp_path / "venv" / "recipes" / "demo" / "tiny-flux.toml"     # the installation's shipped recipe
    installed.parent.mkdir(parents=True)
    shutil.copyfile(demo.shipped_recipe(), installed)
    shipped = installed.read_text("utf-8")
    monkeypatch.setattr(demo, "shipped_recipe", lambda: installed)
    assets = tmp_path / "demo" / "assets"
    shutil.copytree(tiny_model, assets / "tiny-flux")        # the model an earlier demo built: reused, not rebuilt
    recipe = demo.build_demo(assets)
    quick = ["--unset", "sample.every_steps", "--set", "eval.enabled=false", "--set", "train.save_every_steps=2"]
    assert main([str(recipe), "--set", "train.steps=3", *quick]) == 0, capsys.readouterr().err
    run = tmp_path / "demo" / "run"
    first = (run / "tiny-flux-demo.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "venv")                          # the venv moved, or lora-run was upgraded
    capsys.readouterr()
    code = main([str(recipe), "--set", "train.steps=4", *quick, "--resume", "--output-dir", str(run)])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err, out.err[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} (step 2 of 4)" in out.out, out.out[-2000:]
    assert (run / "tiny-flux-demo.safetensors").read_bytes() != first
    assert str(tmp_path / "venv") not in recipe.read_text("utf-8")   # the copy beside it: the shipped recipe as it was
    assert (assets / "tiny-flux.toml").read_text("utf-8").endswith(shipped)
    moved = tmp_path / "moved demo"                           # the whole demo folder moved
    (tmp_path / "demo").rename(moved)
    code, text = run_cli(["check", str(moved / "assets" / "recipe.toml")], capsys, "not found")
    assert code == 0 and "check passed" in text, text[-2000:]
    assert load_recipe(moved / "assets" / "recipe.toml").recipe.model.source == str(moved / "assets" / "tiny-flux")
    figures("first use (copied recipes, pasted commands, score arguments)", cases=3, faults=2)


@pytest.fixture
def faces(tmp_path):
    from lora_run_devtools.testing import make_images

    folder = tmp_path / "subject"
    make_images(folder, count=2, size=(64, 64))
    return folder


def test_score_arguments_that_cannot_apply_are_named(faces, tmp_path, monkeypatch, capsys, figures):
    """`score --report ""` silently wrote no report (exit 0); `--model` without `--embedder onnx` was reported as
    an invalid value of an option that does not exist (`[--embedder-options] invalid value (RecipeError: …)`);
    a `--report` under a file said "the folder exists and is not a folder" without naming that file."""
    monkeypatch.chdir(tmp_path)
    base = ["score", "--subject", str(faces), "--images", str(faces)]
    code, text = run_cli([*base, "--report", ""], capsys, "unexpected")
    assert code == 2 and "--report: an empty path" in text
    code, text = run_cli([*base, "--model", "arcface.onnx"], capsys, "unexpected")
    assert code == 2 and "--model applies only with --embedder onnx" in text and "RecipeError" not in text
    code, text = run_cli([*base, "--detector", "scrfd.onnx"], capsys, "unexpected")
    assert code == 2 and "--detector applies only with --embedder onnx" in text
    empty = {"--subject": ["score", "--subject", "", "--images", str(faces)],   # "$UNSET": never the working
             "--images": ["score", "--subject", str(faces), "--images", ""],     # folder, never ignored
             "--control": [*base, "--control", ""]}
    for flag, argv in empty.items():
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and f"{flag}: an empty path" in text, (flag, text)
    code, text = run_cli(["recipes", ""], capsys, "unexpected")
    assert code == 2 and 'no shipped recipe ""' in text and "Copy one" not in text
    code, text = run_cli([*base, "--report", "r é.html", "--json"], capsys, "unexpected")
    assert code == 0 and json.loads(text)["report"] == str(tmp_path / "r é.html")   # --json says where it went
    (tmp_path / "r é.html").unlink()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    code, text = run_cli([*base, "--report", str(blocker / "r.html")], capsys, "unexpected")
    assert code == 2 and f"r.html: {blocker} exists and is not a folder" in text
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "subject"]
    figures("first use (copied recipes, pasted commands, score arguments)", cases=4, faults=4)


def _readme_block(after: str) -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    block = text[text.index(after):].split("```\n", 2)[1]
    return [line.split("…")[0] for line in block.splitlines()]


def _shows(printed: str, shown: list[str]) -> bool:
    """``printed``'s error lines are ``shown``'s, each up to its "…", in the order `check` prints them."""
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    return len(errors) == len(shown) and all(line.startswith(start) for line, start in zip(errors, shown))


def test_the_readmes_error_example_is_what_check_prints(tmp_path, capsys, monkeypatch, small_dataset, figures):
    """The README showed a type error, an unknown key and a backend refusal as one `check`'s output; a recipe
    with all three gets only the first two (the refusal needs a recipe that parses). The README now shows the
    two rounds as `check` prints them: every error line, in its order (it showed the type error before the unknown
    key, and left out the refused default `lora.targets`)."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.toml"
    base = ('backend = "kohya"\n[model]\nfamily = "flux.1-dev"\nsource = "black-forest-labs/FLUX.1-dev"\n'
            f'offline = true\n[dataset]\npath = "{small_dataset}"\ntrigger = "ohwx"\n'
            'bucket_min = 64\nmin_images = 3\n')     # a dataset the lint passes: only the recipe's errors
    recipe.write_text(base + "[train]\nsteps = 3.9\nnoise_offset = 0.1\n[lora]\nrnak = 3\n", encoding="utf-8")
    code, first = run_cli(["check", "recipe.toml"], capsys, "unexpected")
    shown = _readme_block("Wrong types and\nunknown keys come first")
    assert code == 2 and len(shown) == 2 and _shows(first, shown), first
    assert "noise_offset" not in first
    recipe.write_text(base + "[train]\nsteps = 4\nnoise_offset = 0.1\n[lora]\nrank = 3\n", encoding="utf-8")
    code, second = run_cli(["check", "recipe.toml"], capsys, "unexpected")
    shown = _readme_block("and once it parses")
    assert code == 2 and len(shown) == 3 and _shows(second, shown), second
    figures("first use (copied recipes, pasted commands, score arguments)", cases=2, faults=1)


def test_resuming_a_completed_run_replaces_nothing(tiny_recipe, tmp_path, capsys, monkeypatch, figures):
    """`--resume` of a completed run (an agent retrying a command that already succeeded) said "no complete
    checkpoint yet; starting from step 0" and trained the run again, replacing the LoRA it had finished with.
    It is now refused (exit 2) with nothing touched, and so is a shorter step count (it replaced the LoRA with the
    newest checkpoint's, an earlier step's); raising the step count still trains on."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe("", name="recipe.toml")
    out = tmp_path / "run"
    code, text = run_cli([str(recipe), "--output-dir", str(out)], capsys, "unexpected")
    assert code == 0, text
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
              and p.name != ".lora-run.lock"}
    code, text = run_cli([str(recipe), "--output-dir", str(out), "--resume"], capsys, "unexpected")
    assert code == 2 and "nothing to resume" in text and "is completed (steps = 6)" in text, text
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
             and p.name != ".lora-run.lock"}
    assert after == before
    # a shorter run would write the step-4 checkpoint's LoRA over the 6-step one the run finished with
    code, text = run_cli([str(recipe), "--output-dir", str(out), "--resume", "--set", "train.steps=4"], capsys,
                         "unexpected")
    assert code == 2 and "is completed (steps = 6; steps = 4 now would not train on" in text, text
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
            and p.name != ".lora-run.lock"} == before
    code, text = run_cli([str(recipe), "--output-dir", str(out), "--resume", "--set", "train.steps=8"], capsys,
                         "unexpected")
    assert code == 0 and "resumed from" in text, text
    figures("first use (copied recipes, pasted commands, score arguments)", cases=2, faults=1)


def test_eval_refuses_a_file_that_is_no_lora_before_loading_a_model(tiny_recipe, tmp_path, capsys, figures):
    """`lora-run eval RECIPE --lora run/manifest.json` (or a model's weights) loaded the whole pipeline, printed
    "generating N images", and only then failed; it is now refused from the file's header, nothing written."""
    recipe = tiny_recipe("")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"status": "completed"}')
    before = sorted(p.name for p in tmp_path.iterdir())
    code, text = run_cli(["eval", str(recipe), "--lora", str(manifest)], capsys, "unexpected")
    assert code == 2 and "not a LoRA file" in text and "generating" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    figures("first use (copied recipes, pasted commands, score arguments)", cases=1, faults=1)


def test_an_empty_output_dir_is_refused_not_taken_as_absent(tiny_recipe, tmp_path, capsys, monkeypatch, figures):
    """`--output-dir "$OUT"` with OUT unset: `run --overwrite` took the empty value as no --output-dir and
    replaced the recipe's own run folder; `plan` and `eval` quietly used their defaults and `demo` the working
    folder. An empty or blank --output-dir is now refused everywhere (exit 2), nothing touched."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe()               # its run folder: [output] dir's default, runs/tiny
    code, text = run_cli([str(recipe)], capsys, "unexpected")
    assert code == 0, text
    run = tmp_path / "runs" / "tiny"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"}
    assert any(p.suffix == ".safetensors" for p in before)
    for argv in ([str(recipe), "--output-dir", "", "--overwrite"], [str(recipe), "--output-dir", " "],
                 ["plan", str(recipe), "--output-dir", ""], ["plan", str(recipe), "--output-dir", "", "--json"],
                 ["demo", "--output-dir", ""],
                 ["eval", str(recipe), "--lora", str(next(run.glob("*.safetensors"))), "--output-dir", ""]):
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and "--output-dir: an empty path" in text, (argv, text)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lora-run.lock"}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml", "runs", "subject"]
    figures("first use (copied recipes, pasted commands, score arguments)", cases=6, faults=6)


def test_the_four_places_that_take_an_output_dir_refuse_a_blank_one_with_one_message(tiny_recipe, tmp_path,
                                                                                        monkeypatch, figures):
    """The command line refuses a blank --output-dir first (one argument type); behind it `output_path`,
    `output_problems` (`run`, `check`, `plan`), `eval` and `demo` each refused it with a message of their own.
    They share one check now: called from Python, all four (and a whole run) give the same message, exit 2, and
    write nothing."""
    from argparse import Namespace

    from lora_run.errors import OutputError
    from lora_run.plugins import load_plugins
    from lora_run.run import execute
    from lora_run_eval.evaluator import cmd_eval
    from lora_run_native.demo import run_demo
    from lora_run_rundir.output import EMPTY_OUTPUT_DIR, output_path, output_problems

    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe()
    plugins = load_plugins()
    loaded = load_recipe(recipe, plugins=plugins)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert EMPTY_OUTPUT_DIR.startswith("--output-dir: an empty path")
    for blank in ("", "  "):
        refusals = {
            "output_path": lambda: output_path(loaded.recipe, blank),
            "run": lambda: execute(loaded, plugins, output_dir=blank, overwrite=True),
            "eval": lambda: cmd_eval(Namespace(recipe=str(recipe), sets=[], unsets=[], lora=[str(recipe)],
                                               output_dir=blank, overwrite=False, json=False), plugins),
            "demo": lambda: run_demo(blank, plugins)}
        for name, call in refusals.items():
            with pytest.raises(OutputError) as err:
                call()
            assert (str(err.value), err.value.exit_code) == (EMPTY_OUTPUT_DIR, 2), name
        assert output_problems(loaded.recipe, blank) == [EMPTY_OUTPUT_DIR]
    assert output_problems(loaded.recipe, None) == [] and output_problems(loaded.recipe, "runs/x") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    figures("first use (copied recipes, pasted commands, score arguments)", cases=10, faults=10)


def test_a_terminal_that_cannot_show_a_name_gets_it_escaped(tiny_recipe, tmp_path, figures):
    """An output whose encoding lacks a character (`PYTHONIOENCODING=ascii`, a Latin-1 locale) is written with escapes
    instead of ending the command in a UnicodeEncodeError: `check` names the dataset's files, `docs` prints pages
    with `×` and `–`."""
    import os
    import subprocess
    import sys

    from lora_run_devtools.testing import make_images

    data = tmp_path / "été"
    make_images(data, count=2, size=(96, 80))
    (data / "日本.png").write_bytes((data / sorted(os.listdir(data))[0]).read_bytes())   # no caption: exit 2
    recipe = tiny_recipe(data=data)
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "HF_HUB_OFFLINE": "1"}
    shown = {}
    for argv, code in ((["check", str(recipe)], 2), (["docs", "performance"], 0)):
        done = subprocess.run([sys.executable, "-m", "lora_run", *argv], capture_output=True, env=env, cwd=tmp_path,
                              timeout=120)
        shown[argv[0]] = text = (done.stdout + done.stderr).decode("ascii")    # ASCII, as asked
        assert done.returncode == code and "Encode" not in text and "Traceback" not in text, text[-2000:]
    assert "\\xe9t\\xe9" in shown["check"] and "\\u65e5\\u672c.png" in shown["check"], shown["check"]
    assert "\\xd7" in shown["docs"]      # the page's multiplication signs
    figures("first use (copied recipes, pasted commands, score arguments)", cases=2, faults=2)


#: A process that has none of the `train` extra's packages, as `pip install lora-run` alone gives.
WITHOUT_TRAIN = ("import sys\n"
                 "for name in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate', 'safetensors'):\n"
                 "    sys.modules[name] = None\n"
                 "from lora_run.cli import main\n"
                 "sys.exit(main())\n")


def test_an_install_without_the_train_extra_names_it_in_every_command(tiny_recipe, tmp_path, figures):
    """`pip install lora-run` without `[train]`: `lora-run eval RECIPE --lora FILE` ended in "unexpected
    ModuleNotFoundError: No module named 'torch' (a bug in lora-run …)", exit 1: the check that a LoRA holds no NaN
    read it with torch before the recipe's backend was checked. The check reads the raw bytes now, and eval names the
    packages to install (exit 2, nothing written), as check, plan, the run and the demo do; the reading commands
    work."""
    import os
    import subprocess
    import sys

    lora = _lora_file(tmp_path / "my-lora.safetensors")
    recipe = tiny_recipe()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*argv):
        done = subprocess.run([sys.executable, "-c", WITHOUT_TRAIN, *argv], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
        return done.returncode, done.stdout + done.stderr

    before = sorted(p.name for p in tmp_path.iterdir())
    needs = "pip install 'lora-run[train]'"
    for argv in (["eval", str(recipe), "--lora", str(lora)], ["check", str(recipe)], ["plan", str(recipe)],
                 [str(recipe)], ["demo"]):
        code, text = run(*argv)
        assert code == 2 and needs in text and "unexpected" not in text and "Traceback" not in text, (argv, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for argv in (["recipes"], ["docs", "getting-started"], ["plugins"]):
        code, text = run(*argv)
        assert code == 0, (argv, text)
    figures("first use (copied recipes, pasted commands, score arguments)", cases=8, faults=5)


def _lora_file(path, values=None, dtype=None):
    import torch
    from safetensors.torch import save_file

    down = torch.full((4, 64), 0.01) if values is None else values
    tensors = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.full((64, 4), 0.01),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)}
    save_file({k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}, str(path))
    return path


def test_the_lora_check_finds_nan_and_inf_in_every_lora_dtype_without_torch(tmp_path, figures):
    """The NaN/inf check of `lora-run eval --lora` reads the raw bytes with numpy (no torch): for every dtype a LoRA
    may have it agrees with torch, on NaN, ±inf, the largest and smallest finite values, -0 and subnormals."""
    import torch

    from lora_run_formats import LORA_DTYPES, lora_file_problem

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}
    assert set(dtypes) == LORA_DTYPES
    for name, dtype in dtypes.items():
        info = torch.finfo(dtype)
        finite = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0, 1.0, -1.5],
                              dtype=torch.float64)
        specials = [float("nan"), -float("nan")]
        if dtype != torch.float8_e4m3fn:          # e4m3fn has no inf (it would be stored as NaN)
            specials += [float("inf"), float("-inf")]
        cases = [(finite, None)] + [(finite.clone().index_fill_(0, torch.tensor([3]), v), "holds NaN or inf")
                                    for v in specials]
        for n, (values, expected) in enumerate(cases):
            stored = values.to(dtype)
            path = _lora_file(tmp_path / f"{name}-{n}.safetensors", stored.reshape(2, 4).repeat(2, 16))
            problem = lora_file_problem(path)
            truth = bool(torch.isfinite(stored.to(torch.float64)).all())
            assert (problem is None) == truth == (expected is None), (name, n, problem)
            assert expected is None or expected in problem, (name, problem)
    figures("first use (copied recipes, pasted commands, score arguments)", cases=len(dtypes), faults=len(dtypes))


def test_generation_without_the_train_extra_names_the_packages(monkeypatch, tmp_path, figures):
    """The native backend generates the evaluation's images for any recipe (a kohya one too, whose `check` does not
    ask for torch): without the `train` extra that generator says what to install (exit 2) before any import."""
    import lora_run_native
    import lora_run_native.backend as backend
    from lora_run.errors import PluginError

    monkeypatch.setattr(backend, "missing_packages", lambda name="native": f'backend "{name}" trains with torch, '
                        "not installed here: pip install 'lora-run[train]'")
    with pytest.raises(PluginError, match=r"generating the evaluation images: .*pip install 'lora-run\[train\]'") as e:
        lora_run_native._generate(None, None, [], str(tmp_path))
    assert e.value.exit_code == 2 and not any(tmp_path.iterdir())
    figures("first use (copied recipes, pasted commands, score arguments)", cases=1, faults=1)


@pytest.mark.parametrize("name", [n for n in map(shipped_name, shipped_recipes()) if not n.startswith("demo/")])
def test_a_shipped_recipes_command_lines_work_from_any_folder(name, tmp_path, capsys, monkeypatch, figures):
    """A shipped recipe's header told the user to run `lora-run check recipes/NAME.toml --set …`, a path only a
    checkout has (a wheel install: "recipe file not found"). The header now names the copy, `lora-run recipes NAME >
    my.toml`, and its command lines read my.toml: run from an empty folder, each finds the recipe (what is left is
    the model, which is not here). The checkout path itself is answered with that copy command."""
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", name]) == 0
    text = capsys.readouterr().out
    (tmp_path / "my.toml").write_text(text, encoding="utf-8")
    header = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    start = next(n for n, line in enumerate(header) if line.startswith("Command"))
    assert f"lora-run recipes {name} > my.toml" in header[start]
    lines, commands = iter(header[start + 1:]), []
    for line in lines:
        if not line.startswith("lora-run"):
            break
        while line.endswith("\\"):
            line = line[:-1] + next(lines)
        commands.append(shlex.split(line))
    assert commands and all("my.toml" in argv[1:3] for argv in commands), commands
    (tmp_path / "photos").mkdir()
    for argv in commands:
        code, out = run_cli(["check" if argv[1] == "my.toml" else argv[1], *argv[argv.index("my.toml"):],
                             "--set", "model.offline=true"], capsys, "unexpected")
        assert code == 2 and "recipe file not found" not in out and "[model.source]" in out, out
    code, out = run_cli(["check", f"recipes/{name}.toml"], capsys, "unexpected")
    assert code == 2 and f"recipe file not found; {name} is a shipped recipe: copy it with `lora-run recipes {name} " \
                         "> my.toml`" in out, out
    code, out = run_cli(["check", "recipes/flux/no-such.toml"], capsys, "unexpected")
    assert code == 2 and "shipped recipe" not in out
    figures("first use (copied recipes, pasted commands, score arguments)", cases=len(commands) + 2, faults=2)
