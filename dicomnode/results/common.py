"""What the SR and the Secondary Capture encoders share: equipment, identity, cleaning."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from highdicom import ContributingEquipment
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from dicomnode import __version__
from dicomnode.errors import DicomNodeError
from dicomnode.results.codes import PROCESSING_EQUIPMENT
from dicomnode.results.uids import uuid_uid

log = logging.getLogger("dicomnode.results")

#: Manufacturer written into results unless the caller names another.
MANUFACTURER = "dicomnode project"
#: ManufacturerModelName of the node in General Equipment and Contributing Equipment.
NODE_MODEL_NAME = "dicomnode"
#: Software version of the node unless the caller names another.
SOFTWARE_VERSION = __version__
#: Series Description of the result series (Series Description is LO: 64 characters).
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"

#: VRs whose values are checked when copied from a source (text-like, never UIDs).
_CHECKED_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}
)


class ResultError(DicomNodeError, ValueError):
    """A typed result and its source images cannot be encoded as a DICOM result object."""


class ModelDescription(Protocol):
    """What result encoders read of a model (``dicomnode.pipelines.cxr.ModelUsed``)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def task(self) -> str: ...

    @property
    def device_uid(self) -> str: ...

    @property
    def sha256(self) -> str: ...


def node_device_uid(manufacturer: str, institution_name: str | None) -> str:
    """A stable Device UID for the node when the caller has none configured.

    Derived (``2.25`` form) from the manufacturer and the institution, so it stays the
    same across runs; a site that has registered a Device UID for its node should pass
    that one instead.
    """
    return uuid_uid("dicomnode-node-device", manufacturer, institution_name or "")


def contributing_equipment(
    models: Sequence[ModelDescription],
    *,
    manufacturer: str,
    software_version: str,
    device_uid: str,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
) -> list[ContributingEquipment]:
    """Contributing Equipment items as IHE AI Results asks: the node, then one per model.

    Every item has Purpose of Reference DCM 109102 "Processing Equipment", the
    Manufacturer, a Manufacturer's Model Name (``dicomnode`` for the node, the model's
    name for a model), Software Versions (the node's version, the model's version) and
    the Device UID (the node's; each model's own from its manifest). highdicom adds the
    source's acquisition equipment (when the source names a Manufacturer) before them
    and its own item after them.
    """
    node = ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=software_version,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        contribution_description="AI node that ran the models below and encoded this object",
    )
    node.DeviceUID = device_uid
    items = [node]
    for model in models:
        item = ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=model.name,
            software_versions=model.version,
            institution_name=institution_name,
            institutional_department_name=institutional_department_name,
            contribution_description=(
                f"{model.task} model {model.name} {model.version}, weights SHA-256 {model.sha256}"
            ),
        )
        item.DeviceUID = model.device_uid
        items.append(item)
    return items


def empty_invalid_copied_values(result: Dataset, source: Dataset) -> list[str]:
    """Empty top-level values ``result`` copied from ``source`` that break their VR.

    Source images often carry values their VR forbids (a Patient's Age of ``"62"``
    instead of ``"062Y"``, say); copied as they are, they would make the result object
    invalid. Every top-level text-like element (never a UID) whose value in ``result``
    equals the one in ``source`` and fails pydicom's VR validation is emptied (every
    copied Patient and Study attribute but the UIDs is Type 2 or 3, so empty is allowed).
    Returns the keywords emptied; they are logged without their values (they may be PHI).
    """
    emptied = []
    for element in result:
        if element.VR not in _CHECKED_VRS or element.value in (None, ""):
            continue
        copied = source.get(element.tag)
        if copied is None or copied.value != element.value:
            continue
        values = list(element.value) if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, str(value), pydicom_config.RAISE)
        except ValueError:
            element.value = None
            emptied.append(element.keyword or str(element.tag))
    if emptied:
        log.warning(
            "source %s has values invalid for their VR, left empty in the result: %s",
            source.get("SOPInstanceUID", "?"),
            ", ".join(emptied),
        )
    return emptied
