"""The shipped CXR ensemble, re-measured on the held-out test patients of ../shared/data.

Checks: every member and the stacking model load with matching checksums; the members
were trained on the input their manifests record (``[training] sources`` and ``crop``),
and the test images are read and cut the same way: for ``lung``, by the CXR pipeline's
own lung-mask and crop functions with the lung model the manifests name (cached under
``build/cache/``); the ensemble with the card's recommended strategy reaches macro ROC
AUC >= 0.85 (being at least its best member is not met: an expected failure, with the
card's paired bootstrap of the gap re-measured); most held-out adult normals are called
normal; one member is pruned by >= 20 % of its parameters while its validation AUC stays
within 0.02 of the unpruned model; the numbers in the cards' ``metrics.json`` are the
ones measured here (within 0.005); and the node's pipeline cuts a real chest file
exactly as the training data were cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import shared_data

from dicomnode.imaging import to_uint8
from dicomnode.inference.ensemble import combine
from dicomnode.inference.geometry import crop
from dicomnode.inference.registry import load_model, read_manifest, sha256_of
from dicomnode.training.cxr_data import load_cxr_set, lung_crops, to_model_input
from dicomnode.training.export import training_table
from dicomnode.training.metrics import macro_auc, paired_macro_auc_difference

MODELS = Path(__file__).resolve().parents[2] / "models"
MEMBERS = ("cxr-vgg16", "cxr-vgg19", "cxr-inceptionv3")
STACKING = "cxr-stacking"
TOLERANCE = 0.005


def _metrics(name: str) -> dict[str, Any]:
    return json.loads((MODELS / name / "metrics.json").read_text(encoding="utf-8"))["metrics"]


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    """Members' and ensembles' test probabilities, and members' validation AUC."""
    data_root = shared_data("cxr_classification").parent
    specs = {name: read_manifest(MODELS / name / "manifest.toml") for name in MEMBERS}
    models = {name: load_model(spec) for name, spec in specs.items()}  # checks sha256
    first = specs[MEMBERS[0]]
    training = training_table(first.manifest)  # type: ignore[arg-type]
    crops = {training_table(spec.manifest).get("crop", "none") for spec in specs.values()}  # type: ignore[arg-type]
    assert len(crops) == 1, f"members trained on different inputs: {crops}"
    data = load_cxr_set(
        data_root,
        first.input_size[0],
        fractions=tuple(training["split_fractions"]),
        salt=training["split_salt"],
        crop=crops.pop(),
        sources=tuple(training["sources"]),
    )
    if data.crop == "lung":
        assert data.lung_model_sha256 == training["crop_lung_model_sha256"]
    out: dict[str, Any] = {
        "specs": specs,
        "val_auc": {},
        "crop": data.crop,
        "test_sources": [image.source for image in data.images if image.split == "test"],
    }
    for split in ("val", "test"):
        pixels, labels = data.split(split)
        x = to_model_input(pixels, first.channels, first.scale)
        probabilities = np.stack(
            [np.asarray(models[n].predict(x, batch_size=16, verbose=0)) for n in MEMBERS]
        )
        out[split] = (probabilities, labels)
    p_val, y_val = out["val"]
    out["val_auc"] = {n: macro_auc(y_val, p) for n, p in zip(MEMBERS, p_val, strict=True)}
    stacking_spec = read_manifest(MODELS / STACKING / "manifest.toml")
    out["meta"] = load_model(stacking_spec)
    return out


def test_shipped_weights_match_their_manifests() -> None:
    for name in (*MEMBERS, STACKING):
        spec = read_manifest(MODELS / name / "manifest.toml")
        assert sha256_of(spec.weights) == spec.sha256, name
        assert [c.name for c in spec.classes] == ["pneumonia", "covid19", "normal"]
        if name != STACKING:
            assert spec.ensemble_weight is not None and spec.ensemble_weight >= 0


def test_members_match_their_cards(measured: dict[str, Any]) -> None:
    p_test, y_test = measured["test"]
    for name, p in zip(MEMBERS, p_test, strict=True):
        card = _metrics(name)
        assert abs(macro_auc(y_test, p) - card["macro_auc"]) <= TOLERANCE, name
        assert abs(measured["val_auc"][name] - card["val_macro_auc"]) <= TOLERANCE, name


