from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from lora_run import hookspecs
from lora_run_devtools import docgen

DOCS = Path(__file__).resolve().parents[2] / "docs"


def hook_functions():
    return [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(f, "lora_run_spec")]


def test_every_hook_has_a_page_headed_by_its_signature():
    hooks = hook_functions()
    assert len(hooks) == 18
    for fn in hooks:
        page = DOCS / "hooks" / f"{fn.__name__}.md"
        assert page.is_file(), page
        args = ", ".join(inspect.signature(fn).parameters)
        assert page.read_text().splitlines()[0] == f"# {fn.__name__}({args})"
        assert (fn.__doc__ or "").strip(), fn.__name__
        assert f"hooks/{fn.__name__}.md" in (DOCS / "writing-a-plugin.md").read_text()


def test_recipe_reference_is_fresh():
    assert docgen.main(["--check"]) == 0, "run: python -m lora_run_devtools.docgen"


def test_every_schema_field_is_documented():
    import attrs
    from lora_run import schema
    for cls in (c for c in vars(schema).values() if isinstance(c, type) and attrs.has(c)):
        for f in attrs.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"


# `lora-run docs`: the pages travel in the wheel (lora_run.docs) and every message names them as `lora-run docs PAGE`

REPO = DOCS.parent
#: `lora-run docs NAME` as a message, a recipe comment or a page writes it (PAGE, NAME: placeholders, upper case)
MENTION = re.compile(r"lora-run docs ([a-z][\w/.-]*\w)")
#: a page named by its path in the checkout: dead for a wheel install, which has no docs/ folder
DOCS_PATH = re.compile(r"docs/([\w/-]+)\.md")


def expected_pages() -> dict[str, Path]:
    """The pages as the checkout's files are: docs/*.md and docs/hooks/*.md (docs/examples is a plugin package)."""
    files = [*DOCS.glob("*.md"), *(DOCS / "hooks").glob("*.md")]
    return {p.relative_to(DOCS).with_suffix("").as_posix(): p for p in files}


def test_docs_lists_every_page_and_prints_one(capsys):
    from lora_run.cli import main

    pages = expected_pages()
    assert {"multi-gpu", "evaluation", "lora-formats", "hooks/run_processes"} <= set(pages)
    assert main(["docs"]) == 0
    listing = capsys.readouterr().out
    names = [line.split()[0] for line in listing.splitlines()[:len(pages)]]
    assert names == sorted(pages)
    assert "\nmulti-gpu " in listing and "Training on several GPUs" in listing and "examples" not in listing
    for asked in ("multi-gpu", "docs/multi-gpu.md", "multi-gpu.md"):
        assert main(["docs", asked]) == 0
        assert capsys.readouterr().out == (DOCS / "multi-gpu.md").read_text("utf-8")
    assert main(["docs", "hooks/run_processes", "--path"]) == 0
    assert capsys.readouterr().out == f"{DOCS / 'hooks' / 'run_processes.md'}\n"
    assert main(["docs", "--path"]) == 0
    assert capsys.readouterr().out == f"{DOCS}\n"


