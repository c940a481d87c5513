"""Switching backend or model family is one line: every shipped recipe, through every backend (`--set backend=...`)
and every model family (`--set model.family=...` with that family's model: a local diffusers folder, and the single
files the kohya and diffusion-pipe backends load), is either checked and planned (exit 0) or refused with exit code 2,
each error line naming a recipe key and why; never a traceback, never exit code 1. The recipes as shipped (hub ids,
offline here) are one more column."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_run.cli import main
from lora_run.plugins import load_plugins
from lora_run.recipe import load_recipe
from lora_run_devtools.testing import build_tiny, header_only_files, make_images

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.toml"))
BACKENDS = ("native", "kohya", "diffusion-pipe")
#: the single files each family's engines load (kohya: sd-scripts; diffusion-pipe: HunyuanImage's ComfyUI files)
FILES = {"flux.1-dev": ("transformer", "clip_l", "t5xxl", "vae"),
         "hunyuan-image-2.1": ("transformer", "vae", "qwen", "byt5")}
KEYED = re.compile(r"^error: .+?: \[[a-z0-9_.\-\[\]]+\] \S.*")


def contract(code: int, out: str, err: str) -> list[str]:
    """What breaks the one-line-switch contract in one command's result."""
    problems = []
    if code not in (0, 2):
        problems.append(f"exit code {code}")
    if "Traceback" in out + err or "error: unexpected " in err:
        problems.append("a crash: " + next((line for line in err.splitlines() if "unexpected" in line), "Traceback"))
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        if not lines:
            problems.append("exit code 2 without an error line")
        problems += [f"names no recipe key: {line[:160]}" for line in lines if not KEYED.match(line)]
    return problems


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Photos, regularisation photos, each built-in family's tiny model and dummy single files."""
    root = tmp_path_factory.mktemp("switch")
    make_images(root / "subject", count=4, size=(640, 640))
    make_images(root / "reg", count=2, size=(640, 640), trigger="", prefix="reg")
    families = sorted(load_plugins().registry["family"])
    sources = {}
    for family in families:
        try:
            sources[family] = build_tiny(family, root / family)
        except ValueError:       # a third-party family without a tiny builder: its hub id stays
            sources[family] = None
    files = header_only_files(root, FILES)
    return {"root": root, "families": families, "sources": sources, "files": files}


def switched(world: dict, recipe: Path, backend: str, family: str | None) -> list[str]:
    """The `--set` values of one cell: the backend, the dataset, and for a family switch its model."""
    sets = [f'backend="{backend}"', f'dataset.path="{world["root"] / "subject"}"']
    if load_recipe(recipe).recipe.dataset.regularization:
        sets.append(f'dataset.regularization=[{{path="{world["root"] / "reg"}"}}]')
    if family is not None:
        sets.append(f'model.family="{family}"')
        if world["sources"].get(family):
            sets.append(f'model.source="{world["sources"][family]}"')
        if family in world["files"] and backend != "native":
            files = ", ".join(f'{k}="{v}"' for k, v in world["files"][family].items())
            sets.append(f"model.files={{{files}}}")
    return sets


def run(command: str, recipe: Path, sets: list[str], out_dir: Path, capsys) -> tuple[int, str, str]:
    args = [command, str(recipe)]
    for value in sets:
        args += ["--set", value]
    if command == "plan":
        args += ["--output-dir", str(out_dir)]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", SHIPPED, ids=[str(p.relative_to(RECIPES)) for p in SHIPPED])
def test_every_switch_plans_or_is_refused_by_key(recipe, backend, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    broken, planned = [], 0
    for family in (None, *world["families"]):
        sets = switched(world, recipe, backend, family)
        for command in ("check", "plan"):
            code, out, err = run(command, recipe, sets, tmp_path / "run", capsys)
            planned += code == 0 and command == "plan"
            broken += [f"{family or 'as shipped'} {command}: {p}" for p in contract(code, out, err)]
    assert broken == []
    if backend == "native":      # every family's switch of a recipe runs somewhere: the native backend's plans
        assert planned >= 1


def test_the_contract_catches_a_crash_and_an_unkeyed_refusal(world, tmp_path, capsys, monkeypatch):
    """Planted mistakes: a backend whose check raises (the CLI turns it into exit 1 and "unexpected"), and refusals
    that name no key, or none at all."""
    import lora_run_kohya.backend as kohya

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES / "flux" / "identity-fast.toml"
    sets = [*switched(world, recipe, "kohya", "flux.1-dev"), "train.noise_offset=0.0"]   # refused first otherwise
    assert run("check", recipe, sets, tmp_path / "run", capsys)[0] == 0

    def crash(self):
        raise KeyError("network_dim")
    monkeypatch.setattr(kohya.KohyaBackend, "check", crash)
    code, out, err = run("check", recipe, sets, tmp_path / "run", capsys)
    assert code == 1 and contract(code, out, err) == [
        "exit code 1", "a crash: error: unexpected KeyError: 'network_dim' (a bug in lora-run or a plugin; --debug "
                       "shows the traceback)"]
    assert contract(2, "", "error: recipe.toml: the LoRA is too large\n") == [
        "names no recipe key: error: recipe.toml: the LoRA is too large"]
    assert contract(2, "", "check failed\n") == ["exit code 2 without an error line"]
    assert contract(0, "Traceback (most recent call last):\n", "") == ["a crash: Traceback"]
