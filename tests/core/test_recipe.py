from __future__ import annotations

from pathlib import Path

import pytest

from lora_run.errors import RecipeError
from lora_run.recipe import dump_recipe, load_recipe, parse_set

from .conftest import GOOD


def problems_of(path, sets=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, sets)
    return info.value.problems


def test_good_recipe_loads_with_defaults(write_recipe):
    loaded = load_recipe(write_recipe(GOOD))
    r = loaded.recipe
    assert r.backend.name == "recording"
    assert r.train.steps == 3 and r.train.epochs is None
    assert r.lora.rank == 32 and r.optimizer.name == "adafactor"
    assert Path(r.dataset.path).is_absolute()


def test_ten_mistakes_ten_errors(write_recipe):
    path = write_recipe("""
[model]
source = "x"
base_precision = "fp9"
[dataset]
path = "{dataset}"
repeats = "2"
caption_dropout = 1.5
[lora]
rank = 0
lerning_rate = 3
[optimizer]
lr = "1e-4"
name = "adam"
[train]
steps = 3.9
gradient_checkpointing = "false"
[optimzer]
x = 1
""")
    problems = problems_of(path)
    assert len(problems) == 10, problems
    expected = ["[model.base_precision] must be one of \"bf16\", \"fp8\"",
                "[dataset.repeats] expected int, got str '2'",
                "[dataset.caption_dropout] must be <= 1.0, got 1.5",
                "[lora.rank] must be >= 1, got 0",
                "[lora] unknown key 'lerning_rate'",
                "[optimizer.lr] expected float, got str '1e-4'",
                "[optimizer.name] must be one of",
                "[train.steps] expected int, got float 3.9",
                "[train.gradient_checkpointing] expected true or false, got str 'false'",
                "unknown key 'optimzer' (did you mean 'optimizer'?)"]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert all(p.startswith("recipe.toml: ") for p in problems)


def test_no_lenient_coercions(write_recipe):
    for key, value in [("train.seed", "3.9"), ("train.gradient_checkpointing", '"false"'),
                       ("output.name", "42"), ("train.seed", "true")]:
        assert problems_of(write_recipe(GOOD), [f"{key}={value}"])


def test_int_accepted_for_float_but_not_bool(write_recipe):
    assert load_recipe(write_recipe(GOOD), ["optimizer.lr=1"]).recipe.optimizer.lr == 1.0
    assert problems_of(write_recipe(GOOD), ["optimizer.lr=true"])


def test_steps_and_epochs_are_exclusive(write_recipe, plugins_with):
    """A rule of `[train]`, the training plugin's table: `validate` reports it with every other problem."""
    from lora_run.run import validate

    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(GOOD), ["train.epochs=2"]), plugins_with())
    assert any("exactly one of `steps` or `epochs`" in p for p in info.value.problems)


def test_bucket_sizes_follow_the_family_grid(write_recipe, plugins_with):
    """The grid comes from the family's registration, not from a table in core."""
    from lora_run.run import validate

    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(GOOD), ["dataset.bucket_step=48", "model.family='hunyuan-image-2.1'"]),
                 plugins_with())
    assert "[dataset.bucket_step] must be a multiple of 32 for hunyuan-image-2.1, got 48" in str(info.value)


