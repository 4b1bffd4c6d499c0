"""One received radiograph to the 8-bit grey image the models expect.

:func:`to_uint8` is the only way the node and model training turn a DICOM image into
pixels, so both see the same grey levels. It does, in this order (PS3.3 C.7.6.3, C.11):

1. **Read and decode.** A path is read with ``dcmread(force=True)``. When the file meta
   has no Transfer Syntax UID (a raw dataset with no meta header), the encoding pydicom
   found while parsing is used: Explicit VR Big Endian or Explicit VR Little Endian when
   it detected those, else Implicit VR Little Endian. Pixel data is decoded by pydicom's
   decoders with the installed plugins (native, deflate, JPEG, JPEG-LS, JPEG 2000, HTJ2K,
   RLE). YBR colour data comes back as RGB. **Only the first frame** of a multi-frame
   image is decoded and used.
2. **Colour** (RGB after decoding): the luminance ``0.299 R + 0.587 G + 0.114 B``
   (ITU-R BT.601, as OpenCV's ``COLOR_RGB2GRAY``) over the stored range
   ``0 .. 2**BitsStored - 1``. Modality LUT and VOI apply to greyscale only; they are ignored.
3. **Greyscale, Modality LUT:** the first Modality LUT Sequence item when present, else
   Rescale Slope and Intercept (a missing one defaults to 1 or 0), else the stored values.
4. **Greyscale, VOI:** the first VOI LUT Sequence item, its output read as 0 .. 2**bits - 1
   with bits from its LUT Descriptor (widened if an entry is larger); else the first
   Window Center and Window Width with the VOI LUT Function
   (LINEAR when absent or unknown, LINEAR_EXACT, SIGMOID); else, or when the window is
   unusable (width below 1 for LINEAR, not above 0 otherwise), the minimum to the maximum
   of the image. A constant image gives 0 everywhere.
5. **MONOCHROME1** is inverted after the VOI, so that air is dark for both photometric
   interpretations. PresentationLUTShape is not read: the photometric interpretation decides.
6. The result in 0..1 is multiplied by 255 and rounded to the nearest integer (``numpy.rint``).

:func:`to_hu` is the CT counterpart: steps 1 and 3 only (decode, then the Modality LUT or
Rescale Slope/Intercept), giving Hounsfield units as ``float32`` with no window applied.

No resizing: the pipeline resizes. :class:`Image8` keeps the source geometry (Rows,
Columns, PixelSpacing, ImagerPixelSpacing) so that results can be mapped back.
Anything that stops an image from being made raises :class:`ImageDecodeError`, with the
transfer syntax and the reason; a file that cannot be opened raises the usual ``OSError``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.errors import DicomNodeError

#: ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: VOI LUT Function values (PS3.3 C.11.2.1.2, C.11.2.1.3); anything else is read as LINEAR.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_HU = "Hounsfield units"
#: (7FE0,0010) Pixel Data: a header is everything before it.
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True, eq=False)
class Image8:
    """An 8-bit grey image made from one DICOM image, and where it came from.

    ``pixels[row, column]`` is the source pixel at (row, column): same Rows and Columns,
    nothing cropped or resized, so coordinates map back to the source one to one.
    """

    pixels: np.ndarray
    """2-D ``numpy.uint8`` array of shape (Rows, Columns); 0 is dark (air), 255 bright."""
    Rows: int
    Columns: int
    PixelSpacing: tuple[float, float] | None
    """(row spacing, column spacing) in mm, when the dataset has a usable one."""
    ImagerPixelSpacing: tuple[float, float] | None
    """(row spacing, column spacing) in mm at the detector (CR, DX), when present."""
    PhotometricInterpretation: str
    """As the source dataset says (``YBR_*`` data were converted to RGB first)."""
    TransferSyntaxUID: str
    """The transfer syntax the pixel data was decoded as (assumed when the file meta has none)."""
    NumberOfFrames: int
    """Frames in the source; only the first was used."""
    voi: str
    """How grey levels were chosen: ``"VOILUTSequence"``, ``"WindowCenter/WindowWidth LINEAR"``
    (or ``LINEAR_EXACT``, ``SIGMOID``), ``"min-max"`` or ``"luminance"`` (colour)."""
    header: Dataset | None = field(default=None, repr=False)
    """The source data set without its pixel data (:func:`header_of`), for the encoders."""


def to_uint8(source: str | os.PathLike[str] | Dataset) -> Image8:
    """Decode the first frame of a DICOM image into an 8-bit grey :class:`Image8`.

    ``source`` is a path to a DICOM file (with or without a file meta header) or a
    dataset; a dataset is not modified. See the module documentation for the steps.

    Raises :class:`ImageDecodeError` when no image can be made (no pixel data, a transfer
    syntax with no decoder, corrupt or truncated data, an unsupported photometric
    interpretation, a malformed LUT), and ``OSError`` when the file cannot be opened.
    """
    ds, label = _open(source)
    transfer_syntax = _transfer_syntax(ds)
    try:
        frame, decoded, frames = _first_frame(ds, transfer_syntax)
        photometric = str(decoded.get("photometric_interpretation", ""))
        if photometric in _MONOCHROME and frame.ndim == 2:
            unit, voi = _grey(frame, ds, invert=photometric == "MONOCHROME1")
        elif photometric == "RGB" and frame.ndim == 3 and frame.shape[2] == 3:
            unit, voi = _luminance(frame, int(cast(int, decoded["bits_stored"]))), "luminance"
        else:
            raise _UnusableError(
                f"PhotometricInterpretation {photometric!r} with decoded shape "
                f"{frame.shape} is not supported (MONOCHROME1, MONOCHROME2, RGB and YBR are)"
            )
    except _UnusableError as exc:
        raise ImageDecodeError(label, transfer_syntax, str(exc)) from exc
    pixels = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    rows, columns = pixels.shape
    return Image8(
        pixels=pixels,
        Rows=rows,
        Columns=columns,
        PixelSpacing=_spacing(ds, "PixelSpacing"),
        ImagerPixelSpacing=_spacing(ds, "ImagerPixelSpacing"),
        PhotometricInterpretation=_text(ds, "PhotometricInterpretation"),
        TransferSyntaxUID=str(transfer_syntax),
        NumberOfFrames=frames,
        voi=voi,
        header=header_of(ds),
    )


def header_of(ds: Dataset) -> Dataset:
    """``ds`` without its pixel data and what follows it, as ``dcmread(stop_before_pixels=True)``
    reads it (file meta kept). The elements are shared with ``ds``, not copied."""
    header = ds[:_PIXEL_DATA_TAG]
    header.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    return header


def _open(
    source: str | os.PathLike[str] | Dataset, target: str = "an 8-bit image"
) -> tuple[Dataset, str]:
    """The dataset of ``source`` (read with ``force``) and how error messages name it.

    Raises :class:`ImageDecodeError` (making ``target``) when the file is not DICOM, and
    ``OSError`` when it cannot be opened.
    """
    if isinstance(source, Dataset):
        return source, f"dataset (SOPInstanceUID {_text(source, 'SOPInstanceUID')!r})"
    label = _source_label(source)
    try:
        return dcmread(Path(source), force=True), label
    except OSError:
        raise
    except Exception as exc:
        raise ImageDecodeError(label, "", f"not readable as DICOM: {exc}", target) from exc


def to_hu(source: str | os.PathLike[str] | Dataset) -> np.ndarray:
    """Decode the first frame of a greyscale CT image into Hounsfield units.

    Steps 1 (read and decode any transfer syntax) and 3 (Modality LUT Sequence, else
    Rescale Slope and Intercept) of :func:`to_uint8`; no VOI, no inversion. Returns a
    ``float32`` array of shape (Rows, Columns): one slice, about 1 MiB for 512 x 512,
    so a series is read one slice at a time. A stored value is HU when the source's
    Rescale Type is HU or absent (CT Image IOD); that is not checked here.

    Raises :class:`ImageDecodeError` when the dataset is not a decodable greyscale image
    and ``OSError`` when the file cannot be opened.
    """
    return read_hu(source)[0]


def read_hu(source: str | os.PathLike[str] | Dataset) -> tuple[np.ndarray, Dataset]:
    """:func:`to_hu` and the source's header (:func:`header_of`), from one read."""
    ds, label = _open(source, _HU)
    transfer_syntax = _transfer_syntax(ds)
    try:
        frame, decoded, _frames = _first_frame(ds, transfer_syntax)
        photometric = str(decoded.get("photometric_interpretation", ""))
        if photometric not in _MONOCHROME or frame.ndim != 2:
            raise _UnusableError(
                f"PhotometricInterpretation {photometric!r} with decoded shape {frame.shape} "
                "is not a greyscale CT image"
            )
        values = _modality(frame, ds)
    except _UnusableError as exc:
        raise ImageDecodeError(label, transfer_syntax, str(exc), _HU) from exc
    return np.asarray(values, dtype=np.float32), header_of(ds)


