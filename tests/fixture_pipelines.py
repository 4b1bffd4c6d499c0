"""Pipelines for tests only: slow, failing. Loaded by the node through ``worker.pipeline``.

They take the worker's place of the real chest X-ray / CT pipelines so the queue can be
exercised (and killed) with predictable timing. Tune them with environment variables.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.errors import RetryableError
from dicomnode.pipelines import PipelineOutcome, ResultObject, StudyInput

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def result_uid(study_uid: str) -> str:
    """The deterministic SOP Instance UID of the fixture's one result object."""
    return generate_uid(entropy_srcs=[study_uid, "fixture-result"])


def _result(study: StudyInput) -> ResultObject:
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = result_uid(study.study_instance_uid)
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study.study_instance_uid, "series"])
    ds.Modality = "OT"
    ds.ImageComments = f"{len(study.instances)} instance(s)"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ResultObject(ds.SOPInstanceUID, SECONDARY_CAPTURE, buffer.getvalue())


class SlowPipeline:
    """Sleeps ``DICOMNODE_TEST_DELAY_S`` seconds, then makes one result object.

    Its ``load`` takes ``DICOMNODE_TEST_LOAD_DELAY_S`` seconds (default 0).

    With ``DICOMNODE_TEST_MARK_DIR`` set, it first creates ``<dir>/<StudyInstanceUID>``, so
    a test knows the moment processing started without polling ``status``."""

    name = "slow-fixture"
    version = "1"
    delay: float = 0.2
    mark_dir: Path | None = None

    def load(self) -> None:
        # DICOMNODE_TEST_LOAD_DELAY_S: seconds "loading models" (a busy loop, as real
        # loading is mostly computation), so a test can stop the node meanwhile.
        loading_until = time.monotonic() + float(os.environ.get("DICOMNODE_TEST_LOAD_DELAY_S", "0"))
        while time.monotonic() < loading_until:
            sum(range(10_000))
        self.delay = float(os.environ.get("DICOMNODE_TEST_DELAY_S", "0.2"))
        mark_dir = os.environ.get("DICOMNODE_TEST_MARK_DIR")
        self.mark_dir = Path(mark_dir) if mark_dir else None

    def run(self, study: StudyInput) -> PipelineOutcome:
        if self.mark_dir is not None:
            (self.mark_dir / study.study_instance_uid).touch()
        time.sleep(self.delay)
        return PipelineOutcome(
            results=(_result(study),),
            summary={"instances": [i.sop_instance_uid for i in study.instances]},
        )


class FailingPipeline:
    """Always fails with a retryable error (an outage that never ends), recognisably."""

    name = "failing-fixture"
    version = "1"

    def load(self) -> None:
        pass

    def run(self, study: StudyInput) -> PipelineOutcome:
        raise RetryableError(f"fixture failure for {study.study_instance_uid}")


class BrokenPipeline:
    """Always fails with a deterministic error (as a corrupt input or a bug does)."""

    name = "broken-fixture"
    version = "1"

    def load(self) -> None:
        pass

    def run(self, study: StudyInput) -> PipelineOutcome:
        raise ValueError(f"fixture bug for {study.study_instance_uid}")


def slow() -> SlowPipeline:
    return SlowPipeline()


def failing() -> FailingPipeline:
    return FailingPipeline()


def broken() -> BrokenPipeline:
    return BrokenPipeline()
