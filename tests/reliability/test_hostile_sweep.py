"""A hostile-input sweep of the CLI (recipes, `--set`, run folders, evaluation folders, `recipes`/`docs` names): each
class of defect it found, fixed at its root, with the case that showed it. CPU, fast (no training)."""
from __future__ import annotations

import pytest

from lora_run.cli import main
from lora_run.errors import RecipeError
from lora_run.recipe import MAX_NESTING, load_recipe, parse_set


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------------------------------- deep nesting
@pytest.mark.parametrize("body", [
    "[" + ".".join(["a"] * 3000) + "]\nx = 1\n",                 # a table header 3000 tables deep
    "[train]\n" + ".".join(["a"] * 3000) + " = 1\n",              # a dotted key, the same
    "[[" + ".".join(["a"] * 3000) + "]]\n",                       # an array of tables
])
def test_a_recipe_nested_thousands_deep_is_bad_input_not_a_crash(tmp_path, capsys, body):
    # TOML's dotted keys and headers nest without a parser's limit; every reader of the data recursed
    # (RecursionError, "unexpected", exit 1)
    path = tmp_path / "deep.toml"
    path.write_text(body, encoding="utf-8")
    for command in ("check", "plan"):
        code, text = _run([command, path], capsys)
        assert code == 2, text
        assert "deep.toml: [" in text and f"more than {MAX_NESTING} levels deep" in text, text
        assert "unexpected" not in text and "Traceback" not in text
    with pytest.raises(RecipeError, match="levels deep"):
        load_recipe(path)


def test_a_set_value_or_key_nested_too_deeply_is_refused():
    with pytest.raises(RecipeError, match="levels deep"):
        parse_set("train.loss_options=" + "{a=" * 100 + "1" + "}" * 100)
    with pytest.raises(RecipeError, match="levels deep"):
        parse_set(".".join(["a"] * 3000) + "=1")
    assert parse_set("backend.kohya.extra_args={lr_scheduler_args=[\"a=1\"]}")[1] == {"lr_scheduler_args": ["a=1"]}


# ---------------------------------------------------------------------------------- one line per problem
def test_a_line_break_in_any_argument_never_splits_an_error_line(tmp_path, capsys, write_recipe):
    # a name from a script's variable may hold a line break; the message of the command that refuses it stays one
    # `error:` line per problem (`recipes` and `docs` printed the name raw, its second half on a line of its own)
    odd = "a\nZQ1\rZQ2"
    recipe = write_recipe("[model]\nsource = \"x\"\n[dataset]\npath = \"{dataset}\"\n")
    cases = [["recipes", odd], ["docs", odd], ["docs", "--path", odd],
             ["score", "--subject", tmp_path, "--images", tmp_path, "--embedder", odd],
             ["check", tmp_path / odd], ["plan", tmp_path / f"{odd}.toml"],
             ["eval", recipe, "--lora", tmp_path / odd],
             ["check", recipe, "--set", f"output.name={odd}"], ["check", recipe, "--unset", odd]]
    for argv in cases:
        code, text = _run(argv, capsys)
        assert code == 2, (argv, text)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if not ln.startswith(("usage:", " ", "dataset:", "  ", "check failed"))]
        assert errors and all(ln.startswith("error: ") for ln in errors), (argv, text)
        # the name's second half never begins a line of its own (`_fail` starts every line with "error: ")
        assert not any(ln.startswith(("error: ZQ", "ZQ")) for ln in lines), (argv, text)


# ------------------------------------------------------------------------------ evaluation image folders
def test_each_evaluated_lora_gets_its_own_image_folder(tmp_path):
    # `eval --lora "a/x y.safetensors" --lora b/x-y.safetensors`: both labels made the folder `x-y`, the second LoRA's
    # images replaced the first's and the report showed them under the first; `Step`/`step` are one folder on macOS
    from lora_run_eval.evaluator import evaluate_loras, image_folders

    labels = ["x y", "x-y", "x_y", "Step 2", "step-2", "STEP 2", "..", "", "final (step 4)"]
    folders = image_folders(tmp_path / "images", labels)
    names = [f.name for f in folders]
    assert len({n.casefold() for n in names}) == len(labels), names
    assert all(f.parent == tmp_path / "images" and f.name not in ("", ".", "..") for f in folders), names
    assert names[0] == "x-y" and names[2] == "x_y" and names[-1] == "final-step-4"    # ordinary names as before

    class Ev:
        echo = staticmethod(lambda _m: None)
        added: list = []

        def add(self, label, step, path, samples):
            self.added.append((label, {s.path for s in samples}))

    class Recipe:
        class eval:
            prompts, strengths, seeds = ["a photo of ohwx"], [1.0], [1]
            steps, guidance, width, height = 2, 3.5, 64, 64
        class dataset:
            trigger = "ohwx"
            class_word = None

    written = []

    def generate(recipe, lora, jobs, out_dir):
        written.append(out_dir)
        return [{"name": j["name"], "path": f"{out_dir}/{j['name']}.png"} for j in jobs]

    loras = [("x y", None, tmp_path / "a.safetensors"), ("x-y", None, tmp_path / "b.safetensors")]
    evaluate_loras(Ev(), generate, Recipe(), loras, tmp_path / "images")
    assert len(set(written)) == 2, written