def test_set_overrides_and_parses_toml_values():
    assert parse_set("train.steps=100") == (("train", "steps"), 100)
    assert parse_set("dataset.trigger=sks") == (("dataset", "trigger"), "sks")
    assert parse_set("sample.prompts=['a', 'b']") == (("sample", "prompts"), ["a", "b"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_set("train.steps")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_set("train..steps=3")


@pytest.mark.parametrize("assignment", ["train.steps=5\ntrain.seed=3", "lora.rank=4\n[train]\nsteps=1"])
def test_a_set_value_holding_a_second_key_is_refused_where_recipes_are_read(write_recipe, assignment):
    """TOML reads `5⏎train.seed=3` as two keys; the first used to be kept and the rest dropped unseen. The recipe's
    reader of --set values refuses it, so a caller of `load_recipe(sets=…)` outside the command line is told too (the
    command line's argument type asks the same reader)."""
    path = write_recipe(GOOD)
    with pytest.raises(RecipeError, match="more than one TOML value") as caught:
        load_recipe(path, sets=[assignment])
    assert "\n" not in str(caught.value)           # the value is escaped: the error stays one line
    assert load_recipe(path, sets=["optimizer.lr=0.5"]).recipe.optimizer.lr == 0.5


def test_extends_merges_and_reports_the_right_file(write_recipe, tmp_path):
    write_recipe(GOOD, "base.toml")
    child = write_recipe('extends = "base.toml"\n[lora]\nrank = 64\nalpha = 64.0\n[train]\nseed = -1\n', "child.toml")
    problems = problems_of(child)
    assert problems == ["child.toml: [train.seed] must be >= 0, got -1"]
    child.write_text('extends = "base.toml"\n[lora]\nrank = 64\nalpha = 64.0\n')
    r = load_recipe(child).recipe
    assert (r.lora.rank, r.train.steps, r.backend.name) == (64, 3, "recording")
    bad = write_recipe('extends = "base.toml"\n[train]\nsteps = 0\n', "bad.toml")
    assert problems_of(bad) == ["bad.toml: [train.steps] must be >= 1, got 0"]
    base_bad = write_recipe(GOOD.replace("steps = 3", "steps = 0"), "base.toml")
    assert problems_of(child) == [f"base.toml: [train.steps] must be >= 1, got 0"]
    assert base_bad


def test_an_unknown_key_names_the_file_or_set_that_wrote_it(write_recipe):
    """The table [train] comes from base.toml; a misspelt key in it from the child or from --set is named by
    where it was written, not by the file that opened the table."""
    write_recipe(GOOD, "base.toml")
    child = write_recipe('extends = "base.toml"\n[train]\nstpes = 4\n', "child.toml")
    assert problems_of(child)[0].startswith("child.toml: [train] unknown key 'stpes' (did you mean 'steps'?)")
    plain = write_recipe('extends = "base.toml"\n', "plain.toml")
    assert problems_of(plain, ["train.stpes=4"])[0].startswith("plain.toml (--set): [train] unknown key 'stpes'")
    from lora_run.recipe import Problems

    # a backend's options table: written [backend.NAME], kept as backend.options[NAME]
    problems = Problems("plain.toml", {("backend",): "base.toml", ("backend", "native"): "base.toml",
                                       ("backend", "native", "other"): "base.toml",
                                       ("backend", "native", "nope"): "--set"})
    problems.add(("backend", "options", "native"), "unknown key 'nope'", ("backend", "options", "native", "nope"))
    problems.add(("backend", "options", "native"), "unknown key 'other'", ("backend", "options", "native", "other"))
    problems.add(("backend", "options", "native", "steps"), "is required")
    assert problems.items == ["plain.toml (--set): [backend.native] unknown key 'nope'",
                              "base.toml: [backend.native] unknown key 'other'",
                              # a key no file wrote goes in the recipe that was run, not the table's file
                              "plain.toml: [backend.native.steps] is required"]
    base = write_recipe(GOOD.replace("steps = 3", "steps = 3\nstpes = 4"), "base.toml")
    assert problems_of(plain)[0].startswith("base.toml: [train] unknown key 'stpes'")
    assert base


def test_a_problem_is_named_by_the_key_path_passed_never_by_its_wording():
    """Which file a problem names comes from the key path its emitter passes, not from the message: a message
    that mentions another key (in the words of an unknown-key message) is still charged to the key passed."""
    from lora_run.recipe import Problems

    origins = {("train",): "base.toml", ("train", "steps"): "base.toml", ("train", "stpes"): "child.toml"}
    problems = Problems("run.toml", dict(origins))
    problems.add(("train",), "unknown key 'steps' (planted: the text names a key base.toml wrote)", ("train", "stpes"))
    problems.add(("train",), "unknown key 'stpes' (planted: the text names a key child.toml wrote)")
    problems.add(("train",), "no key named in this text", ("train", "stpes"))
    assert problems.items == [
        "child.toml: [train] unknown key 'steps' (planted: the text names a key base.toml wrote)",
        # no key path passed: the table's own key decides, whatever the text says
        "base.toml: [train] unknown key 'stpes' (planted: the text names a key child.toml wrote)",
        "child.toml: [train] no key named in this text"]


def test_unknown_keys_carry_their_key_path_from_the_converter():
    """The converter's unknown-key problems carry the key's own path, shown at the table that holds it."""
    from lora_run.recipe import CONVERTER, Problem, collect_errors
    from lora_run_training.sections import TrainSection

    try:
        CONVERTER.structure({"stpes": 4, "seed": "x"}, TrainSection)
    except Exception as exc:  # noqa: BLE001 - the cattrs error tree
        found = collect_errors(exc, ("train",))
    unknown = [problem for problem in found if problem.written is not None]
    assert unknown == [Problem(("train",), unknown[0].message, ("train", "stpes"))]
    assert unknown[0].message.startswith("unknown key 'stpes' (did you mean 'steps'?)")
    assert Problem(("train", "seed"), "expected int, got str 'x'") in found


def test_extends_loop_and_missing_file(write_recipe):
    write_recipe('extends = "b.toml"\n', "a.toml")
    b = write_recipe('extends = "a.toml"\n', "b.toml")
    assert "forms a loop" in problems_of(b)[0]
    c = write_recipe('extends = "nope.toml"\n', "c.toml")
    assert problems_of(c) == ["c.toml: [extends] file not found: nope.toml"]


def test_round_trip_through_tomli_w(write_recipe, tmp_path):
    r = load_recipe(write_recipe(GOOD), ["backend.recording.fail_at=2"]).recipe
    text = dump_recipe(r, header="resolved")
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_recipe(again).recipe == r
    assert text.startswith("# resolved\n")


def test_backend_shorthand_and_table_forms(write_recipe):
    table = GOOD.replace('backend = "recording"', "") + '[backend]\nname = "recording"\n[backend.recording]\nfail_at = 2\n'
    r = load_recipe(write_recipe(table)).recipe
    assert r.backend.name == "recording" and r.backend.options == {"recording": {"fail_at": 2}}
    bad = GOOD.replace('backend = "recording"', "") + '[backend]\nname = "recording"\nfail_at = 2\n'
    assert "[backend.fail_at] unknown key" in problems_of(write_recipe(bad))[0]


def test_not_toml_and_not_found(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[train\nsteps = 3")
    assert "not valid TOML" in problems_of(p)[0]
    assert problems_of(tmp_path / "missing.toml")[0].endswith("recipe file not found")


def test_a_byte_order_mark_is_read_and_other_bytes_are_named(write_recipe, tmp_path):
    """Notepad saves UTF-8 with a byte-order mark: that recipe loads like the same text without it. Text that
    is not UTF-8 (Latin-1 here) is refused with the file named."""
    plain = load_recipe(write_recipe(GOOD)).recipe
    marked = tmp_path / "bom.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_recipe(marked).recipe.train == plain.train
    latin = tmp_path / "latin.toml"
    latin.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    assert problems_of(latin)[0].endswith("latin.toml: the recipe is not UTF-8 text")


def test_list_values_are_not_split_strings(write_recipe):
    problems = problems_of(write_recipe(GOOD), ["sample.prompts='a cat'"])
    assert any("[sample.prompts] expected a list, got str 'a cat'" in p for p in problems)
    problems = problems_of(write_recipe(GOOD), ["sample.seeds=[1, 'x']"])
    assert any("[sample.seeds[1]] expected int, got str 'x'" in p for p in problems)


@pytest.mark.parametrize("text, key", [
    ("[optimizer]\nlr = nan", "[optimizer.lr]"),            # nan passes every >= / <= bound
    ("[lora]\nalpha = -nan", "[lora.alpha]"),
    ("[train]\nsteps = 3\ngpu_memory_gib = inf", "[train.gpu_memory_gib]"),   # no upper bound to catch it
    ("[optimizer]\nbetas = [0.9, nan]", "[optimizer.betas[1]]"),
])
def test_nan_and_inf_are_refused_by_name(write_recipe, text, key):
    base = GOOD.replace("[train]\nsteps = 3\n", "") if "[train]" in text else GOOD
    problems = problems_of(write_recipe(base + text))
    assert any(key in p and "must be a finite number" in p for p in problems), problems
    finite = text.replace("-nan", "1.0").replace("nan", "0.5").replace("inf", "24.0")
    assert load_recipe(write_recipe(base + finite)).recipe is not None     # control: the finite value loads


def test_set_paths_resolve_against_the_working_folder_by_the_schema(write_recipe, tmp_path, monkeypatch):
    """A path given with --set means the same wherever it sits in the schema: a regularisation folder inside a
    list and a local model.source resolve against the working folder, as dataset.path always did (relative,
    they were saved so into the run's recipe.toml). A hub id is left alone."""
    from lora_run.recipe import apply_sets

    recipe_path = write_recipe(GOOD)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    sets = ['dataset.regularization=[{path = "reg/", weight = 0.5}]', 'model.source="./my model"']
    r = load_recipe(recipe_path, sets).recipe
    assert r.dataset.regularization[0].path == str(work / "reg") and r.dataset.regularization[0].weight == 0.5
    assert r.model.source == str(work / "my model")
    assert load_recipe(recipe_path, ["model.source=black-forest-labs/FLUX.1-dev"]).recipe.model.source == \
        "black-forest-labs/FLUX.1-dev"
    # planted control: without the schema the list's path stays relative (what --set gave before)
    raw = apply_sets({}, sets[:1], {})
    assert raw["dataset"]["regularization"][0]["path"] == "reg/"


def test_set_paths_are_decided_by_the_schemas_path_marks_alone(write_recipe, tmp_path, monkeypatch):
    """`--set` decided which values are paths twice: by the key's name (`path`, `dir`, `cache_dir`, `model.files`)
    and by the schema's ``path`` marks. The marks alone decide now, for every path key: core's tables, plugins'
    tables (`[train]`, `[eval]`), a list, and a backend's options table (whose marks a file's values now honour
    too, against the file's folder); a plugin's key merely named `path` that its schema does not mark is left as
    written."""
    import attrs

    from lora_run.recipe import apply_sets
    from lora_run.schema import option, recipe_class

    recipe_path = write_recipe(GOOD.replace('backend = "recording"\n', "") + '[backend]\nname = "recording"\n'
                               '[backend.diffusion-pipe]\npath = "dp-of-the-recipe"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert load_recipe(recipe_path).recipe.backend.options["diffusion-pipe"]["path"] == \
        str(recipe_path.parent / "dp-of-the-recipe")
    sets = ["dataset.path=d", "output.dir=o", "train.cache_dir=c", "model.files.transformer=t.safetensors",
            'eval.embedder_options={model = "m.onnx", detector = "s.onnx", threshold = "x"}',
            "backend.diffusion-pipe.path=dp", "backend.diffusion-pipe.deepspeed=bin/ds",
            "backend.kohya.sd_scripts=sd", "backend.kohya.tokenizer_cache_dir=tok"]
    r = load_recipe(recipe_path, sets).recipe
    assert (r.dataset.path, r.output.dir, r.train.cache_dir, r.model.files["transformer"]) == \
        (str(work / "d"), str(work / "o"), str(work / "c"), str(work / "t.safetensors"))
    assert r.eval.embedder_options == {"model": str(work / "m.onnx"), "detector": str(work / "s.onnx"),
                                       "threshold": "x"}
    assert r.backend.options["diffusion-pipe"] == {"path": str(work / "dp"), "deepspeed": str(work / "bin" / "ds")}
    assert r.backend.options["kohya"] == {"sd_scripts": str(work / "sd"), "tokenizer_cache_dir": str(work / "tok")}

    @attrs.frozen(kw_only=True)
    class Toy:
        path: str = option("", "A plugin's key named path that is no file path.")
        data: str = option("", "A file.", path=True)

    raw = apply_sets({}, ["toy.path=p", "toy.data=q"], {}, recipe_class([("toy", Toy)]))
    assert raw["toy"] == {"path": "p", "data": str(work / "q")}    # the mark decides, not the name
