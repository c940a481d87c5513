from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_run.errors import PluginError
from lora_run.hookspecs import hookimpl

REPO = Path(__file__).resolve().parents[2]


def fake_distribution(site: Path, name: str, module_source: str, entry: str | None = None) -> None:
    """A module plus a dist-info declaring it in the `lora_run` entry-point group."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[lora_run]\n{entry or name} = {name}\n")


def test_builtins_are_found_through_entry_points(plugins_with):
    plugins = plugins_with()
    assert "folder" in plugins.names("dataset")
    assert {"mse", "huber", "pseudo-huber", "smooth-l1"} <= set(plugins.names("loss"))
    assert plugins.pm.get_plugin("folder") is not None


def test_unknown_name_error_lists_choices(plugins_with):
    plugins = plugins_with()
    with pytest.raises(PluginError) as info:
        plugins.get("loss", "hubber", "train.loss")
    message = str(info.value)
    assert 'unknown loss "hubber" at [train.loss] (did you mean "huber"?)' in message
    assert "available: huber, mse, pseudo-huber, smooth-l1" in message


def test_duplicate_registration_is_reported_not_fatal(plugins_with):
    class Dup:
        @hookimpl
        def register_losses(self, register):
            register("mse", lambda options=None: None)
    plugins = plugins_with(Dup())
    assert any("loss 'mse'" in c for c in plugins.conflicts)


def test_register_hook_that_raises_is_reported(plugins_with):
    class Bad:
        @hookimpl
        def register_losses(self, register):
            raise RuntimeError("nope")
    plugins = plugins_with(Bad())
    assert any("register_losses failed: RuntimeError: nope" in b.error for b in plugins.broken)
    assert "mse" in plugins.names("loss")


def test_broken_and_misspelled_plugins_are_skipped(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "broken_plugin", "raise ImportError('missing dependency foo')\n")
    fake_distribution(site, "typo_plugin", """
        from lora_run.hookspecs import hookimpl
        @hookimpl
        def register_backend(register):
            pass
        """)
    env = {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "lora_run.cli", "plugins", "--json"], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    broken = {b["name"]: b["error"] for b in data["broken"]}
    assert "missing dependency foo" in broken["broken_plugin"]
    assert "register_backend" in broken["typo_plugin"]
    assert "folder" in [p["name"] for p in data["plugins"]]
    # `run` warns before it loads the recipe, and once (its recipe loader would warn again)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[dataset]\npath = "d"\n[backend]\nname = "nope"\n', encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "lora_run.cli", str(recipe)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    assert run.returncode == 2 and 'unknown backend "nope"' in run.stderr, run.stderr
    assert run.stderr.count("plugin broken_plugin is broken") == 1, run.stderr
    # a read-only command warns itself (`recipes` is one: its output is what it is for), once
    listing = subprocess.run([sys.executable, "-m", "lora_run.cli", "recipes"], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=60)
    assert listing.returncode == 0 and "flux/identity-fast" in listing.stdout, listing.stderr
    assert listing.stderr.count("plugin broken_plugin is broken") == 1, listing.stderr


def test_disable_and_trace_switches(tmp_path):
    import os
    env = {**os.environ, "LORA_RUN_PLUGINS_DISABLE": "losses", "LORA_RUN_TRACE_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-m", "lora_run.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, timeout=60)
    names = [p["name"] for p in json.loads(out.stdout)["plugins"]]
    assert "losses" not in names and "folder" in names
    assert "[lora-run trace] register_datasets(register)" in out.stderr


def test_a_skipped_plugin_is_never_imported_and_a_switch_naming_none_is_named(tmp_path):
    """`LORA_RUN_PLUGINS_DISABLE` is how a user gets past a plugin whose import is what is broken (or slow, or has
    side effects): the plugin must not be imported at all, so neither its failure nor its side effect happens. A
    name in either switch that no installed plugin has (a typo) is named with the variable, instead of the
    commands silently going missing. Control: without the switch the same plugin is imported and reported."""
    import os

    site, marker = tmp_path / "site", tmp_path / "imported"
    fake_distribution(site, "loud_plugin", f"open({str(marker)!r}, 'w').close()\nraise ImportError('boom')\n")
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}

    def plugins_json(**env: str) -> tuple[dict, str]:
        out = subprocess.run([sys.executable, "-m", "lora_run.cli", "plugins", "--json"], capture_output=True,
                             text=True, env={**base, **env}, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout), out.stderr

    data, _ = plugins_json()
    assert marker.exists() and "boom" in {b["name"]: b["error"] for b in data["broken"]}["loud_plugin"]
    marker.unlink()
    data, err = plugins_json(LORA_RUN_PLUGINS_DISABLE="loud_plugin")
    assert not marker.exists() and data["broken"] == [], (data["broken"], err)
    assert "warning" not in err
    data, err = plugins_json(LORA_RUN_PLUGINS_ONLY="commands,folder,losses")
    assert not marker.exists() and sorted(p["name"] for p in data["plugins"]) == ["commands", "folder", "losses"]
    data, _ = plugins_json(LORA_RUN_PLUGINS_DISABLE="loud_plugin,lossses")
    assert len(data["warnings"]) == 1 and data["warnings"][0].startswith(
        "LORA_RUN_PLUGINS_DISABLE names lossses, which no installed plugin is (installed: commands, "), data
    out = subprocess.run([sys.executable, "-m", "lora_run.cli", "check", "r.toml"], capture_output=True, text=True,
                         env={**base, "LORA_RUN_PLUGINS_ONLY": "zzz"}, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "warning: LORA_RUN_PLUGINS_ONLY names zzz, which no installed plugin is" in out.stderr
    assert "commands: none" in out.stderr


def toy_env(site: Path) -> dict:
    """PYTHONPATH with the toy's install folder in front of the one the tests run with."""
    import os

    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="session")
