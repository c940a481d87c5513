"""`lora-run docs [PAGE]`: the documentation pages, offline, from any install.

The pages are the Markdown files of the top-level ``docs/`` folder (and of ``docs/hooks/``); a wheel carries the
same files as the data package ``lora_run.docs`` (pyproject.toml maps one to the other), so a message that says
"see `lora-run docs multi-gpu`" points at a page every install has. A page's name is its path below ``docs/``
without ``.md``: ``multi-gpu``, ``hooks/run_processes``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_run.cli import ArgumentsError
from lora_run.errors import EXIT_OK, LoraRunError

#: The pages, below docs/: the same patterns as pyproject.toml's package-data for lora_run.docs (a test checks
#: this), so a checkout and a wheel list the same pages. docs/examples (a plugin package) is not documentation.
PAGE_PATTERNS = ("*.md", "hooks/*.md")


def doc_folders() -> list[Path]:
    """The folders the pages are read from: the checkout's docs/ (editable installs), the wheel's lora_run/docs."""
    from lora_run_recipes import shipped_folders

    return shipped_folders("docs")


def doc_pages() -> dict[str, Path]:
    """Every page by its name (its path below docs/ without ``.md``), sorted by name."""
    pages: dict[str, Path] = {}
    for root in doc_folders():
        for pattern in PAGE_PATTERNS:
            for path in root.glob(pattern):
                pages.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
    return dict(sorted(pages.items()))


def find_page(name: str, pages: dict[str, Path]) -> Path:
    """The page ``name`` names (``docs/`` and ``.md`` may be written, letter case is ignored), or exit 2 naming
    the closest page and every page."""
    from lora_run.files import printable
    from lora_run.recipe import did_you_mean

    wanted = name.strip().removeprefix("docs/").removesuffix(".md")
    if not wanted:
        raise ArgumentsError("docs: an empty page name; name a page, or leave PAGE out to list them")
    if wanted in pages:
        return pages[wanted]
    by_case = {page.casefold(): path for page, path in pages.items()}
    if wanted.casefold() in by_case:
        return by_case[wanted.casefold()]
    raise ArgumentsError(f'docs: no page "{printable(name)}"{did_you_mean(wanted, pages, chr(34))}; pages: {", ".join(pages)}')


def title(path: Path) -> str:
    """The page's first heading, without its ``#``."""
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def cmd_docs(args: argparse.Namespace, _plugins: object = None) -> int:
    pages = doc_pages()
    if not pages:
        raise LoraRunError("no documentation pages found: this lora-run installation is missing them (reinstall "
                           "it; a wheel carries them as lora_run/docs)")
    if args.page is not None:      # `lora-run docs "$PAGE"` with PAGE unset is refused, not taken as the list
        path = find_page(args.page, pages)
        if args.path:
            print(path)
        else:
            sys.stdout.write(path.read_text("utf-8"))
        return EXIT_OK
    if args.path:
        print(doc_folders()[0])
        return EXIT_OK
    width = max(len(name) for name in pages) + 2
    for name, path in pages.items():
        print(f"{name:<{width}}{title(path)}")
    print("\nRead one: lora-run docs PAGE (with --path: where its file is)")
    return EXIT_OK


def docs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("page", metavar="PAGE", nargs="?", help="a page by its name in the list, e.g. multi-gpu or "
                   "hooks/run_processes: print its Markdown text")
    p.add_argument("--path", action="store_true", help="print where the page's file is (without PAGE: the folder "
                   "of the pages) instead of its text")
