"""Routing: which instances of a study a pipeline analyses, and why the others are skipped.

Rules are declarative (``[routing]`` in the configuration) and look only at index
tags, so routing never opens a file. Every skipped instance gets a coded reason that
``dicomnode status`` shows.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dicomnode.config import RoutingSettings
from dicomnode.pipelines.base import InstanceInput

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
class Skipped:
    """An instance a pipeline does not analyse, with a coded reason."""

    sop_instance_uid: str
    code: str
    detail: str


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
        counts = Counter(s.code for s in self.skipped)
        examples = {}
        for s in self.skipped:
            examples.setdefault(s.code, s.detail)
        parts = [f"{n} {code} ({examples[code]})" for code, n in sorted(counts.items())]
        return "no frontal chest radiograph: " + "; ".join(parts)


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
