from __future__ import annotations

import json
import subprocess
import sys
import time

from .conftest import GOOD
from .test_plugins import toy_env, toy_site  # noqa: F401 - session fixture reused

TOY = GOOD.replace('backend = "recording"', 'backend = "toy"')


def test_loading_every_installed_plugin_does_not_import_torch():
    code = ("import sys; from lora_run.plugins import load_plugins; p = load_plugins(); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
            "print(heavy, [b.name for b in p.broken])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []", out.stdout


def test_check_is_fast_and_torch_free(toy_site, write_recipe, tmp_path):  # noqa: F811
    recipe = write_recipe(TOY)
    code = ("import sys, time; from lora_run.cli import main; t = time.perf_counter(); "
            f"rc = main(['check', {str(recipe)!r}]); "
            "print('RESULT', rc, 'torch' in sys.modules, round(time.perf_counter() - t, 3))")
    env = toy_env(toy_site)
    import os
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, cwd=tmp_path)
    wall = time.perf_counter() - start
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][0].split()
    assert line[1:3] == ["0", "False"], out.stdout + out.stderr
    assert float(line[3]) < 1.0, line   # the check itself, in-process
    assert wall < 10.0                   # interpreter start included, generous for a loaded CI machine
    assert "check passed" in out.stdout


def test_bad_recipe_exit_2_no_traceback(run_cli, write_recipe):
    path = write_recipe(TOY.replace("steps = 3", "steps = 0\nbogus = 1"))
    out = run_cli("check", path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: recipe.toml: [train.steps] must be >= 1, got 0" in out.stderr
    assert "error: recipe.toml: [train] unknown key 'bogus'" in out.stderr
    js = run_cli("check", path, "--json")
    data = json.loads(js.stdout)
    assert js.returncode == 2 and data["ok"] is False and len(data["problems"]) == 2


def test_usage_errors_and_help(run_cli, tmp_path):
    assert run_cli().returncode == 2
    assert run_cli("--help").returncode == 0
    for cmd in ("check", "plan", "plugins", "recipes", "docs", "run", "demo"):
        assert run_cli(cmd, "--help").returncode == 0, cmd
    out = run_cli("nope.toml")
    assert out.returncode == 2 and "nope.toml: recipe file not found" in out.stderr
    out = run_cli("check", "x.toml", "--set", "novalue")
    assert out.returncode == 2


def test_check_json_reports_lint(toy_site, run_cli, write_recipe):  # noqa: F811
    out = run_cli("check", write_recipe(TOY), "--json", env=toy_env(toy_site))
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["ok"] and data["lint"]["counts"]["subject images"] == 4


def test_plan_shows_resolved_recipe_and_plan(toy_site, run_cli, write_recipe, tmp_path):  # noqa: F811
    env = toy_env(toy_site)
    out = run_cli("plan", write_recipe(TOY), "--output-dir", tmp_path / "o", env=env)
    assert out.returncode == 0, out.stderr
    assert "[train]\nsteps = 3" in out.stdout and "# plan: backend toy" in out.stdout
    assert "toy/plan.json" in out.stdout
    data = json.loads(run_cli("plan", write_recipe(TOY), "--json", env=env).stdout)
    assert data["plan"]["backend"] == "toy" and data["recipe"]["train"]["steps"] == 3
    assert not (tmp_path / "o").exists()   # plan writes nothing


def test_run_refuses_non_empty_output_exit_2(toy_site, run_cli, write_recipe, tmp_path):  # noqa: F811
    env = toy_env(toy_site)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    out = run_cli(write_recipe(TOY), "--output-dir", out_dir, env=env)
    assert out.returncode == 2 and "not empty" in out.stderr and (out_dir / "keep.txt").read_text() == "x"
    both = run_cli(write_recipe(TOY), "--resume", "--overwrite", env=env)
    assert both.returncode == 2


def test_recipes_lists_every_shipped_recipe(run_cli):
    from lora_run_recipes import shipped_recipes
    out = run_cli("recipes")
    assert out.returncode == 0
    for path in shipped_recipes():
        assert str(path) in out.stdout


def test_run_is_the_commands_plugins_command(run_cli, write_recipe):
    """`run` (and `lora-run RECIPE`) is registered by the built-in `commands` plugin like any command; without that
    plugin a recipe is refused naming the missing command, not read as an unknown choice."""
    listing = json.loads(run_cli("plugins", "--json").stdout)["plugins"]
    assert "run" in next(p for p in listing if p["name"] == "commands")["commands"]
    out = run_cli(write_recipe(TOY), env={"LORA_RUN_PLUGINS_DISABLE": "commands"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no installed plugin adds the `run` command" in out.stderr and "recipe.toml" in out.stderr, out.stderr
