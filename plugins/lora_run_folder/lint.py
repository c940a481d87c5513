"""The dataset lint (playbook §6: "fix the dataset first"): this package's ``lint_dataset`` hook, run by
`lora-run check` and before every run, for every dataset type.

Errors stop the run before any model loads; warnings and conversions are shown in a table.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Any

from lora_run.dataset import ERROR, INFO, WARNING, Item, LintReport
from lora_run.files import FileProblem, printable, shown
from lora_run.schema import Recipe

from . import has_trigger, training_caption, trigger_pattern
from .images import ImageProblem, decode_rgb, read_image_bytes

EXTREME_ASPECT = 3.0
NEAR_DUPLICATE_BITS = 4
#: the playbook's size of the regularisation sets together (§6: "20–50 generic people")
REG_IMAGES = (20, 50)
#: class words: a trigger that is one of them is no "unique, uncommon string" (playbook §6)
CLASS_WORDS = frozenset({"person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people", "human", "guy",
                         "lady", "gentleman", "face", "portrait", "photo", "subject", "character", "model"})
#: the codes of the findings for an image that cannot be read or does not decode (the finding's message says why;
#: such an item has no digest in ``LintReport.files``): ``lora-run eval`` names the subject photos among them
NOT_DECODED = ("unreadable", "bad-image")


def file_key(item: Item) -> str:
    """An item's key in ``LintReport.files`` (its image's and caption's SHA-256, which the run folder records and a
    backend may check the bytes it reads against)."""
    return f"{item.subset}/{item.image.name}"


def _dhash(image: Any) -> int:
    small = image.convert("L").resize((9, 8))
    px = list(small.tobytes())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def _not_a_folder(path: str) -> str | None:
    """Why a dataset folder key's value is no folder, or None (os.path: an over-long or unreadable path is "not
    found", not a crash)."""
    if os.path.isdir(path):
        try:
            os.listdir(path)
        except OSError as exc:        # e.g. chmod 000: not "no images found"
            return f"folder cannot be read ({exc.strerror or exc})"
        return None
    return "is not a folder" if os.path.exists(path) else "folder not found"


def lint_dataset(recipe: Recipe, items: list[Item], report: LintReport | None = None) -> LintReport:
    """Check every image and caption into ``report``; the usable items are those without an error."""
    d = recipe.dataset
    report = report if report is not None else LintReport(usable=list(items))
    ok_items: list[Item] = []
    trigger = d.trigger.strip()
    subject = [i for i in items if not i.is_reg]
    report.counts = {"subject images": len(subject), "regularisation images": len(items) - len(subject)}
    missing = _not_a_folder(d.path) if not subject and d.path is not None else None
    if missing:
        report.add(ERROR, "no-folder", f"dataset.path: {missing}: {shown(d.path)}")
    elif not subject:
        report.add(ERROR, "no-images", f"no images found in {shown(d.path) if d.path is not None else 'the dataset'} "
                   "(looked for .jpg .jpeg .png .webp .bmp)")
    for n, reg in enumerate(d.regularization):
        missing = _not_a_folder(reg.path)
        if missing:
            report.add(ERROR, "no-reg-folder", f"dataset.regularization[{n}].path: {missing}: {shown(reg.path)}")
    shared_captions(items, report)
    digest = hashlib.sha256()
    seen_exact: dict[str, Path] = {}
    seen_near: list[tuple[int, Path]] = []
    for item in items:
        name = str(item.image)
        try:
            data = read_image_bytes(item.image)
        except FileProblem as exc:
            report.add(ERROR, NOT_DECODED[0], str(exc), name)
            continue
        try:
            opened = decode_rgb(data)    # one read: the bytes hashed are the bytes checked
        except ImageProblem as exc:
            report.add(ERROR, NOT_DECODED[1], str(exc), name)
            continue
        sha = opened.sha256
        for note in opened.notes:
            report.add(INFO, "converted", note, name)
        ok = _check_caption(item, recipe, trigger, report)
        w, h = opened.image.size  # type: ignore[attr-defined]
        if min(w, h) < d.bucket_min:
            report.add(WARNING, "too-small", f"{w}×{h} is smaller than the minimum bucket ({d.bucket_min} px); "
                       "it is skipped (we never upscale). Lower dataset.bucket_min or replace it", name)
            ok = False
        if max(w, h) / min(w, h) > EXTREME_ASPECT:
            report.add(WARNING, "extreme-aspect", f"{w}×{h} has an aspect ratio above {EXTREME_ASPECT}:1; it will "
                       "be cropped hard to fit a bucket", name)
        if sha in seen_exact:
            report.add(WARNING, "duplicate", f"identical to {seen_exact[sha]}", name)
        else:
            seen_exact[sha] = item.image
            fingerprint = _dhash(opened.image)
            for other_hash, other in seen_near:
                if bin(fingerprint ^ other_hash).count("1") <= NEAR_DUPLICATE_BITS:
                    report.add(WARNING, "near-duplicate", f"looks like a near copy of {other}", name)
                    break
            seen_near.append((fingerprint, item.image))
        caption_bytes = training_caption(item, d).encode("utf-8", "replace")
        digest.update(f"{item.subset}\0{item.image.name}\0{sha}\0".encode("utf-8", "surrogateescape"))
        digest.update(caption_bytes + b"\0")
        report.files[file_key(item)] = {"image": sha,
                                                           "caption": hashlib.sha256(caption_bytes).hexdigest()}
        if ok:
            ok_items.append(item)
    usable_subject = sum(not i.is_reg for i in ok_items)
    usable_reg = len(ok_items) - usable_subject
    if d.regularization and not REG_IMAGES[0] <= usable_reg <= REG_IMAGES[1]:
        few = usable_reg < REG_IMAGES[0]
        report.add(WARNING, "few-reg-images" if few else "many-reg-images",
                   f"{usable_reg} usable regularisation image{'s' * (usable_reg != 1)} in all; the playbook asks for "
                   f"{REG_IMAGES[0]}–{REG_IMAGES[1]} generic people (§6)"
                   + ("" if few else ": more outweigh the subject; use fewer or a smaller weight"))
    same_captions(ok_items, d, report)
    if trigger.lower() in CLASS_WORDS:
        report.add(WARNING, "common-trigger", f"the trigger \"{trigger}\" is a common class word: the playbook asks "
                   "for a unique, uncommon string (§6) such as \"ohwx\"; the LoRA would overwrite what the model "
                   f"knows as \"{trigger}\"")
    if subject and usable_subject < d.min_images:
        what = (f"{usable_subject} subject image{'s' * (usable_subject != 1)}" if usable_subject == len(subject) else
                f"{usable_subject} of the {len(subject)} subject images can be trained on (the others are named here)")
        report.add(WARNING, "few-images", f"only {what}; the playbook asks for 15–30 with mixed angles, lighting "
                   f"and framing (threshold: dataset.min_images = {d.min_images})")
    kept = {id(i) for i in ok_items}
    report.usable = [i for i in report.usable if id(i) in kept]
    report.dataset_hash = digest.hexdigest()
    if subject and not any(not i.is_reg for i in report.usable) and not report.errors:
        report.add(ERROR, "no-usable-images", "no subject image is usable (see the warnings above)")
    return report