def _ensemble(measured: dict[str, Any], strategy: str) -> np.ndarray:
    """The test patients' probabilities of the shipped ensemble with ``strategy``."""
    p_test, _ = measured["test"]
    meta = measured["meta"]
    weights = [measured["specs"][n].ensemble_weight for n in MEMBERS]
    return combine(
        p_test,
        strategy,
        weights=weights if strategy == "weighted" else None,
        meta=(lambda x: np.asarray(meta.predict(x, verbose=0))) if strategy == "stacking" else None,
    )


def _test_ensembles(measured: dict[str, Any]) -> tuple[dict[str, float], list[float]]:
    """Macro ROC AUC on the test patients of every strategy, and of each member."""
    p_test, y_test = measured["test"]
    names = ("weighted", "mean", "vote", "stacking")
    strategies = {name: macro_auc(y_test, _ensemble(measured, name)) for name in names}
    return strategies, [macro_auc(y_test, p) for p in p_test]


def test_the_recommended_ensemble_reaches_085_on_held_out_patients(
    measured: dict[str, Any],
) -> None:
    """The recommended strategy (the card's, chosen on validation) on the test patients,
    and every strategy's number in the card is the one measured here."""
    card = _metrics(STACKING)
    strategies, _ = _test_ensembles(measured)
    strategy = card["recommended_strategy"]
    assert strategies[strategy] >= 0.85, f"{strategy} ensemble macro AUC {strategies[strategy]:.4f}"
    for other, auc in strategies.items():
        assert abs(auc - card["ensembles"][other]["macro_auc"]) <= TOLERANCE, other


def test_the_cards_ensemble_versus_best_member_is_measured_here(
    measured: dict[str, Any],
) -> None:
    """The card's paired bootstrap of the recommended ensemble minus the best member on
    the test patients is re-measured here (same resamples, same seed)."""
    card = _metrics(STACKING)
    recorded = card["versus_best_member"]
    p_test, y_test = measured["test"]
    aucs = [macro_auc(y_test, p) for p in p_test]
    best = int(np.argmax(aucs))
    assert recorded["member"] == MEMBERS[best]
    gap = paired_macro_auc_difference(
        y_test,
        _ensemble(measured, card["recommended_strategy"]),
        p_test[best],
        count=recorded["resamples"],
    )
    assert gap.resamples == recorded["resamples"]
    for key, value in gap.as_dict().items():
        assert abs(value - recorded[key]) <= TOLERANCE, key
    assert gap.low <= gap.difference <= gap.high


@pytest.mark.xfail(
    strict=True,
    reason="not met (issue #7, blocked): the recommended strategy (mean, chosen on "
    "validation) scores 0.8887 on the 101 test images, below its best member (cxr-vgg16, "
    "0.8971); the difference, -0.0084, has a 95 % paired bootstrap interval of -0.031 to "
    "+0.014: too few labelled images here to settle it either way",
)
def test_the_recommended_ensemble_is_at_least_its_best_member(measured: dict[str, Any]) -> None:
    strategies, members = _test_ensembles(measured)
    strategy = _metrics(STACKING)["recommended_strategy"]
    assert strategies[strategy] >= max(members), (
        f"{strategy} {strategies[strategy]:.4f} < best member {max(members):.4f}"
    )


def test_held_out_adult_normals_are_mostly_called_normal(measured: dict[str, Any]) -> None:
    """The node sees adult chest films. Members trained without adult normals called 50 of
    the 60 NLM adult normals COVID-19 (the class followed the age of the source); the
    shipped ensemble must call most held-out adult normals normal, and the card's
    per-source table must be what is measured here."""
    _, y_test = measured["test"]
    sources = np.array(measured["test_sources"])
    card = _metrics(STACKING)
    strategy = card["recommended_strategy"]
    called = _ensemble(measured, strategy).argmax(axis=1)
    adult_normal = sources == "nlm"
    assert adult_normal.sum() >= 10 and (y_test[adult_normal] == 2).all()
    as_normal = int((called[adult_normal] == 2).sum())
    assert as_normal > adult_normal.sum() / 2, (
        f"{strategy} ensemble called {as_normal} of {adult_normal.sum()} adult normals normal"
    )
    recorded = card["by_source"]["nlm"]["models"][f"ensemble ({strategy})"]["called"]
    assert recorded["normal"] == as_normal


