"""Face embedders: find the most confident face in an image and turn it into an identity vector.

Two implementations share one interface (:class:`Embedder`):

- ``dlib`` — the offline default. dlib's HOG frontal-face detector, its 5-point landmark model and its
  128-d ResNet descriptor; the weights ship in the ``face_recognition_models`` package. Distance: Euclidean,
  same person below 0.6.
- ``onnx`` — a user-supplied ArcFace model run with onnxruntime. Faces come from an optional SCRFD ONNX
  detector (five keypoints) or else from the dlib HOG detector and its landmarks; each face is aligned to
  the standard ArcFace 112×112 five-point template with a similarity transform. Distance: 1 − cosine.

"No face found" is a result (``FaceResult.face is None`` with a reason), never an exception; so is a file that does
not decode (``readable=False``), which the evaluation then refuses rather than count as an image without a face.
numpy, dlib and onnxruntime are imported inside the functions that need them.
"""
from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path
from typing import Any, Sequence

import attrs

from lora_run.errors import PluginError

#: the most processes that embed one list of images (`Embedder.embed_paths`), and the fewest images each is given
MAX_WORKERS = 8
IMAGES_PER_WORKER = 4

#: The standard ArcFace alignment template for a 112×112 crop: left eye, right eye, nose tip, left and right
#: mouth corner (image coordinates, "left" = the image's left side).
ARCFACE_TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655),
                    (70.7299, 92.2041))


@attrs.frozen
class Face:
    """One detected face, in the coordinates of the image as opened (EXIF orientation applied)."""

    box: tuple[float, float, float, float]           # x0, y0, x1, y1
    score: float                                     # detector confidence (HOG margin or SCRFD probability)
    points: tuple[tuple[float, float], ...]          # left eye, right eye, nose (+ mouth corners for SCRFD)
    embedding: Any                                   # 1-d numpy array
    image_size: tuple[int, int]                      # width, height

    def pose(self) -> tuple[float, float, float, float, float]:
        """(centre x, centre y, eye distance, yaw proxy, roll): positions as fractions of the image width/height.

        The yaw proxy is the nose's horizontal offset from the eyes' midpoint in eye distances (0 = frontal,
        about ±0.5 = strong three-quarter view); roll is the eye line's angle in radians.
        """
        import math

        (lx, ly), (rx, ry), (nx, ny) = self.points[:3]
        w, h = self.image_size
        eye = math.hypot(rx - lx, ry - ly) or 1.0
        mx, my = (lx + rx) / 2, (ly + ry) / 2
        # signed offset of the nose from the eye midpoint, measured along the eye line
        yaw = ((nx - mx) * (rx - lx) + (ny - my) * (ry - ly)) / (eye * eye)
        roll = math.atan2(ry - ly, rx - lx)
        return ((self.box[0] + self.box[2]) / 2 / w, (self.box[1] + self.box[3]) / 2 / h, eye / w, yaw, roll)


@attrs.frozen
class FaceResult:
    """The outcome for one image: the face used (the detector's most confident) or why there is none."""

    path: str
    face: Face | None
    faces_found: int
    note: str = ""          # "no face found", "unreadable image: …"
    readable: bool = True   # False: the file is no image Pillow decodes (never scored as "no face": see evaluator)


