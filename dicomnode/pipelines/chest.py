"""The chest pipeline: chest radiographs and chest CT of a study, each by its own pipeline.

A study may hold radiographs (CR, DX, Secondary Capture), CT series, or both. Its CT
instances (by Modality, ``[ct.selection] modalities``) go to the CT pipeline, every
other instance to the chest X-ray pipeline; each runs only when it has instances. The
study is skipped only when neither analyses anything, with the reasons of both. Both
pipelines are loaded once, when the worker starts.
"""

from __future__ import annotations

from dicomnode.pipelines.ct import CTPipeline, ct_instances
from dicomnode.pipelines.cxr import CXRPipeline
from dicomnode.pipelines.types import ChestStudyResult, PipelineOutcome, StudyInput
from dicomnode.routing import route_reason


class ChestPipeline:
    """Runs :class:`CXRPipeline` on a study's radiographs and :class:`CTPipeline` on its CT."""

    name = "chest"

    def __init__(self, cxr: CXRPipeline, ct: CTPipeline) -> None:
        self.cxr = cxr
        self.ct = ct
        self.version = f"cxr{cxr.version}-ct{ct.version}"

    def load(self) -> None:
        self.cxr.load()
        self.ct.load()

    def analyse(self, study: StudyInput) -> ChestStudyResult:
        ct_part = ct_instances(study, self.ct)
        ct_uids = {i.sop_instance_uid for i in ct_part}
        other = tuple(i for i in study.instances if i.sop_instance_uid not in ct_uids)
        result = ChestStudyResult(study.study_instance_uid)
        if other:
            result.cxr = self.cxr.analyse(StudyInput(study.study_instance_uid, other))
            if not result.cxr.images:
                result.reasons.append(route_reason(result.cxr.skipped))
        else:
            result.reasons.append("no radiographs")
        if ct_part:
            result.ct = self.ct.analyse(StudyInput(study.study_instance_uid, ct_part))
            if result.ct.reason:
                result.reasons.append(result.ct.reason)
        else:
            result.reasons.append("no CT instances")
        return result

    def run(self, study: StudyInput) -> PipelineOutcome:
        result = self.analyse(study)
        reason = None if result.analysed else "; ".join(result.reasons)
        note = None
        if result.analysed:
            notes = [part.note for part in (result.cxr, result.ct) if part is not None]
            note = "; ".join(n for n in notes if n) or None
        return PipelineOutcome(
            summary=result.summary(), skipped_reason=reason, analysis=result, note=note
        )