def same_captions(items: list[Item], section: Any, report: LintReport) -> None:
    """Subject images trained with one caption (letter case and spacing aside): the playbook's "avoid repeating
    identical phrasing" (§6); one warning per caption, naming the files."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        if not item.is_reg and (item.caption or "").strip():
            groups.setdefault(" ".join(training_caption(item, section).lower().split()), []).append(item)
    for group in groups.values():
        if len(group) > 1:
            names = [shown(i.image.name) for i in group]
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            report.add(WARNING, "same-caption", f"{len(group)} subject images are trained with the same caption "
                       f"\"{training_caption(group[0], section)}\" ({listed}); the playbook asks to avoid repeating "
                       "identical phrasing (§6): describe what differs (pose, clothes, place, light)",
                       group[0].caption_file or group[0].image)


def shared_captions(items: list[Item], report: LintReport) -> None:
    """Images that read one caption file (``a.png`` and ``a.jpg`` beside one ``a.txt``): each is trained with it,
    which is seldom meant."""
    first: dict[Path, Path] = {}
    for item in items:
        if item.caption_file is None:
            continue
        other = first.setdefault(item.caption_file, item.image)
        if other != item.image:
            report.add(WARNING, "shared-caption", f"shares its caption file {shown(item.caption_file.name)} with "
                       f"{shown(other.name)}; rename one of the images and give it its own caption", item.image)


def _odd_characters(caption: str) -> str | None:
    """What is odd in a caption's text: line breaks inside it, or control characters (NUL, escape codes)."""
    lines = len(caption.splitlines())
    controls = sorted({c for c in caption if unicodedata.category(c) == "Cc" and c not in "\n\r\t"})
    if controls:
        return "control characters " + " ".join(printable(c) for c in controls)
    return f"{lines} lines (some trainers read only the first)" if lines > 1 else None


def _check_caption(item: Item, recipe: Recipe, trigger: str, report: LintReport) -> bool:
    d = recipe.dataset
    where = str(item.caption_file or item.image)
    if item.caption_error:
        report.add(ERROR, "bad-caption", item.caption_error, where)
        return False
    caption = (item.caption or "").strip()
    odd = _odd_characters(caption)
    if odd:
        report.add(WARNING, "odd-caption", f"the caption holds {odd}; it is trained as written", where)
    if item.is_reg:
        if not caption:
            report.add(INFO, "default-caption", f"no caption; uses \"{item.default_caption}\"", str(item.image))
        if trigger and has_trigger(caption, trigger, ignore_case=True):
            report.add(ERROR, "trigger-in-reg", f"regularisation caption contains the trigger \"{trigger}\"; it "
                       "must never appear there (playbook §6)", where)
            return False
        return True
    if item.caption is None or not caption:
        what = "missing caption file" if item.caption is None else "empty caption"
        if d.trigger_policy == "prepend":
            report.add(WARNING, "no-caption", f"{what}: trained with the trigger alone", str(item.image))
            return True
        report.add(ERROR, "no-caption", f"{what} (expected {item.image.with_suffix(d.caption_extension).name})",
                   str(item.image))
        return False
    if d.trigger_policy == "require" and trigger and not has_trigger(caption, trigger):
        report.add(ERROR, "trigger-missing", f"caption does not contain the trigger \"{trigger}\""
                   f"{_near_trigger(caption, trigger)} (or set dataset.trigger_policy = \"prepend\")", where)
        return False
    return True


def _near_trigger(caption: str, trigger: str) -> str:
    """What a caption holds instead of the trigger: the trigger in other letter case, or inside a longer word."""
    pattern = trigger_pattern(trigger, ignore_case=True)
    found = pattern.search(caption) if pattern is not None else None
    if found:
        return f"; it has \"{found.group(0)}\", which differs in case (T5 reads it as another token)"
    at = caption.lower().find(trigger.lower())
    if at >= 0:
        start, end = at, at + len(trigger)
        while start > 0 and (caption[start - 1].isalnum() or caption[start - 1] == "_"):
            start -= 1
        while end < len(caption) and (caption[end].isalnum() or caption[end] == "_"):
            end += 1
        return f"; it has \"{caption[start:end]}\", a different word (the trigger must stand as a word of its own)"
    return ""
