from __future__ import annotations

import inspect
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
