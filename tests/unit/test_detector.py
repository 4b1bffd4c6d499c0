"""The opacity detector: box post-processing on constructed maps, the box metrics, and
``dicomnode train detector`` on a small real subset (skipped without ../shared/data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicomnode.inference.detector import (
    BoxSettings,
    boxes_from_detector,
    boxes_in_lungs,
    image_score,
    merge_overlapping,
)
from dicomnode.inference.geometry import Box
from dicomnode.training.box_metrics import (
    ImageBoxes,
    box_iou,
    box_sensitivity,
    false_boxes_per_negative,
    froc,
    rsna_image_score,
    rsna_score,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
BOXES = DATA / "cxr_opacity_boxes" / "nih_cxr14_bbox"
PRETRAINED = DATA / "pretrained" / "mobilenet_v2_imagenet"

ALL_LUNG = np.ones((200, 200), bool)
OPEN = BoxSettings(threshold=0.5, gate=0.0, min_area=0.0, max_boxes=10, lung_margin=0.0)


def _blobs(*rects: tuple[int, int, int, int, float]) -> np.ndarray:
    prob = np.zeros((200, 200), np.float32)
    for x, y, w, h, p in rects:
        prob[y : y + h, x : x + w] = p
    return prob


# --- post-processing ----------------------------------------------------------------


def test_one_box_per_component_with_mean_probability() -> None:
    prob = _blobs((10, 10, 20, 30, 0.9), (100, 120, 40, 20, 0.7))
    boxes = boxes_in_lungs(prob, ALL_LUNG, OPEN)
    assert [(b.x, b.y, b.width, b.height) for b in boxes] == [(10, 10, 20, 30), (100, 120, 40, 20)]
    assert boxes[0].confidence == pytest.approx(0.9) and boxes[1].confidence == pytest.approx(0.7)


def test_minimum_area_drops_small_components() -> None:
    prob = _blobs((10, 10, 40, 40, 0.9), (150, 150, 5, 5, 0.95))
    kept = boxes_in_lungs(prob, ALL_LUNG, OPEN.with_(min_area=0.01))  # 400 px floor
    assert [(b.x, b.y) for b in kept] == [(10, 10)]
    assert len(boxes_in_lungs(prob, ALL_LUNG, OPEN)) == 2


def test_overlapping_boxes_merge_into_their_union() -> None:
    prob = _blobs((10, 10, 80, 80, 0.5))
    merged = merge_overlapping(
        [Box(10, 10, 50, 50, 0.9), Box(40, 40, 50, 50, 0.8), Box(150, 150, 10, 10, 0.7)], prob
    )
    spans = {(b.x, b.y, b.width, b.height): b.confidence for b in merged}
    assert set(spans) == {(10, 10, 80, 80), (150, 150, 10, 10)}
    # the union's confidence is the mean probability inside it; the lone box keeps its own
    assert spans[(10, 10, 80, 80)] == pytest.approx(0.5)
    assert [b.confidence for b in merged] == pytest.approx([0.7, 0.5])


def test_lung_gating_keeps_boxes_inside_the_lungs() -> None:
    lungs = np.zeros((200, 200), bool)
    lungs[20:180, 20:90] = True
    prob = _blobs((30, 40, 30, 30, 0.9), (140, 40, 30, 30, 0.9), (80, 100, 30, 30, 0.9))
    kept = boxes_in_lungs(prob, lungs, OPEN)
    # inside: whole; right of the lung: dropped; straddling the edge: cut at the lung
    assert sorted((b.x, b.y, b.width, b.height) for b in kept) == [
        (30, 40, 30, 30),
        (80, 100, 10, 30),
    ]
    widened = boxes_in_lungs(prob, lungs, OPEN.with_(lung_margin=0.1))  # 20 px wider
    assert sorted((b.x, b.y, b.width, b.height) for b in widened) == [
        (30, 40, 30, 30),
        (80, 100, 30, 30),
    ]
    # a map high everywhere gives one box no larger than the (widened) lungs
    [whole] = boxes_in_lungs(np.full((200, 200), 0.9, np.float32), lungs, OPEN)
    assert (whole.x, whole.y, whole.width, whole.height) == (20, 20, 70, 160)


def test_gate_and_at_most_n_boxes() -> None:
    prob = _blobs((10, 10, 20, 20, 0.9), (60, 60, 20, 20, 0.8), (120, 120, 20, 20, 0.6))
    assert image_score(prob, 8) == pytest.approx(0.9)
    assert boxes_in_lungs(prob, ALL_LUNG, OPEN.with_(gate=0.95)) == []
    top2 = boxes_in_lungs(prob, ALL_LUNG, OPEN.with_(max_boxes=2))
    assert [b.confidence for b in top2] == pytest.approx([0.9, 0.8])


def test_detector_map_is_resized_to_the_source() -> None:
    small = np.zeros((32, 32), np.float32)
    small[8:16, 4:12] = 1.0
    boxes = boxes_from_detector(small, np.ones((256, 256), bool), OPEN)
    assert len(boxes) == 1
    b = boxes[0]
    assert abs(b.x - 32) <= 4 and abs(b.y - 64) <= 4 and abs(b.width - 64) <= 8


def test_postprocess_table_round_trip_and_unknown_key() -> None:
    settings = BoxSettings(threshold=0.4, max_boxes=2)
    assert BoxSettings.from_table(settings.as_table()) == settings
    with pytest.raises(ValueError, match="unknown keys"):
        BoxSettings.from_table({"thresh": 0.5})


# --- metrics -----------------------------------------------------------------------


def test_rsna_score_matches_hand_computation() -> None:
    truth = [(0.0, 0.0, 100.0, 100.0)]
    assert box_iou(truth[0], (0, 0, 100, 50)) == pytest.approx(0.5)
    # IoU 0.5: a TP at thresholds 0.40 and 0.45 (strictly above), FP+FN at the 6 others
    half = ImageBoxes(truth, [((0, 0, 100, 50), 0.9)])
    assert rsna_image_score(half) == pytest.approx((1 + 1 + 0 * 6) / 8)
    # a false box on a negative image scores 0; nothing on a negative is skipped
    assert rsna_image_score(ImageBoxes([], [((0, 0, 5, 5), 0.9)])) == 0.0
    assert rsna_image_score(ImageBoxes([], [])) is None
    # greedy by confidence: the confident exact box takes the truth, the other is FP
    two = ImageBoxes(truth, [((0, 0, 100, 50), 0.5), ((0, 0, 100, 100), 0.9)])
    assert rsna_image_score(two) == pytest.approx(0.5)
    assert rsna_score([half, ImageBoxes([], [])]) == pytest.approx(0.25)


def test_sensitivity_false_boxes_and_froc() -> None:
    images = [
        ImageBoxes([(0, 0, 10, 10)], [((0, 0, 10, 10), 0.9)]),
        ImageBoxes([(50, 50, 10, 10)], [((0, 0, 10, 10), 0.8)]),
        ImageBoxes([], [((0, 0, 10, 10), 0.7), ((20, 20, 5, 5), 0.6)]),
        ImageBoxes([], []),
    ]
    assert box_sensitivity(images) == pytest.approx(0.5)
    assert false_boxes_per_negative(images) == pytest.approx(1.0)
    fp, sens = froc(images)
    assert sens[1] == pytest.approx(0.5) and fp[1] == 0.0
    assert fp[-1] == pytest.approx(3 / 4) and sens[-1] == pytest.approx(0.5)


# --- the trainer on a small real subset ----------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )


@pytest.mark.skipif(
    not (BOXES.is_dir() and PRETRAINED.is_dir()),
    reason=f"real boxes or pretrained weights absent ({BOXES}, {PRETRAINED})",
)
def test_trainer_on_a_small_real_subset(tmp_path: Path) -> None:
    from dicomnode.inference.registry import read_manifest
    from dicomnode.training import data as tdata
    from dicomnode.training.card import read_metrics
    from dicomnode.training.recipes.detector import (
        assign_splits,
        combine_cases,
        read_image_labels,
        read_labels,
    )

    boxed = read_labels(BOXES / "labels_rsna_format.csv", BOXES / "images")
    assert len(boxed) == 150 and sum(bool(c.boxes) for c in boxed) == 100
    weak = read_image_labels(
        DATA / "cxr_multisource" / "labels.csv", "normal", "pneumonia", "nih_cxr14"
    )
    cases = combine_cases(boxed, weak)
    assert len(cases) < len(boxed) + len(weak)  # an image in both sources counts once
    splits = assign_splits(cases)
    tdata.assert_group_disjoint([c.group for c in cases], splits)
    assert {c.group for c in cases if c.patient_id.startswith("00000150_")} == {"00000150"}

    out = tmp_path / "det"
    args = [
        "train",
        "detector",
        "--limit",
        "90",
        "--input-size",
        "128",
        "--channels",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--pretrained",
        str(PRETRAINED),
        "--out",
        str(out),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder features" in done.stderr  # the progress bar
    spec = read_manifest(out / "manifest.toml")
    assert spec.task == "detector" and spec.architecture == "opacity_mobilenet"
    assert BoxSettings.from_table(spec.postprocess).max_boxes in (1, 2, 3)
    saved = read_metrics(out)
    for key in ("rsna_score", "image_auc", "box_sensitivity_iou40", "false_boxes_per_negative"):
        low, high = saved["metrics"][f"{key}_ci95"]
        assert low <= saved["metrics"][key] <= high or np.isnan(saved["metrics"][key])
    assert (out / "froc.png").is_file() and (out / "examples.png").is_file()
    assert "RSNA score >= 0.25" in (out / "MODEL_CARD.md").read_text()
    # The same command resumes (features cached, no epoch left); evaluate re-measures.
    again = _cli(*args, "--no-progress")
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    evaluated = _cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["rsna_score"] == pytest.approx(
        saved["metrics"]["rsna_score"], abs=1e-6
    )


def test_detector_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    done = _cli("train", "detector", "--labels", str(tmp_path / "x.csv"), "--images", str(tmp_path))
    assert done.returncode == 1
    assert "--labels" in done.stderr
