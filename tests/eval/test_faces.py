"""The face embedders on real faces: copies of one photograph are one identity, other people are not,
face-free images are reported as "no face found"."""
from __future__ import annotations

import math
import os

import attrs
import numpy as np
import pytest
from PIL import Image

from lora_run_eval.faces import (ARCFACE_TEMPLATE, DlibEmbedder, align_face, dlib_model_dir,
                                 similarity_transform)
from lora_run_eval.options import DlibOptions

from .conftest import astronaut, astronaut_variants, face_free, other_person, save


def test_dlib_models_come_from_the_package_and_use_the_five_point_model(dlib_embedder):
    models = dlib_model_dir()
    assert (models / "shape_predictor_5_face_landmarks.dat").is_file()
    assert dlib_embedder.metric == "euclidean" and dlib_embedder.threshold == 0.6


def test_copies_of_the_same_photo_are_the_same_identity(dlib_embedder):
    reference = dlib_embedder.embed_image(astronaut()).face
    assert reference is not None and reference.embedding.shape == (128,)
    for name, image in astronaut_variants().items():
        result = dlib_embedder.embed_image(image, name)
        assert result.face is not None, name
        d = dlib_embedder.distance(reference.embedding, result.face.embedding)
        assert d < 0.6 * 0.6, (name, d)          # well inside the same-person threshold


def test_other_people_are_not_the_subject(dlib_embedder):
    reference = dlib_embedder.embed_image(astronaut()).face
    distances = []
    for i in range(6):
        face = dlib_embedder.embed_image(other_person(i)).face
        if face is not None:
            distances.append(dlib_embedder.distance(reference.embedding, face.embedding))
    assert len(distances) >= 4
    assert min(distances) > 0.6, distances


def test_face_free_images_are_a_reported_result(dlib_embedder, tmp_path):
    for path in save(face_free(), tmp_path):
        result = dlib_embedder.embed_path(path)
        assert result.face is None and result.note == "no face found" and result.faces_found == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = dlib_embedder.embed_path(broken)
    assert result.face is None and result.note.startswith("unreadable image")
    blank = dlib_embedder.embed_image(Image.new("RGB", (64, 64), (30, 30, 30)))
    assert blank.face is None


def test_the_most_confident_face_is_used_and_coordinates_survive_downscaling(tmp_path):
    big = astronaut().resize((1536, 1536), Image.Resampling.LANCZOS)
    small_side = DlibEmbedder(DlibOptions(max_side=512))
    face = small_side.embed_image(big).face
    ref = small_side.embed_image(astronaut()).face
    assert face is not None and face.image_size == (1536, 1536)
    # the box is reported in the original image's coordinates (3× the 512-pixel original)
    assert all(abs(a - 3 * b) < 12 for a, b in zip(face.box, ref.box))
    cx, cy, eye, yaw, roll = face.pose()
    assert 0.3 < cx < 0.5 and 0.1 < cy < 0.4 and abs(yaw) < 0.2 and abs(roll) < 0.2


