"""The chest X-ray pipeline end to end on real files, with tiny models built here.

The models are test fixtures with fixed or random weights: they make the pipeline's
plumbing checkable (shapes, coordinates, routing, strategies), not its accuracy.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import dicom_files, shared_data

keras = pytest.importorskip("keras")

from fixture_models import CLASSES, write_cxr_models  # noqa: E402

from dicomnode.config import CXRSettings, RoutingSettings  # noqa: E402
from dicomnode.errors import ConfigError  # noqa: E402
from dicomnode.inference.lung import keep_largest  # noqa: E402
from dicomnode.pipelines.cxr import CXRPipeline  # noqa: E402
from dicomnode.pipelines.types import InstanceInput, StudyInput  # noqa: E402
from dicomnode.receive.meta import _view_evidence  # noqa: E402


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cxr_models(tmp_path_factory.mktemp("models"))


def _settings(models_dir: Path, **changes: object) -> CXRSettings:
    base = CXRSettings(
        models_dir=models_dir,
        lung_mask="lung",
        members=("m1", "m2", "m3"),
        strategy="weighted",  # the manifests' weights, checked below
        explain_member="m1",
        abnormal_threshold=0.0,  # look for boxes on every image
        detector="",
        gradcam_boxes=True,  # the configured fallback, unless a test names a detector
        batch_size=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _study(paths: list[Path]) -> StudyInput:
    from pydicom import dcmread

    instances = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        instances.append(
            InstanceInput(
                path=path,
                sop_instance_uid=str(ds.get("SOPInstanceUID") or path.name),
                sop_class_uid=str(
                    ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", "")
                ),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "1")),
                modality=ds.get("Modality"),
                body_part_examined=ds.get("BodyPartExamined"),
                view_position=ds.get("ViewPosition"),
                image_type=None,
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                view_evidence=_view_evidence(ds),
            )
        )
    return StudyInput("1.2.3", tuple(instances))


def test_keep_largest_keeps_the_two_lungs() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:90, 10:40] = True
    mask[10:90, 60:90] = True
    mask[0:2, 98:100] = True  # speck
    kept = keep_largest(mask)
    assert kept.sum() == 2 * 80 * 30 and not kept[0, 99]


@pytest.mark.parametrize("detector", ["", "detector"])
def test_pipeline_on_every_shared_radiograph(models_dir: Path, detector: str) -> None:
    files = dicom_files(shared_data("dicom_cxr"))
    study = _study(files)
    lateral = replace(study.instances[0], sop_instance_uid="9.9.9", view_position="LL")
    study = StudyInput(study.study_instance_uid, (*study.instances, lateral))
    pipeline = CXRPipeline(_settings(models_dir, detector=detector), RoutingSettings())
    pipeline.load()
    outcome = pipeline.run(study)
    result = outcome.analysis
    assert outcome.skipped_reason is None
    analysed = {i.sop_instance_uid for i in result.images}
    # The highdicom sample is a lateral thorax that says so only in
    # AcquisitionDeviceProcessingDescription; the other four files are frontal chests.
    assert len(result.images) == 4
    codes = {s.sop_instance_uid: s.code for s in result.skipped}
    assert codes["9.9.9"] == "lateral-view"
    assert sorted(codes.values()).count("lateral-view") == 2
    assert sorted(codes.values()).count("not-chest") == 2
    assert not analysed & set(codes)
    for image in result.images:
        assert sum(image.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert image.lung_box.within(image.columns, image.rows)
        heat = image.heatmap_in_source()
        assert heat.shape == (image.rows, image.columns)
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        assert image.box_method == ("detector:detector" if detector else "gradcam-threshold")
        for box in image.boxes:
            assert box.within(image.columns, image.rows)
            assert 0.0 <= (box.confidence or 0) <= 1.0
    # The weighted ensemble is the manifests' weighting of the members.
    first = result.images[0]
    members = np.array(
        [[first.member_probabilities[m][c] for c, _, _ in CLASSES] for m in ("m1", "m2", "m3")]
    )
    expected = (0.1 * members[0] + 0.4 * members[1] + 0.5 * members[2]) / 1.0
    assert [first.probabilities[c] for c, _, _ in CLASSES] == pytest.approx(expected, abs=1e-6)
    assert {m.name for m in result.models} >= {"lung", "m1", "m2", "m3"}
    json.dumps(outcome.summary)  # the summary stored with the job is plain JSON
    assert set(result.timings) >= {"decode", "lung_mask", "lung_crop", "ensemble", "gradcam"}


@pytest.mark.parametrize("strategy", ["mean", "vote", "stacking"])
def test_other_ensemble_strategies(models_dir: Path, strategy: str) -> None:
    path = shared_data(
        "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    settings = _settings(models_dir, strategy=strategy, stacking="meta")
    pipeline = CXRPipeline(settings, RoutingSettings())
    pipeline.load()
    [image] = pipeline.analyse(_study([path])).images
    assert sum(image.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    if strategy == "vote":
        assert sorted(image.probabilities.values()) == [0.0, 1 / 3, 2 / 3] or max(
            image.probabilities.values()
        ) == pytest.approx(1.0)


def test_a_study_without_frontal_chest_images_is_skipped_with_reasons(models_dir: Path) -> None:
    files = dicom_files(shared_data("dicom_cxr", "non_chest_radiographs"))
    pipeline = CXRPipeline(_settings(models_dir), RoutingSettings())
    pipeline.load()
    outcome = pipeline.run(_study(files))
    assert outcome.analysis.images == []
    assert outcome.skipped_reason == (
        "no frontal chest radiograph: 2 not-chest (BodyPartExamined EXTREMITY)"
    )


def test_inconsistent_configuration_is_refused(models_dir: Path) -> None:
    with pytest.raises(ConfigError, match="explain_class"):
        CXRPipeline(_settings(models_dir, explain_class="pneumothorax"), RoutingSettings()).load()
    with pytest.raises(ConfigError, match="stacking"):
        CXRPipeline(_settings(models_dir, strategy="stacking"), RoutingSettings()).load()


def test_two_threads_sharing_one_pipeline_get_the_results_of_one(models_dir: Path) -> None:
    """``worker.threads = 2``: the threads share one loaded pipeline. Run together on real
    radiographs, each gets exactly what a lone run gets (same probabilities, boxes and
    heat maps), and nothing raises."""
    import threading

    files = dicom_files(shared_data("dicom_cxr"))
    pipeline = CXRPipeline(_settings(models_dir, detector="detector"), RoutingSettings())
    pipeline.load()
    studies = [_study(files[: len(files) // 2 + 1]), _study(files[len(files) // 2 :])]
    alone = [pipeline.analyse(s) for s in studies]
    assert all(r.images for r in alone)
    start = threading.Barrier(2)
    got: dict[int, list[object]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            start.wait(30)
            for _ in range(3):
                got[k].append(pipeline.analyse(studies[k]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for k in (0, 1):
        assert len(got[k]) == 3
        for result in got[k]:
            expected = alone[k]
            assert [i.sop_instance_uid for i in result.images] == [  # type: ignore[attr-defined]
                i.sop_instance_uid for i in expected.images
            ]
            for mine, ref in zip(result.images, expected.images, strict=True):  # type: ignore[attr-defined]
                assert mine.probabilities == pytest.approx(ref.probabilities, abs=1e-5)
                assert mine.boxes == ref.boxes and mine.box_method == ref.box_method
                assert np.allclose(mine.heatmap, ref.heatmap, atol=1e-4)
                assert mine.source is not None and mine.source.display.shape == (
                    mine.rows,
                    mine.columns,
                )


def test_detector_gates_and_grad_cam_boxes_only_when_configured(models_dir: Path) -> None:
    """The detector runs on every image (its own gate) unless the ensemble is asked to
    gate it; without a detector, Grad-CAM boxes only when configured; the lung mask and
    the detector's map travel with the result (for the Segmentation)."""
    study = _study(dicom_files(shared_data("dicom_cxr")))
    runs = {}
    for name, changes in {
        "detector": {"detector": "detector", "abnormal_threshold": 1.0},
        "gated": {
            "detector": "detector",
            "abnormal_threshold": 1.0,
            "ensemble_gates_detector": True,
        },
        "none": {"gradcam_boxes": False},
    }.items():
        pipeline = CXRPipeline(_settings(models_dir, **changes), RoutingSettings())
        pipeline.load()
        runs[name] = pipeline.analyse(study).images
    assert runs["detector"] and all(i.box_method == "detector:detector" for i in runs["detector"])
    assert all(i.opacity_map is not None and i.lung_mask is not None for i in runs["detector"])
    # abnormal_threshold 1.0: nothing is abnormal, so the gated detector never runs
    assert all(i.box_method == "none" and i.opacity_map is None for i in runs["gated"])
    assert all(i.box_method == "none" and not i.boxes for i in runs["none"])
    assert all(i.lung_mask is not None for i in runs["none"])


def test_models_are_traced_once_for_every_batch_size(models_dir: Path) -> None:
    """Studies of 1, 3 and 5 images (batches 1, 3, 4 + 1) reuse the one trace each model
    got at warm-up: no per-call re-tracing, and no "retracing" warning at all."""
    import logging

    import keras

    warnings: list[str] = []

    class Retracing(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retracing" in record.getMessage():
                warnings.append(record.getMessage())

    handler = Retracing()
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        files = dicom_files(shared_data("dicom_cxr"))
        study = _study(files)
        pipeline = CXRPipeline(_settings(models_dir, detector="detector"), RoutingSettings())
        pipeline.load()
        for n in (1, 3, 5):
            instances = tuple(
                replace(study.instances[0], sop_instance_uid=f"1.2.3.{n}.{k}") for k in range(n)
            )
            result = pipeline.analyse(StudyInput(study.study_instance_uid, instances))
            assert len(result.images) == n
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert warnings == []
    traces = {name: p.traces for name, p in pipeline.predictors.items()}
    if keras.backend.backend() == "tensorflow":
        assert traces and all(t == 1 for t in traces.values()), traces
