"""What the SR and the Secondary Capture encoders share: equipment, identity, cleaning."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Protocol

from highdicom import ContributingEquipment, SpecificCharacterSetValues
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM, validate_value

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

#: The character set of a result whose source declares one highdicom cannot write:
#: UTF-8 holds any text pydicom decoded from the source.
FALLBACK_CHARACTER_SET = "ISO_IR 192"
_DEFINED_TERMS = frozenset(term.value for term in SpecificCharacterSetValues)
#: The terms highdicom takes in a multi-valued Specific Character Set (all ISO 2022 ones
#: but GB2312's); the multi-byte ones may not come first.
_CODE_EXTENSIONS = frozenset(
    term for term in _DEFINED_TERMS if term.startswith("ISO 2022 ") and term != "ISO 2022 IR 58"
)
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159"})

#: Type 2 Patient and General Study attributes highdicom reads from a source.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_DATA = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
#: Patient's Sex (0010,0040) enumerated values.
_PATIENT_SEX = frozenset({"M", "F", "O"})
#: Date and time VRs, parsed as highdicom parses them.
_PARSED = {"DA": DA, "TM": TM, "DT": DT}

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


def result_character_set(source: Dataset) -> str | list[str] | None:
    """The Specific Character Set (0008,0005) for a result object copying ``source``'s
    patient and study text.

    The source's own value when highdicom writes it, after rewrites that keep its
    meaning (PS3.3 C.12.1.1.2): an empty first value of several (``\\ISO 2022 IR 87``,
    as Japanese modalities send it) is ISO 2022 IR 6, spelled out; a single
    ``ISO 2022 IR n`` is ``ISO_IR n`` (one repertoire needs no code extensions), and a
    single ``ISO 2022 IR 6`` the default repertoire. Anything else highdicom refuses (a
    misspelling such as ``ISO_IR100``, Korean ``ISO 2022 IR 149``, which highdicom does
    not know) gives UTF-8, ``ISO_IR 192``: pydicom decoded the source's text as best it
    could, and UTF-8 writes all of it. ``None`` for the default repertoire.
    """
    raw = source.get("SpecificCharacterSet")
    if raw is None or raw == "":
        return None
    values = [str(v).strip() for v in ([raw] if isinstance(raw, str) else raw)]
    if len(values) > 1 and not values[0]:
        values[0] = SpecificCharacterSetValues.DEFAULT_REPERTOIRE_CODE_EXTENSIONS.value
    if len(values) == 1 and values[0].startswith("ISO 2022 IR "):
        if values[0] == SpecificCharacterSetValues.DEFAULT_REPERTOIRE_CODE_EXTENSIONS.value:
            return None
        values[0] = "ISO_IR " + values[0].removeprefix("ISO 2022 IR ")
    if writable_character_set(values):
        return values[0] if len(values) == 1 else values
    log.warning(
        "source %s declares Specific Character Set %r, which highdicom cannot write; "
        "its results are written in UTF-8 (%s)",
        source.get("SOPInstanceUID", "?"),
        "\\".join(values),
        FALLBACK_CHARACTER_SET,
    )
    return FALLBACK_CHARACTER_SET


def writable_character_set(values: Sequence[str]) -> bool:
    """Whether highdicom writes these Specific Character Set values: one defined term
    without code extensions, or several code extensions, no multi-byte one first."""
    if len(values) == 1:
        return values[0] in _DEFINED_TERMS and values[0] not in _CODE_EXTENSIONS
    return (
        len(values) > 1
        and all(value in _CODE_EXTENSIONS for value in values)
        and values[0] not in _MULTI_BYTE_EXTENSIONS
    )


def copyable_header(source: Dataset) -> Dataset:
    """``source``'s top-level attributes without pixel data, for a result to copy.

    highdicom copies the patient and study modules (and the acquisition equipment) from
    this header, parsing some values on the way; modalities often send values their VR
    forbids (a Patient's Age of ``"62"`` instead of ``"062Y"``, a Study Date of
    ``"2026-01-01"``, a Patient's Sex of ``"Male"``, two values in a one-valued
    Institution Name). Copied as they are, they make the result invalid or make
    highdicom refuse it, and the study would get no result at all. So every top-level
    text-like element (never a UID) whose value breaks its VR, its dictionary value
    multiplicity, its date or time format, or the Patient's Sex terms (M, F, O) is
    emptied in the header; every copied Patient and Study attribute but the UIDs is
    Type 2 or 3, so empty is allowed. The Type 2 ones the source lacks are added empty
    (highdicom fails on a missing one). Values valid in form but not in meaning are
    dropped too: a pixel spacing with a value that is not above zero (``0.000\\0.000``
    from some CR readers), which a result would otherwise copy into its own pixel
    measures. The source is not changed. The emptied keywords
    are logged without their values (they may be PHI).
    """
    header = Dataset()
    emptied = []
    for element in source:
        if element.keyword in _PIXEL_DATA:
            continue
        # The character set is checked (and replaced if need be) by result_character_set.
        if element.keyword != "SpecificCharacterSet" and _breaks_its_vr(element):
            header.add(DataElement(element.tag, element.VR, None))
            emptied.append(element.keyword or str(element.tag))
        else:
            header.add(element)
    for keyword in _SPACINGS:
        if keyword in header and not meaningful_spacing(header, keyword):
            del header[keyword]
            emptied.append(keyword)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    if emptied:
        _warn_emptied(str(source.get("SOPInstanceUID", "?")), tuple(emptied))
    return header


@functools.lru_cache(maxsize=1024)
def _warn_emptied(sop_instance_uid: str, keywords: tuple[str, ...]) -> None:
    """Log once per source image, not once per result object made from it."""
    log.warning(
        "source %s has values invalid for their VR or meaning, left out of the results: %s",
        sop_instance_uid,
        ", ".join(keywords),
    )


#: Pixel spacings (row, column in mm) that must be above zero to mean anything.
_SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")


def meaningful_spacing(source: Dataset, keyword: str) -> tuple[float, float] | None:
    """``source``'s ``keyword`` spacing as two numbers above zero, else ``None`` (absent,
    empty, not two values, not numbers, or zero / negative: a spacing that says nothing)."""
    value = source.get(keyword)
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != 2 or not all(v > 0 for v in numbers):
        return None
    return numbers[0], numbers[1]


def _breaks_its_vr(element: DataElement) -> bool:
    """Whether a text-like element's value is one a result must not copy."""
    if element.VR not in _CHECKED_VRS or element.value in (None, ""):
        return False
    values = list(element.value) if element.VM > 1 else [element.value]
    if element.VM > 1 and not element.tag.is_private:
        with contextlib.suppress(KeyError):
            if dictionary_VM(element.tag) == "1":
                return True
    try:
        for value in values:
            text = str(value)
            validate_value(element.VR, text, pydicom_config.RAISE)
            if text and element.VR in _PARSED:
                _PARSED[element.VR](text)  # a real date or time, as highdicom parses it
    except ValueError:
        return True
    return element.keyword == "PatientSex" and str(element.value) not in _PATIENT_SEX
