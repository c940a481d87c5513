"""The playbook's §7 protocol, checked against numbers computed here from the embedder's own output: the identity
score is the mean distance to every subject face (not the distance to the mean face, not the nearest one), scaled by
τ; the rates count the images the documentation says they count. Each independent computation has a planted-mistake
control (a plausible wrong formula) that the comparison must tell apart. Then the protocol's edges: no face in the
subject photos, a flat-colour (NaN) grid, duplicate prompts, the trigger written out, an ONNX threshold that would
make τ zero."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_run_eval import metrics as M
from lora_run_eval.evaluator import grid_jobs
from lora_run_eval.faces import Face, FaceResult, OnnxEmbedder
from lora_run_eval.options import OnnxOptions

from .conftest import astronaut_scene, face_free, make_grid, other_person, save


@pytest.fixture(scope="module")
def subject(dlib_embedder, subject_dir):
    return M.embed_subject(dlib_embedder, sorted(subject_dir.glob("*.png")))


def test_identity_numbers_recomputed_from_the_embeddings(tmp_path, dlib_embedder, subject):
    def trigger(pi, st, seed):
        return astronaut_scene(pi * 7 + seed) if (pi, seed) != (1, 2) else other_person(seed + 30)

    samples = make_grid(tmp_path, trigger, lambda st, seed: astronaut_scene(seed + 20) if seed == 1 else
                        other_person(seed), prompts=2, strengths=(0.5, 1.0), seeds=(1, 2, 3))
    M.embed_samples(dlib_embedder, samples)
    m = M.analyze(samples, subject, dlib_embedder)

    ref_faces = np.stack([f.embedding for f in subject.faces])
    tau = 0.6                                                # dlib's documented threshold
    assert len(ref_faces) == 3

    def by_hand(embedding):                                  # mean Euclidean distance to each subject face
        return float(np.mean(np.sqrt(((ref_faces - embedding) ** 2).sum(axis=1))))

    def planted(embedding):                                  # the mistake: distance to the mean subject face
        return float(np.sqrt(((ref_faces.mean(axis=0) - embedding) ** 2).sum()))

    records = {r["name"]: r for r in m["images"]}
    scores, matches, n_trigger = [], 0, 0
    for s in samples:
        rec = records[s.name]
        if s.result.face is None:
            assert rec["score"] is None and not rec["match"]
            continue
        d = by_hand(s.result.face.embedding)
        nearest = float(np.min(np.sqrt(((ref_faces - s.result.face.embedding) ** 2).sum(axis=1))))
        assert rec["distance"] == pytest.approx(d, abs=1e-4)
        assert rec["nearest_distance"] == pytest.approx(nearest, abs=1e-4)
        assert rec["score"] == pytest.approx(1 - d / (2 * tau), abs=1e-4)
        assert rec["match"] == (d < tau)
        assert abs(planted(s.result.face.embedding) - d) > 1e-3   # the control formula gives another number
        if not s.control and s.strength == 1.0:
            scores.append(1 - d / (2 * tau))
            matches += int(d < tau)
    n_trigger = sum(1 for s in samples if not s.control and s.strength == 1.0)
    assert m["identity"]["reference_strength"] == 1.0
    assert m["identity"]["score"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert m["identity"]["face_rate"] == pytest.approx(len(scores) / n_trigger, abs=1e-4)
    assert m["identity"]["match_rate"] == pytest.approx(matches / n_trigger, abs=1e-4)
    assert m["identity"]["match_rate"] < 1.0           # the other person's image counts: the rate is not trivially 1
    control = [s for s in samples if s.control and s.strength == 1.0 and s.result.face is not None]
    leaks = sum(by_hand(s.result.face.embedding) < tau for s in control)
    assert m["leakage"]["faces"] == len(control) and m["leakage"]["leak_rate"] == pytest.approx(leaks / len(control), abs=1e-4)
    # subject vs itself: each face's mean distance to the others, averaged, as a score
    loo = [np.mean([np.linalg.norm(a - b) for j, b in enumerate(ref_faces) if j != i]) for i, a in enumerate(ref_faces)]
    assert m["subject"]["self_score"] == pytest.approx(float(np.mean([1 - d / (2 * tau) for d in loo])), abs=1e-4)


def _face(vector, x=0.0):
    return Face((10 + x, 10, 90 + x, 90), 1.0, ((30 + x, 40), (70 + x, 40), (50 + x, 60)),
                np.asarray(vector, dtype=np.float64), (100, 100))


def test_cosine_identity_recomputed_with_a_planted_mistake():
    """The onnx embedder's numbers: distance = 1 − cosine similarity, τ = 1 − min_similarity, the score of an image is
    1 − mean distance / (2τ) over every subject face, and `cosine` in the record is the mean similarity."""
    emb = OnnxEmbedder.__new__(OnnxEmbedder)       # its distance and threshold, without an ONNX model
    emb.options = OnnxOptions(model="unused.onnx", min_similarity=0.4)
    emb.threshold = 0.6
    rng = np.random.default_rng(0)
    refs = [rng.normal(size=8) for _ in range(3)]
    gen = refs[0] * 2.0 + rng.normal(scale=0.3, size=8)      # unnormalised on purpose: cosine ignores the scale
    subject = M.Subject([FaceResult(f"s{i}", _face(r), 1) for i, r in enumerate(refs)], [])
    sample = M.Sample("g.png", "g", 0, "ohwx", False, 1.0, 1, FaceResult("g.png", _face(gen, 5), 1))
    m = M.analyze([sample], subject, emb)

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    sims = [cos(gen, r) for r in refs]
    rec = m["images"][0]
    assert rec["cosine"] == pytest.approx(np.mean(sims), abs=1e-4)
    assert rec["score"] == pytest.approx(1 - (1 - np.mean(sims)) / 1.2, abs=1e-4)
    assert rec["nearest_distance"] == pytest.approx(1 - max(sims), abs=1e-4)
    planted = 1 - (1 - max(sims)) / 1.2                     # the mistake: score from the best-matching photo
    assert abs(planted - rec["score"]) > 1e-3
    assert m["identity"]["score"] == rec["score"]


# ------------------------------------------------------------------------------------------------ edges
def test_no_face_in_any_subject_photo_measures_no_match_or_leak_rate(tmp_path, dlib_embedder):
    """Nothing to compare with: the rates are not measured (None), not 0 %: 0 % leakage would read as "the control
    prompt is clean" and a 0 % match rate as "the LoRA failed", neither of which was seen."""
    subject = M.embed_subject(dlib_embedder, save(face_free(), tmp_path / "subject"))
    samples = make_grid(tmp_path / "grid", lambda pi, st, seed: astronaut_scene(pi * 7 + seed),
                        lambda st, seed: astronaut_scene(seed + 20), prompts=1, strengths=(1.0,), seeds=(1, 2))
    M.embed_samples(dlib_embedder, samples)
    m = M.analyze(samples, subject, dlib_embedder)
    assert m["leakage"]["faces"] == 2 and m["identity"]["faces"] == 2       # the faces were found …
    assert m["leakage"]["leak_rate"] is None and not m["leakage"]["flagged"]  # … but nothing could match them
    assert m["identity"]["match_rate"] is None and m["identity"]["all_strengths"]["match_rate"] is None
    assert m["strength_curve"][0]["match_rate"] is None and m["strength_curve"][0]["leak_rate"] is None
    assert m["identity"]["by_prompt"][0]["match_rate"] is None
    assert [f["name"] for f in m["failures"]] == ["no subject face"] and m["quality"] is None


