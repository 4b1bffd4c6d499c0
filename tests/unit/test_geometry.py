"""Numeric checks of the pipeline's array steps on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.inference.ensemble import combine
from dicomnode.inference.geometry import (
    Box,
    boxes_from_probability,
    crop,
    lung_box,
    normalize_heatmap,
)


def test_lung_box_relaxes_by_five_percent_of_the_extent() -> None:
    mask = np.zeros((256, 256), bool)
    mask[40:240, 20:120] = True  # rows 40..239 (200), cols 20..119 (100)
    mask[60:200, 140:230] = True  # cols 140..229: columns 20..229 in all (210)
    box = lung_box(mask)
    assert box == Box(x=20 - 10, y=40 - 10, width=210 + 20, height=200 + 20)


def test_lung_box_is_clipped_to_the_image() -> None:
    mask = np.zeros((100, 100), bool)
    mask[1:100, 0:60] = True  # touches top-1, bottom and left edges
    box = lung_box(mask)
    assert box is not None
    assert (box.x, box.y) == (0, 0)  # 1 - int(0.05 * 99) = -3 -> 0
    assert box.x + box.width == 63 and box.y + box.height == 100
    assert lung_box(np.zeros((10, 10), bool)) is None


def test_crop_cuts_the_box_and_resizes() -> None:
    image = np.zeros((100, 200), np.uint8)
    image[10:30, 50:90] = 255
    out = crop(image, Box(50, 10, 40, 20), 64)
    assert out.shape == (64, 64)
    assert out.min() == 255  # exactly the white block


def test_boxes_from_known_components() -> None:
    prob = np.zeros((50, 60), np.float32)
    prob[5:15, 5:25] = 0.9  # component A: 20 x 10, mean 0.9
    prob[30:40, 40:50] = 0.6  # component B: 10 x 10
    prob[32:34, 42:44] = 1.0  # brighter spot inside B
    prob[45:47, 2:4] = 0.4  # below threshold
    boxes = boxes_from_probability(prob, 0.5)
    assert [(b.x, b.y, b.width, b.height) for b in boxes] == [(5, 5, 20, 10), (40, 30, 10, 10)]
    assert boxes[0].confidence == pytest.approx(0.9)
    assert boxes[1].confidence == pytest.approx((0.6 * 96 + 1.0 * 4) / 100)


def test_boxes_are_kept_inside_the_lungs() -> None:
    prob = np.zeros((50, 60), np.float32)
    prob[5:15, 5:25] = 0.9
    prob[30:40, 40:50] = 0.9
    lungs = np.zeros((50, 60), bool)
    lungs[0:20, 0:30] = True
    boxes = boxes_from_probability(prob, 0.5, inside=lungs)
    assert [(b.x, b.y) for b in boxes] == [(5, 5)]


def test_box_scaling_maps_back_to_source_pixels() -> None:
    box = Box(64, 32, 16, 8, 0.7).scaled(4, 2).shifted(10, 20)
    assert box == Box(266, 84, 64, 16, 0.7)
    assert box.within(330, 100) and not box.within(300, 100)


P = np.array(
    [
        [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]],  # member 1, two images
        [[0.1, 0.3, 0.6], [0.6, 0.3, 0.1]],  # member 2
        [[0.3, 0.4, 0.3], [0.2, 0.5, 0.3]],  # member 3
    ]
)


def test_weighted_average_with_seed_weights() -> None:
    out = combine(P, "weighted", weights=[0.1, 0.4, 0.5])
    expected0 = [
        0.1 * 0.2 + 0.4 * 0.1 + 0.5 * 0.3,
        0.1 * 0.5 + 0.4 * 0.3 + 0.5 * 0.4,
        0.1 * 0.3 + 0.4 * 0.6 + 0.5 * 0.3,
    ]
    assert out[0] == pytest.approx(expected0)
    assert out.sum(axis=1) == pytest.approx([1, 1])


def test_mean_vote_and_stacking() -> None:
    assert combine(P, "mean")[1] == pytest.approx([0.5, 1 / 3, 0.5 / 3])
    # image 0: top classes 1, 2, 1 -> votes 0, 2/3, 1/3; image 1: 0, 0, 1 -> 2/3, 1/3, 0
    assert combine(P, "vote") == pytest.approx(np.array([[0, 2 / 3, 1 / 3], [2 / 3, 1 / 3, 0]]))
    seen = {}

    def meta(x: np.ndarray) -> np.ndarray:
        seen["x"] = x
        return np.tile([1.0, 1.0, 2.0], (x.shape[0], 1))

    out = combine(P, "stacking", meta=meta)
    assert seen["x"].shape == (2, 9)
    assert seen["x"][0].tolist() == pytest.approx([0.2, 0.5, 0.3, 0.1, 0.3, 0.6, 0.3, 0.4, 0.3])
    assert out == pytest.approx(np.array([[0.25, 0.25, 0.5]] * 2))


def test_ensemble_errors_quote_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        combine(P, "weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="'median'"):
        combine(P, "median")


def test_normalize_heatmap() -> None:
    cam = np.array([[-1.0, 0.0], [2.0, 4.0]])
    assert normalize_heatmap(cam).tolist() == [[0.0, 0.0], [0.5, 1.0]]
    assert normalize_heatmap(-cam * 0).max() == 0
