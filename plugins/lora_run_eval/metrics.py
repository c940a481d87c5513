"""The identity metrics, overfit/leakage signals, the §9 failure diagnosis and the best-checkpoint rule.

Every number here is documented with its formula and threshold in ``docs/evaluation.md``; the constants
below are the thresholds that page names. Inputs are plain records (:class:`Sample`, :class:`Subject`); the
output is a JSON-able dict. numpy is imported inside functions.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs

from .faces import Embedder, FaceResult
from .imagesim import Signature, image_distance, signature_of

# ----------------------------------------------------------------------------------------------- thresholds
MATCH_SCORE = 0.5               # score > 0.5 ⇔ mean distance to the subject < τ (the embedder's threshold)
CARBON_SSIM_DISTANCE = 0.08     # two images are carbon copies when 1 − SSIM(64×64 gray) < 0.08 …
CARBON_HASH_BITS = 4            # … or their 64-bit DCT hashes differ in at most 4 bits
SAME_POSE_SPREAD = 0.03         # a group's mean pairwise pose distance below this = "same pose every time"
FLAG_RATE = 0.5                 # a signal is flagged when it holds for at least half of the cases
FACE_RATE_MIN = 0.5             # below this share of images with a face, identity is not judged
LEAK_RATE_MAX = 0.5             # control images matching the subject at ≥ 50 % = leakage
MEMORISED_RATE = 0.25           # ≥ 25 % of the trigger (or of the control) images are copies of a training photo
FRONTAL_YAW = 0.15              # |yaw proxy| below this counts as a frontal photo
FRONTAL_MIN_PHOTOS = 5          # the angle check needs at least this many subject faces
STRENGTH_DROP = 0.05            # identity at the top strength this far below the best = over-strength
PENALTY_LEAK = 0.5              # best-checkpoint quality = identity − 0.5·leak_rate − 0.5·carbon_copy_rate
PENALTY_CARBON = 0.5
TIE = 0.01                      # qualities within 0.01 are a tie: the earlier checkpoint wins
IDENTITY_FLAT = 0.01            # identity gained less than this since the best earlier checkpoint = flat
LOSS_FALLING = 0.05             # windowed mean loss dropped by more than 5 % = still falling
PAIR_CAP = 100                  # at most this many images per group enter the pairwise comparisons


@attrs.define
class Sample:
    """One generated (or scored) image and where in the grid it sits."""

    path: str
    name: str = ""
    prompt_index: int | None = None
    prompt: str | None = None
    control: bool = False
    strength: float | None = None
    seed: int | None = None
    result: FaceResult | None = None
    signature: Signature | None = None

    @property
    def blank(self) -> bool:
        return self.signature is not None and self.signature.blank

    @property
    def comparable(self) -> Signature | None:
        """The signature to compare with others: none for a blank image (every blank image is the same picture, so
        it would count as a carbon copy of every other: a pipeline's NaNs are not overtraining)."""
        return None if self.signature is None or self.signature.blank else self.signature


@attrs.define
class Subject:
    """The subject's training photos, embedded."""

    results: list[FaceResult]
    signatures: list[Signature]

    @property
    def faces(self) -> list[Any]:
        return [r.face for r in self.results if r.face is not None]


def embed_subject(embedder: Embedder, paths: Iterable[Path | str]) -> Subject:
    paths = list(paths)
    return Subject(embedder.embed_paths(paths), [s for s in (signature_of(p) for p in paths) if s is not None])


def embed_samples(embedder: Embedder, samples: Sequence[Sample]) -> list[Sample]:
    for s, result in zip(samples, embedder.embed_paths([s.path for s in samples])):
        s.result = result
        s.signature = signature_of(s.path)
    return samples


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def score_from_distance(distance: float, threshold: float) -> float:
    """Identity score: 1 − d / (2τ). 1 = the same embedding; 0.5 = exactly at the same-person threshold."""
    return 1.0 - distance / (2.0 * threshold)


def _pose_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _carbon(a: Signature, b: Signature) -> tuple[float, int, bool]:
    ssim_d, bits = image_distance(a, b)
    return ssim_d, bits, ssim_d < CARBON_SSIM_DISTANCE or bits <= CARBON_HASH_BITS


def reference_strength(strengths: Iterable[float | None]) -> float | None:
    """The strength closest to 1.0 (ties: the lower one); None when the images carry no strength."""
    values = sorted({s for s in strengths if s is not None})
    if not values:
        return None
    return min(values, key=lambda s: (abs(s - 1.0), s))


def subject_summary(subject: Subject, embedder: Embedder) -> dict[str, Any]:
    faces = subject.faces
    tau = embedder.threshold
    loo = []
    for i, f in enumerate(faces):
        others = [embedder.distance(f.embedding, g.embedding) for j, g in enumerate(faces) if j != i]
        if others:
            loo.append(sum(others) / len(others))
    yaws = [f.pose()[3] for f in faces]
    return {
        "images": len(subject.results),
        "faces": len(faces),
        "no_face": [{"path": r.path, "note": r.note} for r in subject.results if r.face is None],
        "self_distance": _mean(loo),
        "self_score": _mean(score_from_distance(d, tau) for d in loo),
        "yaw": {"min": min(yaws), "max": max(yaws)} if yaws else None,
    }


BLANK_NOTE = "blank image (one flat colour: NaNs in the generation?)"


def _image_record(s: Sample, subject_faces: list[Any], embedder: Embedder) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": s.name or Path(s.path).stem, "path": s.path, "prompt_index": s.prompt_index,
                           "control": s.control, "strength": s.strength, "seed": s.seed, "face": False,
                           "faces_found": 0, "note": "", "distance": None, "nearest_distance": None,
                           "score": None, "match": False, "blank": s.blank}
    r = s.result
    if r is None or r.face is None:
        rec["note"] = BLANK_NOTE if s.blank else r.note if r is not None else "not embedded"
        return rec
    rec.update(face=True, faces_found=r.faces_found, box=[round(v, 1) for v in r.face.box],
               pose=[round(v, 4) for v in r.face.pose()])
    if subject_faces:
        dists = [embedder.distance(r.face.embedding, f.embedding) for f in subject_faces]
        mean_d = sum(dists) / len(dists)
        score = score_from_distance(mean_d, embedder.threshold)
        rec.update(distance=mean_d, nearest_distance=min(dists), score=score, match=score > MATCH_SCORE)
        if embedder.metric == "cosine":
            rec["cosine"] = 1.0 - mean_d
    return rec


