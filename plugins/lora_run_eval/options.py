"""Options of the face embedders: the `[eval] embedder_options` table, checked by the strict converter.

No heavy imports here: `lora-run check` structures these classes to validate a recipe.
"""
from __future__ import annotations

from typing import Literal

import attrs

from lora_run.schema import option


@attrs.frozen(kw_only=True)
class DlibOptions:
    """`embedder = "dlib"`: HOG face detector, 5-point landmarks, 128-d ResNet descriptor (all offline)."""

    threshold: float = option(0.6, "Same-person threshold on the Euclidean distance of two descriptors "
                              "(dlib's calibrated value: below 0.6 is the same person).", gt=0.0, le=2.0)
    upsample: int = option(1, "How many times the HOG detector upsamples the image (finds smaller faces, "
                           "slower).", ge=0, le=3)
    jitter: int = option(0, "Re-sample each face this many times with small jitter and average the "
                         "descriptors (more stable, slower).", ge=0, le=100)
    max_side: int = option(1024, "Images are downscaled so that their longer side is at most this many "
                           "pixels before detection.", ge=128, le=8192)


@attrs.frozen(kw_only=True)
class OnnxOptions:
    """`embedder = "onnx"`: a user-supplied ArcFace model (and optional face detector) run with onnxruntime."""

    model: str = option(doc="ArcFace-style recognition model (`.onnx`): one aligned 112×112 face in, one "
                        "embedding vector out. Relative paths are resolved against the recipe's folder.")
    detector: str | None = option(None, "Optional SCRFD face detector (`.onnx`, the 9-output layout with "
                                  "five keypoints). Without it the dlib HOG detector and its 5-point landmarks "
                                  "give the boxes and the alignment points.")
    min_similarity: float = option(0.4, "Same-person threshold on the cosine similarity of two embeddings "
                                   "(below 1: the distance threshold τ = 1 − min_similarity must be above 0).",
                                   gt=-1.0, lt=1.0)
    input_size: int = option(112, "Side of the aligned face crop the model takes.", ge=16, le=1024)
    normalize: Literal["arcface", "unit", "none"] = option(
        "arcface", "Pixel normalisation: `arcface` = (x − 127.5) / 127.5, `unit` = x / 255, `none` = 0…255.")
    channels: Literal["rgb", "bgr"] = option("rgb", "Channel order the model expects.")
    detector_size: int = option(640, "Square input side for the SCRFD detector (a multiple of 32).", ge=64,
                                le=2048)
    detector_threshold: float = option(0.5, "SCRFD face score threshold.", gt=0.0, le=1.0)
    upsample: int = option(1, "HOG fallback: detector upsampling.", ge=0, le=3)
    max_side: int = option(1024, "Images are downscaled so that their longer side is at most this many "
                           "pixels before detection.", ge=128, le=8192)
    providers: list[str] = option(factory=list, doc="onnxruntime execution providers, in order of preference "
                                  "(default: CUDA when available, then CPU).")
