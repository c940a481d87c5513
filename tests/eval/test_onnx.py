"""The `onnx` embedder with small ONNX models the tests export themselves (torch.onnx.export):

- a tiny "ArcFace-like" net (112×112 aligned face in, one vector out; mirror- and brightness-robust by
  construction) run through our own detection (dlib HOG fallback), 5-point alignment, normalisation and
  cosine similarity;
- a constant "SCRFD" detector in the 9-output layout, to check anchor decoding, letterboxing and
  keypoint alignment.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_run.errors import PluginError
from lora_run_eval.faces import OnnxEmbedder, ScrfdDetector, align_face
from lora_run_eval.options import OnnxOptions

from .conftest import astronaut, astronaut_variants, face_free

import torch  # noqa: E402 - the [train] extra; the test exports its own models
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class TinyFaceNet(torch.nn.Module):
    """Grey → per-image normalisation → conv → tanh → 4×4 pooling; the embedding of the image plus that of
    its mirror image."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 5, stride=2, padding=2)   # 112 → 56, a multiple of 4
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)

    def features(self, x):
        grey = x.mean(dim=1, keepdim=True)
        grey = (grey - grey.mean(dim=(2, 3), keepdim=True)) / (grey.std(dim=(2, 3), keepdim=True) + 1e-3)
        return self.pool(torch.tanh(self.conv(grey))).flatten(1)

    def forward(self, x):
        return self.features(x) + self.features(torch.flip(x, dims=[3]))