def _rates(records: list[dict[str, Any]], measured: bool = True) -> dict[str, Any]:
    """Counts and rates of a set of image records; ``measured`` False when there is no subject face to compare with
    (then no image can match or not match: the match rate is None, not 0)."""
    faces = [r for r in records if r["face"]]
    return {
        "images": len(records),
        "faces": len(faces),
        "face_rate": len(faces) / len(records) if records else None,
        "score": _mean(r["score"] for r in faces),
        "distance": _mean(r["distance"] for r in faces),
        "match_rate": (sum(1 for r in records if r["match"]) / len(records)) if records and measured else None,
    }


def _pairs(items: list[Any]) -> Iterable[tuple[Any, Any]]:
    return itertools.combinations(items[:PAIR_CAP], 2)


def _diversity(samples: list[Sample], embedder: Embedder) -> dict[str, Any]:
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.control, s.prompt_index, s.strength), []).append(s)
    out_groups, carbon_pairs, all_pairs = [], 0, 0
    ssim_all, bits_all, emb_all = [], [], []
    same_pose_groups = pose_groups = 0
    for (control, prompt_index, strength), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        sigs = [m for m in members if m.comparable is not None]
        ssim_d, bits, carbon = [], [], 0
        for a, b in _pairs(sigs):
            d, h, c = _carbon(a.comparable, b.comparable)
            ssim_d.append(d)
            bits.append(h)
            carbon += int(c)
        faces = [m.result.face for m in members if m.result is not None and m.result.face is not None]
        emb = [embedder.distance(a.embedding, b.embedding) for a, b in _pairs(faces)]
        poses = [f.pose() for f in faces]
        pose = _mean(_pose_distance(a, b) for a, b in _pairs(poses))
        if len(faces) >= 2 and pose is not None:
            pose_groups += 1
            same_pose_groups += int(pose < SAME_POSE_SPREAD)
        n_pairs = len(ssim_d)
        carbon_pairs += carbon
        all_pairs += n_pairs
        ssim_all += ssim_d
        bits_all += bits
        emb_all += emb
        out_groups.append({"control": control, "prompt_index": prompt_index, "strength": strength,
                           "images": len(members),
                           "pairs": n_pairs, "ssim_distance": _mean(ssim_d),
                           "hash_distance": _mean(b / 64 for b in bits), "embedding_distance": _mean(emb),
                           "pose_spread": pose, "carbon_copies": carbon,
                           "same_pose": pose is not None and len(faces) >= 2 and pose < SAME_POSE_SPREAD})
    return {
        "groups": out_groups,
        "pairs": all_pairs,
        "carbon_copy_pairs": carbon_pairs,
        "carbon_copy_rate": carbon_pairs / all_pairs if all_pairs else None,
        "ssim_distance": _mean(ssim_all),
        "hash_distance": _mean(b / 64 for b in bits_all),
        "embedding_distance": _mean(emb_all),
        "same_pose_groups": same_pose_groups,
        "pose_groups": pose_groups,
        "same_pose": pose_groups > 0 and same_pose_groups / pose_groups >= FLAG_RATE,
    }