def test_score_says_leakage_was_not_measured_without_a_subject_face(run_cli, tmp_path):
    subject = save(face_free(), tmp_path / "subject")[0].parent
    images = save({f"gen{i}": astronaut_scene(i) for i in range(2)}, tmp_path / "images")[0].parent
    control = save({f"ctl{i}": other_person(i) for i in range(2)}, tmp_path / "control")[0].parent
    done = run_cli("score", "--subject", subject, "--images", images, "--control", control)
    assert done.returncode == 0, done.stderr
    assert "leakage: not measured (no subject face to compare the 2 control faces with)" in done.stdout, done.stdout
    assert "0% of 2 control faces" not in done.stdout
    data = json.loads(run_cli("score", "--subject", subject, "--images", images, "--control", control,
                              "--json").stdout)
    assert data["results"]["images"]["leakage"]["leak_rate"] is None


def test_a_flat_colour_grid_is_named_nans_not_sameface(tmp_path, dlib_embedder, subject):
    """Black images (a pipeline's NaNs) are all the same picture; they are not carbon copies of each other (that
    would diagnose overtraining and "the prompt is ignored") but the §9 NaNs failure. Control: a real image repeated
    across seeds still is a carbon copy."""
    black = Image.new("RGB", (512, 512))
    samples = make_grid(tmp_path / "nan", lambda pi, st, seed: black, lambda st, seed: black, prompts=2)
    M.embed_samples(dlib_embedder, samples)
    m = M.analyze(samples, subject, dlib_embedder)
    names = [f["name"] for f in m["failures"]]
    assert "NaNs" in names and "sameface" not in names and "prompt brittleness" not in names, names
    assert m["blank"]["images"] == m["blank"]["of"] == 18
    assert m["diversity"]["pairs"] == 0 and m["diversity"]["carbon_copy_rate"] is None
    assert all(r["blank"] and "flat colour" in r["note"] for r in m["images"])
    nans = next(f for f in m["failures"] if f["name"] == "NaNs")
    assert "bf16" in nans["fix"] and "18 of 18 images are blank" in nans["evidence"][0]

    same = face_free()["coffee"]                              # control: a real picture, the same every time
    samples = make_grid(tmp_path / "same", lambda pi, st, seed: same, lambda st, seed: same, prompts=2)
    M.embed_samples(dlib_embedder, samples)
    m = M.analyze(samples, subject, dlib_embedder)
    assert m["blank"]["images"] == 0 and m["diversity"]["carbon_copy_rate"] == 1.0
    assert "NaNs" not in [f["name"] for f in m["failures"]]