class Embedder:
    """What both embedders provide."""

    name = ""
    metric = ""             # "euclidean" or "cosine"
    threshold = 0.6         # τ: same person when distance < τ
    #: True when ``type(self)(self.options)`` in another process makes an equal embedder, so a list of images can
    #: be spread over processes. (dlib's Python binding holds the interpreter's lock while it works: threads measured
    #: 1.26× on 2 cores and 1.29× on 16, 2026-12-04.) onnxruntime already spreads one model's work over the cores.
    parallel = False
    options: Any = None

    def embed_paths(self, paths: Sequence[Path | str], workers: int | None = None) -> list[FaceResult]:
        """``embed_path`` of each path, in order. A ``parallel`` embedder spreads them over ``workers`` processes
        (default: the cores this process may use, at most ``MAX_WORKERS`` and one for every ``IMAGES_PER_WORKER``
        images), each with its own embedder built from this one's options. They are started with ``spawn``: the
        caller may hold a CUDA context, which a forked child must not touch. Ctrl-C reaches the caller alone; the
        workers ignore it and are stopped with the pool. Where processes cannot be started, the images are embedded
        here, one at a time."""
        paths = list(paths)
        with self.pool(len(paths), workers) as pool:
            return pool.embed_paths(paths)

    def pool(self, expected: int, workers: int | None = None) -> EmbeddingPool:
        """Worker processes that embed images as they are handed over (``EmbeddingPool``): ``workers``, by default as
        many as ``embed_paths`` starts for ``expected`` images."""
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = min(cores, MAX_WORKERS, expected // IMAGES_PER_WORKER)
        return EmbeddingPool(self, workers)

    def faces(self, image: Any) -> list[Face]:  # pragma: no cover - interface
        raise NotImplementedError

    def distance(self, a: Any, b: Any) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "threshold": self.threshold}

    def embed_path(self, path: Path | str) -> FaceResult:
        """Open an image safely and embed its most confident face; unreadable or face-free is reported."""
        from lora_run_folder.images import ImageProblem, open_rgb

        try:
            image = open_rgb(Path(path)).image
        except ImageProblem as exc:
            return FaceResult(str(path), None, 0, f"unreadable image: {exc}", readable=False)
        except OSError as exc:
            return FaceResult(str(path), None, 0, f"unreadable image: {exc.strerror or exc}", readable=False)
        return self.embed_image(image, str(path))

    def embed_image(self, image: Any, label: str = "") -> FaceResult:
        faces = self.faces(image)
        if not faces:
            return FaceResult(label, None, 0, "no face found")
        return FaceResult(label, max(faces, key=lambda f: f.score), len(faces))


#: the embedder of a worker process of `Embedder.embed_paths`
_WORKER_EMBEDDER: Embedder | None = None


class EmbeddingPool:
    """Images embedded while the caller goes on: ``submit(path)`` hands an image to a worker process as soon as it
    is written (the evaluation grid, while the next images are generated on the GPU); ``embed_paths(paths)`` then
    gives their results in order, as ``Embedder.embed_paths`` does (submitting the paths not handed over yet). Without
    workers (an embedder that is not ``parallel``, fewer than two workers, or processes that cannot be started) it
    submits nothing and ``embed_paths`` is the embedder's own. The workers start at the first ``submit`` (spawned:
    the caller holds a CUDA context) and ignore Ctrl-C; ``close`` stops them, dropping what is still queued."""

    def __init__(self, embedder: Embedder, workers: int):
        self.embedder = embedder
        self.workers = workers if embedder.parallel and workers >= 2 else 0
        self._pool: Any = None
        self._futures: dict[str, Any] = {}

    def submit(self, path: Path | str) -> None:
        if not self.workers or str(path) in self._futures:
            return
        try:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker,
                                                 initargs=(type(self.embedder), self.embedder.options))
            self._futures[str(path)] = self._pool.submit(_embed_in_worker, str(path))
        except Exception:  # noqa: BLE001 - no processes here (or the pool broke): the rest is embedded in this process
            self.workers = 0

    def embed_paths(self, paths: Sequence[Path | str]) -> list[FaceResult]:
        for path in paths:     # those not handed over yet (a generator that does not report its images) go now
            self.submit(path)
        out = []
        for path in paths:
            future = self._futures.pop(str(path), None)
            try:
                out.append(future.result() if future is not None else self.embedder.embed_path(path))
            except (OSError, RuntimeError):   # a worker that died (BrokenProcessPool): this one embeds it
                out.append(self.embedder.embed_path(path))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()

    def __enter__(self) -> EmbeddingPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _start_worker(kind: type[Embedder], options: Any) -> None:
    global _WORKER_EMBEDDER
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the caller's to handle
    _WORKER_EMBEDDER = kind(options)


def _embed_in_worker(path: str) -> FaceResult:
    assert _WORKER_EMBEDDER is not None
    return _WORKER_EMBEDDER.embed_path(path)