def test_pose_sees_a_flip_and_a_rotation(dlib_embedder):
    v = astronaut_variants()
    base = dlib_embedder.embed_image(v["original"]).face.pose()
    flipped = dlib_embedder.embed_image(v["flipped"]).face.pose()
    rotated = dlib_embedder.embed_image(v["rotated"]).face.pose()
    assert abs(flipped[0] - (1 - base[0])) < 0.02          # centre x mirrored
    assert abs(rotated[4] - base[4]) > math.radians(4)      # roll changed by about the 7° rotation


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = (scale * rot @ src.T).T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_alignment_puts_the_landmarks_on_the_arcface_template():
    # paint five dots, align them, find the dots again in the 112×112 crop
    template = np.asarray(ARCFACE_TEMPLATE)
    angle, scale = -0.25, 2.3
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = (scale * rot @ template.T).T + np.array([150.0, 90.0])
    canvas = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in points:
        canvas[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 255
    crop = align_face(Image.fromarray(canvas), points, 112)
    assert crop.shape == (112, 112, 3)
    for tx, ty in template:
        x0, y0 = int(tx) - 4, int(ty) - 4
        patch = crop[y0:y0 + 9, x0:x0 + 9, 0].astype(float)
        assert patch.sum() > 0, (tx, ty)
        ys, xs = np.mgrid[:9, :9]
        cx, cy = x0 + (xs * patch).sum() / patch.sum(), y0 + (ys * patch).sum() / patch.sum()
        assert abs(cx - tx) < 1.0 and abs(cy - ty) < 1.0, (tx, ty, cx, cy)


@pytest.mark.parametrize("size", [112, 224])
def test_alignment_scales_with_the_crop_size(size):
    template = np.asarray(ARCFACE_TEMPLATE) * 2 + 40
    crop = align_face(Image.new("RGB", (400, 400), (10, 200, 30)), template, size)
    assert crop.shape == (size, size, 3) and crop[size // 2, size // 2].tolist() == [10, 200, 30]


class PidNoted(DlibEmbedder):
    """dlib with the embedding process's id at the end of each result's note (module level: a spawned worker
    process imports it to rebuild the embedder)."""

    def embed_path(self, path):
        result = super().embed_path(path)
        return attrs.evolve(result, note=f"{result.note}|pid {os.getpid()}")


def test_a_list_of_images_is_embedded_in_processes_with_the_serial_results_in_order(tmp_path):
    """`embed_paths` spreads dlib over worker processes (dlib holds Python's lock, so threads barely overlapped) and
    gives each path the result the serial loop gives it: the same face, box and embedding, in the paths' order
    (faces, other people, face-free images and an unreadable file mixed), from more than one process."""
    images = {**{f"a-{k}": v for k, v in astronaut_variants().items()},
              **{f"other-{i}": other_person(i) for i in range(4)}, **face_free()}
    paths = save(images, tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths.insert(5, broken)
    embedder = PidNoted()
    serial = [embedder.embed_path(p) for p in paths]
    spread = embedder.embed_paths(paths, workers=2)
    assert [r.path for r in spread] == [str(p) for p in paths]
    pids = {r.note.rsplit("|pid ", 1)[1] for r in spread}
    assert str(os.getpid()) not in pids and len(pids) == 2, pids
    for one, other in zip(serial, spread):
        assert (one.faces_found, one.note.split("|")[0]) == (other.faces_found, other.note.split("|")[0]), one.path
        if one.face is not None:
            assert one.face.box == other.face.box and np.array_equal(one.face.embedding, other.face.embedding)
    assert sum(r.face is not None for r in spread) >= 8 and spread[5].note.startswith("unreadable image")


def test_few_images_or_an_embedder_that_cannot_be_rebuilt_stay_in_this_process(tmp_path):
    """No process is started for fewer than `IMAGES_PER_WORKER` images a worker, nor for an embedder that is not
    `parallel` (a third party's, say): their results come from this process."""
    paths = save({f"a-{k}": v for k, v in list(astronaut_variants().items())[:3]}, tmp_path)
    here = f"|pid {os.getpid()}"
    assert all(r.note.endswith(here) for r in PidNoted().embed_paths(paths))

    class Serial(PidNoted):
        parallel = False

    assert all(r.note.endswith(here) for r in Serial().embed_paths(paths * 4, workers=2))


def test_a_pool_embeds_images_handed_over_one_at_a_time_in_worker_processes(tmp_path):
    """The evaluation hands each image to an `EmbeddingPool` as it is written: the workers (other processes) embed
    them meanwhile, and `embed_paths` gives the serial results in the paths' order, a path never handed over
    included. Control: an embedder that is not `parallel` gets no workers, and its results come from this process."""
    images = {**{f"a-{k}": v for k, v in astronaut_variants().items()},
              **{f"other-{i}": other_person(i) for i in range(3)}, **face_free()}
    paths = save(images, tmp_path)
    embedder = PidNoted()
    serial = [embedder.embed_path(p) for p in paths]
    with embedder.pool(len(paths), workers=2) as pool:
        for p in paths[:-1]:       # the last one is never handed over
            pool.submit(p)
        assert len(pool._futures) == len(paths) - 1
        pooled = pool.embed_paths(paths)
    assert pool._pool is None and [r.path for r in pooled] == [str(p) for p in paths]
    pids = {r.note.rsplit("|pid ", 1)[1] for r in pooled}
    assert str(os.getpid()) not in pids, pids
    for one, other in zip(serial, pooled):
        assert (one.faces_found, one.note.split("|")[0]) == (other.faces_found, other.note.split("|")[0]), one.path
        if one.face is not None:
            assert one.face.box == other.face.box and np.array_equal(one.face.embedding, other.face.embedding)

    class Serial(PidNoted):
        parallel = False

    with Serial().pool(len(paths) * 4) as pool:
        for p in paths:
            pool.submit(p)
        assert pool.workers == 0 and not pool._futures
        here = pool.embed_paths(paths[:3])
    assert all(r.note.endswith(f"|pid {os.getpid()}") for r in here)
