"""What may change when a run is resumed: the recipe only in its length, save policy, `[sample]` and `[eval]`;
the dataset not at all (unless `--allow-dataset-change`)."""
from __future__ import annotations

import os
from typing import Any

from lora_run.errors import OutputError, RecipeError
from lora_run.files import FileProblem, read_limited, shown
from lora_run.recipe import load_recipe, to_dict

from .atomic import parse_json
from .folder import DATASET_RECORD, JSON_LIMIT, RECIPE, RunDir

_RESUMABLE_CHANGES = {("train", "steps"), ("train", "epochs"), ("train", "save_every_steps"),
                      ("train", "save_every_epochs"), ("train", "keep_last"), ("sample",), ("eval",)}
#: Not compared at all: `[output] dir` only says where the run folder is, and the folder resumed is the one found
#: (`--output-dir`, or that key); a relative one (the default `runs/{name}`) resolves against the working folder,
#: so the same folder resumed from another working folder reads another value.
_WHERE_THE_FOLDER_IS = {("output", "dir")}


#: May change on resume as long as the batch all processes train on together (their product) stays the same.
_PER_PROCESS_BATCH = {("train", "batch_size"), ("train", "gpus")}


def resume_differences(saved: dict[str, Any], new: dict[str, Any], prefix: tuple = ()) -> list[str]:
    """The recipe keys that differ between the run's resolved recipe and the recipe now, where a resumed run
    cannot follow them."""
    out = []
    if not prefix:
        a, b = saved.get("train", {}), new.get("train", {})
        (ab, ag), (bb, bg) = ((t.get("batch_size", 1), t.get("gpus", 1)) for t in (a, b))
        if ab * ag != bb * bg:      # the way on: the run's process count, or this one with the batch that keeps it
            other = f" or train.batch_size = {ab * ag // bg} on {bg} process(es)" if ab * ag % bg == 0 else ""
            out.append(f"train.batch_size × train.gpus (the global batch: {ab} × {ag} before, {bb} × {bg} now; keep "
                       f"it: --gpus {ag} with train.batch_size = {ab}{other})")
    for key in sorted(set(saved) | set(new)):
        here = (*prefix, key)
        if here in _RESUMABLE_CHANGES or here[:1] in _RESUMABLE_CHANGES or here in _PER_PROCESS_BATCH \
                or here in _WHERE_THE_FOLDER_IS:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(resume_differences(a, b, here))
        elif a != b:
            out.append(".".join(here))
    return out


def check_recipe_unchanged(run_dir: RunDir, recipe: Any, shown_recipe: str, plugins: Any) -> None:
    """The run's recipe may change only where a resumed run can follow it; a completed run resumes only to train
    on (more steps or epochs): the same length would train its last stretch again and replace the LoRA, samples
    and evaluation it finished with."""
    saved = run_dir.file(RECIPE)
    if not saved.is_file():
        return
    before, now = to_dict(load_recipe(saved, plugins=plugins).recipe), to_dict(recipe)
    diffs = resume_differences(before, now)
    if diffs:
        raise RecipeError(f"{shown_recipe}: cannot resume {run_dir.path}: the recipe changed at "
                          f"{', '.join('[' + d + ']' for d in diffs)}; only steps/epochs, save policy, "
                          "[sample] and [eval] may change on resume (and the process count, with the global batch "
                          "kept)")
    length = [{k: part.get("train", {}).get(k) for k in ("steps", "epochs")} for part in (before, now)]
    if run_dir.read_manifest().get("status") == "completed" and not _longer(*length):
        told = ", ".join(f"{k} = {v}" for k, v in length[0].items() if v is not None)
        asked = ", ".join(f"{k} = {v}" for k, v in length[1].items() if v is not None)
        raise OutputError(f"{shown_recipe}: nothing to resume: the run in {run_dir.path} is completed ({told}"
                          + (f"; {asked} now would not train on: a resume replaces its LoRA, samples and evaluation with "
                             "an earlier step's" if length[0] != length[1] else "")
                          + "); raise [train.steps] (or epochs) to train on, `lora-run eval` evaluates its LoRA again, "
                          "--overwrite starts it over")


def _longer(before: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether the run's length (``[train] steps`` or ``epochs``) is now longer. A completed run resumes only for
    that: the same or a shorter length would write an earlier step's LoRA over the one it finished with. Where the
    length changed from steps to epochs (or back) the backend knows the step count (the native backend refuses a
    run shorter than its newest checkpoint)."""
    for key in ("steps", "epochs"):
        old, new = before.get(key), now.get(key)
        if isinstance(old, (int, float)) and isinstance(new, (int, float)):
            return new > old
    return before != now


def dataset_changes(saved: dict[str, Any], now: dict[str, dict[str, str]]) -> list[str]:
    """What changed between the per-file record of a run's dataset and the dataset now."""
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old is not None and not isinstance(old, dict):   # a damaged record: it cannot vouch for this image
            old = {}
        if old is None:
            out.append(f"added image {shown(key)}")
        elif new is None:
            out.append(f"removed image {shown(key)}")
        else:
            if old.get("image") != new.get("image"):
                out.append(f"image {shown(key)} changed")
            if old.get("caption") != new.get("caption"):
                out.append(f"caption of {shown(key)} changed")
    return out


def check_dataset_unchanged(run_dir: RunDir, report: Any, shown_recipe: str) -> None:
    record = run_dir.file(DATASET_RECORD)
    changes: list[str] = []
    saved: Any = None
    if record.is_file():
        try:
            saved = parse_json(read_limited(record, "json", JSON_LIMIT)).get("files", {})
        except (OSError, ValueError, AttributeError, FileProblem):
            saved = None
        if isinstance(saved, dict):
            changes = dataset_changes(saved, report.files)
    if not isinstance(saved, dict):
        # no per-file record, or one that does not read as one (not JSON, another shape): the manifest's hash of the
        # whole dataset still tells a change (a damaged record must not let a changed dataset through)
        recorded = run_dir.read_manifest().get("dataset")
        old_hash = recorded.get("hash") if isinstance(recorded, dict) else None
        if old_hash and old_hash != report.dataset_hash:
            why = "is damaged" if os.path.lexists(record) else "is missing"
            changes = [f"the dataset hash differs (this run folder's per-file record {DATASET_RECORD} {why}, so the "
                       "files cannot be named)"]
    if changes:
        shown_changes = "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more" if len(changes) > 12 else "")
        raise OutputError(f"{shown_recipe}: cannot resume {shown(run_dir.path)}: the dataset changed since the run "
                          f"started ({len(changes)} change(s): {shown_changes}); restore it, start a new run, or pass "
                          "--allow-dataset-change to continue training on the changed dataset")