def test_identity_at_strength_0_is_read_as_the_base_model_not_the_lora():
    curve = [{"strength": 0.0, "score": 0.7}, {"strength": 1.0, "score": 0.8}]
    notes = M.strength_notes({"strength_curve": curve})
    assert any("even at strength 0, without the LoRA" in n for n in notes), notes
    assert not any(n == "identity already holds at strength 0.0" for n in notes)
    curve[0]["strength"] = 0.5                                  # control: a real LoRA strength
    assert "identity already holds at strength 0.5" in M.strength_notes({"strength_curve": curve})


def test_a_prompt_that_writes_the_trigger_out_is_not_a_control_prompt():
    from lora_run_eval.section import is_control

    class R:
        class dataset:
            trigger = " ohwx "

        class eval:
            prompts = ["a photo of {trigger}", "a photo of ohwx at the beach", "a photo of a person", "画像 {trigger} ✓"]
            strengths, seeds, steps, guidance, width, height = [1.0], [1], 28, 3.5, 512, 512

    jobs = grid_jobs(R)
    assert [j["control"] for j in jobs] == [False, False, True, False]
    assert [j["prompt"] for j in jobs][3] == "画像 ohwx ✓"
    assert is_control("a photo of a person", "") and not is_control("{trigger}", "")
    assert not is_control("a photo of ohwx  man", " ohwx  man ")     # white space folded on both sides
    assert not is_control("一张ohwx的照片", "ohwx") and not is_control("a photo of OHWX", "ohwx")
    assert is_control("a man who asks", "sks")      # the trigger inside another word is no trigger (as in the lint)


def test_score_names_a_link_that_leads_nowhere_instead_of_leaving_it_out(run_cli, tmp_path, subject_dir):
    """A dangling link or a link loop named like an image is no image to score: exit 2 naming each, before any model
    loads; a link to a real image is scored like the image (control)."""
    images = save({"gen0": astronaut_scene(0)}, tmp_path / "images")[0].parent
    (images / "linked.png").symlink_to(sorted(subject_dir.glob("*.png"))[0])
    done = run_cli("score", "--subject", subject_dir, "--images", images, "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(r["name"] for r in json.loads(done.stdout)["results"]["images"]["images"]) == ["gen0", "linked"]
    (images / "gone.png").symlink_to(tmp_path / "missing.png")
    (images / "loop.png").symlink_to("loop.png")
    done = run_cli("score", "--subject", subject_dir, "--images", images)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "gone.png: cannot be scored: not found (a dangling link)" in done.stderr
    assert "loop.png: cannot be scored" in done.stderr and "eval: subject" not in done.stdout
