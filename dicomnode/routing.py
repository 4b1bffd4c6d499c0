"""Routing: which instances of a study a pipeline analyses, and why the others are skipped.

Rules are declarative (``[routing]`` and ``[ct.selection]`` in the configuration).
Chest X-ray routing looks only at index tags (a radiograph without BodyPartExamined is
judged by its study and series descriptions too), so it never opens a file; CT series
selection also reads slice headers (no pixel data) for orientation and position.
Every skipped instance (or CT series) gets a coded reason that ``dicomnode status`` shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicomnode.config import CTSelectionSettings, RoutingSettings
from dicomnode.pipelines.types import (
    CTSelection,
    InstanceInput,
    SeriesSkipped,
    Skipped,
    summarise_skips,
)
from dicomnode.volume import CTSeries, SeriesError, SliceHeader, assemble

#: Skip reason codes.
NOT_A_RADIOGRAPH = "not-a-radiograph"
NOT_CHEST = "not-chest"
LATERAL_VIEW = "lateral-view"
OTHER_VIEW = "other-view"
NOT_AN_IMAGE = "not-an-image"

#: Image storage SOP classes the chest X-ray pipeline can read (CR, DX, SC).
_RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (e.g. RSNA exports)
}


@dataclass(frozen=True)
class Route:
    """The instances the chest X-ray pipeline analyses, and the ones it skips."""

    instances: tuple[InstanceInput, ...]
    skipped: tuple[Skipped, ...]

    @property
    def reason(self) -> str | None:
        """Why nothing is analysed, summarised by code (None when something is)."""
        if self.instances:
            return None
        if not self.skipped:
            return "no instances"
        return "no frontal chest radiograph: " + summarise_skips(self.skipped)


def route_reason(skipped: Sequence[Skipped]) -> str:
    """Why a study had nothing to analyse (coded, counted)."""
    return Route((), tuple(skipped)).reason or "no instances"


def _words(text: str | None) -> set[str]:
    return {w for w in re.split(r"[^A-Z0-9]+", (text or "").upper()) if w}


def classify_cxr(instance: InstanceInput, rules: RoutingSettings) -> Skipped | None:
    """None when ``instance`` is a frontal chest radiograph, else why it is not."""
    uid = instance.sop_instance_uid
    modality = (instance.modality or "").upper()
    if instance.sop_class_uid not in _RADIOGRAPH_SOP_CLASSES:
        return Skipped(uid, NOT_AN_IMAGE, f"SOP Class {instance.sop_class_uid}")
    if modality not in rules.cxr_modalities:
        return Skipped(uid, NOT_A_RADIOGRAPH, f"Modality {modality or 'empty'}")
    body_part = (instance.body_part_examined or "").upper()
    if body_part and body_part not in rules.chest_body_parts:
        return Skipped(uid, NOT_CHEST, f"BodyPartExamined {body_part}")
    if not body_part:
        # No body part: the study's and the series' descriptions may say what was imaged.
        described = _words(instance.study_description) | _words(instance.series_description)
        other = described & set(rules.non_chest_words)
        if other and not described & set(rules.chest_words):
            return Skipped(uid, NOT_CHEST, f"description says {sorted(other)[0]}")
    view = (instance.view_position or "").upper()
    if view in rules.lateral_views:
        return Skipped(uid, LATERAL_VIEW, f"ViewPosition {view}")
    if view and view not in rules.frontal_views:
        return Skipped(uid, OTHER_VIEW, f"ViewPosition {view}")
    if not view:
        # No view: frontal unless other evidence says lateral.
        evidence = (
            _words(instance.series_description)
            | _words(instance.image_type)
            | _words(instance.view_evidence)
        )
        lateral = evidence & set(rules.lateral_words)
        if lateral:
            return Skipped(uid, LATERAL_VIEW, f"description says {sorted(lateral)[0]}")
    return None


def route_cxr(instances: Sequence[InstanceInput], rules: RoutingSettings) -> Route:
    """Split a study's instances into those the chest X-ray pipeline analyses and the rest."""
    keep, skipped = [], []
    for instance in instances:
        verdict = classify_cxr(instance, rules)
        if verdict is None:
            keep.append(instance)
        else:
            skipped.append(verdict)
    return Route(tuple(keep), tuple(skipped))


# --------------------------------------------------------------------------- CT series
#
# The CT pipeline analyses one series per study: the axial chest series. Selection
# looks at index tags first (Modality, SOP Class) and then at slice headers read
# without pixel data (ImageType, orientation, position), which the CT pipeline's
# I/O step reads; it never decodes an image.

#: CT series skip reason codes.
NOT_CT = "not-ct"
MULTI_FRAME = "multi-frame"
LOCALIZER = "localizer"
REFORMAT = "reformat"
NOT_AXIAL = "not-axial"
NO_GEOMETRY = "no-geometry"
TOO_FEW_SLICES = "too-few-slices"
UNREADABLE = "unreadable"
NOT_PREFERRED = "not-preferred"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MULTI_FRAME_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


def is_ct_candidate(instance: InstanceInput, rules: CTSelectionSettings) -> bool:
    """Whether the CT pipeline looks at ``instance`` at all (by index tags only)."""
    return (instance.modality or "").upper() in rules.modalities