def _prompt_following(trigger: list[Sample]) -> dict[str, Any]:
    """Same seed and strength, different trigger prompts: carbon copies mean the prompt is ignored."""
    by_cell: dict[tuple, list[Sample]] = {}
    for s in trigger:
        if s.prompt_index is not None and s.comparable is not None:
            by_cell.setdefault((s.strength, s.seed), []).append(s)
    pairs = carbon = 0
    for members in by_cell.values():
        for a, b in _pairs(members):
            if a.prompt_index == b.prompt_index:
                continue
            pairs += 1
            carbon += int(_carbon(a.comparable, b.comparable)[2])
    rate = carbon / pairs if pairs else None
    return {"pairs": pairs, "carbon_copies": carbon, "rate": rate,
            "ignored": rate is not None and rate >= FLAG_RATE}


def _memorised(samples: list[Sample], subject: Subject) -> tuple[list[str], int]:
    """Names of the images that are carbon copies of a subject photo, and how many images were compared
    (those with a readable signature that are not blank; none when no subject photo could be read)."""
    if not subject.signatures:
        return [], 0
    out, compared = [], 0
    for s in samples:
        if s.comparable is None:
            continue
        compared += 1
        if any(_carbon(s.comparable, t)[2] for t in subject.signatures):
            out.append(s.name or Path(s.path).stem)
    return out, compared


def analyze(samples: Sequence[Sample], subject: Subject, embedder: Embedder, *,
            text_encoder_trained: bool | None = None) -> dict[str, Any]:
    """Every per-LoRA metric and signal for one set of images (a grid, or a scored folder)."""
    samples = list(samples)
    subject_faces = subject.faces
    measured = bool(subject_faces)      # no subject face: nothing matches or fails to match (rates None, not 0)
    records = [_image_record(s, subject_faces, embedder) for s in samples]
    by_sample = dict(zip(map(id, samples), records))
    trigger = [s for s in samples if not s.control]
    control = [s for s in samples if s.control]
    ref = reference_strength(s.strength for s in trigger)
    at_ref = [by_sample[id(s)] for s in trigger if ref is None or s.strength == ref]
    identity = {"reference_strength": ref, **_rates(at_ref, measured),
                "all_strengths": _rates([by_sample[id(s)] for s in trigger], measured)}
    strengths = sorted({s.strength for s in samples if s.strength is not None})
    curve = []
    for st in strengths:
        row = {"strength": st, **_rates([by_sample[id(s)] for s in trigger if s.strength == st], measured)}
        ctl = _rates([by_sample[id(s)] for s in control if s.strength == st])
        row["leak_rate"] = (sum(1 for s in control if s.strength == st and by_sample[id(s)]["match"])
                            / ctl["faces"]) if ctl["faces"] and measured else None
        curve.append(row)
    prompts: dict[int, dict[str, Any]] = {}
    for s in trigger:
        if s.prompt_index is not None and (ref is None or s.strength == ref):
            prompts.setdefault(s.prompt_index, {"index": s.prompt_index, "prompt": s.prompt, "records": []})
            prompts[s.prompt_index]["records"].append(by_sample[id(s)])
    identity["by_prompt"] = [{"index": p["index"], "prompt": p["prompt"], **_rates(p["records"], measured)}
                             for _, p in sorted(prompts.items())]
    leak_records = [by_sample[id(s)] for s in control if ref is None or s.strength == ref]
    leak_faces = [r for r in leak_records if r["face"]]
    leakage = {"images": len(leak_records), "faces": len(leak_faces),
               "leak_rate": (sum(1 for r in leak_faces if r["match"]) / len(leak_faces))
               if leak_faces and measured else None,
               "score": _mean(r["score"] for r in leak_faces),
               "control_prompts": sorted({s.prompt for s in control if s.prompt})}
    leakage["flagged"] = leakage["leak_rate"] is not None and leakage["leak_rate"] >= LEAK_RATE_MAX
    diversity = _diversity(samples, embedder)
    diversity["prompt_following"] = _prompt_following(trigger)
    # each rate over its own kind: control images never dilute the trigger images' memorisation
    for key, group in (("memorised", trigger), ("memorised_control", control)):
        names, compared = _memorised(group, subject)
        diversity[key] = names
        diversity[f"{key}_compared"] = compared
        diversity[f"{key}_rate"] = len(names) / compared if compared else None
    blank = [r["name"] for r in records if r["blank"]]
    result = {
        "embedder": embedder.describe(),
        "subject": subject_summary(subject, embedder),
        "blank": {"images": len(blank), "of": len(records), "names": blank},
        "identity": identity,
        "strength_curve": curve,
        "leakage": leakage,
        "diversity": diversity,
        "images": records,
    }
    result["quality"] = quality(result)
    result["failures"] = diagnose(result, text_encoder_trained=text_encoder_trained)
    return _round(result)