def test_an_unknown_page_is_refused_naming_the_closest(capsys):
    from lora_run.cli import main

    assert main(["docs", "multi-gpus"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert 'error: docs: no page "multi-gpus" (did you mean "multi-gpu"?); pages: DEVELOPING, architecture' \
           in captured.err
    assert main(["docs", " "]) == 2       # `lora-run docs "$PAGE"` with PAGE unset: not the listing
    captured = capsys.readouterr()
    assert captured.out == "" and "an empty page name" in captured.err


def unknown_mentions(texts: dict[str, str]) -> list[str]:
    """Each `lora-run docs NAME` in ``texts`` whose NAME is no page, as 'file: NAME'."""
    from lora_run.errors import LoraRunError
    from lora_run_commands.docs import doc_pages, find_page

    pages, unknown = doc_pages(), []
    for where, text in texts.items():
        for name in MENTION.findall(text):
            try:
                find_page(name, pages)
            except LoraRunError:
                unknown.append(f"{where}: {name}")
    return unknown


def test_every_page_a_message_names_exists():
    sources = [*(REPO / "plugins").rglob("*.py"), *(REPO / "core").rglob("*.py"), *(REPO / "recipes").rglob("*.toml"),
               REPO / "README.md", *DOCS.rglob("*.md")]
    texts = {str(p.relative_to(REPO)): p.read_text("utf-8") for p in sources}
    named = {name for text in texts.values() for name in MENTION.findall(text)}
    assert {"multi-gpu", "evaluation"} <= named, named          # the scan sees the native backend's and the report's
    assert unknown_mentions(texts) == []
    planted = {"plugins/x.py": 'raise RecipeError("see `lora-run docs multi-gpus`")',
               "docs/x.md": "read `lora-run docs hooks/run_process` and `lora-run docs PAGE`"}
    assert unknown_mentions(planted) == ["plugins/x.py: multi-gpus", "docs/x.md: hooks/run_process"]


def docs_paths_in_strings(source: str) -> list[str]:
    """The docs/ pages a Python source names by path in a string that is not a docstring (a message, the report's
    HTML), as their page names; comments and docstrings are for readers of the code and may."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    pages = expected_pages()
    return [name for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings for name in DOCS_PATH.findall(node.value) if name in pages]


def test_no_message_names_a_page_by_its_checkout_path():
    """A wheel install has no docs/ folder: core's and plugins' messages (and the schema's help texts, which
    `lora-run recipes`/the reference show) say `lora-run docs PAGE`. lora_run_devtools (the reference generator,
    run in a checkout) may name the checkout's files."""
    sources = [*(REPO / "core").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
    found = [f"{path.relative_to(REPO)}: {name}" for path in sources
             if "lora_run_devtools" not in path.parts for name in docs_paths_in_strings(path.read_text("utf-8"))]
    assert found == []
    planted = ('"""See docs/multi-gpu.md."""\n# docs/evaluation.md\n'
               'def f():\n    """docs/evaluation.md"""\n    raise ValueError("see docs/multi-gpu.md")\n'
               'NOTE = f"{1} (docs/lora-formats.md)"\nTHEIRS = "sd-scripts\' docs/flux_train_network.md"\n')
    assert sorted(docs_paths_in_strings(planted)) == ["lora-formats", "multi-gpu"]


def test_the_wheel_carries_the_pages_the_command_lists():
    """pyproject.toml ships docs/ as the data package lora_run.docs with the patterns `lora-run docs` reads, so a
    wheel lists the same pages as a checkout (.ci/install-proof runs `lora-run docs multi-gpu` from a wheel)."""
    from lora_run.recipe import tomllib
    from lora_run_commands.docs import PAGE_PATTERNS, doc_pages

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["lora_run.docs"] == "docs"
    assert tuple(config["package-data"]["lora_run.docs"]) == PAGE_PATTERNS
    assert {"lora_run.docs", "lora_run.docs.hooks"} <= set(config["packages"])
    assert doc_pages() == dict(sorted(expected_pages().items()))
    assert not (REPO / "core" / "lora_run" / "docs").exists(), "docs/ has one copy, at the top level"


#: a command naming a shipped recipe by its path in the checkout (`lora-run check recipes/flux/identity-fast.toml`)
CHECKOUT_RECIPE = re.compile(r"lora-run (?:\w+ )?(?:\./)?recipes/[\w-]+/[\w-]+\.toml")


def test_no_command_for_a_user_names_a_shipped_recipe_by_its_checkout_path():
    """docs/hunyuan.md and the shipped recipes' "Command:" lines said `lora-run check recipes/hunyuan-dit/identity.toml
    …`: outside a checkout (any wheel install) that is "recipe file not found". They copy the recipe with
    `lora-run recipes NAME > FILE` first now, which every install can (bench/ runs in a checkout and may)."""
    sources = [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "recipes").rglob("*.toml")]
    found = [f"{p.relative_to(REPO)}: {m}" for p in sources for m in CHECKOUT_RECIPE.findall(p.read_text("utf-8"))]
    assert found == []
    assert CHECKOUT_RECIPE.findall("run `lora-run check recipes/flux/identity-fast.toml --set a=b` or "
                                   "lora-run ./recipes/flux2/identity-hifi.toml") == [
        "lora-run check recipes/flux/identity-fast.toml", "lora-run ./recipes/flux2/identity-hifi.toml"]


# every relative link and #anchor in README.md and docs/**.md resolves

#: a Markdown link or image `[text](target)` / `![alt](target "title")`; the target is group 1
LINK = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def page_anchors(text: str) -> set[str]:
    """The anchors of a page's headings (outside code blocks), a repeated one numbered `-1`, `-2` as GitHub does."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        anchor, n = heading_anchor(heading), 0
        while (anchor if n == 0 else f"{anchor}-{n}") in found:
            n += 1
        found.add(anchor if n == 0 else f"{anchor}-{n}")
    return found


def broken_links(pages: dict[Path, str]) -> list[str]:
    """Each relative link of ``pages`` (path → text) to a missing file, or to a heading its page lacks."""
    broken = []
    for page, text in pages.items():
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        for target in LINK.findall(prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):        # https:, mailto:: not ours to check
                continue
            name, _, anchor = target.partition("#")
            linked = (page.parent / name).resolve() if name else page
            text_of = pages.get(linked) if linked in pages else \
                (linked.read_text("utf-8") if linked.suffix == ".md" and linked.is_file() else None)
            if not linked.exists() and linked not in pages:
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and text_of is not None and anchor not in page_anchors(text_of):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    return broken


def test_every_relative_link_and_anchor_resolves():
    pages = {p.resolve(): p.read_text("utf-8") for p in [REPO / "README.md", *DOCS.rglob("*.md")]}
    assert sum(len(LINK.findall(t)) for t in pages.values()) > 100       # the scan sees the links
    assert broken_links(pages) == []
    # control: a missing page, a missing heading (here and on another page) are named; code and URLs are not links
    planted = {DOCS.resolve() / "x.md": "# Top `level`: 2×\n## Same\n## Same\nSee [a](multi-gpu.md#no-such), "
               "[b](gone.md), [c](#same-1), [d](#top-level-2), [e](#same-2), ![f](../README.md#quick-start-a-fresh-"
               "machine-two-commands), `[g](gone.md)`, [h](https://example.com/#x).\n```\n[i](gone.md)\n```\n"}
    assert broken_links(planted) == ["docs/x.md: multi-gpu.md#no-such (no such heading)",
                                     "docs/x.md: gone.md (no such file)", "docs/x.md: #same-2 (no such heading)"]


#: a dotted name of lora-run's code as a page writes it (`lora_run_rundir.space`, `lora_run.run.Signals.term`), or an
#: entry as a registration names it (`"lora_run_toy.family:ToyFluxAdapter"`)
CODE_NAME = re.compile(r"\b(lora_run(?:_[a-z0-9]+)*(?:[.:][A-Za-z_]\w*)+)")
#: names that are no importable module in a checkout: the wheel's data packages
NOT_IMPORTABLE = ("lora_run.docs", "lora_run.recipes")


def unknown_code_names(texts: dict[str, str]) -> list[str]:
    """Each dotted name in ``texts`` that is neither a module nor an attribute of one, as 'file: name'."""
    import importlib

    unknown = []
    for where, text in texts.items():
        for name in dict.fromkeys(CODE_NAME.findall(text)):
            if name.startswith(NOT_IMPORTABLE):
                continue
            parts = [p for p in re.split(r"[.:]", name) if p not in ("py", "md", "toml", "json")]
            for split in range(len(parts), 0, -1):
                try:
                    found: object = importlib.import_module(".".join(parts[:split]))
                    break
                except ImportError:
                    continue
            else:
                unknown.append(f"{where}: {name}")
                continue
            for attribute in parts[split:]:
                if not hasattr(found, attribute):
                    unknown.append(f"{where}: {name}")
                    break
                found = getattr(found, attribute)
    return unknown


def test_every_code_name_a_page_writes_exists(monkeypatch):
    """docs/reliability.md named `lora_run.run.CtrlC` after it became `Signals`, and hooks/register_families.md
    registered the toy plugin's adapter as `lora_run_toy.family:ToyAdapter` (it is `ToyFluxAdapter`): a renamed
    function or module leaves no page behind."""
    monkeypatch.syspath_prepend(str(DOCS / "examples" / "lora-run-toy"))      # the example plugin, not installed
    texts = {str(p.relative_to(REPO)): p.read_text("utf-8") for p in [REPO / "README.md", *DOCS.rglob("*.md")]}
    assert sum(len(CODE_NAME.findall(t)) for t in texts.values()) > 50       # the scan sees the names
    assert unknown_code_names(texts) == []
    planted = {"docs/x.md": "`lora_run.run.CtrlC`, `lora_run_rundir.spaces`, `lora_run_rundir.space` and "
                            "`lora_run_native.checkpoint.save`, (`lora_run_formats.model_files`). lora_run.docs "
                            '"lora_run_toy.family:ToyAdapter", "lora_run_toy.family:ToyFluxAdapter"'}
    assert unknown_code_names(planted) == ["docs/x.md: lora_run.run.CtrlC", "docs/x.md: lora_run_rundir.spaces",
                                           "docs/x.md: lora_run_toy.family:ToyAdapter"]


# every ```toml block of a page is a recipe (or a part of one) that parses: valid TOML, known keys, right types

#: what a page's recipe fragment is laid over, so that it is a whole recipe (the fragment's keys win)
FRAGMENT_BASE = {"model": {"family": "flux.1-dev", "source": "models/flux"},
                 "dataset": {"path": "data/subject", "trigger": "ohwx"}, "train": {"steps": 10}}


def toml_blocks(text: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", text, flags=re.S | re.M)


def recipe_block_problems(where: str, block: str) -> list[str]:
    """Why ``block`` (a page's ```toml block) is no part of a recipe: not TOML, or unknown keys and wrong types."""
    from lora_run.errors import RecipeError
    from lora_run.recipe import tomllib
    from lora_run_devtools.testing import parse_recipe_text
    import tomli_w

    try:
        table = tomllib.loads(block)
    except tomllib.TOMLDecodeError as exc:
        return [f"{where}: not valid TOML: {exc}"]
    if "project" in table:                   # a package's pyproject.toml (writing-a-plugin.md)
        return []
    merged = {**FRAGMENT_BASE, **{k: v for k, v in table.items() if not isinstance(v, dict)}}
    for key, value in table.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
    try:
        parse_recipe_text(tomli_w.dumps(merged), name=where)
    except RecipeError as exc:
        return [str(exc)]
    return []


def test_every_toml_block_of_a_page_is_a_recipe_that_parses():
    """backend-kohya.md's set-up block wrote `backend = "kohya"` above a `[backend.kohya]` table, which TOML refuses
    (getting-started.md says so): copied, it failed with "not valid TOML"."""
    pages = [REPO / "README.md", *DOCS.rglob("*.md")]
    blocks = [(f"{p.relative_to(REPO)} block {i + 1}", b) for p in pages
              for i, b in enumerate(toml_blocks(p.read_text("utf-8")))]
    assert len(blocks) >= 10
    assert [why for where, block in blocks for why in recipe_block_problems(where, block)] == []
    planted = {"shorthand": 'backend = "kohya"\n[backend.kohya]\nsd_scripts = "x"\n',
               "misspelt": "[lora]\nrnak = 4\n", "a float": "[train]\nsteps = 3.9\n",
               "fine": '[backend]\nname = "kohya"\n[backend.kohya]\nsd_scripts = "x"\n'}
    found = {where: " ".join(recipe_block_problems(where, block)) for where, block in planted.items()}
    assert "not valid TOML" in found["shorthand"] and "unknown key 'rnak'" in found["misspelt"]
    assert "expected int, got float 3.9" in found["a float"] and found["fine"] == ""


def demo_page_mismatches(page: str) -> list[str]:
    """What docs/demo.md (``page``, its text with lines joined) says of the demo that its code and shipped recipe do
    not: the counts of drawings and regularisation faces, the steps, the checkpoint and sample intervals."""
    from lora_run.recipe import tomllib
    from lora_run_native import demo

    recipe = tomllib.loads(demo.shipped_recipe().read_text("utf-8"))
    train, sample = recipe["train"], recipe["sample"]
    said = {f"{demo.SUBJECT_IMAGES} drawings of one cartoon character": "subject drawings",
            f"and {demo.REG_IMAGES} generic cartoon faces": "regularisation faces (REG_IMAGES)",
            f"{train['steps']} training steps": "[train] steps",
            f"checkpoints every {train['save_every_steps']} steps": "[train] save_every_steps",
            f"samples at step {sample['every_steps']} and at the end": "[sample] every_steps"}
    return [what for text, what in said.items() if text not in page]


def test_the_demo_page_says_what_the_demo_does():
    """docs/demo.md said the demo draws 6 regularisation faces; it draws REG_IMAGES (20)."""
    page = " ".join((DOCS / "demo.md").read_text("utf-8").split())
    assert demo_page_mismatches(page) == []
    assert demo_page_mismatches(page.replace("and 20 generic", "and 6 generic").replace("24 training", "25 training")) \
        == ["regularisation faces (REG_IMAGES)", "[train] steps"]


# the backends' option tables: every option, and the defaults a cell writes as a plain value

#: page, the text the table follows, the options class (module, name)
OPTION_TABLES = [("native-backend.md", "Options live in `[backend.native]`",
                  ("lora_run_native.backend", "NativeOptions")),
                 ("backend-kohya.md", "## `[backend.kohya]` options", ("lora_run_kohya", "KohyaOptions")),
                 ("backend-diffusion-pipe.md", "## Options: `[backend.diffusion-pipe]`",
                  ("lora_run_diffusion_pipe.options", "DiffusionPipeOptions"))]


def option_rows(text: str, after: str) -> dict[str, str]:
    """The first Markdown table after ``after`` in ``text``: each key of its first column → its second cell."""
    lines = text.split(after, 1)[1].lstrip("\n:").strip("\n").splitlines()
    rows = [line for line in lines[:next((i for i, line in enumerate(lines[2:], 2) if not line.startswith("|")),
                                         len(lines))] if line.startswith("|")][2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {key: cell[1] for cell in cells for key in re.findall(r"`(\w+)`", cell[0])}


def plain_default(cell: str) -> tuple[bool, object]:
    """(True, value) where a default cell writes a plain value (`true`, 1, 1800, `{}`, unset, —), else (False,
    None)."""
    word = cell.strip("`").split(" ")[0].strip("`:")
    if word in ("true", "false"):
        return True, word == "true"
    if word in ("unset", "—", "none"):
        return True, None
    if word in ("{}", "[]"):
        return True, {"{}": {}, "[]": []}[word]
    if re.fullmatch(r"-?\d+(\.\d+)?", word):
        return True, float(word)
    return False, None


def option_table_problems(page: str, text: str, after: str, options: type) -> list[str]:
    import attrs

    rows, fields = option_rows(text, after), {f.name: f for f in attrs.fields(options)}
    problems = [f"{page}: `{name}` is no option" for name in rows if name not in fields]
    problems += [f"{page}: option `{name}` missing from the table" for name in fields if name not in rows]
    for name, cell in rows.items():
        plain, value = plain_default(cell)
        if plain and name in fields:
            field = fields[name]
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
            if default != value:
                problems.append(f"{page}: `{name}` default is {default!r}, the table says {cell}")
    return problems


def test_every_backend_options_table_lists_its_options_with_their_defaults():
    """docs/native-backend.md gave `text_max_length` the default 512; it is unset (the family's maximum)."""
    import importlib

    found = []
    for page, after, (module, name) in OPTION_TABLES:
        found += option_table_problems(page, (DOCS / page).read_text("utf-8"), after,
                                       getattr(importlib.import_module(module), name))
    assert found == []
    from lora_run_native.backend import NativeOptions

    planted = ("Options live in `[backend.native]`:\n\n| key | default | meaning |\n|---|---|---|\n"
               "| `text_max_length` | 512 | … |\n| `tensorboard` | `true` | … |\n| `progress_bar` | false | … |\n"
               "| `fsdp` | `false` | … |\n| `fsdpp` | unset | … |\n\nText.\n")
    assert option_table_problems("x.md", planted, "Options live in `[backend.native]`", NativeOptions) == [
        "x.md: `fsdpp` is no option", "x.md: `text_max_length` default is None, the table says 512",
        "x.md: `progress_bar` default is True, the table says false"]


# every `lora-run …` command line a page shows is one the command line accepts

#: a page's placeholder → a value of its kind
PLACEHOLDERS = {"RECIPE": "recipe.toml", "RECIPE.toml": "recipe.toml", "N": "2", "PAGE": "multi-gpu",
                "NAME": "demo/tiny-flux", "FILE": "file", "DIR": "dir", "D": "dir", "RUN": "run", "OTHER": "other"}
#: command lines the pages show as refused (bad input, to show its message)
SHOWN_REFUSED = {"lora-run chek r.toml", "lora-run chek recipe.toml", 'lora-run check ""', "lora-run check -",
                 "lora-run -"}


def command_lines(text: str) -> list[str]:
    """The `lora-run …` command lines of a page: those in its shell blocks, and its code spans that give arguments."""
    found = []
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)    # in order: each opening with its close
    for block in (body for language, body in blocks if language in ("sh", "bash", "")):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                part = re.sub(r"^\S*/bin/(?=lora-run )", "", part.strip())
                found += [part] if part.startswith("lora-run ") else []
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose) if span.startswith("lora-run ")]
    return found


def refused_command_lines(lines: list[str]) -> list[str]:
    """Each of ``lines`` the command line refuses (its arguments as parsed, nothing run), with why. A mention of a
    command without the arguments it requires (`lora-run check`) is a name, not a command line; a usage synopsis
    (`[--json]`, `…`) and a version line are not parsed."""
    import shlex

    from lora_run.cli import ArgumentsError, _with_command, build_parser
    from lora_run.plugins import load_plugins

    plugins = load_plugins()
    parser, commands = build_parser(plugins), sorted(plugins.registry["command"])
    refused = []
    for line in lines:
        line = re.split(r"\s+#|\s+[>|]", line)[0]
        if re.search(r" \[|…|\.\.\.|<command>|^lora-run \d", line):
            continue
        argv = [PLACEHOLDERS.get(word, word.replace("<run>", "run")) for word in shlex.split(line)[1:]
                if word != "--debug"]           # the CLI takes --debug off the line before parsing
        try:
            parser.parse_args(_with_command(argv, commands))
        except ArgumentsError as exc:
            if not re.search(r"arguments are required|expected one argument", str(exc)):
                refused.append(f"{line}: {exc}")
        except SystemExit:                       # --help
            pass
    return refused


def test_every_command_line_a_page_shows_is_accepted(capsys):
    """Pages wrote `lora-run --gpus N`, which the command line reads as the command "N" (the option belongs to `run`:
    `lora-run RECIPE --gpus N`). The GPU record pages (performance, gpu-acceptance) keep the commands as run."""
    records = ("performance.md", "gpu-acceptance.md")
    pages = [REPO / "README.md", *(p for p in DOCS.rglob("*.md") if p.name not in records)]
    lines = [line for page in pages for line in command_lines(page.read_text("utf-8"))]
    assert len(lines) > 100 and "lora-run recipes flux/identity-fast > my-recipe.toml   # copy one to start your own" \
        in lines and not any("package versions" in line for line in lines)     # a closing fence opens no block
    refused = refused_command_lines(lines)
    assert {line.split(":")[0] for line in refused} == SHOWN_REFUSED, refused
    planted = ["lora-run --gpus N", "lora-run plan recipe.toml --gpus 4", "lora-run check", "lora-run check --json",
               "lora-run RECIPE --resume --output-dir <run>", "lora-run recipe.toml --gpus 4 # a comment",
               "lora-run eval --lora"]
    assert [line.split(":")[0] for line in refused_command_lines(planted)] == ["lora-run --gpus N",
                                                                               "lora-run plan recipe.toml --gpus 4"]
    capsys.readouterr()


# the plugin examples: every name they use is imported, defined or the reader's; each hook page's example loads

#: names an example leaves to its reader (their own functions, classes and constants) or takes from its page's text
READERS_NAMES = {"ENGINE_VERSION", "upload", "notify", "send_to_dashboard", "train_share", "ToyBackend", "ToyOptions",
                 "FolderDataset", "IdentityEvaluator", "DlibEmbedder", "DlibOptions", "charbonnier",
                 "CharbonnierOptions", "state_dict"}


def undefined_names(code: str) -> list[str]:
    """The names ``code`` reads that it neither imports, defines, assigns nor takes as an argument (builtins aside)."""
    import builtins

    tree = ast.parse(code)
    known = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            known |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            known.add(node.name)
        elif isinstance(node, ast.arg):
            known.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            known.add(node.id)
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return sorted(read - known - READERS_NAMES)


def example_blocks() -> dict[str, str]:
    pages = [*sorted((DOCS / "hooks").glob("*.md")), DOCS / "writing-a-plugin.md", DOCS / "lora-formats.md"]
    return {f"{p.relative_to(DOCS)} block {i + 1}": block for p in pages
            for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", p.read_text("utf-8"), flags=re.S | re.M))}


def test_every_plugin_example_names_only_what_it_imports_and_each_hook_example_loads():
    """The hook pages' examples used `hookimpl`, `Path`, `RecipeError`, `attrs` and `option` without importing them,
    so a copied example failed with NameError; each now runs as written, as a plugin the plugin manager accepts."""
    import types

    from lora_run.plugins import load_plugins

    blocks = example_blocks()
    assert len(blocks) >= 20
    assert {where: undefined_names(code) for where, code in blocks.items() if undefined_names(code)} == {}
    def as_plugin(where: str, code: str) -> types.ModuleType:
        module = types.ModuleType(where.split()[0].replace("/", "_").removesuffix(".md"))
        module.__dict__.update(dict.fromkeys(READERS_NAMES))     # the reader's own objects, never called here
        exec(compile(code, where, "exec"), module.__dict__)      # noqa: S102 - the page's own example
        return module

    modules = [as_plugin(where, code) for where, code in blocks.items() if where.startswith("hooks/")]
    assert len(modules) == 18
    names = {m.__name__ for m in modules}
    assert [b for b in load_plugins(extra=modules).broken if b.name in names] == []     # hook names and arguments
    planted = "@hookimpl\ndef step_finished(run, step, metrics):\n    print(Path(step), helper)\n"
    assert undefined_names(planted) == ["Path", "helper", "hookimpl"]
    assert undefined_names("from pathlib import Path\nx = lambda p: Path(p)\nupload(x)\n") == []
    misnamed = as_plugin("hooks/x.md", "from lora_run.hookspecs import hookimpl\n@hookimpl\ndef step_finishd(run):\n"
                                       "    pass\n")
    assert [b.name for b in load_plugins(extra=[misnamed]).broken] == ["hooks_x"]


# docs/dataset-lint.md: its tables list every finding code the lint and the training policy report, and no other

#: a finding as the dataset's lint and the training policy add it: `report.add(WARNING, "few-images", …)`
LINT_CODE = re.compile(r'report\.add\((?:ERROR|WARNING|INFO|"error"|"warning"|"info"), "([a-z0-9-]+)"'
                       r'(?: if \w+ else "([a-z0-9-]+)")?')


def lint_codes_in_code() -> set[str]:
    from lora_run_folder.lint import NOT_DECODED

    sources = [*(REPO / "plugins" / "lora_run_folder").glob("*.py"), REPO / "plugins" / "lora_run_training" / "policy.py"]
    return {code for path in sources for pair in LINT_CODE.findall(path.read_text("utf-8")) for code in pair
            if code} | set(NOT_DECODED)


def lint_table_problems(page: str, codes: set[str]) -> list[str]:
    """The codes the lint reports that the page's tables lack, and the codes the tables name that nothing reports."""
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    listed = {code for row in rows for code in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}
    return [f"missing from the page: {c}" for c in sorted(codes - listed)] + \
        [f"reported by no code: {c}" for c in sorted(listed - codes)]


def test_the_dataset_lint_page_lists_every_finding_code():
    """docs/dataset-lint.md lacked `no-usable-images`, the error of a dataset whose every subject image is unusable."""
    codes = lint_codes_in_code()
    assert {"no-usable-images", "unreadable", "bad-image", "te-lr-ratio", "sub-folder", "many-reg-images"} <= codes
    page = (DOCS / "dataset-lint.md").read_text("utf-8")
    assert lint_table_problems(page, codes) == []
    planted = page.replace("| `no-usable-images` |", "| `no-usable-image` |")
    assert lint_table_problems(planted, codes) == ["missing from the page: no-usable-images",
                                                   "reported by no code: no-usable-image"]


# docs/reliability.md: the size limits of files read on a user's behalf are the constants the readers check


def size_text(n: int) -> str:
    """``n`` bytes as the page writes a limit: the largest binary unit that divides it (1 MiB, 64 KiB, 8 GiB)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def size_limit_problems(page: str) -> list[str]:
    from lora_run import files
    import lora_run_folder
    import lora_run_rundir
    from lora_run_eval import evaluator, faces
    from lora_run_folder import images
    from lora_run_formats import model_files

    table = page.split("### Size limits of files read on a user's behalf", 1)[1].split("\n\n")[1]
    cells = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in table.splitlines()[2:]}
    expected = {"recipe and every `extends` file": size_text(files.RECIPE_LIMIT),
                "caption": size_text(lora_run_folder.CAPTION_LIMIT),
                "training / subject image, and every image `score` scores":
                    f"{size_text(images.IMAGE_LIMIT)}, and {images.MAX_PIXELS // 1_000_000} million pixels",
                "LoRA file for `lora-run eval --lora`": size_text(evaluator.LORA_LIMIT),
                "ONNX face model (`[eval.embedder_options]`)": f"{size_text(faces.ONNX_LIMIT)} (protobuf's own limit)",
                "JSON of our own run folder read back (manifest, checkpoint state, cache index, the loss log `eval` "
                "reads)": size_text(lora_run_rundir.JSON_LIMIT),
                "JSON and tokenizer file of a model folder (config.json, model_index.json, tokenizer files)":
                    size_text(model_files.TEXT_LIMIT)}
    return [f"{row}: the page says {cells.get(row)!r}, the code {limit!r}" for row, limit in expected.items()
            if cells.get(row) != limit]


def test_the_size_limits_on_the_reliability_page_are_the_code_s():
    page = (DOCS / "reliability.md").read_text("utf-8")
    assert size_limit_problems(page) == []
    planted = page.replace("| caption | 64 KiB |", "| caption | 1 MiB |")
    assert size_limit_problems(planted) == ["caption: the page says '1 MiB', the code '64 KiB'"]
