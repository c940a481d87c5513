"""Paths a user hands lora-run that are symlink loops (a link to itself, or a path running through one): on
Python 3.11 and 3.12 ``Path.resolve()`` raises RuntimeError for them, which reached the user as "unexpected
RuntimeError" (exit 1). Every option and key that takes a path now ends in exit 2 naming it, and a run folder
that cannot be created (a loop, a file on the way) is refused by `check` as well as by the run, before
anything is generated or written."""
from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_cli


def _run(argv, capsys):
    return run_cli(argv, capsys, never="unexpected")


@pytest.fixture
def loop(tmp_path) -> Path:
    link = tmp_path / "loop"
    link.symlink_to("loop")
    return link


@pytest.mark.parametrize("through", [False, True], ids=["the-link", "a-path-through-it"])
def test_a_symlink_loop_given_as_an_option_is_named_with_exit_2(tiny_recipe, small_dataset, loop, tmp_path,
                                                                capsys, through):
    target = str(loop / "x" if through else loop)
    recipe = str(tiny_recipe())
    lora = tmp_path / "some.safetensors"
    lora.write_bytes(b"\0" * 16)
    cases = {
        ("check", target): target,                                           # the recipe itself
        (target,): target,
        ("check", recipe, "--set", f"dataset.path={target}"): "[dataset]",
        (recipe, "--output-dir", target): "--output-dir",
        ("eval", recipe, "--lora", target): "--lora",
        ("eval", recipe, "--lora", str(lora), "--output-dir", target): "--output-dir",
        ("score", "--subject", str(small_dataset), "--images", str(small_dataset), "--report", target): "--report",
        ("demo", "--output-dir", target): "--output-dir",
    }
    for argv, named in cases.items():
        code, text = _run(list(argv), capsys)
        assert code == 2, (argv, text[-1500:])
        error = "\n".join(line for line in text.splitlines() if line.startswith("error:"))
        assert named in error, (argv, text[-1500:])
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("recipe.toml", "some.safetensors", "subject")] \
        == ["loop"]                                                          # nothing was written anywhere


@pytest.mark.parametrize("through", [False, True], ids=["the-link", "a-path-through-it"])
def test_check_refuses_an_output_dir_that_cannot_be_created_as_the_run_would(tiny_recipe, loop, tmp_path, capsys,
                                                                             through):
    recipe = tiny_recipe()
    recipe.write_text(recipe.read_text().replace('name = "tiny"', f'name = "tiny"\ndir = "{loop}{"/run" if through else ""}"'))
    for argv in (["check", str(recipe)], [str(recipe)]):
        code, out = _run(argv, capsys)
        assert code == 2, out[-1500:]
        assert "recipe.toml: [output.dir]" in out and "symlink loop" in out, out[-1500:]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, out = _run(["check", str(recipe), "--set", f"output.dir={afile}/run"], capsys)
    assert code == 2 and "[output.dir]" in out and "is not a folder" in out, out[-1500:]
    assert afile.read_text() == "mine"


def test_a_cache_dir_that_cannot_be_a_folder_is_refused_before_the_model_loads(tiny_recipe, loop, tmp_path, capsys):
    """`train.cache_dir` that is a symlink loop, a file, or a path through a file passed `check`, and the run
    loaded the model and then crashed writing its first cache entry ('backend crashed: OSError', exit 1)."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    recipe = str(tiny_recipe())
    for value, says in ((loop, "symlink loop"), (afile, "exists and is not a folder"),
                        (afile / "cache", "cannot be created")):
        for argv in (["check", recipe], [recipe, "--output-dir", str(tmp_path / "run")]):
            code, text = _run([*argv, "--set", f'train.cache_dir="{value}"'], capsys)
            assert code == 2, text[-1500:]
            assert "(--set): [train.cache_dir]" in text and says in text, text[-1500:]
            assert "caching" not in text                                        # nothing loaded
    assert afile.read_text() == "mine" and not (tmp_path / "run").exists()
    code, text = _run(["check", recipe, "--set", f'train.cache_dir="{tmp_path / "new" / "cache"}"'], capsys)
    assert code == 0, text[-1500:]                                            # a folder still to be made is fine


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder where nothing can be made")
def test_a_folder_the_system_refuses_to_make_is_named_with_exit_2(tiny_recipe, small_dataset, tmp_path, capsys):
    """An output folder whose parent exists but where the file system refuses a new folder (a read-only mount, a
    kernel file system: here /proc) passes the path checks and failed at mkdir: `eval --output-dir` and `score
    --report` said "unexpected FileNotFoundError" (exit 1; `score` after its scoring), a `train.cache_dir` there
    'backend "native" crashed'. Each now says which path cannot be made, exit 2, and `score` says it before it
    scores."""
    import torch
    from safetensors.torch import save_file

    refused = "/proc/lora-run-cannot-make-this"
    recipe = str(tiny_recipe())
    lora = tmp_path / "some.safetensors"       # a LoRA by its tensors' names: eval gets as far as making its folder
    save_file({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.zeros(2, 64),
               "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.zeros(64, 2)}, str(lora))
    cases = [(recipe, "--output-dir", f"{refused}/run"),
             ("eval", recipe, "--lora", str(lora), "--output-dir", f"{refused}/eval"),
             ("score", "--subject", str(small_dataset), "--images", str(small_dataset), "--report",
              f"{refused}/report.html"),
             ("demo", "--output-dir", f"{refused}/demo"),
             (recipe, "--output-dir", str(tmp_path / "run"), "--set", f"train.cache_dir={refused}/cache")]
    for argv in cases:
        code, text = _run(list(argv), capsys)
        error = "\n".join(line for line in text.splitlines() if line.startswith("error:"))
        assert code == 2 and refused in error, (argv, text[-1500:])
        assert "score" not in argv or "scored" not in text, "refused before scoring"
