"""The command line's own arguments, as a first-time user or an automation agent gets them wrong (the CLI audit
of the recipe-path, option and demo findings): each bad argument is one clear message naming the word, option or
argument, exit code 2, no traceback, and nothing written."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from lora_run.cli import build_parser, main

from .conftest import run_cli

AREA = "command-line arguments (unknown commands, repeated options, empty and stdin paths)"


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_an_unknown_command_word_is_named_not_read_as_a_recipe(tmp_path, monkeypatch, capsys, figures):
    """`lora-run chek recipe.toml` was read as `run chek` and said "unrecognized arguments: recipe.toml" (or, alone,
    "chek: recipe file not found"); the command of a disabled plugin read the same. A word that is no file and
    looks like no path is now named as neither a command nor a recipe file, with the commands and the closest."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text("")
    for argv, closest in ((["chek", "recipe.toml"], "check"), (["plna"], "plan"), (["--debug", "recipse"], "recipes"),
                          (["frobnicate"], None)):
        code, text = run_cli(argv, capsys, "recipe file not found")
        word = next(a for a in argv if not a.startswith("-"))
        assert code == 2 and f'"{word}" is neither a command nor a recipe file' in text, text
        assert "unrecognized" not in text and "commands: check, demo, docs, eval, plan, plugins, recipes, run, score" in text
        assert (f'did you mean "{closest}"?' in text) if closest else "did you mean" not in text, text
    assert main(["frobnicate", "--json"]) == 2       # an agent reading --json gets the same, as JSON
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems[0].startswith('"frobnicate" is neither a command nor a recipe file; commands: check,')
    monkeypatch.setenv("LORA_RUN_PLUGINS_DISABLE", "eval")      # its commands are gone with it
    code, text = run_cli(["score", "--subject", "a", "--images", "b"], capsys, "recipe file not found")
    assert code == 2 and '"score" is neither a command nor a recipe file' in text and "eval, " not in text
    assert "a plugin's command exists only while the plugin is installed and loads" in text
    monkeypatch.delenv("LORA_RUN_PLUGINS_DISABLE")
    # controls: a path-looking word stays a recipe path; an existing file without a suffix is a recipe
    for word in ("chek.toml", "sub/chek", "./chek"):
        code, text = run_cli([word], capsys, "neither a command")
        assert code == 2 and "recipe file not found" in text, (word, text)
    (tmp_path / "chek").write_text("[model]\n")
    code, text = run_cli(["chek"], capsys, "neither a command")
    assert code == 2 and "chek: [dataset] is required" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chek", "recipe.toml"]
    figures(AREA, cases=9, faults=5)


def _single_valued(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs is None and type(a).__name__ != "_HelpAction"
            and not isinstance(a, (argparse._StoreConstAction, argparse._AppendAction))]


def test_every_single_valued_option_given_twice_is_refused(capsys, figures):
    """`--output-dir a --output-dir b` silently used b (argparse keeps the last value); an agent that appends an
    option to a command line it was given changed nothing it could see. Every single-valued option of every
    command, the plugins' included, is now refused when given twice, naming the option."""
    seen = 0
    for name, parser in _commands().items():
        for action in _single_valued(parser):
            flag = action.option_strings[-1]
            code, text = run_cli([name, flag, "1", flag, "2"], capsys, "unexpected")
            assert code == 2 and f"argument {'/'.join(action.option_strings)}: given more than once" in text, \
                (name, flag, text)
            seen += 1
    assert seen >= 12      # run: --output-dir, --gpus; plan, eval, demo: --output-dir; score: 7 options, …
    plain = argparse.ArgumentParser()           # control: what argparse alone does with the same line
    plain.add_argument("--output-dir")
    assert plain.parse_args(["--output-dir", "1", "--output-dir", "2"]).output_dir == "2"
    # controls: repeatable options repeat; a flag given twice is still the same flag
    code, text = run_cli(["check", "nope.toml", "--set", "a.b=1", "--set", "a.c=2", "--json", "--json"], capsys,
                         "more than once")
    assert code == 2 and "nope.toml: recipe file not found" in text
    figures(AREA, cases=seen + 1, faults=seen)


