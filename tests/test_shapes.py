"""Tests for the procedural product silhouettes in moon2.data.synth.shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from moon2.data.synth.shapes import SHAPE_NAMES, detail_mask, shape_mask

REQUIRED = {
    "tshirt",
    "shirt",
    "hoodie",
    "jeans",
    "shorts",
    "skirt",
    "dress",
    "jacket",
    "coat",
    "sweater",
    "sneaker",
    "boot",
    "sandal",
    "high_heel",
    "slipper",
    "backpack",
    "handbag",
    "tote",
    "wallet",
    "suitcase",
    "smartphone",
    "laptop",
    "tablet",
    "headphones",
    "speaker",
    "smartwatch",
    "camera",
    "mug",
    "teapot",
    "plate",
    "bowl",
    "chair",
    "sofa",
    "table",
    "lamp",
    "vase",
    "cushion",
    "clock",
    "cap",
    "sunglasses",
    "umbrella",
    "perfume",
    "ball",
    "racket",
    "dumbbell",
    "bottle",
}
SIZES = (16, 64, 128, 300)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_names_sorted_and_complete() -> None:
    assert list(SHAPE_NAMES) == sorted(set(SHAPE_NAMES))
    assert set(SHAPE_NAMES) >= REQUIRED


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_mode_size_coverage_and_centring(shape: str, size: int) -> None:
    sil, det = shape_mask(shape, size), detail_mask(shape, size)
    for img in (sil, det):
        assert img.mode == "L"
        assert img.size == (size, size)
    arr = _arr(sil)
    assert 0.08 <= (arr > 127).mean() <= 0.8
    # Half-covered pixels count for the extent: thin parts (an umbrella shaft) are <1 px at 16.
    ys, xs = np.nonzero(arr > 63)
    span = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / size
    slack = 2 / size  # one anti-aliased fringe pixel on each side
    assert 0.6 - slack <= span <= 0.85 + slack
    tol = max(1.5, 0.05 * size)
    assert abs((xs.min() + xs.max()) / 2 - (size - 1) / 2) <= tol
    assert abs((ys.min() + ys.max()) / 2 - (size - 1) / 2) <= tol


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_detail_lies_inside_silhouette(shape: str, size: int) -> None:
    det, sil = _arr(detail_mask(shape, size)), _arr(shape_mask(shape, size))
    assert det.sum() > 0
    assert det[sil > 0].sum() >= 0.9 * det.sum()
    strokes = det > 127
    if size >= 64:
        assert strokes.any()
    if strokes.any():
        assert strokes[sil > 127].sum() >= 0.9 * strokes.sum()


def test_shapes_pairwise_distinct() -> None:
    masks = {name: _arr(shape_mask(name, 64)) > 127 for name in SHAPE_NAMES}
    for a, b in itertools.combinations(SHAPE_NAMES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.9, f"{a} vs {b}: IoU {iou:.3f}"


def test_deterministic_and_copies() -> None:
    first = shape_mask("mug", 64)
    first.paste(0, (0, 0, 64, 64))  # mutating a result must not poison the cache
    again = shape_mask("mug", 64)
    assert np.array_equal(_arr(again), _arr(shape_mask("mug", 64)))
    assert _arr(again).max() == 255
    assert np.array_equal(_arr(detail_mask("clock", 100)), _arr(detail_mask("clock", 100)))


def test_cutout_holes() -> None:
    # The mug handle hole is background between the body and the handle's outer rim.
    row = _arr(shape_mask("mug", 128))[64] > 127
    runs = np.flatnonzero(np.diff(row.astype(np.int8)))
    assert len(runs) >= 4


def test_large_size() -> None:
    img = shape_mask("umbrella", 1024)
    assert img.size == (1024, 1024)
    assert 0.08 <= (_arr(img) > 127).mean() <= 0.8


def test_unknown_shape() -> None:
    with pytest.raises(KeyError, match=r"valid shapes: .*tshirt"):
        shape_mask("spaceship", 64)
    with pytest.raises(KeyError, match="spaceship"):
        detail_mask("spaceship", 64)


def test_too_small_size() -> None:
    with pytest.raises(ValueError, match="size"):
        shape_mask("mug", 4)
