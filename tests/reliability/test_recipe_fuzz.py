"""Property-based fuzzing of the shipped recipes: wrong types, unknown keys, missing sections and keys,
out-of-range numbers, huge strings and odd unicode, and hostile paths in `output.name`, `output.dir`,
`extends` and every path key (names that climb out of the run folder, devices, FIFOs, a 4 GiB sparse file,
folders, the dataset itself). Thousands of mutated recipes go through the real loader
and validation (``load_recipe`` + ``validate``, the path `lora-run check` takes) in-process; a sample also
goes through ``lora_run.cli.main``. Every case either validates or fails with a ``LoraRunError`` of exit code
2 whose every line names a key; nothing else ever escapes (no traceback)."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_run.cli import main as cli_main
from lora_run_recipes import shipped_recipes
from lora_run.errors import LoraRunError
from lora_run.recipe import load_raw

KEY = re.compile(r"\[[^\]\s][^\]]*\]|top level:|\[extends\]")
ODD = st.sampled_from(["", " ", "\x00", "\u202e\u0644\u0627", "\ud7ff\ufffd", "\U0001f600" * 50, "a\nb",
                       "🙂.toml", "../../etc/passwd", "${HOME}", "$(touch pwned)", "os.system", "lora_run.run:execute",
                       "\\\\?\\C:\\x", "\u0000\u0001\u0002", "é" * 5000])
HUGE = st.integers(min_value=10_000, max_value=200_000).map(lambda n: "x" * n)
NUMBERS = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 2**31, 1e308, -0.0, 1e-320]))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.text(max_size=30), ODD, HUGE)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))


#: Path-like values; "@giant", "@fifo", "@data", "@folder" are replaced by real hostile files (module fixture).
PATHLIKE = st.sampled_from(["../../escaped", "..", ".", "/", "/dev/zero", "/dev/null", "/etc/passwd", "~", "a/b",
                            "runs/{name}/..", "{name}", "../{name}", "", " ", "\x00", "a\nb", "/proc/self/mem",
                            "@giant", "@fifo", "@data", "@folder", "nonexistent/file.toml", "x" * 300,
                            "\u202e\u0644\u0627.safetensors", ".hidden", "C:\\Windows\\evil"])
PATH_KEYS = [("output", "name"), ("output", "dir"), ("extends",), ("dataset", "path"), ("train", "cache_dir"),
             ("model", "source"), ("model", "files", "transformer"), ("model", "files", "vae"),
             ("dataset", "regularization")]
HOSTILE: dict[str, str] = {}


def _hostile(value: str) -> str:
    for mark, real in HOSTILE.items():
        value = value.replace(mark, real)
    return value


def _paths(node, prefix=()):
    """Every key path of a nested dict (lists by index)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _get_parent(raw, path):
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def _sanitize(value):
    """TOML cannot hold None or surrogates or NUL in keys; keep the rest as-is."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_sanitize(v) for v in value]
    if isinstance(value, dict):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model):
    """The shipped recipes with `extends` merged, the dataset pointed at a real folder and FLUX models at the
    tiny model, so unmutated bases validate and mutations are what fails."""
    from lora_run_devtools.testing import make_images

    data = tmp_path_factory.mktemp("fuzzdata")
    make_images(data / "subject", count=2, size=(64, 64))
    with open(data / "giant.toml", "wb") as fh:
        fh.truncate(4 << 30)                          # sparse: no disk used
    os.mkfifo(data / "fifo")
    HOSTILE.update({"@giant": str(data / "giant.toml"), "@fifo": str(data / "fifo"), "@data": str(data / "subject"),
                    "@folder": str(data)})
    out = []
    for path in shipped_recipes():
        raw = load_raw(path, {})
        raw.setdefault("dataset", {})["path"] = str(data / "subject")
        if raw.get("model", {}).get("family") == "flux.1-dev" and "source" in raw.get("model", {}):
            raw["model"]["source"] = str(tiny_model)
        out.append((path.name, raw))
    assert len(out) >= 3
    return out


@pytest.fixture(scope="module")
def plugins():
    from lora_run.plugins import load_plugins

    return load_plugins()


def mutate(data, raw):
    """One or more mutations; returns (the mutated raw dict, what was done)."""
    import copy

    raw = copy.deepcopy(raw)
    done = []
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        paths = list(_paths(raw))
        kind = data.draw(st.sampled_from(["type", "type", "range", "unknown", "delete", "string", "path", "path"]),
                         label="kind")
        if kind == "path":
            where = data.draw(st.sampled_from(PATH_KEYS), label="path key")
            value = _hostile(data.draw(PATHLIKE, label="path value"))
            node = raw
            for part in where[:-1]:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[where[-1]] = [{"path": value}] if where[-1] == "regularization" else value
            done.append(("path", where, value))
            continue
        if kind == "unknown":
            tables = [()] + [p for p in paths if isinstance(_walk(raw, p), dict)]
            where = data.draw(st.sampled_from(tables), label="table")
            name = data.draw(st.one_of(st.text(min_size=1, max_size=20), ODD.filter(bool)), label="name")
            _walk(raw, where)[_sanitize(name)] = _sanitize(data.draw(SCALARS, label="value"))
            done.append(("unknown", where, name))
            continue
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = _get_parent(raw, path)
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "range":
            parent[path[-1]] = data.draw(NUMBERS, label="number")
        elif kind == "string":
            parent[path[-1]] = _sanitize(data.draw(st.one_of(ODD, HUGE), label="string"))
        else:
            parent[path[-1]] = _sanitize(data.draw(VALUES, label="value"))
        done.append((kind, path))
    return raw, done


def _walk(raw, path):
    node = raw
    for part in path:
        node = node[part]
    return node


def _write(raw, target: Path) -> bool:
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return False
    target.write_text(text, encoding="utf-8")
    return True


COUNT = {"cases": 0, "rejected": 0, "accepted": 0, "cli": 0}


def check_outcome(path: Path, plugins, what) -> None:
    from lora_run.recipe import load_recipe
    from lora_run.run import validate
    from lora_run_rundir.output import raise_output_problems

    COUNT["cases"] += 1
    try:
        loaded = load_recipe(path)
        validate(loaded, plugins)
        raise_output_problems(loaded)          # what `check`, `plan` and `run` also refuse
    except LoraRunError as exc:
        COUNT["rejected"] += 1
        assert exc.exit_code == 2, (what, type(exc).__name__, str(exc)[:500])
        lines = str(exc).splitlines()
        assert lines, what
        for line in lines:
            assert KEY.search(line), f"{what}: error line names no key: {line[:300]!r}"
        assert "Traceback" not in str(exc)
        return
    COUNT["accepted"] += 1


@pytest.mark.slow
@settings(max_examples=2000, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data())
def test_mutated_recipes_fail_cleanly_naming_a_key(data, bases, plugins, tmp_path_factory):
    name, base = data.draw(st.sampled_from(bases), label="recipe")
    raw, what = mutate(data, base)
    target = tmp_path_factory.getbasetemp() / "fuzz.toml"
    if not _write(raw, target):
        return
    check_outcome(target, plugins, (name, what))


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data())
def test_cli_check_exit_code_2_and_no_traceback(data, bases, tmp_path_factory, capsys):
    name, base = data.draw(st.sampled_from(bases), label="recipe")
    raw, what = mutate(data, base)
    target = tmp_path_factory.getbasetemp() / "fuzz-cli.toml"
    if not _write(raw, target):
        return
    capsys.readouterr()
    code = cli_main(["check", str(target)])
    out = capsys.readouterr()
    COUNT["cli"] += 1
    assert code in (0, 2), (name, what, code, out.err[-800:])
    assert "Traceback" not in out.err + out.out
    if code == 2:
        assert any(KEY.search(line) for line in out.err.splitlines() if line.startswith("error:")), out.err[-800:]


def test_zz_fuzz_figures(figures):
    """Reports the totals of the two fuzz tests above (runs after them: file order)."""
    print(f"\nrecipe fuzz: {COUNT['cases']} in-process cases ({COUNT['rejected']} rejected with exit 2, "
          f"{COUNT['accepted']} valid), {COUNT['cli']} through the CLI; 0 tracebacks")
    figures("recipe-fuzz", cases=COUNT["cases"] + COUNT["cli"], faults=COUNT["rejected"] + COUNT["cli"])
