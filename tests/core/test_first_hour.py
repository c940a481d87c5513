"""The first hour with lora-run: shipped recipes from any install, --unset, every problem at once, pipes."""
from __future__ import annotations

import fnmatch
import json
import subprocess
import sys

from pathlib import Path

import pytest

from lora_run.cli import main
from lora_run_recipes import shipped_name, shipped_recipes
from lora_run.errors import RecipeError
from lora_run.recipe import load_recipe, tomllib

from .conftest import GOOD

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_ships_every_package_and_the_recipes():
    """The wheel's package list (pyproject.toml) names every package under core/ and plugins/, and maps the
    top-level recipes/ (the one copy) into the wheel as lora_run.recipes with every .toml below it (and docs/ as
    lora_run.docs: tests/core/test_docs.py)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for root in (REPO / "core", REPO / "plugins")
               for p in root.rglob("__init__.py")}
    listed = set(config["packages"])
    assert on_disk <= listed, f"not packaged: {sorted(on_disk - listed)}"
    # data folders are listed as packages too (setuptools warns, and will stop installing them, otherwise)
    data = {"lora_run.recipes"} | {f"lora_run.recipes.{d.name}" for d in (REPO / "recipes").iterdir()
                                   if d.is_dir() and d.name.isidentifier()}
    data |= {"lora_run.docs", "lora_run.docs.hooks"}     # docs/'s pages (`lora-run docs`), not docs/examples
    data |= {".".join(d.relative_to(REPO / "plugins").parts) for d in (REPO / "plugins").glob("*/*/")
             if d.is_dir() and d.name.isidentifier() and not (d / "__init__.py").exists() and d.name != "__pycache__"
             and any(f.is_file() for f in d.iterdir())}
    assert listed - on_disk == data
    assert config["package-dir"]["lora_run.recipes"] == "recipes"
    assert "**/*.toml" in config["package-data"]["lora_run.recipes"]
    assert not (REPO / "core" / "lora_run" / "recipes").exists(), "recipes/ has one copy, at the top level"
    # every data file (not .py) of a package is matched by its package-data patterns: setuptools leaves out the
    # others without a word, and the wheel's command that opens one fails (.ci/install-proof compares whole wheels)
    unshipped = []
    for root in (REPO / "core", REPO / "plugins"):
        for path in root.rglob("*"):
            parts = path.relative_to(root).parts
            if (not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in parts
                    or any(part.endswith(".egg-info") for part in parts)):
                continue
            rel = "/".join(parts[1:])       # below its top-level package, as package-data patterns are written
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in config["package-data"].get(parts[0], [])):
                unshipped.append("/".join(parts))
    assert unshipped == [], f"not in the wheel (pyproject.toml [tool.setuptools.package-data]): {unshipped}"


def test_only_lora_runs_own_checkout_adds_its_recipes_and_docs(tmp_path, monkeypatch):
    """`pip install --target vendor` inside a user's project put the package at project/vendor/lora_run; the project's
    pyproject.toml, two levels up, made it "the checkout", and the project's own docs/ and recipes/ were listed, and
    printed, as lora-run's (its recipes/flux/identity-fast.toml shadowed the shipped one). Only lora-run's own
    checkout (core/lora_run under a pyproject.toml naming lora-run) is read as one."""
    import lora_run
    from lora_run_commands.docs import doc_folders
    from lora_run_recipes import is_checkout, shipped_folders

    package = Path(lora_run.__file__).resolve().parent
    assert is_checkout(package) == (package == REPO / "core" / "lora_run")
    project = tmp_path / "project"
    for folder in ("docs", "recipes/flux", "vendor/lora_run/recipes/flux", "vendor/lora_run/docs"):
        (project / folder).mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "my-project"\n')
    (project / "recipes" / "flux" / "identity-fast.toml").write_text("# my team's recipe\n")
    (project / "vendor" / "lora_run" / "__init__.py").write_text("")
    monkeypatch.setattr(lora_run, "__file__", str(project / "vendor" / "lora_run" / "__init__.py"))
    assert shipped_folders("recipes") == [project / "vendor" / "lora_run" / "recipes"]
    assert doc_folders() == [project / "vendor" / "lora_run" / "docs"]
    # the same layout that is lora-run's own checkout (core/lora_run, its pyproject.toml) still reads it first
    checkout = tmp_path / "checkout"
    (checkout / "core" / "lora_run").mkdir(parents=True)
    (checkout / "recipes").mkdir()
    (checkout / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    monkeypatch.setattr(lora_run, "__file__", str(checkout / "core" / "lora_run" / "__init__.py"))
    assert shipped_folders("recipes") == [checkout / "recipes"]

def test_recipes_are_listed_by_name_and_printed_ready_to_copy(tmp_path, capsys, monkeypatch):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    names = [shipped_name(p) for p in shipped_recipes()]
    assert {"demo/tiny-flux", "flux/identity-fast", "flux/identity-hifi"} <= set(names)
    for name in names:
        assert f"\n{name} " in "\n" + listing
    assert main(["recipes", "flux/identity-hifi"]) == 0
    copy = tmp_path / "mine" / "my.toml"
    copy.parent.mkdir()
    copy.write_text(capsys.readouterr().out)
    # the copy still finds the recipe it extends: the relative `extends` now names the shipped file
    recipe = load_recipe(copy).recipe
    assert recipe.lora.rank == 64 and recipe.optimizer.name == "adafactor"
    assert main(["recipes", "flux/no-such"]) == 2
    assert "shipped: demo/tiny-flux" in capsys.readouterr().err


def test_unset_removes_an_optional_key(write_recipe, capsys):
    path = write_recipe(GOOD + "[sample]\nprompts = [\"{trigger}\"]\nevery_steps = 5\n")
    assert load_recipe(path).recipe.sample.every_steps == 5
    assert load_recipe(path, unsets=["sample.every_steps"]).recipe.sample.every_steps is None
    # unset first, then set: a table can be reset and refilled in one command line
    recipe = load_recipe(path, ["sample.steps=7"], ["sample"]).recipe
    assert recipe.sample.every_steps is None and recipe.sample.steps == 7
    load_recipe(path, unsets=["train.epochs"])     # a real key that is not set: nothing to remove
    with pytest.raises(RecipeError, match=r"--unset sample\.every_step: \[sample\.every_step\] is not a recipe key"):
        load_recipe(path, unsets=["sample.every_step"])
    with pytest.raises(RecipeError, match="expected a dotted key"):
        load_recipe(path, unsets=["sample.every_steps=3"])


def test_unset_from_the_command_line(write_recipe, run_cli):
    path = write_recipe(GOOD + "[sample]\nprompts = []\nevery_steps = 5\n")
    kept = run_cli("check", path)
    assert kept.returncode == 2 and "[sample.prompts] must not be empty when sample.every_steps is set" in kept.stderr
    removed = run_cli("check", path, "--unset", "sample.every_steps")
    assert "[sample.prompts]" not in removed.stderr and "[sample" not in removed.stderr
    bad = run_cli("check", path, "--unset", "sample.every_step")
    assert bad.returncode == 2 and "is not a recipe key" in bad.stderr and "Traceback" not in bad.stderr


def test_check_reports_recipe_and_dataset_problems_in_one_run(write_recipe, run_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli("check", write_recipe(GOOD), "--set", f"dataset.path=\"{empty}\"", "--set",
                  "train.loss=\"no-such-loss\"")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "[train.loss]" in out.stderr                                  # a recipe problem …
    assert "[dataset] has" in out.stderr and "dataset:" in out.stdout    # … and the dataset lint, together
    as_json = json.loads(run_cli("check", write_recipe(GOOD), "--set", f"dataset.path=\"{empty}\"", "--set",
                                 "train.loss=\"no-such-loss\"", "--json").stdout)
    assert as_json["ok"] is False and any("[train.loss]" in p for p in as_json["problems"])
    assert any(f["level"] == "error" for f in as_json["lint"]["findings"])


def _closed_pipe_stderr(code: str, cwd) -> str:
    """Run `code` with its stdout a pipe whose reading end is closed at once (as `| head` does): stderr."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    child.stdout.close()
    err = child.stderr.read().decode()
    child.wait(timeout=60)
    return err


def test_a_closed_output_pipe_ends_quietly(write_recipe, tmp_path):
    path = write_recipe(GOOD)
    for args in (["plugins", "--json"], ["check", str(path), "--json"], ["recipes"]):
        code = f"import sys; sys.argv = ['lora-run', *{args!r}]; from lora_run.cli import main; sys.exit(main())"
        err = _closed_pipe_stderr(code, tmp_path)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
    # control: the same output written without the CLI's handling does end in BrokenPipeError
    control = ("import sys, argparse; from lora_run.plugins import load_plugins; "
               "from lora_run_commands import cmd_plugins; "
               "cmd_plugins(argparse.Namespace(json=True), load_plugins()); sys.stdout.flush()")
    assert "BrokenPipeError" in _closed_pipe_stderr(control, tmp_path)


def test_capability_errors_name_each_backend_once(write_recipe, run_cli):
    path = write_recipe(GOOD.replace('backend = "recording"', 'backend = "kohya"')
                        .replace("steps = 3", "steps = 3\nnoise_offset = 0.05"))
    out = run_cli("check", path)
    assert out.returncode == 2
    line = next(l for l in out.stderr.splitlines() if "[train.noise_offset]" in l)
    assert line.endswith("backends that can: native"), line
