"""The models shipped under models/: checksums, loading, and their cards' numbers re-measured.

Every manifest under ``models/`` must load with a matching checksum. For the models this
project trained, the held-out metrics are measured again from ``../shared/data`` and
must reach the acceptance bars of issue #7 and equal (within 0.005) what the model's
``metrics.json`` (and so its card) states. Without the data those checks skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.inference.registry import load_model, read_manifest, verify_weights
from dicomnode.training.card import CARD_FILE, NOT_FOR_DIAGNOSIS, read_metrics

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
DATA = REPO.parent / "shared" / "data"
MANIFESTS = sorted(MODELS.glob("*/manifest.toml"))
#: All shipped weights together must stay at or below this (issue #7).
WEIGHTS_BUDGET = 40 * 1024 * 1024


def _need_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"training data not found at {path}: the re-measurement needs ../shared/data")
    return path


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.parent.name for m in MANIFESTS])
def test_manifest_loads_with_matching_checksum(manifest: Path) -> None:
    spec = read_manifest(manifest)
    verify_weights(spec)
    model = load_model(spec)
    if spec.task == "stacking":  # takes the members' outputs concatenated, not an image
        assert model.input_shape[1:] == (spec.input_size[0],)
    else:
        assert tuple(model.input_shape[1:]) == (*spec.input_size, spec.channels)
    card = manifest.parent / CARD_FILE
    assert card.is_file(), f"{manifest.parent.name} has no {CARD_FILE}"
    assert NOT_FOR_DIAGNOSIS in card.read_text(encoding="utf-8")


def test_shipped_weights_fit_the_budget() -> None:
    total = sum(read_manifest(m).weights.stat().st_size for m in MANIFESTS)
    assert total <= WEIGHTS_BUDGET, f"shipped weights are {total / 2**20:.1f} MiB"


def test_lung_unet_dice_on_held_out_patients() -> None:
    from dicomnode.training.recipes import lung

    folder = MODELS / lung.NAME
    if not folder.is_dir():
        pytest.fail(f"{folder} is not shipped")
    _need_data("cxr_lung_masks", "montgomery_shenzhen_512px")
    measured = lung.measure(folder, DATA)
    stated = read_metrics(folder)["metrics"]
    assert measured["n"] >= 15
    assert measured["mean_dice"] >= 0.90
    assert measured["mean_dice"] == pytest.approx(stated["mean_dice"], abs=0.005)
    assert measured["mean_iou"] == pytest.approx(stated["mean_iou"], abs=0.005)


def test_ct_classifier_auc_on_held_out_groups() -> None:
    from dicomnode.training.recipes import ct

    folder = MODELS / ct.NAME
    if not folder.is_dir():
        pytest.fail(f"{folder} is not shipped")
    _need_data("covid_ct_slices")
    measured = ct.measure(folder, DATA)["summary"]
    stated = read_metrics(folder)["metrics"]
    assert measured["n"] >= 20
    assert measured["auc"] >= 0.80
    assert measured["auc"] == pytest.approx(stated["auc"], abs=0.005)
    assert measured["accuracy"] == pytest.approx(stated["accuracy"], abs=0.005)
    assert measured["confusion_matrix"] == stated["confusion_matrix"]


def test_detector_card_numbers_on_held_out_patients(tmp_path: Path) -> None:
    """The detector's card numbers are what it measures now on the held-out NIH patients
    (the goals of issue 22 are not reached; the card says so, with the intervals)."""
    from dicomnode.training.recipes import detector

    folder = MODELS / detector.NAME
    if not folder.is_dir():
        pytest.fail(f"{folder} is not shipped")
    _need_data("cxr_opacity_boxes", "nih_cxr14_bbox")
    _need_data("cxr_multisource")
    stated = read_metrics(folder)
    copy = tmp_path / detector.NAME  # evaluate rewrites the card: measure a copy
    copy.mkdir()
    for item in folder.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    measured = detector.evaluate(copy, DATA)
    for key in ("rsna_score", "image_auc", "image_auc_score", "box_sensitivity_iou40"):
        assert measured[key] == pytest.approx(stated["metrics"][key], abs=0.005), key
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    for goal, met in (
        ("RSNA score >= 0.25", measured["rsna_score"] >= 0.25),
        ("image AUC >= 0.80", measured["image_auc"] >= 0.80),
    ):
        assert f"| {goal} | {'met' if met else 'NOT met'}" in card
