"""Signals and the §9 diagnosis on real faces laid out as an evaluation grid; the pure rules on numbers."""
from __future__ import annotations

import pytest
from PIL import Image

from lora_run_eval import metrics as M

from .conftest import astronaut_scene, face_free, make_grid, other_person


@pytest.fixture(scope="module")
def subject(dlib_embedder, subject_dir):
    return M.embed_subject(dlib_embedder, sorted(subject_dir.glob("*.png")))


def run(tmp_path, dlib_embedder, subject, trigger, control, **kw):
    samples = make_grid(tmp_path, trigger, control, **kw)
    M.embed_samples(dlib_embedder, samples)
    return M.analyze(samples, subject, dlib_embedder, text_encoder_trained=False)


def names(metrics):
    return [f["name"] for f in metrics["failures"]]


def test_a_healthy_lora_has_no_failure(tmp_path, dlib_embedder, subject):
    m = run(tmp_path, dlib_embedder, subject,
            trigger=lambda pi, st, seed: astronaut_scene(pi * 7 + seed + (3 if st == 1.0 else 0)),
            control=lambda st, seed: other_person(seed + (10 if st == 1.0 else 0)))
    assert names(m) == []
    ident = m["identity"]
    assert ident["reference_strength"] == 1.0 and ident["face_rate"] == 1.0 and ident["match_rate"] == 1.0
    assert ident["score"] > 0.75
    assert m["subject"]["faces"] == 3 and m["subject"]["self_score"] > 0.75
    assert m["leakage"]["faces"] >= 2 and m["leakage"]["leak_rate"] == 0.0 and not m["leakage"]["flagged"]
    assert m["diversity"]["carbon_copy_rate"] < 0.5 and not m["diversity"]["same_pose"]
    assert [r["strength"] for r in m["strength_curve"]] == [0.8, 1.0]
    assert len(m["identity"]["by_prompt"]) == 3 and len(m["images"]) == 24
    assert m["quality"] == pytest.approx(ident["score"] - 0.5 * 0.0 - 0.5 * m["diversity"]["carbon_copy_rate"],
                                         abs=1e-3)


def test_sameface_carbon_copies_and_leakage(tmp_path, dlib_embedder, subject):
    same = astronaut_scene(0)
    m = run(tmp_path, dlib_embedder, subject, trigger=lambda pi, st, seed: same,
            control=lambda st, seed: astronaut_scene(seed))
    assert "sameface" in names(m)
    evidence = " ".join(next(f for f in m["failures"] if f["name"] == "sameface")["evidence"])
    assert "leaks into the control prompt" in evidence and "carbon copies across seeds" in evidence
    assert "same pose every time" in evidence
    assert m["leakage"]["leak_rate"] == 1.0 and m["leakage"]["flagged"]
    assert m["diversity"]["prompt_following"]["ignored"]          # every prompt gives the same picture
    assert "prompt brittleness" in names(m)
    fix = next(f for f in m["failures"] if f["name"] == "sameface")["fix"]
    assert "Early stop" in fix


def test_weak_identity(tmp_path, dlib_embedder, subject):
    m = run(tmp_path, dlib_embedder, subject, trigger=lambda pi, st, seed: other_person(pi * 6 + seed * 2 + int(st)),
            control=lambda st, seed: face_free()["coffee"], prompts=2, seeds=(1, 2))
    assert "weak identity" in names(m)
    assert m["identity"]["score"] < 0.5 and m["identity"]["match_rate"] < 0.5
    assert m["leakage"]["faces"] == 0 and m["leakage"]["leak_rate"] is None
    weak = next(f for f in m["failures"] if f["name"] == "weak identity")
    assert weak["fix"] == "More steps, higher rank."


def test_prompt_brittleness_when_identity_holds_only_for_the_portrait(tmp_path, dlib_embedder, subject):
    def trigger(pi, st, seed):
        return astronaut_scene(seed + 3 * pi) if pi == 0 else other_person(pi * 5 + seed)

    m = run(tmp_path, dlib_embedder, subject, trigger=trigger, control=lambda st, seed: other_person(40 + seed),
            prompts=2, strengths=(1.0,), seeds=(1, 2))
    brittle = next(f for f in m["failures"] if f["name"] == "prompt brittleness")
    assert "ohwx prompt 1" in brittle["evidence"][0]
    assert "text encoder was not trained" in brittle["fix"]
    rows = {p["index"]: p for p in m["identity"]["by_prompt"]}
    assert rows[0]["score"] > 0.5 > rows[1]["score"]


def test_no_face_is_a_result_not_a_crash(tmp_path, dlib_embedder, subject):
    blank = face_free()["coffee"]       # a picture without a face (a flat colour is the NaNs failure, test_protocol)
    m = run(tmp_path, dlib_embedder, subject, trigger=lambda pi, st, seed: blank,
            control=lambda st, seed: blank, prompts=1, seeds=(1, 2))
    assert names(m)[0] == "no face"
    assert m["identity"]["face_rate"] == 0.0 and m["identity"]["score"] is None and m["quality"] is None
    assert all(r["note"] == "no face found" for r in m["images"])


