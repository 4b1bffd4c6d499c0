"""Routing of chest X-ray studies: frontal chest radiographs in, the rest out with a reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dicomnode.config import RoutingSettings, parse_settings
from dicomnode.pipelines.types import InstanceInput
from dicomnode.routing import LATERAL_VIEW, NOT_A_RADIOGRAPH, NOT_CHEST, OTHER_VIEW, route_cxr

RULES = RoutingSettings()
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _inst(uid: str, **tags: object) -> InstanceInput:
    base = InstanceInput(
        path=Path("/x"),
        sop_instance_uid=uid,
        sop_class_uid=CR,
        series_instance_uid="1.2",
        modality="CR",
        body_part_examined="CHEST",
        view_position="PA",
        image_type=None,
        rows=100,
        columns=100,
    )
    return replace(base, **tags)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tags", "code"),
    [
        ({}, None),
        ({"view_position": "AP"}, None),
        ({"body_part_examined": None, "view_position": None}, None),  # nothing says otherwise
        ({"sop_class_uid": DX, "modality": "DX", "body_part_examined": "THORAX"}, None),
        ({"sop_class_uid": SC}, None),  # RSNA-style Secondary Capture, Modality CR
        ({"view_position": "LL"}, LATERAL_VIEW),
        ({"view_position": None, "series_description": "CHEST LAT"}, LATERAL_VIEW),
        ({"view_position": "", "image_type": "ORIGINAL\\PRIMARY\\LATERAL"}, LATERAL_VIEW),
        ({"body_part_examined": "EXTREMITY", "view_position": "AP"}, NOT_CHEST),
        ({"modality": "MG"}, NOT_A_RADIOGRAPH),
        ({"view_position": "OBLIQUE"}, OTHER_VIEW),
        # A dental panoramic CR with no BodyPartExamined says so only in its descriptions.
        (
            {
                "body_part_examined": None,
                "view_position": None,
                "study_description": "OPG TEETH",
                "series_description": "PANORAMIC TEETH",
            },
            NOT_CHEST,
        ),
        ({"body_part_examined": None, "study_description": "Dental (teeth)"}, NOT_CHEST),
        # A chest word wins; a stated BodyPartExamined wins over the descriptions.
        ({"body_part_examined": None, "study_description": "CHEST AND SPINE"}, None),
        ({"study_description": "TEETH"}, None),
    ],
)
def test_instances_are_classified(tags: dict, code: str | None) -> None:
    route = route_cxr([_inst("1.1", **tags)], RULES)
    if code is None:
        assert [i.sop_instance_uid for i in route.instances] == ["1.1"] and route.reason is None
    else:
        assert route.instances == () and route.skipped[0].code == code
        assert code in (route.reason or "")


def test_a_dental_panoramic_is_skipped_with_a_coded_reason() -> None:
    route = route_cxr(
        [
            _inst(
                "1.1",
                body_part_examined=None,
                view_position=None,
                study_description="PANORAMIC",
                series_description="TEETH",
            )
        ],
        RULES,
    )
    assert route.instances == ()
    assert route.reason == "no frontal chest radiograph: 1 not-chest (description says PANORAMIC)"


def test_ct_in_a_study_is_not_a_radiograph() -> None:
    route = route_cxr([_inst("1.1"), _inst("1.2", sop_class_uid=CT, modality="CT")], RULES)
    assert [i.sop_instance_uid for i in route.instances] == ["1.1"]
    assert route.skipped[0].detail == "SOP Class 1.2.840.10008.5.1.4.1.1.2"


def test_reason_summarises_by_code() -> None:
    route = route_cxr(
        [
            _inst("1.1", view_position="LL"),
            _inst("1.2", view_position="RL"),
            _inst("1.3", body_part_examined="KNEE"),
        ],
        RULES,
    )
    assert route.reason == (
        "no frontal chest radiograph: 2 lateral-view (ViewPosition LL); "
        "1 not-chest (BodyPartExamined KNEE)"
    )


def test_rules_come_from_config(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "receive": {"allow_unknown_callers": True},
            "routing": {
                "chest_body_parts": ["chest", "ribs"],
                "cxr_modalities": ["CR", "DX", "OT"],
                "non_chest_words": ["cephalogram"],
            },
        },
        base_dir=tmp_path,
        source=None,
    )
    rules = settings.routing
    assert route_cxr([_inst("1.1", body_part_examined="RIBS")], rules).instances
    assert route_cxr([_inst("1.1", modality="OT", sop_class_uid=SC)], rules).instances
    assert not route_cxr([_inst("1.1", body_part_examined="THORAX")], rules).instances
    assert rules.non_chest_words == ("CEPHALOGRAM",)
    ceph = _inst("1.1", body_part_examined=None, series_description="Cephalogram")
    assert route_cxr([ceph], rules).skipped[0].code == NOT_CHEST
    assert route_cxr(
        [_inst("1.1", body_part_examined=None, study_description="TEETH")], rules
    ).instances
