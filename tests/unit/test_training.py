"""The training framework: metrics against hand-computed values, splits, resume, cards, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.inference.registry import load_model, read_manifest, sha256_of
from dicomnode.training import TrainingError, targets
from dicomnode.training import data as tdata
from dicomnode.training import metrics as m
from dicomnode.training.card import (
    NOT_FOR_DIAGNOSIS,
    DataSource,
    ModelCard,
    plot_confusion,
    plot_reliability,
    plot_roc,
    read_metrics,
    write_card,
)
from dicomnode.training.evaluate import evaluate_model
from dicomnode.training.export import ClassCode, device_uid, export_model, verify_export
from dicomnode.training.loop import FitSettings, fit, read_state

REPO = Path(__file__).resolve().parents[2]

# --- metrics ---------------------------------------------------------------------------


def test_dice_and_iou_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, 0:3] = True  # 3 pixels
    b[0, 1:4] = True  # 3 pixels, 2 shared
    assert m.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert m.iou(a, b) == pytest.approx(2 / 4)
    assert m.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert m.iou(a, np.zeros((4, 4))) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        m.dice(a, b[:3])


def test_auc_by_hand_with_ties() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    # Pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4.
    assert m.roc_auc(y, s) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: pairs 1, 0.5, 1, 1.
    assert m.roc_auc(y, np.array([0.1, 0.4, 0.4, 0.8])) == pytest.approx(3.5 / 4)
    assert m.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        m.roc_auc(np.array([1, 1]), np.array([0.2, 0.3]))


def test_roc_curve_points_and_area() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    fpr, tpr, thr = m.roc_curve(y, s)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[0] == np.inf and thr[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(m.roc_auc(y, s))
    # Youden: best J at threshold 0.35 (tpr 1, fpr .5) ties with 0.8 (tpr .5, fpr 0);
    # the first maximum (0.8) wins; midpoint to the next distinct score 0.4.
    assert m.youden_threshold(y, s) == pytest.approx(0.6)


def test_multiclass_auc_accuracy_confusion() -> None:
    y = np.array([0, 1, 2, 2])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.5, 0.3],  # wrong: predicted 1
            [0.1, 0.1, 0.8],
        ]
    )
    aucs = m.one_vs_rest_auc(y, p)
    assert aucs[0] == pytest.approx(1.0)
    # class 1: positive 0.6 against negatives 0.1, 0.5, 0.1 -> all below: 1.0
    assert aucs[1] == pytest.approx(1.0)
    # class 2: positives 0.3, 0.8 against 0.1, 0.1 -> 1.0
    assert aucs[2] == pytest.approx(1.0)
    assert m.macro_auc(y, p) == pytest.approx(1.0)
    pred = p.argmax(axis=1)
    assert m.accuracy(y, pred) == pytest.approx(0.75)
    assert m.confusion_matrix(y, pred, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="class indices"):
        m.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_calibration_by_hand() -> None:
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.9, 1.0])
    o = np.array([0, 1, 1, 1, 0, 1])
    cal = m.calibration(p, o, n_bins=2)
    assert cal.count.tolist() == [2, 4]
    assert cal.confidence.tolist() == pytest.approx([0.1, 0.925])
    assert cal.frequency.tolist() == pytest.approx([0.5, 0.75])
    assert cal.ece == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.175)
    top = m.top_label_calibration(np.array([0, 1]), np.array([[0.9, 0.1], [0.7, 0.3]]), 10)
    assert top.count.sum() == 2
    assert top.ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.7)
    summary = m.binary_summary(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert summary["confusion_matrix"] == [[1, 1], [0, 2]]
    assert summary["sensitivity"] == 1.0 and summary["specificity"] == 0.5


def test_bootstrap_resamples_keep_every_class_and_repeat_with_the_seed() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])  # one image each of classes 1 and 2
    resamples = m.bootstrap_resamples(y, 200, seed=3)
    assert 0 < len(resamples) < 200  # many draws miss class 1 or 2 and are dropped
    assert all(set(y[index]) == {0, 1, 2} and index.size == y.size for index in resamples)
    again = m.bootstrap_resamples(y, 200, seed=3)
    assert all((a == b).all() for a, b in zip(resamples, again, strict=True))
    with pytest.raises(ValueError, match="no labels"):
        m.bootstrap_resamples(np.array([], dtype=np.int64), 10, seed=0)


def test_paired_difference_separates_a_real_gap_from_noise() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    truth = np.eye(3)[y]
    good = 0.3 * truth + 0.7 * rng.dirichlet(np.ones(3), y.size)  # macro AUC about 0.88
    poor = 0.05 * truth + 0.95 * rng.dirichlet(np.ones(3), y.size)  # about 0.58
    gap = m.paired_macro_auc_difference(y, good, poor, count=300, seed=0)
    assert gap.difference == pytest.approx(m.macro_auc(y, good) - m.macro_auc(y, poor))
    assert gap.low > 0 and gap.share_at_least_zero == 1.0 and gap.resamples == 300
    same = m.paired_macro_auc_difference(y, good, good, count=50, seed=0)
    assert same.difference == same.low == same.high == 0.0
    # a small perturbation of the same model: the interval straddles zero
    near = good + 0.02 * rng.standard_normal(good.shape)
    noise = m.paired_macro_auc_difference(y, near, good, count=300, seed=0)
    assert noise.low < 0 < noise.high and 0 < noise.share_at_least_zero < 1
    assert set(gap.as_dict()) == {
        "difference",
        "ci95_low",
        "ci95_high",
        "share_at_least_zero",
        "resamples",
    }
    with pytest.raises(ValueError, match="differ in shape"):
        m.paired_macro_auc_difference(y, good, good[:, :2])


# --- data --------------------------------------------------------------------------------


def test_split_is_deterministic_stratified_and_group_disjoint() -> None:
    keys = [f"patient-{i:03d}" for i in range(200)]
    strata = {k: i % 2 for i, k in enumerate(keys)}
    first = tdata.split_groups(keys, "salt-a", strata=strata)
    assert first == tdata.split_groups(list(reversed(keys)), "salt-a", strata=strata)
    assert first != tdata.split_groups(keys, "salt-b", strata=strata)
    for stratum in (0, 1):
        chosen = [first[k] for k in keys if strata[k] == stratum]
        assert chosen.count("train") == 70 and chosen.count("val") == 15
        assert chosen.count("test") == 15
    # Items of one group always share its split.
    groups = [k for k in keys for _ in range(3)]
    splits = [first[g] for g in groups]
    tdata.assert_group_disjoint(groups, splits)
    counts = tdata.split_counts(splits, groups)
    assert counts["test"] == {"images": 90, "groups": 30}
    with pytest.raises(TrainingError, match="'patient-000' is in both"):
        tdata.assert_group_disjoint(["patient-000", "patient-000"], ["train", "test"])
    with pytest.raises(TrainingError, match="add up to 1"):
        tdata.split_groups(keys, "s", fractions=(0.5, 0.2, 0.2))


def test_read_grey_modes(tmp_path: Path) -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 255  # pure red, alpha 0: alpha is ignored
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    grey = tdata.read_grey(tmp_path / "a.png")
    assert grey.shape == (4, 5) and grey.dtype == np.uint8
    assert int(grey[0, 0]) == 76  # ITU-R 601 luma of red: 0.299 * 255
    Image.fromarray(np.full((3, 3), 200, np.uint8), "L").save(tmp_path / "b.jpg")
    assert abs(int(tdata.read_grey(tmp_path / "b.jpg")[1, 1]) - 200) <= 2
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(TrainingError, match=r"c\.png"):
        tdata.read_grey(tmp_path / "c.png")


def test_augmentation_moves_image_and_mask_together() -> None:
    image = np.zeros((64, 64), np.uint8)
    image[20:40, 10:30] = 255
    mask = (image > 0).astype(np.uint8)
    aug = tdata.Augmentation()
    same = 0
    for draw in range(8):
        out, out_mask = aug.apply(np.random.default_rng(draw), image, mask)
        assert out_mask is not None and set(np.unique(out_mask)) <= {0, 1}
        assert m.dice(out > 127, out_mask) > 0.9
        same += int(np.array_equal(out, image))
        again, _ = aug.apply(np.random.default_rng(draw), image, mask)
        assert np.array_equal(out, again)
    assert same == 0
    jitter = tdata.IntensityJitter()
    grey = (image // 2 + 60).astype(np.uint8)  # 60 and 187: room to move both ways
    jittered = jitter.apply(np.random.default_rng(1), grey)
    assert jittered.dtype == np.uint8 and jittered.shape == image.shape
    assert not np.array_equal(jittered, grey)
    assert np.array_equal(jittered, jitter.apply(np.random.default_rng(1), grey))
    # Order of grey levels is kept: the bright square stays brighter than the background.
    assert jittered[30, 20] > jittered[5, 5]


# --- loop: resume --------------------------------------------------------------------


def _tiny_problem(
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((48, 8, 8, 1)).astype(np.float32)
    y = (x[:, :4, :, 0].mean(axis=(1, 2)) > 0.5).astype(np.float32)[:, None]
    return x[:32], y[:32], x[32:], y[32:]


def _tiny_model():  # type: ignore[no-untyped-def]
    import keras

    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return model


def _fit(checkpoints: Path, epochs: int, fingerprint: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    x, y, vx, vy = _tiny_problem()

    def train_batches(epoch: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
        for idx in tdata.batches(len(x), 8, rng):
            yield x[idx], y[idx]

    def validate(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
        p = model.predict(vx, verbose=0)[:, 0]
        return {"val_auc": m.roc_auc(vy[:, 0], p)}

    settings = FitSettings(
        epochs=epochs,
        checkpoint_dir=checkpoints,
        seed=3,
        steps_per_epoch=4,
        monitor="val_auc",
        mode="max",
        progress=False,
        fingerprint=fingerprint or {"target": "tiny"},
    )
    return fit(_tiny_model, train_batches, validate, settings)


def test_resume_continues_after_the_last_completed_epoch(tmp_path: Path) -> None:
    first = _fit(tmp_path / "ckpt", epochs=1)
    assert first.resumed_from == 0 and [h["epoch"] for h in first.history] == [1]
    state = read_state(tmp_path / "ckpt")
    assert state is not None and state["epochs_completed"] == 1
    # "Crash" after epoch 1; the same command with 3 epochs continues at epoch 2.
    second = _fit(tmp_path / "ckpt", epochs=3)
    assert second.resumed_from == 1
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[0] == first.history[0]
    assert second.best_epoch in (1, 2, 3)
    assert second.best_score == max(h["val_auc"] for h in second.history)
    # Optimizer state came back: Adam's step counter went on from epoch 1's 4 steps.
    import keras

    last = keras.models.load_model(tmp_path / "ckpt" / "last.keras")
    assert int(keras.ops.convert_to_numpy(last.optimizer.iterations)) == 12
    # Nothing left to do: a third run trains no epoch.
    third = _fit(tmp_path / "ckpt", epochs=3)
    assert third.resumed_from == 3 and len(third.history) == 3
    with pytest.raises(TrainingError, match="belongs to another run"):
        _fit(tmp_path / "ckpt", epochs=4, fingerprint={"target": "other"})


# --- card and export -----------------------------------------------------------------


def test_card_metrics_json_and_plots(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.2, 0.6, 0.55, 0.7, 0.9])
    fpr, tpr, _ = m.roc_curve(y, s)
    auc = m.roc_auc(y, s)
    cal = m.calibration(s, y, 5)
    card = ModelCard(
        name="demo",
        version="1.0.0",
        title="Demo model",
        summary="A test card.",
        architecture="tiny",
        input="8 x 8 grey",
        data=[DataSource("synthetic", "Random numbers.", "CC0")],
        split_method="By group.",
        split_counts={"train": {"images": 3, "groups": 2}, "test": {"images": 5, "groups": 5}},
        training={"epochs": 2},
        metrics={"auc": auc, "calibration": cal},
        tables=[("AUC", f"{auc:.4f}")],
        plots=[("ROC", "roc.png")],
        limitations=["Tiny."],
    )
    plot_roc({"demo": (fpr, tpr, auc)}, tmp_path / "roc.png")
    plot_confusion(np.array([[1, 1], [0, 3]]), ["no", "yes"], tmp_path / "cm.png")
    plot_reliability({"demo": cal}, tmp_path / "rel.png")
    card_path, metrics_path = write_card(tmp_path, card)
    text = card_path.read_text()
    assert NOT_FOR_DIAGNOSIS in text and "CC0" in text and "| test | 5 | 5 |" in text
    saved = read_metrics(tmp_path)
    assert saved["metrics"]["auc"] == pytest.approx(auc)
    assert saved["metrics"]["calibration"]["count"] == cal.count.tolist()
    assert json.loads(metrics_path.read_text())["name"] == "demo"
    for png in ("roc.png", "cm.png", "rel.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_round_trip_through_the_registry(tmp_path: Path) -> None:
    model = _tiny_model()
    spec = export_model(
        model,
        tmp_path / "tiny-ct",
        name="tiny-ct",
        version="0.1.0",
        task="ct-classifier",
        architecture="densenet121_sigmoid",
        input_size=(8, 8),
        channels=1,
        builder={"growth_rate": 4, "blocks": [1, 1]},
        classes=[ClassCode("covid19", "840539006", "SCT", "COVID-19")],
        gradcam_layer="relu",
        threshold=0.42,
        input_extra={"window_center": -600.0, "window_width": 1500.0},
        training={"target": "nonexistent-target", "seed": 3},
        description="A test export.",
    )
    assert spec.sha256 == sha256_of(tmp_path / "tiny-ct" / "model.keras")
    assert spec.threshold == pytest.approx(0.42)
    assert spec.device_uid == device_uid("tiny-ct", "0.1.0")
    assert spec.device_uid.startswith("2.25.") and len(spec.device_uid) <= 64
    assert spec.builder == {"growth_rate": 4, "blocks": [1, 1]}
    assert spec.class_names == ["covid19"] and spec.gradcam_layer == "relu"
    again = read_manifest(tmp_path / "tiny-ct" / "manifest.toml")
    assert again == spec
    loaded = load_model(again)
    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    assert np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert verify_export(tmp_path / "tiny-ct")[0] == spec
    with pytest.raises(TrainingError, match="unknown training target 'nonexistent-target'"):
        evaluate_model(tmp_path / "tiny-ct", tmp_path)


# --- command line --------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_cli_rejects_unknown_target_and_missing_data(tmp_path: Path) -> None:
    unknown = _cli("train", "no-such-target")
    assert unknown.returncode == 2
    assert "invalid choice: 'no-such-target'" in unknown.stderr
    for name in targets():
        assert name in unknown.stderr
    missing = _cli("evaluate", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no manifest.toml" in missing.stderr


def test_reports_write_plots_and_numbers(tmp_path: Path) -> None:
    from dicomnode.training.card import binary_report, classifier_report

    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    report = classifier_report(y, p, ["a", "b", "c"], tmp_path, "member", "m_")
    assert report.metrics["accuracy"] == pytest.approx(0.75)
    assert report.metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert report.metrics["auc"]["a"] == pytest.approx(1.0)
    assert {name for _, name in report.plots} == {
        "m_roc.png",
        "m_confusion.png",
        "m_reliability.png",
    }
    binary = binary_report(
        np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), 0.5, ("neg", "pos"), tmp_path, "ct"
    )
    assert binary.metrics["auc"] == pytest.approx(1.0)
    assert binary.metrics["confusion_matrix"] == [[1, 1], [0, 2]]
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "confusion.png").is_file()


# --- detector: the RSNA-format command end to end on synthetic images ------------------


def _rsna_folder(root: Path) -> tuple[Path, Path, dict[str, tuple[int, int, int, int]]]:
    """30 patients: 64 x 64 noisy greys; half have one bright box (the "opacity").

    Most images are PNG, a few DICOM (as RSNA ships them); labels as in
    stage_2_train_labels.csv: one row per box, or one empty row with Target 0.
    """
    from support import make_instance

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(7)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    lines = ["patientId,x,y,width,height,Target"]
    for n in range(30):
        pid = f"{n:04d}-synthetic"
        pixels = rng.normal(70, 12, (64, 64)).clip(0, 255)
        if n % 2 == 0:
            w, h = (int(v) for v in rng.integers(14, 24, 2))
            x, y = (int(v) for v in rng.integers(4, 64 - 24, 2))
            pixels[y : y + h, x : x + w] += 120
            boxes[pid] = (x, y, w, h)
            lines.append(f"{pid},{x},{y},{w},{h},1")
        else:
            lines.append(f"{pid},,,,,0")
        grey = pixels.clip(0, 255).astype(np.uint8)
        if n % 5 == 0:
            path = make_instance(
                images,
                modality="CR",
                patient_id=pid,
                extra={
                    "BitsAllocated": 8,
                    "BitsStored": 8,
                    "HighBit": 7,
                    "PixelData": grey.tobytes(),
                },
            )
            path.rename(images / f"{pid}.dcm")
        else:
            Image.fromarray(grey, "L").save(images / f"{pid}.png")
    labels = root / "stage_2_train_labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return labels, images, boxes


def test_detector_reads_any_rsna_format_folder(tmp_path: Path) -> None:
    """A site's own RSNA-format folder (PNG and DICOM): every labelled image found, its
    boxes, patient-level splits (training itself: tests/unit/test_detector.py)."""
    from dicomnode.training.recipes.detector import assign_splits, patient_of, read_labels

    labels, images, boxes = _rsna_folder(tmp_path / "rsna")
    cases = read_labels(labels, images)
    assert len(cases) == 30 and sum(bool(c.boxes) for c in cases) == 15
    assert sum(c.image.suffix == ".dcm" for c in cases) == 6
    assert {c.patient_id: tuple(c.boxes[0]) for c in cases if c.boxes} == {
        k: tuple(float(v) for v in b) for k, b in boxes.items()
    }
    tdata.assert_group_disjoint([c.group for c in cases], assign_splits(cases))
    assert (
        patient_of("00000150_002") == "00000150"
        and patient_of("0004-synthetic") == "0004-synthetic"
    )