def export(module, path, shape, names=("input",), outputs=("embedding",)):
    module.eval()
    torch.onnx.export(module, (torch.zeros(*shape),), str(path), input_names=list(names),
                      output_names=list(outputs), dynamo=False, dynamic_axes={names[0]: {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def arcface_model(tmp_path_factory):
    return export(TinyFaceNet(), tmp_path_factory.mktemp("onnx") / "tiny-arcface.onnx", (1, 3, 112, 112))


def test_embedding_equals_the_model_on_our_aligned_crop(arcface_model):
    embedder = OnnxEmbedder(OnnxOptions(model=str(arcface_model)))
    image = astronaut()
    result = embedder.embed_image(image)
    assert result.face is not None and result.face.embedding.shape == (128,)
    crop = align_face(image, result.face.points, 112)
    x = torch.from_numpy(((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None].copy())
    expected = TinyFaceNet()(x).detach().numpy()[0]
    assert np.allclose(result.face.embedding, expected, atol=1e-4)
    assert embedder.metric == "cosine" and embedder.threshold == pytest.approx(0.6)


def test_copies_match_and_face_free_images_have_no_face(arcface_model):
    embedder = OnnxEmbedder(OnnxOptions(model=str(arcface_model)))
    ref = embedder.embed_image(astronaut()).face.embedding
    variants = astronaut_variants()
    for name in ("flipped", "cropped", "recoloured", "brighter"):
        face = embedder.embed_image(variants[name]).face
        assert face is not None, name
        cosine = 1.0 - embedder.distance(ref, face.embedding)
        assert cosine > 0.4, (name, cosine)          # ≥ min_similarity: the same identity
    for name, image in face_free().items():
        assert embedder.embed_image(image).face is None, name


def test_channels_last_bgr_unit_models_get_their_layout(tmp_path):
    class ChannelsLast(torch.nn.Module):
        def forward(self, x):                       # NHWC in; returns the mean of each channel
            return x.mean(dim=(1, 2))

    path = export(ChannelsLast(), tmp_path / "nhwc.onnx", (1, 112, 112, 3))
    embedder = OnnxEmbedder(OnnxOptions(model=str(path), normalize="unit", channels="bgr"))
    assert embedder.channels_last
    crop = np.zeros((112, 112, 3), dtype=np.uint8)
    crop[..., 0] = 255                               # pure red
    out = embedder.embed_crop(crop)
    assert out.tolist() == pytest.approx([0.0, 0.0, 1.0])   # BGR order, scaled to 0…1


def test_missing_or_broken_model_is_a_plugin_error(tmp_path):
    with pytest.raises(PluginError, match="ONNX model not found"):
        OnnxEmbedder(OnnxOptions(model=str(tmp_path / "nope.onnx")))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(PluginError, match="cannot load"):
        OnnxEmbedder(OnnxOptions(model=str(bad)))


class ConstantScrfd(torch.nn.Module):
    """Outputs one confident anchor (stride 16, cell row 5 col 7, first anchor) in SCRFD's 9-output layout."""

    size = 320

    def __init__(self, kps):
        super().__init__()
        tensors = []
        for kind, width in (("score", 1), ("box", 4), ("kps", 10)):
            for stride in (8, 16, 32):
                cells = (self.size // stride) ** 2 * 2
                t = torch.zeros(cells, width)
                if stride == 16:
                    index = (5 * (self.size // 16) + 7) * 2
                    if kind == "score":
                        t[index, 0] = 0.9
                        t[index + 2, 0] = 0.8   # a neighbour overlapping it: removed by NMS
                    elif kind == "box":
                        t[index] = torch.tensor([2.0, 3.0, 2.0, 3.0])
                        t[index + 2] = torch.tensor([2.0, 3.0, 2.0, 3.0])
                    else:
                        t[index] = kps
                        t[index + 2] = kps
                tensors.append(t)
        for n, t in enumerate(tensors):
            self.register_buffer(f"out{n}", t)

    def forward(self, x):
        zero = x.mean() * 0
        return tuple(getattr(self, f"out{n}") + zero for n in range(9))


def test_scrfd_decoding_letterbox_and_nms(tmp_path):
    kps = torch.tensor([-1.0, -1.0, 1.0, -1.0, 0.0, 0.0, -0.8, 1.0, 0.8, 1.0])
    path = tmp_path / "scrfd.onnx"
    module = ConstantScrfd(kps).eval()
    torch.onnx.export(module, (torch.zeros(1, 3, 320, 320),), str(path), input_names=["input.1"],
                      output_names=[f"o{n}" for n in range(9)], dynamo=False)
    detector = ScrfdDetector(str(path), size=640, threshold=0.5)
    assert detector.size == (320, 320)              # the model's fixed input size wins
    image = np.zeros((480, 640, 3), dtype=np.uint8)  # scale 0.5 into the 320×320 letterbox
    found = detector.detect(image)
    assert len(found) == 1                          # the overlapping neighbour was suppressed
    box, score, points = found[0]
    # centre (7·16, 5·16) = (112, 80); box = centre ± (2, 3)·16 → (80, 32, 144, 128); ÷ 0.5
    assert box == pytest.approx((160.0, 64.0, 288.0, 256.0)) and score == pytest.approx(0.9)
    assert points[2].tolist() == pytest.approx([224.0, 160.0])          # the nose at the centre
    assert points[0].tolist() == pytest.approx([192.0, 128.0])          # (112 − 16, 80 − 16) ÷ 0.5


def test_onnx_embedder_with_a_detector_aligns_on_its_keypoints(tmp_path, arcface_model):
    kps = torch.tensor([-1.0, -1.0, 1.0, -1.0, 0.0, 0.0, -0.8, 1.0, 0.8, 1.0])
    path = tmp_path / "scrfd.onnx"
    torch.onnx.export(ConstantScrfd(kps).eval(), (torch.zeros(1, 3, 320, 320),), str(path),
                      input_names=["input.1"], output_names=[f"o{n}" for n in range(9)], dynamo=False)
    embedder = OnnxEmbedder(OnnxOptions(model=str(arcface_model), detector=str(path)))
    assert embedder.hog is None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    face = embedder.embed_image(image).face
    assert face is not None and len(face.points) == 5
    assert face.box == pytest.approx((160.0, 64.0, 288.0, 256.0))
    with pytest.raises(PluginError, match="9 outputs"):
        OnnxEmbedder(OnnxOptions(model=str(arcface_model), detector=str(arcface_model)))
