"""The placeholder pipeline: records which instances an analysis would receive.

It stands in for the chest X-ray and CT pipelines until they land, so that the
queue, the worker and the outbox can be exercised end to end. It produces no
result objects; its summary lists the instances by series.
"""

from __future__ import annotations

from collections import defaultdict

from dicomnode.pipelines.types import PipelineOutcome, StudyInput


class PlaceholderPipeline:
    """Counts what it would analyse; produces nothing to send."""

    name = "placeholder"
    version = "0"

    def load(self) -> None:
        """Nothing to load."""

    def run(self, study: StudyInput) -> PipelineOutcome:
        series: dict[str, list[str]] = defaultdict(list)
        for instance in study.instances:
            series[instance.series_instance_uid].append(instance.sop_instance_uid)
        return PipelineOutcome(
            summary={
                "pipeline": self.name,
                "instances": len(study.instances),
                "series": {uid: sorted(sops) for uid, sops in sorted(series.items())},
            }
        )
