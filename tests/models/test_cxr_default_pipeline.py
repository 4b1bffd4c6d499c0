"""The default CXR pipeline (config.toml's [cxr]: cxr-mobilenetv2 alone, on the whole image,
the lung U-Net, the out-of-domain gate and the operating points) with the shipped models.

Checks that the node feeds the model exactly what training fed it (one implementation,
:func:`dicomnode.inference.cxr_domain.model_input`), that each finding is Present at its
documented operating point, and that an image unlike the validated ones is flagged and
reported without findings or boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import OutputSettings, load_settings
from dicomnode.imaging import to_uint8
from dicomnode.inference.cxr_domain import DomainModel
from dicomnode.pipelines.cxr import CXRPipeline
from dicomnode.pipelines.types import OUTSIDE_DOMAIN, StudyInput
from dicomnode.results.encode import encode_cxr
from dicomnode.training.cxr_features import model_input
from tests.support import dicom_files, instance_inputs, make_instance, shared_data

REPO = Path(__file__).resolve().parents[2]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def pipeline() -> CXRPipeline:
    config = load_settings(REPO / "config.toml")
    assert config.cxr.members == ("cxr-mobilenetv2",)
    p = CXRPipeline(config.cxr, config.routing)
    p.load()
    return p


def test_default_members_manifest_and_gate(pipeline: CXRPipeline) -> None:
    spec = pipeline.specs["cxr-mobilenetv2"]
    assert (spec.crop, spec.normalisation, spec.input_size) == ("whole", "none", (224, 224))
    domain = DomainModel.load(REPO / "models" / "cxr-mobilenetv2")
    assert pipeline.operating_points == domain.operating_points
    assert pipeline.operating_points["covid19"] == pytest.approx(0.3928, abs=1e-4)
    assert pipeline.operating_points["pneumonia"] == pytest.approx(0.5725, abs=1e-4)
    assert pipeline.explainer == "cxr-mobilenetv2"


def test_chest_films_whole_image_input_and_findings(pipeline: CXRPipeline) -> None:
    # The files with a File Meta header (instance_inputs reads the index tags as the node does).
    files = [
        f
        for f in dicom_files(shared_data("dicom_cxr", "chest"))
        if f.read_bytes()[128:132] == b"DICM"
    ]
    # One file per SOP Instance UID (two shared files are copies of one instance).
    instances = tuple({i.sop_instance_uid: i for i in instance_inputs(files)}.values())
    paths = {i.sop_instance_uid: i.path for i in instances}
    result = pipeline.analyse(StudyInput("1.2.3", instances))
    assert result.images, "the shared chest films are analysed"
    assert result.operating_points == pipeline.operating_points
    model = pipeline.models["cxr-mobilenetv2"]
    for image in result.images:
        grey = to_uint8(paths[image.sop_instance_uid]).pixels
        # Training's step, called directly: the node's probabilities are the model's on it.
        x = model_input(grey, 224, "none")[None]
        direct = np.asarray(model.predict_on_batch(x))[0]
        classes = [c.name for c in pipeline.specs["cxr-mobilenetv2"].classes]
        got = [image.probabilities[c] for c in classes]
        assert got == pytest.approx(direct.tolist(), abs=1e-4)
        assert image.domain_score is not None and image.domain_threshold == 1.0
        assert image.classified_box is not None
        assert (image.classified_box.width, image.classified_box.height) == (
            image.columns,
            image.rows,
        )
        assert image.heatmap_in_source().shape == (image.rows, image.columns)
        if image.outside_domain:
            assert image.findings == {} and image.boxes == []
        else:
            for name, point in pipeline.operating_points.items():
                assert image.findings[name] == (image.probabilities[name] >= point)


def test_noise_image_is_outside_the_validated_domain(pipeline: CXRPipeline, tmp_path: Path) -> None:
    # A CR labelled a PA chest whose pixels are uniform noise: routing accepts it, the gate
    # must not.
    path = make_instance(
        tmp_path,
        study_uid="1.2.826.0.1.3680043.10.999.7",
        modality="CR",
        rows=512,
        columns=512,
        extra={"ViewPosition": "PA"},
    )
    study = StudyInput("1.2.826.0.1.3680043.10.999.7", instance_inputs([path]))
    outcome = pipeline.run(study)
    [image] = outcome.analysis.images
    assert image.outside_domain, image.domain_score
    assert image.domain_score is not None and image.domain_score > 1.0
    assert image.findings == {}
    assert image.boxes == [] and not image.abnormal
    assert outcome.note is not None and OUTSIDE_DOMAIN in outcome.note
    assert outcome.summary["images"][0]["outside_domain"] is True
    # The results: an SR saying so, no heat-map SC and no GSPS presenting a finding.
    objects = encode_cxr(outcome.analysis, study, OutputSettings())
    classes = [o.sop_class_uid for o in objects]
    assert COMPREHENSIVE_3D_SR in classes
    assert SECONDARY_CAPTURE not in classes and GSPS not in classes