def toy_site(tmp_path_factory):
    """The toy third-party plugin from docs/examples, pip-installed into a throwaway target folder."""
    import shutil

    target = tmp_path_factory.mktemp("toy-site")
    source = tmp_path_factory.mktemp("toy-source") / "lora-run-toy"   # the build's build/ and egg-info land here,
    shutil.copytree(REPO / "docs" / "examples" / "lora-run-toy", source)  # not in the checkout
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return target


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """The ```bash block of a README as (command, here-document body or None), continuation lines joined and
    comments dropped."""
    import re

    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    commands, lines = [], iter(block.splitlines())
    for line in lines:
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        here = re.search(r"<<'(\w+)'$", line)
        body = None
        if here:
            body = "".join(f"{l}\n" for l in iter(lambda: next(lines), here.group(1)))
            line = line[:here.start()].strip()
        commands.append((line, body))
    return commands


@pytest.mark.slow
def test_the_toy_readme_runs_as_written(toy_site, tmp_path, run_cli):
    """docs/examples/lora-run-toy/README.md said `lora-run my-recipe.toml --set backend.name=toy` with no recipe
    the toy could run: the README's own recipe (the one it copies, identity-fast) was refused with five keys the toy
    backend cannot honour. Its lines now write a recipe of their own on the demo's photos; each runs here as written
    (the pip line is the `toy_site` fixture; `lora-run demo` is its assets, built without its run)."""
    import shlex

    from lora_run_native.demo import build_demo

    env = toy_env(toy_site)
    commands = readme_commands((REPO / "docs" / "examples" / "lora-run-toy" / "README.md").read_text("utf-8"))
    assert commands[0] == ("pip install ./docs/examples/lora-run-toy", None)
    ran = []
    for line, body in commands[1:]:
        argv = shlex.split(line)
        if argv == ["lora-run", "demo"]:
            build_demo(tmp_path / "runs" / "demo" / "assets")
        elif argv[:2] == ["cat", ">"] and body is not None:
            (tmp_path / argv[2]).write_text(body, encoding="utf-8")
        elif argv[0] == "python":
            done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=tmp_path,
                                  env={**os.environ, **env}, timeout=120)
            assert done.returncode == 0, (line, done.stderr)
        else:
            assert argv[0] == "lora-run", line
            done = run_cli(*argv[1:], env=env, cwd=tmp_path)
            assert done.returncode == 0, (line, done.stderr[-2000:])
            ran.append(done.stdout)
    assert len(ran) == 3 and "toy-flux is trained by: native" in ran[0]
    toy = tmp_path / "runs" / "identity-lora"
    assert json.loads((toy / "identity-lora.toy.json").read_text())["greeting"] == "hello"
    assert len((toy / "toy-events.txt").read_text().splitlines()) == 20
    manifest = json.loads((tmp_path / "runs" / "toy-flux" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["family"] == "toy-flux"
    assert 'loss = "toy-abs"' in (tmp_path / "runs" / "toy-flux" / "recipe.toml").read_text()


def test_third_party_plugin_is_discovered_and_selected(toy_site, tmp_path, run_cli, subject_dataset):
    env = toy_env(toy_site)
    listing = run_cli("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    toy = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "toy")
    assert toy["backends"] == ["toy"] and toy["losses"] == ["toy-abs"] and toy["version"] == "0.3.0"
    assert "step_finished" in toy["hooks"]
    recipe = tmp_path / "toy.toml"
    recipe.write_text(f"""
[backend]
name = "toy"
[backend.toy]
target = 5.0
[model]
source = "black-forest-labs/FLUX.1-dev"
[dataset]
path = "{subject_dataset}"
trigger = "ohwx"
min_images = 2
[optimizer]
lr = 0.1
[train]
steps = 20
[eval]
enabled = false
""")
    done = run_cli(recipe, "--output-dir", tmp_path / "run", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "identity-lora.toy.json").read_text())
    assert abs(result["value"] - 5.0) < 0.1
    events = (tmp_path / "run" / "toy-events.txt").read_text().splitlines()
    assert len(events) == 20 and events[0].startswith("step 1 loss")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["backend"] == "toy"
    assert any(p["name"] == "toy" and p["version"] == "0.3.0" for p in manifest["plugins"])
    # the third-party backend and hook claim what they write: the run is theirs to replace with --overwrite
    assert {"identity-lora.toy.json", "toy-events.txt"} <= set(manifest["written"]), manifest["written"]
    again = run_cli(recipe, "--output-dir", tmp_path / "run", "--overwrite", env=env)
    assert again.returncode == 0, again.stderr
    bad = run_cli(recipe, "--output-dir", tmp_path / "run2", "--set", "backend.toy.target='x'", env=env)
    assert bad.returncode == 2
    assert "[backend.toy.target] expected float, got str 'x'" in bad.stderr