@pytest.mark.parametrize("value, says", [
    ("", "an empty path; name the file"), ("  ", "an empty path; name the file"),
    ("-", "reading standard input or writing standard output is not supported; name a file (a recipe: save it")])
def test_an_empty_or_stdin_recipe_argument_is_named(value, says, tmp_path, monkeypatch, capsys, figures):
    """`lora-run check ""` said ".: the recipe file is a folder"; `lora-run check -` said "-: recipe file not found"
    and `lora-run -` listed the commands as an invalid choice. Each command that reads a recipe names RECIPE."""
    monkeypatch.chdir(tmp_path)
    argvs = [[value], ["run", value], ["check", value, "--json"], ["plan", value], ["eval", value, "--lora", "x"]]
    for argv in argvs:
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and f"argument RECIPE: {says}" in text, (argv, text)
        assert "is a folder" not in text and "invalid choice" not in text
    assert list(tmp_path.iterdir()) == []
    figures(AREA, cases=len(argvs), faults=len(argvs))


def test_every_path_option_refuses_an_empty_path_in_one_place(capsys, tmp_path, monkeypatch, figures):
    """An empty or blank `--output-dir` was refused by four messages written in four places (run, plan, eval, demo),
    and the other path options (`--lora`, `score --subject/--images/--control/--report/--model/--detector`) each by
    its own; one argument type now refuses every one of them, in every command, naming the option."""
    from lora_run_commands.arguments import path_argument

    monkeypatch.chdir(tmp_path)
    paths = [(name, action) for name, parser in _commands().items() for action in parser._actions
             if action.type is path_argument]
    flags = {(name, action.option_strings[-1]) for name, action in paths if action.option_strings}
    assert {("run", "--output-dir"), ("plan", "--output-dir"), ("eval", "--output-dir"), ("demo", "--output-dir"),
            ("eval", "--lora"), ("score", "--subject"), ("score", "--report"), ("score", "--model")} <= flags
    for name, flag in sorted(flags):
        for blank, says in (("", "an empty path"), (" ", "an empty path"), ("-", "reading standard input or writing")):
            code, text = run_cli([name, flag, blank], capsys, "unexpected")
            assert code == 2 and f"argument {flag}: {says}" in text, (name, flag, text)
    assert main(["plan", "r.toml", "--output-dir", "", "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["exit_code"] == 2 and "--output-dir: an empty path" in data["problems"][0]
    assert list(tmp_path.iterdir()) == []
    figures(AREA, cases=3 * len(flags) + 1, faults=3 * len(flags) + 1)


def _lora_header(path):
    """A LoRA file of one module that fits the tiny FLUX.1 model (eval checks it before anything loads)."""
    import struct

    header = json.dumps({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight":
                         {"dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256]},
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                         {"dtype": "F32", "shape": [192, 1], "data_offsets": [256, 1024]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1024)


def test_a_path_no_file_system_takes_is_named_by_its_argument(capsys, tmp_path, monkeypatch, tiny_recipe, figures):
    """A name over 255 bytes (NAME_MAX) or a path over 4096 (PATH_MAX) in a path argument made Python's own
    `Path.exists()`/`is_dir()` raise "File name too long" where a command asked whether it exists: `check LONG.toml`
    (while looking for a shipped recipe of that name), `eval --output-dir LONG` and `score --report LONG.html` ended in
    "unexpected OSError" (exit 1), and `plan --output-dir LONG` planned a run folder no run could make. The path
    argument type now refuses such a path for every path option and RECIPE, naming the argument (exit 2)."""
    from lora_run_commands.arguments import path_argument

    monkeypatch.chdir(tmp_path)
    long_name, deep = "x" * 300, "a/" * 2100 + "b"
    recipe = str(tiny_recipe())
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"\0" * 16)
    subject = str(tmp_path / "subject")
    full = [["check", f"{long_name}.toml"], ["plan", recipe, "--output-dir", long_name],
            ["eval", recipe, "--lora", str(lora), "--output-dir", long_name],
            ["score", "--subject", subject, "--images", subject, "--report", f"{long_name}.html"],
            ["check", f"{deep}.toml"], ["score", "--subject", deep, "--images", subject]]
    for argv in full:       # the commands that crashed or passed: whole command lines
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and ("bytes a file or folder name may have" in text or "bytes a path may have" in text), \
            (argv[:2], text[-400:])
    paths = [(name, action) for name, parser in _commands().items() for action in parser._actions
             if action.type is path_argument]
    flags = {(name, action.option_strings[-1]) for name, action in paths if action.option_strings}
    for name, flag in sorted(flags):
        for value, says in ((long_name, "a name in the path is 300 bytes long"),
                            (f"{tmp_path}/{'é' * 128}", "a name in the path is 256 bytes long"),
                            (deep, "the path is over the 4096 bytes")):
            code, text = run_cli([name, flag, value], capsys, "unexpected")
            assert code == 2 and f"argument {flag}: {says}" in text, (name, flag, text[-300:])
    # a LoRA named near the limit: its default evaluation folder `eval-<name>` is over it
    long_lora = tmp_path / ("y" * 252 + ".st")
    _lora_header(long_lora)
    code, text = run_cli(["eval", recipe, "--lora", str(long_lora)], capsys, "unexpected")
    assert code == 2 and "eval-<its name>, would have a name of 257 bytes" in text and "give --output-dir" in text, text
    for ok in ("x" * 255, f"{tmp_path}/{'é' * 127}"):      # the longest names a file system takes pass
        assert path_argument(ok) == ok
    assert not any(tmp_path.glob("x*x")), "nothing was written"
    figures(AREA, cases=len(full) + 3 * len(flags), faults=len(full) + 3 * len(flags))


def test_the_demo_points_at_what_every_install_has():
    """The demo's closing line sent the user to docs/getting-started.md, which a wheel does not install. What it
    names now exists at run time: commands that are registered and shipped recipes by their names."""
    from lora_run.plugins import load_plugins
    from lora_run_native.demo import NEXT_STEPS
    from lora_run_recipes import shipped_name, shipped_recipes

    commands = set(load_plugins().registry["command"]) | {"run"}
    named = re.findall(r"lora-run ([\w./-]+)(?: ([\w./-]+))?", NEXT_STEPS)
    assert len(named) == 4 and "docs/" not in NEXT_STEPS and ".md" not in NEXT_STEPS
    shipped = {shipped_name(p) for p in shipped_recipes()}
    for command, argument in named:
        assert command in commands or command == "my.toml", command       # my.toml: the copy the line makes
        if command == "recipes" and argument:
            assert argument in shipped, argument


def test_debug_is_honoured_before_the_command_too(tmp_path, monkeypatch, capsys, figures):
    """`lora-run --debug check x.toml` and `lora-run --debug RECIPE` silently dropped --debug (the command's own
    parser reset it to false); it now applies wherever it stands on the line. A bad input under --debug shows its
    traceback and keeps its exit code 2 and its message (`check --json --debug` exited 1 with no JSON: automation
    reads the code)."""
    monkeypatch.chdir(tmp_path)
    for argv in (["--debug", "check", "nope.toml"], ["check", "nope.toml", "--debug"], ["--debug", "nope.toml"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "RecipeError" in err and "error: nope.toml: recipe file not found" in err, err
    assert main(["check", "nope.toml", "--json", "--debug"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["exit_code"] == 2 and "Traceback" in out.err
    assert main(["check", "nope.toml"]) == 2
    err = capsys.readouterr().err
    assert "error: nope.toml: recipe file not found" in err and "Traceback" not in err
    figures(AREA, cases=4, faults=2)


def test_a_misspelt_name_in_score_or_recipes_is_named_by_its_argument(tmp_path, capsys, figures):
    """The neighbours of the unknown command word: `score --embedder onxx` was reported at `[eval.embedder]`, a
    recipe key of a command that reads no recipe; `recipes identity-fast` listed the recipes without the close one."""
    from lora_run_devtools.testing import make_images

    make_images(tmp_path / "faces", count=2, size=(64, 64))
    faces = str(tmp_path / "faces")
    code, text = run_cli(["score", "--subject", faces, "--images", faces, "--embedder", "onxx"], capsys, "unexpected")
    assert code == 2 and 'error: --embedder onxx: unknown embedder (did you mean "onnx"?); available: dlib, onnx' \
        in text and "[eval.embedder]" not in text, text
    code, text = run_cli(["recipes", "identity-fst"], capsys, "unexpected")
    assert code == 2 and 'no shipped recipe "identity-fst" (did you mean "flux/identity-fast"?); shipped: ' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]
    figures(AREA, cases=2, faults=2)


def test_an_extra_argument_is_named_in_its_command(tmp_path, monkeypatch, capsys, figures):
    """`lora-run plugins extra` said `lora-run: error: unrecognized arguments: extra`: the whole program's name, as if
    the word were the program's; argparse names the command for its other usage errors (`lora-run check` without a
    recipe), and now for a left-over argument too."""
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(["plugins", "extra"], capsys, "unexpected")
    assert code == 2 and "error: lora-run plugins: unrecognized arguments: extra" in text, text
    assert "usage: lora-run plugins [-h] [--json]" in text and "usage: lora-run [-h]" not in text, text
    code, text = run_cli(["check", "x.toml", "one", "two"], capsys, "unexpected")
    assert code == 2 and "error: lora-run check: unrecognized arguments: one two" in text, text
    code, text = run_cli(["x.toml", "--bogus"], capsys, "unexpected")     # the default command `run` is named too
    assert code == 2 and "error: lora-run run: unrecognized arguments: --bogus" in text, text
    assert main(["plugins", "--json", "extra"]) == 2                          # under --json: the JSON error
    assert json.loads(capsys.readouterr().out)["problems"] == ["lora-run plugins: unrecognized arguments: extra"]
    # controls: an option before any command is still the program's; a command's own usage error was always its own
    for argv in (["--bogus"], ["--bogus", "plugins"]):
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and "error: lora-run: unrecognized arguments: --bogus" in text, (argv, text)
    code, text = run_cli(["check"], capsys, "unexpected")
    assert code == 2 and "error: lora-run check: the following arguments are required: RECIPE" in text, text
    assert list(tmp_path.iterdir()) == []
    figures(AREA, cases=6, faults=3)


def test_set_and_unset_refuse_what_they_would_silently_drop(tiny_recipe, capsys, figures):
    """`--set extends=…` and `--unset extends` were accepted and changed nothing (the recipe's files are merged before
    the command line applies), and a --set value holding a line break and a second key kept the first value and
    dropped the rest unseen. Each is refused naming the option, for every command that reads a recipe."""
    recipe = str(tiny_recipe())
    cases = {("--set", 'extends="other.toml"'): "argument --set: [extends] cannot be set on the command line",
             ("--unset", "extends"): "argument --unset: [extends] cannot be removed on the command line",
             ("--set", "train.steps=5\ntrain.seed=3"): "argument --set: train.steps=5\\ntrain.seed=3: the value holds "
                                                       "more than one TOML value",
             ("--set", "lora.rank=4\n[train]\nsteps=1"): "the value holds more than one TOML value"}
    for command in ("check", "plan", "run", "eval"):
        for option, says in cases.items():
            code, text = run_cli([command, recipe, *option, *(["--lora", recipe] if command == "eval" else [])],
                                 capsys, "unexpected")
            error = [line for line in text.splitlines() if line.startswith("error:")]
            assert code == 2 and len(error) == 1 and says in error[0], (command, option, text[-1500:])
    for value in ("train.steps=5 # a comment", "dataset.trigger=two words"):     # one value each: as before
        assert main(["check", recipe, "--set", value]) in (0, 2)
        assert "argument --set" not in capsys.readouterr().err
    figures(AREA, cases=len(cases) * 4 + 2, faults=len(cases) * 4)


def test_a_launcher_variable_that_is_no_number_is_named(tiny_recipe, tmp_path, monkeypatch, capsys, figures):
    """LOCAL_RANK set to a word under a launcher's RANK/WORLD_SIZE crashed the native backend's `int()`
    ("unexpected ValueError", exit 1)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "abc")
    code, text = run_cli([str(tiny_recipe()), "--output-dir", str(tmp_path / "run")], capsys, "unexpected")
    assert code == 2 and "error: LOCAL_RANK='abc' in the environment is not a process number" in text, text[-1500:]
    figures(AREA, cases=1, faults=1)


def test_a_working_folder_deleted_under_the_shell_is_named(tiny_recipe, tmp_path, monkeypatch, capsys, figures):
    """`cd run; rm -rf ../run; lora-run check /abs/recipe.toml`: os.getcwd() fails, and the loader's relative paths
    with it ("unexpected FileNotFoundError", exit 1)."""
    recipe, gone = tiny_recipe(), tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    for argv in (["check", str(recipe)], [str(recipe)], ["check", str(recipe), "--json"]):
        code, text = run_cli(argv, capsys, "unexpected")
        assert code == 2 and "the working folder cannot be read" in text, text[-1500:]
    assert json.loads(text)["problems"][0].startswith("the working folder cannot be read")
    figures(AREA, cases=3, faults=3)


def test_run_options_before_the_recipe_are_the_run_commands(tmp_path, monkeypatch, capsys):
    """`lora-run --gpus 2 recipe.toml` said "invalid choice: '2'" (argparse read the option's value as the command);
    options before a recipe are now `run`'s, as they are after it. Controls: the program's own options still work,
    an option `run` lacks is named, and a word that is no option, command or path is still named as such."""
    from lora_run import plugins as registry
    from lora_run.cli import _with_command

    commands = sorted(registry.load_plugins().registry["command"])
    parser = build_parser()
    before = parser.parse_args(_with_command(["--gpus", "2", "--set", "train.steps=3", "r.toml"], commands))
    after = parser.parse_args(_with_command(["r.toml", "--gpus", "2", "--set", "train.steps=3"], commands))
    assert before.command == after.command == "run"
    assert {k: v for k, v in vars(before).items() if k != "_given"} == {k: v for k, v in vars(after).items()
                                                                         if k != "_given"}
    assert _with_command(["--version"], commands) == ["--version"] and _with_command([], commands) == []
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(["--output-dir", str(tmp_path / "o"), "nope.toml"], capsys, "invalid choice")
    assert code == 2 and "nope.toml: recipe file not found" in text, text
    code, text = run_cli(["--frobnicate", "nope.toml"], capsys, "invalid choice")
    assert code == 2 and "unrecognized arguments: --frobnicate" in text, text
    code, text = run_cli(["chek"], capsys, "invalid choice")
    assert code == 2 and '"chek" is neither a command nor a recipe file' in text
    assert not any(tmp_path.iterdir())


def test_unset_of_a_key_no_recipe_holds_is_named(tiny_recipe, tmp_path, monkeypatch, capsys, figures):
    """`--unset backend.nonsense` (any key under `[backend]`), `--unset backend.native.<typo>` and `--unset` of a key
    no loss, embedder or dataset type takes (`train.loss_options.…`, `[dataset.options]`) were accepted and removed
    nothing, exit 0: the typo went unseen and the key the user meant stayed set. Each is now refused naming the key and
    the closest one, for every command that reads a recipe, as `--unset` of an unknown key of core's tables was;
    a key that exists but is not set still does nothing, under any installed backend's table too."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe()
    before = recipe.read_bytes()
    cases = {"backend.nonsense": "[backend.nonsense] is not a recipe key; [backend] holds: ",
             "backend.nme": "[backend.nme] is not a recipe key (did you mean 'name'?)",
             "backend.nativ.fsdp": "[backend.nativ.fsdp] is not a recipe key (did you mean 'native'?)",
             "backend.native.text_max_lenght": "[backend.native.text_max_lenght] is not a recipe key (did you mean "
                                               "'text_max_length'?); [backend.native] holds: fsdp, progress_bar, ",
             "backend.kohya.pythn": "(did you mean 'python'?)",
             "train.nonexistent": "[train.nonexistent] is not a recipe key; [train] holds: attention,",
             "dataset.pathx": "[dataset.pathx] is not a recipe key (did you mean 'path'?)",
             "dataset.options.xyz": "[dataset.options.xyz] is not a recipe key",
             "train.loss_options.width": "[train.loss_options.width] is not a recipe key; [train.loss_options] holds: "
                                         "beta, c",
             "eval.embedder_options.modle": "(did you mean 'model'?)"}
    listing = sorted(p.name for p in tmp_path.iterdir())
    for command in ("check", "plan", "run", "eval"):
        for key, says in cases.items():
            code, text = run_cli([command, str(recipe), "--unset", key, *(["--lora", str(recipe)] if command == "eval"
                                                                          else [])], capsys, "unexpected")
            error = [line for line in text.splitlines() if line.startswith("error:")]
            assert code == 2 and len(error) == 1, (command, key, text[-1500:])
            assert error[0].startswith(f"error: --unset {key}: ") and says in error[0], (command, key, error)
    assert recipe.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    # controls: keys that exist but are not set remove nothing and pass, under another backend's table too
    for key in ("backend.native.fsdp", "backend.kohya.python", "backend.kohya", "train.loss_options.c",
                "eval.embedder_options.model", "model.files.transformer", "dataset.options"):
        code, text = run_cli(["check", str(recipe), "--unset", key], capsys, "unexpected")
        assert code == 0 and "check passed" in text, (key, text[-1500:])
    # a free table's key (the family's `[model.files]` slots are a plugin's) that is not set passes, unless one set
    # there is so close that it is a misspelling of it: `--unset model.files.t5xx` removed nothing, exit 0, and the
    # run trained with the t5xxl file the user meant to drop
    files = tmp_path / "with-files.toml"
    files.write_text(recipe.read_text() + f'\n[model.files]\nt5xxl = "{recipe}"\n', encoding="utf-8")
    code, text = run_cli(["check", str(files), "--unset", "model.files.t5xx"], capsys, "unexpected")
    assert code == 2 and "[model.files.t5xx] is not set (did you mean 't5xxl'?): nothing to remove" in text, text[-1500:]
    code, text = run_cli(["check", str(files), "--unset", "model.files.clip_l"], capsys, "unexpected")
    assert code != 2 or "model.files.clip_l" not in text, text[-1500:]           # the control: a slot not set
    files.unlink()
    # --set of an unknown backend table or [backend] key already failed; it names the closest now as well
    code, text = run_cli(["check", str(recipe), "--set", "backend.nativ.fsdp=true"], capsys, "unexpected")
    assert code == 2 and 'table for unknown backend "nativ" (did you mean "native"?)' in text, text[-1500:]
    code, text = run_cli(["check", str(recipe), "--set", "backend.nme=native"], capsys, "unexpected")
    assert code == 2 and "[backend.nme] unknown key (did you mean 'name'?)" in text, text[-1500:]
    assert recipe.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == listing
    figures(AREA, cases=len(cases) * 4 + 9, faults=len(cases) * 4 + 2)