# --- reading and decoding ------------------------------------------------------------


class _UnusableError(Exception):
    """Internal: why no image can be made; :func:`to_uint8` turns it into ImageDecodeError."""


def _transfer_syntax(ds: Dataset) -> UID:
    """The file meta's Transfer Syntax UID, else the encoding pydicom detected while reading."""
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if uid:
        return UID(str(uid).strip("\x00 "))
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    if implicit is False:
        return ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def _first_frame(ds: Dataset, transfer_syntax: UID) -> tuple[np.ndarray, dict[str, object], int]:
    """Decode frame 0 with pydicom (YBR to RGB).

    Also returns what pydicom says about the decoded frame (``photometric_interpretation``,
    ``bits_stored``, ...) and the number of frames in the source.
    """
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise _UnusableError("the dataset has no Pixel Data")
    _check_pixel_attributes(ds, transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:
        raise _UnusableError("pydicom has no pixel data decoder for this transfer syntax") from exc
    try:
        options = as_pixel_options(ds)
        frame, decoded = decoder.as_array(ds, index=0, **options)
        frames = int(options["number_of_frames"])
    except Exception as exc:
        raise _UnusableError(f"{type(exc).__name__}: {exc}") from exc
    return frame, dict(decoded), frames


#: Bits Allocated values of the image IODs (PS3.3 C.7.6.3.1.1; 1 only for bitmaps).
_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def _check_pixel_attributes(ds: Dataset, transfer_syntax: UID) -> None:
    """Refuse pixel attributes that contradict each other or the pixel data.

    pydicom decodes uncompressed Pixel Data longer than Rows, Columns, Samples
    per Pixel, Number of Frames and Bits Allocated give (it warns and drops the
    rest): BitsAllocated 1 on 8-bit data becomes an image of noise that a model
    would analyse. Shorter data pydicom refuses itself.
    """
    bits_allocated = _number(ds, "BitsAllocated")
    bits_stored = _number(ds, "BitsStored")
    if bits_allocated is None or int(bits_allocated) not in _BITS_ALLOCATED:
        raise _UnusableError(f"BitsAllocated {bits_allocated} is not one of {_BITS_ALLOCATED}")
    if bits_stored is not None and not 1 <= bits_stored <= bits_allocated:
        raise _UnusableError(
            f"BitsStored {bits_stored:g} does not fit BitsAllocated {bits_allocated:g}"
        )
    if transfer_syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception as exc:  # an attribute missing or of the wrong type
        raise _UnusableError(f"the pixel attributes are unusable: {exc}") from exc
    actual = len(ds.PixelData)
    if actual > expected + expected % 2 + 1:
        raise _UnusableError(
            f"Pixel Data holds {actual} bytes but Rows, Columns, SamplesPerPixel, "
            f"NumberOfFrames and BitsAllocated {bits_allocated:g} give {expected}: the "
            "attributes contradict the pixel data"
        )


def _source_label(path: str | os.PathLike[str]) -> str:
    """How an error names a file: relative to the data directory when it is a stored
    instance (``instances/<study>/<series>/<sop>.dcm``, as ``Settings.instances_dir``
    lays them out), else as given."""
    parts = Path(path).parts
    if "instances" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("instances")
        return str(Path(*parts[last:]))
    return os.fspath(path)


# --- greyscale: Modality LUT, VOI, MONOCHROME1 --------------------------------------


def _grey(frame: np.ndarray, ds: Dataset, invert: bool) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI, as floats in 0..1 (1 bright), MONOCHROME1 inverted."""
    values = _modality(frame, ds)
    voi_item = _first_item(ds, "VOILUTSequence")
    if voi_item is not None:
        lut, first_mapped, bits = _lut(voi_item, ds, "VOILUTSequence")
        top = max(2**bits - 1, int(lut.max()))
        unit = _lookup(values, lut, first_mapped) / float(top)
        return (1.0 - unit if invert else unit), "VOILUTSequence"
    window = _window(ds)
    if window is not None:
        center, width, function = window
        unit = _windowed(values, center, width, function)
        return (1.0 - unit if invert else unit), f"WindowCenter/WindowWidth {function}"
    return _min_max(values, invert), "min-max"


def _modality(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT Sequence, else Rescale Slope/Intercept (PS3.3 C.11.1)."""
    item = _first_item(ds, "ModalityLUTSequence")
    if item is not None:
        lut, first_mapped, _bits = _lut(item, ds, "ModalityLUTSequence")
        return _lookup(frame, lut, first_mapped)
    slope = _number(ds, "RescaleSlope")
    intercept = _number(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        return frame
    values = frame.astype(np.float64)
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    """First Window Center/Width and the VOI LUT Function, or None when absent or unusable."""
    center = _number(ds, "WindowCenter")
    width = _number(ds, "WindowWidth")
    if center is None or width is None:
        return None
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    if function not in VOI_LUT_FUNCTIONS:
        function = "LINEAR"
    smallest_width_allowed = 1.0 if function == "LINEAR" else math.nextafter(0.0, 1.0)
    if width < smallest_width_allowed:
        return None
    return center, width, function


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.1 (SIGMOID), C.11.2.1.3.2 (LINEAR_EXACT), 0..1."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
        if width == 0.0:  # width 1: a threshold, x <= c - 0.5 is dark
            return (x > center).astype(np.float64)
    x -= center
    x /= width
    x += 0.5
    return np.clip(x, 0.0, 1.0, out=x)


def _min_max(values: np.ndarray, invert: bool) -> np.ndarray:
    """Stretch min..max to 0..1 (max..min when inverted); a constant image gives zeros."""
    low = float(values.min())
    high = float(values.max())
    if not high > low:
        return np.zeros(values.shape, dtype=np.float64)
    if invert:
        unit = np.subtract(high, values, dtype=np.float64)
    else:
        unit = np.subtract(values, low, dtype=np.float64)
    unit /= high - low
    return unit


def _lut(item: Dataset, ds: Dataset, keyword: str) -> tuple[np.ndarray, int, int]:
    """A LUT item's entries (int64), first mapped input value and bits per entry (PS3.3 C.11)."""
    try:
        entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError) as exc:
        value = item.get("LUTDescriptor")
        raise _UnusableError(f"{keyword} LUTDescriptor {value!r} is not three numbers") from exc
    entries = entries % 65536 or 65536  # 0 means 65536; undo a signed (SS) reading
    if first_mapped >= 32768 and ds.get("PixelRepresentation") == 1:
        first_mapped -= 65536  # a negative first value read as unsigned (US)
    if not 1 <= bits <= 16:
        raise _UnusableError(f"{keyword} LUTDescriptor bits per entry {bits} is not in 1..16")
    raw = item.get("LUTData")
    if isinstance(raw, bytes | bytearray):
        big_endian = _transfer_syntax(ds) == ExplicitVRBigEndian
        if bits <= 8 and len(raw) == entries:
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2", count=len(raw) // 2)
    elif isinstance(raw, MultiValue | list | tuple):
        data = np.asarray([int(v) for v in raw])
    elif isinstance(raw, int):
        data = np.asarray([raw])
    else:
        raise _UnusableError(f"{keyword} LUTData is missing or unreadable: {raw!r}")
    data = data[:entries].astype(np.int64)
    if data.size == 0:
        raise _UnusableError(f"{keyword} LUTData is empty")
    return data, first_mapped, bits


def _lookup(values: np.ndarray, lut: np.ndarray, first_mapped: int) -> np.ndarray:
    """``lut[x - first_mapped]``; inputs before the first or after the last entry clamp."""
    if not np.issubdtype(values.dtype, np.integer):
        values = np.floor(values)
    index = values.astype(np.int64) - first_mapped
    np.clip(index, 0, lut.size - 1, out=index)
    return lut[index]


# --- colour ---------------------------------------------------------------------------


def _luminance(rgb: np.ndarray, bits_stored: int) -> np.ndarray:
    """BT.601 luma of RGB samples, 0..1 over the stored range."""
    luma = rgb.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)
    luma /= float(2**bits_stored - 1)
    return luma


