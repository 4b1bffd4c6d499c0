"""Read the few header attributes the index needs from a received file.

Only the header is parsed (``stop_before_pixels``); pixel data is never decoded
on the receive path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.errors import DatasetError, InvalidUIDError
from dicomnode.index import InstanceMeta
from dicomnode.receive.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_UID,
    SOP_INSTANCE_MISMATCH,
)
from dicomnode.storage import validate_uid


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    # Keep values inside a 32-bit signed column.
    return number if -(2**31) <= number < 2**31 else None


def read_instance_meta(
    path: Path,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> InstanceMeta:
    """Parse the header of a received file and check it against the C-STORE request.

    Raises :class:`DatasetError` carrying the C-STORE failure status when the
    dataset cannot be parsed, lacks a usable UID, or contradicts the request.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        # Touch every element we need now, so a broken encoding fails here
        # (pydicom parses values lazily).
        values: dict[str, Any] = {
            k: ds.get(k)
            for k in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "SOPClassUID",
                "Modality",
                "BodyPartExamined",
                "ViewPosition",
                "ImageType",
                "PhotometricInterpretation",
                "Rows",
                "Columns",
                "NumberOfFrames",
                "InstanceNumber",
                "SeriesDescription",
                "SeriesNumber",
                "PatientID",
                "AccessionNumber",
                "StudyDate",
            )
        }
    except Exception as exc:
        raise DatasetError(
            f"dataset cannot be parsed: {type(exc).__name__}: {exc}", CANNOT_UNDERSTAND
        ) from exc
    try:
        study_uid = validate_uid(values["StudyInstanceUID"], "StudyInstanceUID")
        series_uid = validate_uid(values["SeriesInstanceUID"], "SeriesInstanceUID")
        affected_instance = validate_uid(affected_sop_instance_uid, "AffectedSOPInstanceUID")
        # Some archives export files whose dataset has an empty SOPInstanceUID and
        # keep the UID in the file meta only; the request carries it, so use that.
        raw_sop = values["SOPInstanceUID"]
        sop_uid = (
            affected_instance
            if raw_sop is None or str(raw_sop).strip("\x00 ") == ""
            else validate_uid(raw_sop, "SOPInstanceUID")
        )
    except InvalidUIDError as exc:
        raise DatasetError(str(exc), INVALID_UID) from exc
    if sop_uid != affected_instance:
        raise DatasetError(
            f"SOPInstanceUID {sop_uid!r} differs from the request's "
            f"AffectedSOPInstanceUID {affected_instance!r}",
            SOP_INSTANCE_MISMATCH,
        )
    sop_class = values["SOPClassUID"]
    if sop_class and str(sop_class).rstrip("\x00 ") != affected_sop_class_uid:
        raise DatasetError(
            f"SOPClassUID {str(sop_class)!r} differs from the request's "
            f"AffectedSOPClassUID {affected_sop_class_uid!r}",
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return InstanceMeta(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUID=sop_uid,
        SOPClassUID=affected_sop_class_uid,
        TransferSyntaxUID=transfer_syntax_uid,
        Modality=_text(ds, "Modality", 16),
        BodyPartExamined=_text(ds, "BodyPartExamined", 64),
        ViewPosition=_text(ds, "ViewPosition", 16),
        ImageType=_text(ds, "ImageType", 200),
        PhotometricInterpretation=_text(ds, "PhotometricInterpretation", 16),
        Rows=_int(ds, "Rows"),
        Columns=_int(ds, "Columns"),
        NumberOfFrames=_int(ds, "NumberOfFrames"),
        InstanceNumber=_int(ds, "InstanceNumber"),
        SeriesDescription=_text(ds, "SeriesDescription", 64),
        SeriesNumber=_int(ds, "SeriesNumber"),
        PatientID=_text(ds, "PatientID", 64),
        AccessionNumber=_text(ds, "AccessionNumber", 64),
        StudyDate=_text(ds, "StudyDate", 8),
    )