def _as_array(image: Any, max_side: int) -> tuple[Any, float]:
    """An RGB uint8 contiguous array, downscaled so the long side is ≤ max_side; and the scale applied."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    scale = 1.0
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), scale


#: The modules each built-in embedder imports when it runs, with the distribution that provides each (all in the
#: ``eval`` extra): what `lora-run check` and the run's lint look for before anything trains.
NEEDS = {"dlib": (("dlib", "dlib-bin"), ("face_recognition_models", "face_recognition_models")),
         "onnx": (("dlib", "dlib-bin"), ("onnxruntime", "onnxruntime"))}


def missing_packages(embedder: str) -> list[str]:
    """The distributions ``embedder`` needs that are not installed (none for an embedder not in ``NEEDS``: a third
    party's states its own needs)."""
    return [dist for module, dist in NEEDS.get(embedder, ()) if importlib.util.find_spec(module) is None]


def dlib_model_dir() -> Path:
    """The folder of model files inside the `face_recognition_models` package, found without importing it
    (its `__init__` needs `pkg_resources`, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("the dlib face embedder needs the `face_recognition_models` package: "
                          "pip install 'lora-run[eval]'")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError:
        raise PluginError("the dlib face embedder needs the `dlib-bin` package (prebuilt dlib): "
                          "pip install 'lora-run[eval]'") from None
    return dlib


class HogLandmarks:
    """dlib's HOG detector and 5-point shape predictor (the alignment source for both embedders)."""

    def __init__(self, upsample: int = 1):
        dlib = _import_dlib()
        models = dlib_model_dir()
        five = models / "shape_predictor_5_face_landmarks.dat"
        if not five.is_file():
            raise PluginError(f"{five}: missing 5-point landmark model; reinstall face_recognition_models")
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(five))
        self.upsample = upsample

    def detect(self, array: Any) -> list[tuple[Any, float, Any]]:
        """[(dlib rectangle, score, full_object_detection)], most confident first."""
        rects, scores, _kinds = self.detector.run(array, self.upsample, 0.0)
        found = [(r, float(s), self.predictor(array, r)) for r, s in zip(rects, scores)]
        return sorted(found, key=lambda item: -item[1])

    @staticmethod
    def points(shape: Any, scale: float) -> tuple[tuple[float, float], ...]:
        """Left eye centre, right eye centre, bottom of the nose, in original-image coordinates.

        dlib's 5-point model gives the outer and inner corner of each eye (points 0–1 on the image's
        right, 2–3 on its left) and the bottom of the nose (point 4).
        """
        p = [(shape.part(i).x / scale, shape.part(i).y / scale) for i in range(5)]
        left = ((p[2][0] + p[3][0]) / 2, (p[2][1] + p[3][1]) / 2)
        right = ((p[0][0] + p[1][0]) / 2, (p[0][1] + p[1][1]) / 2)
        return left, right, p[4]


