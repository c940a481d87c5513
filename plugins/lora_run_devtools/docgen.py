"""Generate docs/recipe-reference.md from the attrs field docs and the registered plugins:
`python -m lora_run_devtools.docgen [--check]`."""
from __future__ import annotations

import sys
import typing
from pathlib import Path

import attrs

from lora_run.schema import Recipe
from lora_run_training.capabilities import features_of

HEADER = """# Recipe reference

Generated from the field documentation in `core/lora_run/schema.py`, the recipe tables and keys plugins register
(`register_sections`) and the installed plugins by `python -m lora_run_devtools.docgen`; a test fails when this
page is stale. Paths in a recipe file are relative to
that file; paths given with `--set` are relative to the current directory (the keys a path applies to are the ones the
schema marks as paths: core's, plugins' tables and backends' option tables). Every key is checked strictly: no type
coercion, unknown keys are errors (with a suggestion), all problems are reported at once, exit code 2.

On the command line, `--set KEY=VALUE` sets a key (a TOML value: `--set train.steps=100`,
`--set 'dataset.regularization=[{path="reg/"}]'`) and `--unset KEY` removes one, so that its default
applies (`--unset sample.every_steps` turns sampling off; `--unset sample` resets the whole table).
`--unset` is applied first, then every `--set`, in order (a later `--set` of a key wins); unsetting a key that is
not set does nothing, and a name that is not a recipe key is an error naming the closest key (inside a
`[backend.<name>]` table and the options tables, `[train] loss_options` …: a key no installed plugin's options take;
in a free table such as `[model.files]`, a key that is not set while one very close to it is, `t5xx` beside `t5xxl`).
"""


def _type_name(tp: object) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "table"
    if attrs.has(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "**required**"
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        value = field.default.factory()
        return "—" if attrs.has(type(value)) else f"`{value!r}`".replace("'", '"')
    if field.default is None:
        return "unset"
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value!r}`".replace("'", '"')


def _limits(field: attrs.Attribute) -> str:
    m = field.metadata
    parts = [f"≥ {m['ge']}" if m.get("ge") is not None else "", f"> {m['gt']}" if m.get("gt") is not None else "",
             f"≤ {m['le']}" if m.get("le") is not None else "", f"< {m['lt']}" if m.get("lt") is not None else ""]
    return ", ".join(p for p in parts if p)


def section_table(cls: type, title: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"## `{title}`", "", (cls.__doc__ or "").strip(), "",
             "| key | type | default | limits | meaning |", "| --- | --- | --- | --- | --- |"]
    nested = []
    for f in attrs.fields(cls):
        tp = hints[f.name]
        if attrs.has(tp):
            nested.append((tp, f"[{title.strip('[]')}.{f.name}]"))
        inner = [a for a in typing.get_args(tp) if attrs.has(a)]
        if inner:
            nested.append((inner[0], f"[[{title.strip('[]')}.{f.name}]]"))
        doc = f.metadata.get("doc", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{f.name}` | {_type_name(tp)} | {_default(f)} | {_limits(f)} | {doc} |")
    lines.append("")
    for sub, sub_title in nested:
        lines.extend(section_table(sub, sub_title))
    return lines


def families_section() -> list[str]:
    """`[model] family` choices, from the registered family plugins (`register_families`)."""
    from lora_run.plugins import load_plugins

    plugins = load_plugins()
    default = plugins.default("family")
    lines = ["## Model families\n",
             "Generated from the installed family plugins (`register_families`): what `[model] family` accepts, "
             "the `[model.files]` slots each takes, the grid every bucket side must fall on, the releases "
             "`[model] version` may name, the σ samplers of its own `[train] timestep_sampling` may name, the "
             "LoRA formats `[output] formats` may name (**bold**: written when the recipe does not say), and "
             "the backends that train it (**bold**: chosen when `[backend] name` is unset). A recipe without "
             "`[model] family` trains " + (f"`{default}`" if default else "nothing: it must name one") + ".\n",
             "| family | plugin | `[model.files]` slots | grid (px) | versions | own samplers | LoRA formats "
             "| trained by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, reg in sorted(plugins.registry["family"].items()):
        slots = "<br>".join(f"`{slot}`: {doc}" for slot, doc in reg.file_slots.items()) or "none (folders only)"
        chosen = reg.default_formats or reg.lora_formats
        formats = ", ".join(f"**`{f}`**" if f in chosen else f"`{f}`" for f in reg.lora_formats) or "—"
        trainers = plugins.trainers(name)
        backend = plugins.default("backend", trainers)
        trained = ", ".join(f"**{b}**" if b == backend else b for b in trainers) or "—"
        lines.append(f"| `{name}` | {reg.plugin} | {slots} | {reg.pixel_multiple} | "
                     f"{', '.join(reg.versions) or '—'} | {', '.join(f'`{s}`' for s in reg.samplers) or '—'} | "
                     f"{formats} | {trained} |")
    lines.append("")
    return lines


def render() -> str:
    from lora_run.plugins import load_plugins

    plugins = load_plugins()
    recipe_class = plugins.recipe_class
    lines = [HEADER]
    top = attrs.fields(recipe_class)
    hints = typing.get_type_hints(recipe_class)
    lines.append("## Top level\n")
    lines.append("| key | meaning |\n| --- | --- |")
    for f in top:
        if not attrs.has(hints[f.name]):
            lines.append(f"| `{f.name}` | {f.metadata.get('doc', '')} |")
    lines.append("")
    for f in top:
        if attrs.has(hints[f.name]):
            table = section_table(hints[f.name], f"[{f.name}]")
            section = plugins.registry["section"].get(f.name)
            if section is not None and f.name in attrs.fields_dict(Recipe):     # keys a plugin adds to core's table
                first = attrs.fields(section.options)[0].name
                table[2] += f" (The keys from `{first}` on are registered by the `{section.plugin}` plugin.)"
            elif section is not None:     # a table a plugin registers (`register_sections`)
                table[2] += f" (Registered by the `{section.plugin}` plugin.)"
            lines.extend(table)
    lines.extend(families_section())
    lines.append("## Features and backend capabilities\n")
    lines.append("A backend declares, per model family, which of these features it honours; a recipe that uses "
                 "one the chosen backend does not honour is refused with the key named (`lora-run check`).\n")
    lines.append("| feature | key | used when |\n| --- | --- | --- |")
    for feat in features_of(recipe_class):
        lines.append(f"| `{feat.name}` | `{'.'.join(feat.key)}` | {feat.doc} |")
    lines.append("| `loss:<name>` | `train.loss` | the named loss plugin (a backend that declares `loss:*` "
                 "takes every registered loss) |")
    lines.append("| `timestep_sampling:<name>` | `train.timestep_sampling` | the named σ sampler (`uniform`, "
                 "`sigmoid`, `logit-normal`, `shift`, or one a family registers) |")
    return "\n".join(lines).rstrip() + "\n"


def target() -> Path:
    return Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = target().read_text("utf-8") if target().exists() else ""
        if current != text:
            print("docs/recipe-reference.md is stale: run python -m lora_run_devtools.docgen", file=sys.stderr)
            return 1
        return 0
    target().write_text(text, "utf-8")
    print(f"wrote {target()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
