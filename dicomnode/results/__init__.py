"""Result objects sent back to the PACS: the TID 1500 SR and the Grad-CAM Secondary Captures.

The encoders read the pipelines' typed results and the source datasets; they never
run a model. Every object is built with highdicom (valid once built), in the source
study and a new series, with deterministic UIDs (:func:`result_uid`).
"""

from dicomnode.results.common import ResultError, contributing_equipment
from dicomnode.results.sc import build_heatmap_sc, render_overlay
from dicomnode.results.sr import box_polyline, build_sr
from dicomnode.results.uids import result_uid

__all__ = [
    "ResultError",
    "box_polyline",
    "build_heatmap_sc",
    "build_sr",
    "contributing_equipment",
    "render_overlay",
    "result_uid",
]
