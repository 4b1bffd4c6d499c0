"""A study's outcome in words, for the worker's log line and the status page."""

from __future__ import annotations

from dicomnode.outcome import describe


def test_a_chest_study_with_a_radiograph_and_a_ct() -> None:
    summary = {
        "pipeline": "chest",
        "cxr": {
            "pipeline": "cxr",
            "images": [
                {
                    "sop_instance_uid": "1.2.3",
                    "probabilities": {"covid19": 0.8123, "normal": 0.1, "pneumonia": 0.0877},
                    "boxes": [{"x": 10.4, "y": 20, "width": 30, "height": 40, "confidence": 0.9}],
                    "box_method": "gradcam",
                }
            ],
        },
        "ct": {
            "pipeline": "ct",
            "finding": "covid19",
            "score": 0.4,
            "positive": False,
            "threshold": 0.5000001,
            "slices_classified": 42,
        },
    }
    assert describe(summary) == [
        "CXR 1.2.3: covid19 0.81, normal 0.10, pneumonia 0.09; 1 box(es) by gradcam: "
        "[10,20 30x40 p=0.90]",
        "CT: covid19 0.40 (negative at threshold 0.50, 42 slices)",
    ]


def test_nothing_analysed_says_nothing() -> None:
    assert describe(None) == []
    assert describe({"pipeline": "placeholder", "instances": 3}) == []
    assert describe({"pipeline": "ct", "score": None}) == []
