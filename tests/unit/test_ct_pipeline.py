"""The chest CT pipeline on series built from real slices, with a tiny random DenseNet.

The model is a test fixture (random weights, growth rate 4): it makes the plumbing
checkable (selection, streaming, batching, aggregation, evidence, result objects),
not the accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from support import dciodvfy, instance_inputs, shared_data, synthetic_ct_series

keras = pytest.importorskip("keras")

from fixture_models import write_ct_model, write_cxr_models  # noqa: E402

from dicomnode.config import (  # noqa: E402
    CTSelectionSettings,
    CTSettings,
    CXRSettings,
    OutputSettings,
    RoutingSettings,
)
from dicomnode.errors import ConfigError  # noqa: E402
from dicomnode.pipelines.chest import ChestPipeline  # noqa: E402
from dicomnode.pipelines.ct import CTPipeline  # noqa: E402
from dicomnode.pipelines.cxr import CXRPipeline  # noqa: E402
from dicomnode.pipelines.types import NO_LUNG, StudyInput  # noqa: E402
from dicomnode.results.encode import encode  # noqa: E402

SINGLES = ("dicom_ct", "tcia_covid19_ny_sbu_single_slices")
CHEST = ("A048383__axial__19010410-30.dcm", "A056642__axial__19010107-111.dcm")
ABDOMEN = "A027284__axial__19000925-116.dcm"
CORONAL = "A072894__19010103-Chest-058.dcm"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ct_model(tmp_path_factory.mktemp("models"), threshold=0.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    """A CT study: a 24-slice axial series (16 chest slices, 8 abdominal), a coronal
    reformat series and a 4-slice thick chest series, all in one study."""
    folder = shared_data(*SINGLES)
    root = tmp_path_factory.mktemp("study")
    sources = [folder / CHEST[0], folder / CHEST[1], folder / ABDOMEN]
    axial = synthetic_ct_series(sources, root / "axial", 24, spacing_mm=1.25)
    study_uid = str(dcmread(axial[0], stop_before_pixels=True).StudyInstanceUID)
    coronal = synthetic_ct_series(
        [folder / CORONAL], root / "coronal", 3, study_uid=study_uid, series_description="COR"
    )
    for path in coronal:  # keep it a coronal reformat
        ds = dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.save_as(path)
    thick = synthetic_ct_series(
        [folder / CHEST[0]], root / "thick", 4, study_uid=study_uid, spacing_mm=5.0
    )
    return study_uid, axial + coronal + thick


def _pipeline(models_dir: Path, **changes: object) -> CTPipeline:
    settings = CTSettings(
        **{  # type: ignore[arg-type]
            "models_dir": models_dir,
            "classifier": "ct-tiny",
            "batch_size": 5,
            "selection": CTSelectionSettings(min_slices=3),
            **changes,
        }
    )
    pipeline = CTPipeline(settings)
    pipeline.load()
    return pipeline


def _dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    return dciodvfy(path)[0]


def test_study_is_selected_streamed_scored_and_explained(
    models_dir: Path, study: tuple[str, list[Path]], tmp_path: Path
) -> None:
    study_uid, paths = study
    pipeline = _pipeline(models_dir)
    study_input = StudyInput(study_uid, instance_inputs(paths))
    outcome = pipeline.run(study_input)
    result = outcome.analysis
    assert outcome.skipped_reason is None
    # Selection: the thin axial series; the reformat and the thicker series are recorded.
    axial_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert result.series_instance_uid == axial_uid
    codes = sorted(s.code for s in result.selection.skipped)
    assert codes == ["not-preferred", "reformat"]
    # Every slice is read; only the chest ones (2 of each 3 sources) are classified.
    assert result.slices_read == 24
    assert len(result.slice_probabilities) == 16
    assert {s.code for s in result.skipped_slices} == {NO_LUNG}
    assert len(result.skipped_slices) == 8
    probabilities = [p for _, p in result.slice_probabilities]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert result.score == pytest.approx(max(probabilities))
    assert result.positive is True  # threshold 0.0 in the fixture manifest
    # Evidence: the three most probable slices, highest first, each with a heat map.
    assert len(result.evidence) == 3
    top = sorted(probabilities, reverse=True)[:3]
    assert [e.probability for e in result.evidence] == pytest.approx(top)
    for e in result.evidence:
        heat = e.heatmap_in_source()
        assert heat.shape == (512, 512) and heat.min() >= 0.0 and heat.max() <= 1.0
        assert e.lung_box.within(512, 512) and e.lung_fraction >= 0.02
    summary = outcome.summary
    assert summary["pipeline"] == "ct" and summary["slices_classified"] == 16
    assert summary["selection"]["chosen"]["slices"] == 24
    assert summary["slices_skipped"] == {NO_LUNG: 8}
    assert outcome.note == (
        "ct: 16 of 24 slices classified; skipped series: 1 not-preferred, 1 reformat; "
        "slices not classified: 8 no-lung"
    )

    # Result objects: one SR and one SC per evidence slice, dciodvfy-clean.
    objects = encode(outcome, study_input, OutputSettings())
    kinds = [o.sop_class_uid for o in objects]
    assert kinds == [SR_CLASS, SC_CLASS, SC_CLASS, SC_CLASS]
    for obj in objects:
        assert _dciodvfy_errors(obj.data, tmp_path) == []
    from io import BytesIO

    sr = dcmread(BytesIO(objects[0].data))
    assert sr.StudyInstanceUID == study_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for evidence in sr.CurrentRequestedProcedureEvidenceSequence
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {e.sop_instance_uid for e in result.evidence}
    values = []

    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "840539006":
                values.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    # The study score first, then each evidence slice's probability.
    assert values == pytest.approx([result.score, *top], abs=1e-6)
    for obj, e in zip(objects[1:], result.evidence, strict=True):
        sc = dcmread(BytesIO(obj.data))
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == e.sop_instance_uid
        assert (sc.Rows, sc.Columns) == (512, 512) and sc.BurnedInAnnotation == "YES"
    # Re-running gives the same UIDs (a re-run replaces the objects in the PACS).
    again = encode(pipeline.run(study_input), study_input, OutputSettings())
    assert [o.sop_instance_uid for o in again] == [o.sop_instance_uid for o in objects]


def test_aggregation_and_negative_call(models_dir: Path, study: tuple[str, list[Path]]) -> None:
    study_uid, paths = study
    pipeline = _pipeline(models_dir, aggregation="top_k_mean", top_k=4, evidence_slices=1)
    result = pipeline.analyse(StudyInput(study_uid, instance_inputs(paths)))
    probabilities = sorted((p for _, p in result.slice_probabilities), reverse=True)
    assert result.score == pytest.approx(float(np.mean(probabilities[:4])))
    assert len(result.evidence) == 1


def test_nothing_to_analyse_is_skipped_with_coded_reasons(models_dir: Path, tmp_path: Path) -> None:
    folder = shared_data(*SINGLES)
    pipeline = _pipeline(models_dir)
    abdomen = synthetic_ct_series([folder / ABDOMEN], tmp_path / "abd", 5)
    outcome = pipeline.run(StudyInput("1.2.3", instance_inputs(abdomen)))
    assert outcome.skipped_reason == (
        "no slice of the chosen CT series could be classified: 5 no-lung"
    )
    described = synthetic_ct_series(
        [folder / ABDOMEN], tmp_path / "abd2", 5, series_description="ABD/PEL 2.5 MM"
    )
    for path in described:  # no body part: the description decides
        ds = dcmread(path)
        del ds.BodyPartExamined
        ds.save_as(path)
    outcome = pipeline.run(StudyInput("1.2.3", instance_inputs(described)))
    assert outcome.skipped_reason == "no axial chest CT series: 1 not-chest (description says ABD)"
    assert outcome.summary["selection"]["skipped_series"][0]["instances"] == 5


def test_wrong_model_task_is_a_config_error(tmp_path: Path) -> None:
    models = write_cxr_models(tmp_path / "models")
    pipeline = CTPipeline(CTSettings(models_dir=models, classifier="m1"))
    with pytest.raises(ConfigError, match=r"ct\.classifier"):
        pipeline.load()


def test_chest_pipeline_runs_both_and_skips_with_both_reasons(
    models_dir: Path, study: tuple[str, list[Path]], tmp_path: Path
) -> None:
    study_uid, paths = study
    cxr_models = write_cxr_models(tmp_path / "cxr")
    cxr = CXRPipeline(
        CXRSettings(
            models_dir=cxr_models,
            lung_mask="lung",
            members=("m1", "m2", "m3"),
            explain_member="m1",
            detector="detector",
        ),
        RoutingSettings(),
    )
    ct = CTPipeline(
        CTSettings(
            models_dir=models_dir,
            classifier="ct-tiny",
            selection=CTSelectionSettings(min_slices=3),
        )
    )
    chest = ChestPipeline(cxr, ct)
    chest.load()
    ds = dcmread(
        shared_data(
            "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
        )
    )
    ds.StudyInstanceUID = study_uid  # the radiograph joins the CT study
    radiograph = tmp_path / "cr.dcm"
    ds.save_as(radiograph)
    both = StudyInput(study_uid, instance_inputs(paths) + instance_inputs([radiograph]))
    outcome = chest.run(both)
    assert outcome.skipped_reason is None
    assert outcome.analysis.cxr is not None and len(outcome.analysis.cxr.images) == 1
    assert outcome.analysis.ct is not None and outcome.analysis.ct.score is not None
    objects = encode(outcome, both, OutputSettings())
    # CXR: one SR + one SC + one SEG (+ a GSPS when the detector drew boxes);
    # CT: one SR + three SCs; all UIDs distinct.
    classes = [o.sop_class_uid for o in objects]
    gsps = classes.count("1.2.840.10008.5.1.4.1.1.11.1")
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 2
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 4
    assert classes.count("1.2.840.10008.5.1.4.1.1.66.4") == 1 and gsps <= 1
    assert len(objects) == 7 + gsps and len({o.sop_instance_uid for o in objects}) == 7 + gsps
    coronal_only = StudyInput(study_uid, instance_inputs(paths[24:27]))
    outcome = chest.run(coronal_only)
    assert outcome.skipped_reason == (
        "no radiographs; no axial chest CT series: 1 reformat (ImageType REFORMATTED)"
    )


def test_an_undecodable_slice_is_recorded_and_the_rest_analysed(
    models_dir: Path, tmp_path: Path
) -> None:
    folder = shared_data(*SINGLES)
    paths = synthetic_ct_series([folder / CHEST[0]], tmp_path / "s", 6)
    broken = dcmread(paths[2])
    broken.PixelData = broken.PixelData[:1000]  # truncated pixel data
    broken.save_as(paths[2])
    pipeline = _pipeline(models_dir)
    result = pipeline.analyse(StudyInput("1.2.3", instance_inputs(paths)))
    assert result.slices_read == 6 and len(result.slice_probabilities) == 5
    [skipped] = result.skipped_slices
    assert skipped.code == "undecodable" and skipped.sop_instance_uid == broken.SOPInstanceUID
    # The reason names the file relative to the data directory and keeps the decoder's
    # whole message (it was cut at 300 characters, mostly the absolute path).
    assert skipped.detail.startswith(
        f"cannot make Hounsfield units of instances/s/{paths[2].name} (transfer syntax"
    )
    assert str(tmp_path) not in skipped.detail
    assert skipped.detail.endswith("or the transfer syntax may be incorrect")
    assert result.score is not None


def test_every_single_slice_is_analysed_or_skipped_with_a_reason(models_dir: Path) -> None:
    """Each shared slice as its own one-slice study: no error; chest slices get a score,
    the others a coded reason (abdomen: no lung or not chest; the reformats: reformat)."""
    import csv

    folder = shared_data(*SINGLES)
    with (folder / "slices.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    pipeline = _pipeline(models_dir, selection=CTSelectionSettings(min_slices=1))
    for row in rows:
        [instance] = instance_inputs([folder / row["file"]])
        outcome = pipeline.run(StudyInput(instance.sop_instance_uid, (instance,)))
        region = row["region_by_visual_check"]
        header = dcmread(folder / row["file"], stop_before_pixels=True)
        if "REFORMATTED" in header.ImageType:
            assert "1 reformat" in (outcome.skipped_reason or ""), row
        elif region.startswith("abdomen"):
            reason = outcome.skipped_reason or ""
            assert "1 no-lung" in reason or "not-chest" in reason, row
        elif region.startswith("chest"):
            assert outcome.skipped_reason is None, row
            assert outcome.analysis.evidence[0].sop_instance_uid == header.SOPInstanceUID


def test_a_configured_lung_mask_model_replaces_the_hu_method(
    study: tuple[str, list[Path]], tmp_path: Path
) -> None:
    """Plumbing only: the fixture "U-Net" marks dark pixels (air) as lung."""
    study_uid, paths = study
    models = write_cxr_models(tmp_path / "models")  # has "lung", a lung-mask model
    write_ct_model(models, threshold=0.0)
    pipeline = _pipeline(models, lung_mask="lung", min_lung_fraction=0.0)
    study_input = StudyInput(study_uid, instance_inputs(paths))
    outcome = pipeline.run(study_input)
    result = outcome.analysis
    assert result.lung_mask_method == "model:lung"
    assert {m.name for m in result.models} == {"ct-tiny", "lung"}
    assert result.score is not None and result.evidence
    objects = encode(outcome, study_input, OutputSettings())
    from io import BytesIO

    sr = dcmread(BytesIO(objects[0].data))
    names = set()

    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001":
                names.add(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert names == {"ct-tiny", "lung"}  # TID 4019: the classifier and the mask model


def test_duplicate_slices_and_gaps_are_in_the_note_that_status_shows(
    models_dir: Path, tmp_path: Path
) -> None:
    """Not only in the job summary: the study's note (its reason in ``status``) names them."""
    folder = shared_data(*SINGLES)
    paths = synthetic_ct_series([folder / CHEST[0]], tmp_path / "s", 10)
    by_number = {int(dcmread(p, stop_before_pixels=True).InstanceNumber): p for p in paths}
    by_number.pop(5).unlink()  # a missing slice: a gap of twice the spacing
    twin = dcmread(by_number[8])
    twin.SOPInstanceUID = generate_uid()  # same position, another instance: a duplicate
    twin.save_as(tmp_path / "s" / "twin.dcm")
    kept = [*by_number.values(), tmp_path / "s" / "twin.dcm"]
    outcome = _pipeline(models_dir).run(StudyInput("1.2.3", instance_inputs(kept)))
    assert outcome.analysis is not None and outcome.skipped_reason is None
    assert outcome.note is not None
    assert "1 duplicate slice(s) dropped" in outcome.note
    assert "1 gap(s) in the series (widest 2.5 mm)" in outcome.note
