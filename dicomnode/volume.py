"""CT series assembly: slice headers, order along the normal, gaps, duplicates.

A CT series arrives as one file per slice, in any order. Assembly works on headers
only (``dcmread(stop_before_pixels=True)``), so that a series of 1,000+ slices costs a
few MiB; pixel data is decoded later, one slice at a time (:func:`dicomnode.imaging.to_hu`),
and never held as a whole volume.

Geometry (PS3.3 C.7.6.2.1.1): the slice normal is the cross product of the row and
column direction cosines of Image Orientation (Patient); a slice's position along the
normal is the dot product of the normal with its Image Position (Patient). Slices are
sorted by that position (ascending; ties by Instance Number). Then:

* **duplicates**: slices at the same position (within 1 % of the typical spacing, or
  0.01 mm) are duplicates; the first in order is kept, the others are reported;
* **spacing**: the median distance between neighbouring positions;
* **gaps**: a distance larger than ``gap_factor`` times the spacing is a gap (a missing
  slice or a second stack); the series is then not complete.

A slice without a usable position or orientation (e.g. a single secondary capture) is
ordered by Instance Number and the series has no spacing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.errors import DicomNodeError

#: Distances above this many times the median spacing are gaps.
DEFAULT_GAP_FACTOR = 1.5


class SeriesError(DicomNodeError):
    """A slice header cannot be read or used (the message names the file and the value)."""


@dataclass(frozen=True)
class SliceHeader:
    """What assembly and series selection read of one CT slice (no pixel data)."""

    path: Path
    SOPInstanceUID: str
    SOPClassUID: str
    SeriesInstanceUID: str
    Modality: str
    ImageType: tuple[str, ...]
    SeriesDescription: str
    BodyPartExamined: str
    Rows: int
    Columns: int
    InstanceNumber: int | None
    ImagePositionPatient: tuple[float, float, float] | None
    ImageOrientationPatient: tuple[float, float, float, float, float, float] | None
    PixelSpacing: tuple[float, float] | None
    SliceThickness: float | None
    NumberOfFrames: int

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal (row cosines x column cosines), None without an orientation."""
        if self.ImageOrientationPatient is None:
            return None
        row = np.asarray(self.ImageOrientationPatient[:3], dtype=np.float64)
        col = np.asarray(self.ImageOrientationPatient[3:], dtype=np.float64)
        normal = np.cross(row, col)
        norm = float(np.linalg.norm(normal))
        return normal / norm if norm > 1e-6 else None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if not isinstance(value, MultiValue | list | tuple) or len(value) != count:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    try:
        number = float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip("\x00 ")


