"""The shipped multi-source MobileNetV2 CXR classifier: its card re-measured, its OOD gate.

The NIH normal-vs-pneumonia AUC of the card is measured again on the held-out test
patients with the shipped weights, the calibration and gate files are checked, and the
gate must flag the non-chest radiographs of ``dicom_cxr`` and blank or noise images while
passing most in-domain test films. Without ``../shared/data`` these checks skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.inference.cxr_domain import DomainModel
from dicomnode.inference.registry import load_model, read_manifest
from dicomnode.training.card import read_metrics
from dicomnode.training.recipes import cxr_mobilenet as recipe
from tests.support import shared_data

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "models" / recipe.NAME


@pytest.fixture(scope="module")
def shipped() -> tuple[object, DomainModel, dict]:
    if not FOLDER.is_dir():
        pytest.fail(f"{FOLDER} is not shipped")
    spec = read_manifest(FOLDER / "manifest.toml")
    return load_model(spec), DomainModel.load(FOLDER), read_metrics(FOLDER)


def test_manifest_records_the_inference_recipe(shipped) -> None:
    _, domain, card = shipped
    spec = read_manifest(FOLDER / "manifest.toml")
    assert spec.architecture == "mobilenetv2_classifier"
    assert [c.name for c in spec.classes] == ["pneumonia", "covid19", "normal"]
    training = card["training"]
    assert training["temperature"] == pytest.approx(domain.temperature)
    assert training["ood_threshold"] == pytest.approx(domain.gate.threshold)
    assert set(domain.operating_points) == {"covid19", "pneumonia"}
    assert 0 < domain.operating_points["covid19"] < 1


def test_nih_auc_of_the_card_is_remeasured(shipped) -> None:
    from dicomnode.training.metrics import roc_auc

    model, domain, card = shipped
    data = shared_data("cxr_multisource")
    _, table, paths, keys = recipe._prepared(data.parent)
    rows = np.flatnonzero(
        (table.splits == "test") & (table.sources == "nih_cxr14") & np.isin(table.y, [0, 2])
    )
    _, p = recipe.model_features(
        model, [paths[i] for i in rows], domain.normalisation, "whole", [keys[i] for i in rows]
    )
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    auc = roc_auc((table.y[rows] == 0).astype(int), 1 - p[:, 2])
    stated = card["metrics"]["within_source"]["nih_normal_vs_pneumonia"]
    assert auc == pytest.approx(stated["auc"], abs=0.005)
    assert stated["ci95_low"] < auc < stated["ci95_high"]


def test_gate_flags_non_chest_and_garbage_but_not_chest_films(shipped, tmp_path: Path) -> None:
    from PIL import Image

    model, domain, _ = shipped
    legs = sorted(shared_data("dicom_cxr", "non_chest_radiographs").glob("*.dcm"))
    assert legs
    pooled, _ = recipe.model_features(model, legs, domain.normalisation, "whole", [str(p) for p in legs])
    assert domain.gate.outside(pooled).all()
    data = shared_data("cxr_multisource")
    _, table, paths, keys = recipe._prepared(data.parent)
    rows = np.flatnonzero(table.splits == "test")[::20]
    films = [paths[i] for i in rows]
    pooled, _ = recipe.model_features(model, films, domain.normalisation, "whole", [str(p) for p in films])
    assert domain.gate.outside(pooled).mean() <= 0.1
    rng = np.random.default_rng(0)
    probes = []
    for kind in ("blank", "random"):
        path = tmp_path / f"{kind}.png"
        from dicomnode.training.data import read_grey

        Image.fromarray(recipe.corrupted(read_grey(films[0]), kind, rng)).save(path)
        probes.append(path)
    pooled, _ = recipe.model_features(model, probes, domain.normalisation, "whole", [str(p) for p in probes])
    assert domain.gate.outside(pooled).all()