def _series_verdict(
    series_uid: str, headers: Sequence[SliceHeader], rules: CTSelectionSettings
) -> SeriesSkipped | None:
    """None when the series' tags and orientation make it an axial chest candidate."""
    n = len(headers)
    first = headers[0]
    description = _words(first.SeriesDescription)
    image_types = {t for h in headers for t in h.ImageType}
    localizer = (image_types | description) & set(rules.localizer_words)
    if localizer:
        return SeriesSkipped(series_uid, LOCALIZER, f"says {sorted(localizer)[0]}", n)
    reformat = image_types & set(rules.reformat_image_types)
    if reformat:
        return SeriesSkipped(series_uid, REFORMAT, f"ImageType {sorted(reformat)[0]}", n)
    body_part = first.BodyPartExamined
    if body_part and body_part not in rules.chest_body_parts:
        return SeriesSkipped(series_uid, NOT_CHEST, f"BodyPartExamined {body_part}", n)
    if not body_part and not description & set(rules.chest_words):
        other = description & set(rules.non_chest_words)
        if other:
            return SeriesSkipped(series_uid, NOT_CHEST, f"description says {sorted(other)[0]}", n)
    normals = [h.normal for h in headers]
    if any(v is None for v in normals) or any(h.ImagePositionPatient is None for h in headers):
        return SeriesSkipped(
            series_uid, NO_GEOMETRY, "no ImageOrientationPatient/ImagePositionPatient", n
        )
    worst = max(math.degrees(math.acos(min(1.0, abs(float(v[2]))))) for v in normals)  # type: ignore[index]
    if worst > rules.axial_tolerance_deg:
        return SeriesSkipped(
            series_uid,
            NOT_AXIAL,
            f"slice normal {worst:.0f} degrees from the head-feet axis",
            n,
        )
    return None


def select_ct_series(
    instances: Sequence[InstanceInput],
    read_header: Callable[[InstanceInput], SliceHeader],
    rules: CTSelectionSettings,
) -> CTSelection:
    """Pick the axial chest series of a study; every other series gets a coded reason.

    ``instances`` are the study's instances (index tags); ``read_header`` reads one
    slice's header without pixel data (it raises :class:`~dicomnode.volume.SeriesError`
    for an unreadable file). Rules, in order: Modality in ``modalities`` (others:
    ``not-ct``), CT Image Storage (Enhanced CT: ``multi-frame``), not a localizer, not a
    reformat, chest body part (or an empty one whose description does not say another
    region), axial within ``axial_tolerance_deg``, at least ``min_slices`` slices after
    duplicates are removed. Of the candidates left: a complete series first (no gap),
    then the thinnest slices, then the most slices; the others are ``not-preferred``.
    """
    by_series: dict[str, list[InstanceInput]] = {}
    for instance in instances:
        by_series.setdefault(instance.series_instance_uid, []).append(instance)
    skipped: list[SeriesSkipped] = []
    candidates: list[CTSeries] = []
    for series_uid, members in by_series.items():
        n = len(members)
        modalities = sorted({(m.modality or "").upper() for m in members})
        if not any(is_ct_candidate(m, rules) for m in members):
            skipped.append(
                SeriesSkipped(series_uid, NOT_CT, f"Modality {'/'.join(modalities) or 'empty'}", n)
            )
            continue
        sop_classes = {m.sop_class_uid for m in members}
        multi = sop_classes & set(_MULTI_FRAME_CT)
        if multi:
            name = _MULTI_FRAME_CT[sorted(multi)[0]]
            skipped.append(SeriesSkipped(series_uid, MULTI_FRAME, f"{name} is not analysed", n))
            continue
        if sop_classes != {CT_IMAGE_STORAGE}:
            sop_class = sorted(sop_classes - {CT_IMAGE_STORAGE})[0]
            skipped.append(SeriesSkipped(series_uid, NOT_AN_IMAGE, f"SOP Class {sop_class}", n))
            continue
        try:
            headers = [read_header(m) for m in members]
        except SeriesError as exc:
            skipped.append(SeriesSkipped(series_uid, UNREADABLE, str(exc)[:300], n))
            continue
        verdict = _series_verdict(series_uid, headers, rules)
        if verdict is not None:
            skipped.append(verdict)
            continue
        series = assemble(headers, rules.gap_factor)
        if len(series.slices) < rules.min_slices:
            skipped.append(
                SeriesSkipped(
                    series_uid,
                    TOO_FEW_SLICES,
                    f"{len(series.slices)} slice(s), at least {rules.min_slices} needed",
                    n,
                )
            )
            continue
        candidates.append(series)
    if not candidates:
        return CTSelection(None, "", tuple(skipped))

    def rank(s: CTSeries) -> tuple[bool, float, int]:
        thickness = s.slice_thickness_mm or math.inf
        return (not s.complete, thickness, -len(s.slices))

    candidates.sort(key=rank)
    chosen = candidates[0]
    why = (
        f"{'complete' if chosen.complete else f'{len(chosen.gaps)} gap(s)'}, "
        f"{chosen.slice_thickness_mm or 'unknown'} mm slices, {len(chosen.slices)} slices"
    )
    for candidate in candidates[1:]:
        skipped.append(
            SeriesSkipped(
                candidate.series_instance_uid,
                NOT_PREFERRED,
                f"{len(candidate.slices)} slices of {candidate.slice_thickness_mm or 'unknown'} mm"
                f"{'' if candidate.complete else ' with gaps'}; chose {chosen.series_instance_uid}",
                len(candidate.slices) + len(candidate.duplicates),
            )
        )
    return CTSelection(chosen, why, tuple(skipped))