def quality(metrics: dict[str, Any]) -> float | None:
    """Best-checkpoint quality: identity − 0.5·leak_rate − 0.5·carbon_copy_rate (None without faces)."""
    ident = metrics["identity"]
    if ident["score"] is None or (ident["face_rate"] or 0.0) < FACE_RATE_MIN:
        return None
    leak = metrics["leakage"]["leak_rate"] or 0.0
    carbon = metrics["diversity"]["carbon_copy_rate"] or 0.0
    return ident["score"] - PENALTY_LEAK * leak - PENALTY_CARBON * carbon


# ------------------------------------------------------------------------------------------ the §9 table
FIXES = {
    "no subject face": ("no face was found in the subject's own photos, so nothing can be compared",
                        "Use photos where the face is visible (frontal or three-quarter, at least about 80 pixels "
                        "wide); see the subject photos in the report."),
    "no face": ("the generated images show no detectable face",
                "Look at the grid. No person at all: the model or the LoRA is broken (or far too strong). Small or "
                "profile faces: use close-up prompts, or the `onnx` embedder with an SCRFD detector."),
    "weak identity": ("undertraining (playbook §9)", "More steps, higher rank."),
    "sameface": ("overtraining (playbook §9)", "Early stop (pick the best checkpoint), LoRA dropout, "
                 "regularisation images (priors)."),
    "prompt brittleness": ("text-encoder overfit (playbook §9)", "Freeze the text encoder early "
                           "([text_encoder] train_fraction ≤ 0.5, lr_ratio 0.3–0.5)."),
    "angle failure": ("poor dataset (playbook §9)", "Add side and profile photos of the subject."),
    "NaNs": ("non-finite values in the LoRA or the generation: LR too high, fp16 overflow (playbook §9)",
             "Lower the learning rate and train in bf16 ([train] mixed_precision); a LoRA from another tool: check "
             "its weights for NaN/Inf."),
}