def slice_header(ds: Dataset, path: Path) -> SliceHeader:
    """The :class:`SliceHeader` of a dataset read from ``path``."""
    image_type = ds.get("ImageType")
    if isinstance(image_type, str):
        types: tuple[str, ...] = (image_type.strip().upper(),)
    elif image_type:
        types = tuple(str(v).strip().upper() for v in image_type)
    else:
        types = ()
    thickness = _number(ds, "SliceThickness")
    instance_number = _number(ds, "InstanceNumber")
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is not None and not all(v > 0 for v in spacing):
        spacing = None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    return SliceHeader(
        path=path,
        SOPInstanceUID=_text(ds, "SOPInstanceUID"),
        SOPClassUID=_text(ds, "SOPClassUID"),
        SeriesInstanceUID=_text(ds, "SeriesInstanceUID"),
        Modality=_text(ds, "Modality").upper(),
        ImageType=types,
        SeriesDescription=_text(ds, "SeriesDescription"),
        BodyPartExamined=_text(ds, "BodyPartExamined").upper(),
        Rows=int(ds.get("Rows") or 0),
        Columns=int(ds.get("Columns") or 0),
        InstanceNumber=int(instance_number) if instance_number is not None else None,
        ImagePositionPatient=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        ImageOrientationPatient=_floats(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
        PixelSpacing=spacing,  # type: ignore[arg-type]
        SliceThickness=thickness if thickness is not None and thickness > 0 else None,
        NumberOfFrames=frames,
    )


def read_slice_header(path: str | os.PathLike[str]) -> SliceHeader:
    """Read one file's header (no pixel data); :class:`SeriesError` when unreadable."""
    path = Path(path)
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except OSError as exc:
        raise SeriesError(f"{path}: cannot be read: {exc}") from exc
    except Exception as exc:
        raise SeriesError(f"{path}: not readable as DICOM: {exc}") from exc
    return slice_header(ds, path)


@dataclass(frozen=True)
class OrderedSlice:
    """A slice in series order, with its position along the normal (mm, None if unknown)."""

    header: SliceHeader
    position: float | None


@dataclass(frozen=True)
class Gap:
    """Neighbouring slices further apart than the gap threshold."""

    after_sop_instance_uid: str
    before_sop_instance_uid: str
    distance_mm: float


@dataclass(frozen=True)
class CTSeries:
    """One series of slices in order along the normal."""

    series_instance_uid: str
    slices: tuple[OrderedSlice, ...]
    spacing_mm: float | None
    """Median distance between neighbouring slices (None for one slice or no geometry)."""
    gaps: tuple[Gap, ...] = ()
    duplicates: tuple[str, ...] = ()
    """SOP Instance UIDs left out because another slice has the same position."""
    normal: tuple[float, float, float] | None = None
    geometry: str = "position"
    """``position`` (sorted along the normal) or ``instance-number`` (no usable geometry)."""
    notes: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """No gap between neighbouring slices."""
        return not self.gaps

    @property
    def slice_thickness_mm(self) -> float | None:
        """The slices' Slice Thickness (the most common value), else the spacing."""
        values = [s.header.SliceThickness for s in self.slices if s.header.SliceThickness]
        if values:
            uniq, counts = np.unique(np.asarray(values), return_counts=True)
            return float(uniq[int(np.argmax(counts))])
        return self.spacing_mm

    def summary(self) -> dict[str, object]:
        """JSON-ready description (no patient data)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "slices": len(self.slices),
            "spacing_mm": None if self.spacing_mm is None else round(self.spacing_mm, 4),
            "slice_thickness_mm": self.slice_thickness_mm,
            "geometry": self.geometry,
            "gaps": [
                {"after": g.after_sop_instance_uid, "distance_mm": round(g.distance_mm, 3)}
                for g in self.gaps
            ],
            "duplicates": list(self.duplicates),
        }


def assemble(headers: Iterable[SliceHeader], gap_factor: float = DEFAULT_GAP_FACTOR) -> CTSeries:
    """Order one series' slices along the normal; find duplicates and gaps.

    All headers must belong to one series. Raises :class:`SeriesError` when they do not
    or when there are none.
    """
    items = list(headers)
    if not items:
        raise SeriesError("a series needs at least one slice")
    uids = {h.SeriesInstanceUID for h in items}
    if len(uids) != 1:
        raise SeriesError(f"slices of several series given to one assembly: {sorted(uids)}")
    series_uid = items[0].SeriesInstanceUID
    normals = [h.normal for h in items]
    usable = all(n is not None for n in normals) and all(
        h.ImagePositionPatient is not None for h in items
    )
    if not usable:
        ordered = sorted(items, key=lambda h: (h.InstanceNumber is None, h.InstanceNumber or 0))
        return CTSeries(
            series_uid,
            tuple(OrderedSlice(h, None) for h in ordered),
            None,
            geometry="instance-number",
            notes=("no usable ImagePositionPatient/ImageOrientationPatient",),
        )
    normal = normals[0]
    assert normal is not None
    positions = [float(np.dot(normal, h.ImagePositionPatient)) for h in items]  # type: ignore[arg-type]
    order = sorted(
        range(len(items)),
        key=lambda i: (positions[i], items[i].InstanceNumber or 0, items[i].SOPInstanceUID),
    )
    steps = np.diff([positions[i] for i in order])
    nonzero = steps[steps > 0.01]
    typical = float(np.median(nonzero)) if nonzero.size else 0.0
    same = max(0.01, 0.01 * typical)
    kept: list[OrderedSlice] = []
    duplicates: list[str] = []
    for i in order:
        if kept and kept[-1].position is not None and positions[i] - kept[-1].position < same:
            duplicates.append(items[i].SOPInstanceUID)
            continue
        kept.append(OrderedSlice(items[i], positions[i]))
    distances = np.diff([s.position for s in kept]) if len(kept) > 1 else np.zeros(0)
    spacing = float(np.median(distances)) if distances.size else None
    gaps = []
    if spacing:
        for k, distance in enumerate(distances):
            if distance > gap_factor * spacing:
                gaps.append(
                    Gap(
                        kept[k].header.SOPInstanceUID,
                        kept[k + 1].header.SOPInstanceUID,
                        float(distance),
                    )
                )
    notes = []
    if any(n is not None and float(np.dot(n, normal)) < 0.9999 for n in normals):
        notes.append("slices differ in ImageOrientationPatient")
    return CTSeries(
        series_uid,
        tuple(kept),
        spacing,
        tuple(gaps),
        tuple(duplicates),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        notes=tuple(notes),
    )


def group_by_series(headers: Sequence[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Headers grouped by Series Instance UID, in first-seen order."""
    groups: dict[str, list[SliceHeader]] = {}
    for header in headers:
        groups.setdefault(header.SeriesInstanceUID, []).append(header)
    return groups