class DlibEmbedder(Embedder):
    """HOG detector + 5-point landmarks + dlib's 128-d ResNet face descriptor; Euclidean distance."""

    name = "dlib"
    metric = "euclidean"
    parallel = True

    def __init__(self, options: Any = None):
        from .options import DlibOptions

        self.options = options or DlibOptions()
        self.threshold = self.options.threshold
        self.hog = HogLandmarks(self.options.upsample)
        resnet = dlib_model_dir() / "dlib_face_recognition_resnet_model_v1.dat"
        if not resnet.is_file():
            raise PluginError(f"{resnet}: missing face descriptor model; reinstall face_recognition_models")
        self.encoder = self.hog.dlib.face_recognition_model_v1(str(resnet))

    def faces(self, image: Any) -> list[Face]:
        import numpy as np

        array, scale = _as_array(image, self.options.max_side)
        out = []
        for rect, score, shape in self.hog.detect(array):
            vector = np.asarray(self.encoder.compute_face_descriptor(array, shape, self.options.jitter),
                                dtype=np.float64)
            box = (rect.left() / scale, rect.top() / scale, rect.right() / scale, rect.bottom() / scale)
            out.append(Face(box, score, HogLandmarks.points(shape, scale), vector,
                            (round(array.shape[1] / scale), round(array.shape[0] / scale))))
        return out

    def distance(self, a: Any, b: Any) -> float:
        import numpy as np

        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def similarity_transform(src: Sequence[Sequence[float]], dst: Sequence[Sequence[float]]) -> Any:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src points onto dst.

    Returns a 2×3 matrix M with dst ≈ M[:, :2] @ src + M[:, 2] (Umeyama's closed form).
    """
    import numpy as np

    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    ms, md = s.mean(0), d.mean(0)
    sc, dc = s - ms, d - md
    cov = dc.T @ sc / len(s)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    var = (sc ** 2).sum() / len(s)
    scale = float((sig * sign).sum() / var) if var > 0 else 1.0
    t = md - scale * rot @ ms
    return np.hstack([scale * rot, t[:, None]])


def align_face(image: Any, points: Sequence[Sequence[float]], size: int = 112) -> Any:
    """Warp the face to the ArcFace template (scaled to `size`); returns a size×size RGB uint8 array.

    With five points all template points are used; with three (eyes + nose from dlib) the eyes and the
    nose tip of the template.
    """
    import numpy as np
    from PIL import Image

    template = np.asarray(ARCFACE_TEMPLATE[:len(points)], dtype=np.float64) * (size / 112.0)
    m = similarity_transform(points, template)
    a = m[:, :2]
    inv = np.linalg.inv(a)
    offset = -inv @ m[:, 2]
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    warped = image.convert("RGB").transform((size, size), Image.Transform.AFFINE, coeffs,
                                            resample=Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.uint8)


#: the largest ONNX model read (protobuf cannot hold more than 2 GiB)
ONNX_LIMIT = 2 << 30


def _session(path: str, providers: Sequence[str]) -> Any:
    from lora_run.files import FileProblem, check_input_file, shown

    try:
        check_input_file(path, "onnx", ONNX_LIMIT)
    except FileProblem as exc:
        what = "ONNX model not found" if str(exc).startswith("not found") else f"the ONNX model {exc}"
        raise PluginError(f"{shown(path)}: {what} ([eval.embedder_options])") from None
    try:
        import onnxruntime as ort
    except ImportError:
        raise PluginError("the onnx face embedder needs onnxruntime: pip install 'lora-run[eval]'") from None
    available = ort.get_available_providers()
    wanted = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
    try:
        return ort.InferenceSession(path, providers=wanted or available)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise PluginError(f"{path}: onnxruntime cannot load this model: {exc}") from None


class ScrfdDetector:
    """SCRFD face detector (ONNX): 3 strides (8, 16, 32) × (scores, boxes, keypoints), 2 anchors per cell."""

    strides = (8, 16, 32)
    anchors = 2

    def __init__(self, path: str, size: int = 640, threshold: float = 0.5, providers: Sequence[str] = ()):
        self.session = _session(path, providers)
        outputs = self.session.get_outputs()
        if len(outputs) != 9:
            raise PluginError(f"{path}: expected an SCRFD detector with 9 outputs (scores, boxes and keypoints "
                              f"for strides 8/16/32), this model has {len(outputs)}")
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape
        fixed = [d for d in shape[2:4] if isinstance(d, int)]
        self.size = (fixed[1], fixed[0]) if len(fixed) == 2 else (size - size % 32, size - size % 32)
        self.threshold = threshold

    def detect(self, array: Any) -> list[tuple[tuple[float, float, float, float], float, Any]]:
        """[(box, score, 5×2 keypoints)] in the coordinates of `array`, most confident first."""
        import numpy as np
        from PIL import Image

        h, w = array.shape[:2]
        dw, dh = self.size
        scale = min(dw / w, dh / h)
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = np.zeros((dh, dw, 3), dtype=np.float32)
        canvas[:nh, :nw] = np.asarray(Image.fromarray(array).resize((nw, nh), Image.Resampling.BILINEAR),
                                      dtype=np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = [np.asarray(o) for o in self.session.run(None, {self.input.name: blob})]
        outs = [o[0] if o.ndim == 3 else o for o in outs]
        boxes, scores, points = [], [], []
        for i, stride in enumerate(self.strides):
            gh, gw = dh // stride, dw // stride
            ys, xs = np.mgrid[:gh, :gw]
            centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, self.anchors, axis=0)
            score = outs[i].reshape(-1)
            dist = outs[i + 3].reshape(-1, 4) * stride
            kps = outs[i + 6].reshape(-1, 10) * stride
            keep = score >= self.threshold
            c = centres[keep].astype(np.float64)
            boxes.append(np.concatenate([c - dist[keep][:, :2], c + dist[keep][:, 2:]], axis=1))
            points.append(kps[keep].reshape(-1, 5, 2) + c[:, None, :])
            scores.append(score[keep])
        if not any(len(s) for s in scores):
            return []
        box, score, pts = np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)
        keep = _nms(box, score, 0.4)
        return [(tuple(float(v) for v in box[k] / scale), float(score[k]), pts[k] / scale) for k in keep]


def _nms(boxes: Any, scores: Any, iou: float) -> list[int]:
    import numpy as np

    order = list(np.argsort(-scores))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        rest = np.asarray(order, dtype=int)
        if not len(rest):
            break
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        overlap = inter / (area[i] + area[rest] - inter + 1e-9)
        order = [int(j) for j, o in zip(rest, overlap) if o <= iou]
    return keep


class OnnxEmbedder(Embedder):
    """A user-supplied ArcFace ONNX model; faces from SCRFD (if given) or dlib HOG; cosine similarity."""

    name = "onnx"
    metric = "cosine"

    def __init__(self, options: Any):
        self.options = options
        self.threshold = 1.0 - options.min_similarity
        self.session = _session(options.model, options.providers)
        self.input = self.session.get_inputs()[0]
        shape = list(self.input.shape)
        self.channels_last = len(shape) == 4 and shape[-1] == 3 and shape[1] != 3
        self.detector = (ScrfdDetector(options.detector, options.detector_size, options.detector_threshold,
                                       options.providers) if options.detector else None)
        self.hog = None if self.detector else HogLandmarks(options.upsample)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.options.model, "detector": self.options.detector or "dlib-hog",
                "min_similarity": self.options.min_similarity}

    def _locate(self, array: Any, scale: float) -> list[tuple[tuple[float, ...], float, tuple]]:
        if self.detector is not None:
            return [(tuple(v / scale for v in box), score, tuple((float(x) / scale, float(y) / scale)
                                                                  for x, y in kps))
                    for box, score, kps in self.detector.detect(array)]
        assert self.hog is not None
        return [((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), score,
                 HogLandmarks.points(shape, scale)) for r, score, shape in self.hog.detect(array)]

    def preprocess(self, crop: Any) -> Any:
        import numpy as np

        x = crop.astype(np.float32)
        if self.options.channels == "bgr":
            x = x[..., ::-1]
        if self.options.normalize == "arcface":
            x = (x - 127.5) / 127.5
        elif self.options.normalize == "unit":
            x = x / 255.0
        return np.ascontiguousarray(x[None] if self.channels_last else x.transpose(2, 0, 1)[None])

    def embed_crop(self, crop: Any) -> Any:
        import numpy as np

        out = self.session.run(None, {self.input.name: self.preprocess(crop)})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def faces(self, image: Any) -> list[Face]:
        from PIL import Image

        array, scale = _as_array(image, self.options.max_side)
        source = Image.fromarray(array)
        out = []
        for box, score, points in self._locate(array, scale):
            crop = align_face(source, [(x * scale, y * scale) for x, y in points], self.options.input_size)
            out.append(Face(box, score, points, self.embed_crop(crop),
                            (round(array.shape[1] / scale), round(array.shape[0] / scale))))
        return out

    def distance(self, a: Any, b: Any) -> float:
        import numpy as np

        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        denom = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1e-12
        return 1.0 - float(a @ b) / denom
