"""The TOML the engine backends write, read back with the engines' own reader (`toml` 0.10.2, which sd-scripts and
diffusion-pipe use), not only with tomllib: every value must come back exactly, or be refused by name."""
from __future__ import annotations

import sys

import pytest
import tomli_w

from lora_run_engines.keys import value_ok
from lora_run_engines.tomlfile import dumps, misread

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

toml = pytest.importorskip("toml")      # the `test` extra installs the engines' reader

#: path fragments a run folder, a cache folder or a dataset can hold (each once in an otherwise plain path)
HOSTILE = ["it's", 'a",b', "a b", 'q"uote', "back\\slash", "hash#x", "eq=x", "[br]", "-lead", "--lead", "ünï€😀",
           "tab\tx", "new\nline", "'\"", "x" * 250]


@pytest.mark.parametrize("part", HOSTILE)
def test_lists_of_tables_come_back_exactly(part):
    data = {"general": {"resolution": 512},
            "datasets": [{"subsets": [{"image_dir": f"/runs/{part}/subject", "num_repeats": 1, "is_reg": False},
                                      {"image_dir": f"/runs/{part}/reg0", "num_repeats": 2, "is_reg": True}]}],
            "directory": [{"path": f"/data/{part}", "num_repeats": 3}]}
    text = dumps(data)
    assert tomllib.loads(text) == data
    assert toml.loads(text) == data
    assert misread(data) == []


def test_inline_tables_are_what_the_engines_reader_loses():
    """Planted-mistake control: tomli-w's own form (an array of inline tables) is misread by `toml` 0.10.2 for a
    path holding an apostrophe — sd-scripts' `subsets` came back empty for a run folder named `it's`."""
    data = {"datasets": [{"subsets": [{"image_dir": "/runs/it's/subject", "num_repeats": 1}]}]}
    assert tomllib.loads(tomli_w.dumps(data)) == data
    assert toml.loads(tomli_w.dumps(data)) != data
    assert toml.loads(dumps(data)) == data


def test_without_lists_of_tables_the_text_is_tomli_ws():
    data = {"model": {"type": "flux", "dtype": "bfloat16"}, "optimizer": {"betas": [0.9, 0.999]}}
    assert dumps(data) == tomli_w.dumps(data)


@pytest.mark.parametrize("value, in_list", [('"', False), ('""x', False), ('"""', False), ('""', True),
                                            (",x=1", True), (" ,x", True), ("\t,", True),
                                            # the reader strips any white space Python knows, Unicode spaces too
                                            ("\xa0,x", True), ("\u3000 ,", True), ("\x85,", True),
                                            # a \uXXXX-escaped control character, then a backslash-u
                                            ("\x1bC:\\users", False), ("\x00\\u0041", True),
                                            ("\x7fa\\\\ub", False)])
def test_misread_names_each_value_the_engines_reader_changes(value, in_list):
    data = {"saving": {"key": [value, "y"] if in_list else value}}
    try:                                                     # the rule matches the reader's real behaviour
        assert toml.loads(tomli_w.dumps(data)) != data
    except (IndexError, toml.TomlDecodeError):               # or the reader crashes on it
        pass
    (where, why), = misread(data)
    assert where == (("saving", "key", 0) if in_list else ("saving", "key")) and "toml 0.10.2" in why


@pytest.mark.parametrize("value", ['"x', 'a"', 'a""', "a,b", "x=,a", "betas=(0.9,0.999)", "'", "#", ",",
                                   "a\xa0,b", "C:\\users\x1b", "\x1bC:\\Users", "\tC:\\users", "\\u0041"])
def test_values_the_engines_reader_keeps_are_not_refused(value):
    data = {"saving": {"key": value, "list": [value, "y"]}} if value != "," else {"saving": {"key": value}}
    assert toml.loads(tomli_w.dumps(data)) == data
    assert misread(data) == []


def test_a_float_kind_is_finite():
    assert value_ok("float", 0.5) and value_ok("int_or_float", 2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not value_ok("float", bad) and not value_ok("int_or_float", bad)