def _failure(name: str, evidence: list[str], fix_extra: str = "") -> dict[str, Any]:
    cause, fix = FIXES[name]
    return {"name": name, "cause": cause, "fix": fix + (" " + fix_extra if fix_extra else ""), "evidence": evidence}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def diagnose(m: dict[str, Any], *, text_encoder_trained: bool | None = None,
             overfit: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Name the failures of the playbook's §9 table that the signals show, each with its evidence and fix."""
    out = []
    ident, leak, div, subj = m["identity"], m["leakage"], m["diversity"], m["subject"]
    at = f" at strength {ident['reference_strength']}" if ident["reference_strength"] is not None else ""
    if subj["images"] and not subj["faces"]:
        out.append(_failure("no subject face", [f"no face found in any of the {subj['images']} subject photos"]))
    blank = m.get("blank") or {}
    if blank.get("images"):
        shown = ", ".join(blank["names"][:5]) + (", …" if len(blank["names"]) > 5 else "")
        out.append(_failure("NaNs", [f"{blank['images']} of {blank['of']} images are blank, one flat colour (what a "
                                     f"pipeline writes for NaN values): {shown}; they are left out of the "
                                     "carbon-copy, prompt-following and memorisation comparisons"]))
    if ident["images"] and (ident["face_rate"] or 0.0) < FACE_RATE_MIN:
        out.append(_failure("no face", [f"faces found in {_pct(ident['face_rate'])} of the trigger images{at} "
                                        f"(identity needs ≥ {_pct(FACE_RATE_MIN)})"]))
    elif ident["score"] is not None and ident["score"] <= MATCH_SCORE:
        ev = [f"identity score {_num(ident['score'])}{at} ≤ {MATCH_SCORE} (the same-person threshold); "
              f"match rate {_pct(ident['match_rate'])}"]
        if subj["self_score"] is not None and subj["self_score"] <= MATCH_SCORE:
            ev.append(f"the subject's own photos score only {_num(subj['self_score'])} against each other: "
                      "check the dataset first (one person, faces visible, playbook's canonical rule)")
        out.append(_failure("weak identity", ev))
    same: list[str] = []
    if leak["flagged"]:
        same.append(f"identity leaks into the control prompt: {_pct(leak['leak_rate'])} of its faces{at} match "
                    "the subject (they should not)")
    rate = div["carbon_copy_rate"]
    if rate is not None and rate >= FLAG_RATE:
        same.append(f"carbon copies across seeds: {div['carbon_copy_pairs']} of {div['pairs']} image pairs "
                    f"({_pct(rate)})")
    if div["same_pose"]:
        same.append(f"same pose every time in {div['same_pose_groups']} of {div['pose_groups']} prompt×strength "
                    f"groups (pose spread < {SAME_POSE_SPREAD})")
    for key, kind in (("memorised", "trigger"), ("memorised_control", "control")):
        rate = div.get(f"{key}_rate")
        if rate is not None and rate >= MEMORISED_RATE:
            same.append(f"{len(div[key])} of {div[f'{key}_compared']} {kind} images ({_pct(rate)}) are near "
                        "copies of a training photo" + (" (the control prompt should not show the subject at "
                                                         "all)" if kind == "control" else ""))
    if overfit and overfit.get("flagged"):
        same.append(overfit["evidence"])
    if same:
        out.append(_failure("sameface", same))
    brittle: list[str] = []
    rows = [p for p in ident["by_prompt"] if p["images"]]
    good = [p for p in rows if p["score"] is not None and p["score"] > MATCH_SCORE
            and (p["face_rate"] or 0) >= FACE_RATE_MIN]
    bad = [p for p in rows if p not in good]
    if good and bad:
        brittle.append(f"identity holds for {len(good)} prompt(s) but fails for: " + "; ".join(
            f"\"{p['prompt']}\" (score {_num(p['score'])}, faces {_pct(p['face_rate'])})" for p in bad))
    follow = div["prompt_following"]
    if follow["ignored"]:
        brittle.append(f"the prompt is ignored: with the same seed, {_pct(follow['rate'])} of image pairs from "
                       "different prompts are carbon copies")
    if brittle:
        extra = "" if text_encoder_trained else ("The text encoder was not trained here: try a lower strength or "
                                                 "an earlier checkpoint, and vary the captions (playbook §6).")
        out.append(_failure("prompt brittleness", brittle, extra if text_encoder_trained is not None else ""))
    yaw = subj["yaw"]
    if (subj["faces"] >= FRONTAL_MIN_PHOTOS and not subj["no_face"] and yaw is not None
            and max(abs(yaw["min"]), abs(yaw["max"])) < FRONTAL_YAW):
        out.append(_failure("angle failure", [f"all {subj['faces']} subject photos are frontal (|yaw| < "
                                              f"{FRONTAL_YAW}): the LoRA will struggle with other angles"]))
    return out


def strength_notes(m: dict[str, Any]) -> list[str]:
    """Plain-language reading of the identity-vs-strength curve."""
    rows = [r for r in m["strength_curve"] if r["score"] is not None]
    if len(rows) < 2:
        return []
    best = max(rows, key=lambda r: r["score"])
    top = rows[-1]
    notes = [f"identity peaks at strength {best['strength']} (score {best['score']:.2f})"]
    if top is not best and top["score"] < best["score"] - STRENGTH_DROP:
        notes.append(f"above strength {best['strength']} identity drops (score {top['score']:.2f} at "
                     f"{top['strength']}): the LoRA is over-strong there")
    if rows[0]["score"] > MATCH_SCORE and rows[0]["strength"] == 0:
        notes.append("identity holds even at strength 0, without the LoRA: the base model already draws this person "
                     "(or the embedder cannot tell these faces apart), so the score does not show what the LoRA learned")
    elif rows[0]["score"] > MATCH_SCORE:
        notes.append(f"identity already holds at strength {rows[0]['strength']}")
    return notes


# ------------------------------------------------------------------------------ loss, checkpoints, best
def read_loss(path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a JSON-lines file (``losslog.read_rows``); bad lines are skipped."""
    from .losslog import read_rows

    out = []
    for row in read_rows(path):
        try:
            step, loss = int(row["step"]), float(row["loss"])
        except (ValueError, KeyError, TypeError, OverflowError):
            continue
        if math.isfinite(loss):
            out.append((step, loss))
    return sorted(out)


def window_loss(history: list[tuple[int, float]], step: int) -> float | None:
    """Mean loss over the logged steps in (step − w, step], w = max(5, 10 % of the logged span)."""
    if not history:
        return None
    w = max(5, (history[-1][0] - history[0][0] + 1) // 10)
    vals = [loss for s, loss in history if step - w < s <= step]
    return sum(vals) / len(vals) if vals else None


def overfit_signal(history: list[tuple[int, float]], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss still falling while identity stopped improving, from the evaluated LoRAs (step-ordered)."""
    scored = sorted([e for e in entries if e.get("step") is not None and e.get("identity") is not None],
                    key=lambda e: e["step"])
    if len(scored) < 2 or not history:
        why = "needs the loss history and at least two evaluated checkpoints with faces"
        return {"measured": False, "flagged": False, "evidence": why}
    last = scored[-1]
    best_before = max(scored[:-1], key=lambda e: e["identity"])
    gain = last["identity"] - best_before["identity"]
    l_then, l_now = window_loss(history, best_before["step"]), window_loss(history, last["step"])
    drop = (l_then - l_now) / l_then if l_then and l_now is not None and l_then > 0 else None
    flagged = gain < IDENTITY_FLAT and drop is not None and drop > LOSS_FALLING
    evidence = (f"loss fell {_pct(drop)} between step {best_before['step']} and step {last['step']} while "
                f"identity changed by {gain:+.3f} (best earlier: {best_before['label']})")
    return {"measured": True, "flagged": flagged, "identity_gain": round(gain, 4),
            "loss_drop": None if drop is None else round(drop, 4), "from_step": best_before["step"],
            "to_step": last["step"], "evidence": evidence}


def pick_best(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The documented rule: highest quality (identity − 0.5·leak − 0.5·carbon copies); ties within 0.01 go
    to the earlier step. LoRAs whose identity could not be measured are not eligible."""
    eligible = [e for e in entries if e.get("quality") is not None]
    if not eligible:
        return {"label": None, "reason": "no evaluated LoRA produced faces in at least half of its trigger "
                                         "images, so none can be ranked"}
    top = max(e["quality"] for e in eligible)
    tied = [e for e in eligible if e["quality"] >= top - TIE]
    best = min(tied, key=lambda e: (e["step"] if e.get("step") is not None else math.inf))
    others = sorted((e for e in eligible if e is not best), key=lambda e: -e["quality"])
    reason = (f"{best['label']} has the highest quality {best['quality']:.3f} = identity {best['identity']:.3f} "
              f"− {PENALTY_LEAK}·leak {best['leak_rate'] or 0:.2f} − {PENALTY_CARBON}·carbon copies "
              f"{best['carbon_copy_rate'] or 0:.2f}")
    if others:
        reason += f"; next: {others[0]['label']} ({others[0]['quality']:.3f})"
    if len(tied) > 1:
        reason += f"; {len(tied)} LoRAs within {TIE} of each other, the earliest step wins (less overtraining)"
    skipped = [e["label"] for e in entries if e.get("quality") is None]
    if skipped:
        reason += f"; not ranked (too few faces): {', '.join(skipped)}"
    return {"label": best["label"], "step": best.get("step"), "path": best.get("path"),
            "quality": best["quality"], "reason": reason}


def summary_entry(label: str, step: int | None, path: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "step": step, "path": path, "quality": metrics["quality"],
            "identity": metrics["identity"]["score"], "face_rate": metrics["identity"]["face_rate"],
            "match_rate": metrics["identity"]["match_rate"], "leak_rate": metrics["leakage"]["leak_rate"],
            "carbon_copy_rate": metrics["diversity"]["carbon_copy_rate"],
            "failures": [f["name"] for f in metrics["failures"]]}
