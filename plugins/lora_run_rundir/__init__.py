"""Built-in plugin `run-folder`: the run folder every run writes (``open_run_folder``), what a resumed run may
change (``check_resume``), and the safe-writing library plugins share.

- :mod:`.atomic` — atomic writes (``atomic_write_bytes``/``atomic_write_text``/``atomic_path``), a full disk
  reported as one line naming the file, the temporary files of interrupted writes, appends that never reach another
  name of the file (``open_append``: a hard link is broken first);
- :mod:`.folder` — ``RunDir``: never replaces what lora-run did not create, one lora-run per folder (a lock),
  the manifest, the log, the run's start and end;
- :mod:`.output` — where a run folder may not go (`lora-run check` and `plan` ask too), and the rules of the
  `[output]` keys (``check_recipe``: a plain file name, a folder path, at least one format);
- :mod:`.resume` — the recipe and dataset checks of ``--resume``.

Registered through the `lora_run` entry-point group like any third-party plugin. No torch import.
"""
from __future__ import annotations

from typing import Any

from lora_run.hookspecs import hookimpl

from .atomic import (atomic_path, atomic_write_bytes, atomic_write_text, disk_full_error, free_bytes, is_disk_full,
                     open_append, parse_json)
from .folder import JSON_LIMIT, RunDir
from .output import output_path

__all__ = ["JSON_LIMIT", "RunDir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "disk_full_error",
           "free_bytes", "is_disk_full", "open_append", "output_path", "parse_json"]


@hookimpl(trylast=True)     # the fallback: a folder another plugin gives is used instead, whatever the load order
def open_run_folder(loaded: Any, output_dir: str | None, overwrite: bool) -> RunDir:
    from .output import output_path, raise_output_problems

    raise_output_problems(loaded, output_dir, overwrite)
    return RunDir(output_path(loaded.recipe, output_dir))


@hookimpl
def check_recipe(recipe: Any) -> list:
    from .output import output_key_problems

    return output_key_problems(recipe)


@hookimpl(tryfirst=True)     # the run folder itself first: other plugins' checks read its records
def check_resume(run_dir: Any, recipe: Any, loaded: Any, report: Any, allow_dataset_change: bool,
                 plugins: Any) -> None:
    from .resume import check_dataset_unchanged, check_recipe_unchanged

    if isinstance(run_dir, RunDir):
        run_dir.check_resumable()
    check_recipe_unchanged(run_dir, recipe, loaded.shown, plugins)
    if not allow_dataset_change:
        check_dataset_unchanged(run_dir, report, loaded.shown)