# --- small readers ----------------------------------------------------------------------


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    sequence = ds.get(keyword)
    return sequence[0] if sequence else None


def _number(ds: Dataset, keyword: str) -> float | None:
    """The (first) numeric value of an attribute, or None when absent, empty or not finite."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _spacing(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """(row, column) spacing in mm when the attribute holds two positive numbers."""
    value = ds.get(keyword)
    if not isinstance(value, MultiValue | list | tuple) or len(value) != 2:
        return None
    try:
        row, column = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        return None
    return row, column


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip("\x00 ")


# --- errors ---------------------------------------------------------------------------


class ImageDecodeError(DicomNodeError):
    """No 8-bit image can be made from a dataset: the message names the source, the
    transfer syntax (name and UID) and the reason.

    The constructor's arguments are kept in ``args``, so the error survives pickling
    (worker processes).
    """

    def __init__(
        self, source: str, transfer_syntax: str, reason: str, target: str = "an 8-bit image"
    ) -> None:
        super().__init__(source, transfer_syntax, reason, target)
        self.source = source
        self.TransferSyntaxUID = str(transfer_syntax)
        self.reason = reason
        self.target = target

    def __str__(self) -> str:
        return self.naming(self.source)

    def naming(self, source: str) -> str:
        """The message with the source called ``source`` (e.g. a path relative to the data
        directory instead of the absolute one), the decoder's reason kept whole."""
        uid = self.TransferSyntaxUID
        name = UID(uid).name if uid else ""
        syntax = (
            "transfer syntax unknown"
            if not uid
            else f"transfer syntax {name} ({uid})"
            if name and name != uid
            else f"transfer syntax {uid}"
        )
        return f"cannot make {self.target} of {source} ({syntax}): {self.reason}"