def test_copies_of_training_photos_are_memorised(tmp_path, dlib_embedder, subject, subject_dir):
    train = Image.open(sorted(subject_dir.glob("*.png"))[0]).convert("RGB")
    m = run(tmp_path, dlib_embedder, subject, trigger=lambda pi, st, seed: train,
            control=lambda st, seed: other_person(seed), prompts=1, strengths=(1.0,), seeds=(1, 2))
    assert len(m["diversity"]["memorised"]) == 2


# ------------------------------------------------------------------------------------- pure rules
def entry(label, step, identity, leak=0.0, carbon=0.0, face_rate=1.0):
    metrics = {"identity": {"score": identity, "face_rate": face_rate, "match_rate": 1.0},
               "leakage": {"leak_rate": leak}, "diversity": {"carbon_copy_rate": carbon}, "failures": []}
    metrics["quality"] = M.quality(metrics)
    return M.summary_entry(label, step, f"/x/{label}.safetensors", metrics)


def test_best_checkpoint_rule():
    entries = [entry("step 100", 100, 0.55), entry("step 200", 200, 0.72, leak=0.1),
               entry("step 300", 300, 0.80, leak=0.6, carbon=0.4), entry("final", 400, None, face_rate=0.0)]
    best = M.pick_best(entries)
    assert best["label"] == "step 200" and best["step"] == 200
    assert best["quality"] == pytest.approx(0.72 - 0.05)
    assert "next: step 100" in best["reason"] and "not ranked (too few faces): final" in best["reason"]


def test_ties_go_to_the_earlier_checkpoint():
    best = M.pick_best([entry("late", 900, 0.705), entry("early", 300, 0.70)])
    assert best["label"] == "early" and "earliest step wins" in best["reason"]
    assert M.pick_best([entry("x", 1, None, face_rate=0.2)])["label"] is None


def test_loss_still_falling_while_identity_is_flat():
    history = [(s, 1.0 / (1 + s / 50)) for s in range(1, 401)]
    entries = [entry("step 100", 100, 0.60), entry("step 200", 200, 0.70), entry("step 400", 400, 0.695)]
    signal = M.overfit_signal(history, entries)
    assert signal["measured"] and signal["flagged"] and signal["from_step"] == 200 and signal["to_step"] == 400
    assert signal["loss_drop"] > 0.05
    improving = [entry("step 100", 100, 0.60), entry("step 400", 400, 0.75)]
    assert not M.overfit_signal(history, improving)["flagged"]
    flat_loss = [(s, 0.3) for s in range(1, 401)]
    assert not M.overfit_signal(flat_loss, entries)["flagged"]
    assert not M.overfit_signal([], entries)["measured"]


def test_small_rules():
    assert M.reference_strength([0.5, 0.8, 1.2]) == 0.8
    assert M.reference_strength([0.5, 1.0, 1.2]) == 1.0
    assert M.reference_strength([None]) is None
    assert M.score_from_distance(0.6, 0.6) == 0.5 and M.score_from_distance(0.0, 0.6) == 1.0
    assert M.window_loss([(s, float(s)) for s in range(1, 101)], 100) == pytest.approx(95.5)


def test_read_loss_skips_bad_lines(tmp_path):
    path = tmp_path / "loss.jsonl"
    path.write_text('{"step": 2, "loss": 0.5}\nnot json\n{"step": 1, "loss": 0.7}\n{"step": 3, "loss": null}\n')
    assert M.read_loss(path) == [(1, 0.7), (2, 0.5)]
    assert M.read_loss(tmp_path / "missing.jsonl") == []


def test_memorisation_rates_count_each_kind_of_image_separately(tmp_path, dlib_embedder, subject, subject_dir):
    """Trigger copies are a share of the trigger images, control copies a share of the control images."""
    train = Image.open(sorted(subject_dir.glob("*.png"))[0]).convert("RGB")
    m = run(tmp_path, dlib_embedder, subject,
            trigger=lambda pi, st, seed: train if (pi, seed) == (0, 1) else astronaut_scene(pi * 7 + seed),
            control=lambda st, seed: train if seed == 1 else other_person(seed), prompts=1, strengths=(1.0,),
            seeds=(1, 2, 3))
    div = m["diversity"]
    assert div["memorised"] == ["p0-s1-seed1"] and div["memorised_compared"] == 3
    assert div["memorised_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert div["memorised_control"] == ["p1-s1-seed1"] and div["memorised_control_compared"] == 3
    evidence = " ".join(next(f for f in m["failures"] if f["name"] == "sameface")["evidence"])
    assert "1 of 3 trigger images (33%) are near copies" in evidence
    assert "1 of 3 control images (33%) are near copies" in evidence