def test_the_members_were_trained_on_the_nodes_lung_crops() -> None:
    """The node feeds the members the lung crop (the seed method): so must their training."""
    for name in MEMBERS:
        assert training_table(MODELS / name / "manifest.toml").get("crop") == "lung", name


def test_the_default_configuration_runs_the_multisource_model_alone() -> None:
    """config.toml's [cxr] is the node's default: cxr-mobilenetv2 alone (issue 23), never
    averaged with the seed members, which were trained on images of its validation and test
    splits. A [cxr] table without a strategy still gets the seed ensemble's recommended one."""
    import tomllib

    from dicomnode.config import CXRSettings

    config = tomllib.loads((MODELS.parent / "config.toml").read_text(encoding="utf-8"))["cxr"]
    recommended = _metrics(STACKING)["recommended_strategy"]
    assert CXRSettings().strategy == recommended, "a [cxr] table without strategy"
    assert config["members"] == ["cxr-mobilenetv2"]
    assert not set(config["members"]) & set(MEMBERS)
    assert config["strategy"] != "stacking"
    assert config["explain_member"] == "cxr-mobilenetv2"
    assert config["lung_mask"] == "cxr-lung-unet"


def test_pruning_shrinks_a_member_by_a_fifth_at_no_real_cost(measured: dict[str, Any]) -> None:
    reductions = []
    for name in MEMBERS:
        pruning = _metrics(name).get("pruning")
        if not pruning:
            continue
        model = load_model(measured["specs"][name])
        # The card's parameter count is the shipped model's.
        assert model.count_params() == pruning["parameters"]
        reduction = 1 - pruning["parameters"] / pruning["unpruned_parameters"]
        assert abs(reduction - pruning["parameter_reduction"]) < 1e-6
        drop = pruning["unpruned_val_macro_auc"] - measured["val_auc"][name]
        if reduction >= 0.20 and drop <= 0.02:
            reductions.append((name, reduction))
    assert reductions, "no member is pruned by >= 20 % within 0.02 validation AUC"


@pytest.mark.parametrize("strategy", ["mean", "weighted", "stacking"])
def test_the_shipped_ensemble_runs_in_the_node_pipeline(strategy: str) -> None:
    """The node's default [cxr] models (plus the stacking model) analyse a real chest file."""
    from dataclasses import replace

    from pydicom import dcmread

    from dicomnode.config import CXRSettings, RoutingSettings
    from dicomnode.pipelines.types import InstanceInput, StudyInput
    from dicomnode.pipelines.cxr import CXRPipeline

    path = shared_data(
        "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    ds = dcmread(path, stop_before_pixels=True)
    study = StudyInput(
        str(ds.StudyInstanceUID),
        (
            InstanceInput(
                path=path,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                modality=ds.get("Modality"),
                body_part_examined=ds.get("BodyPartExamined"),
                view_position=ds.get("ViewPosition"),
                image_type=None,
                rows=int(ds.Rows),
                columns=int(ds.Columns),
            ),
        ),
    )
    defaults = CXRSettings(models_dir=MODELS)
    assert defaults.members == MEMBERS
    settings = replace(defaults, strategy=strategy, stacking=STACKING)
    pipeline = CXRPipeline(settings, RoutingSettings())
    pipeline.load()  # verifies every checksum
    [image] = pipeline.analyse(study).images
    assert list(image.probabilities) == ["pneumonia", "covid19", "normal"]
    assert sum(image.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(image.member_probabilities) == set(MEMBERS)
    assert image.heatmap is not None and image.explained_class == "covid19"
    # Training cuts its images with the pipeline's own functions: same box, same crop.
    pixels = to_uint8(path).pixels
    crops, lung_spec = lung_crops([pixels], ["chest"], 128, cache_dir=None)
    assert lung_spec.name == settings.lung_mask
    np.testing.assert_array_equal(crops[0], crop(pixels, image.lung_box, 128))
