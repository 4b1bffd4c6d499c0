"""imaging.to_uint8: decoding, Modality LUT, VOI, MONOCHROME1, colour, frames, errors, real files.

Expected images are computed here with numpy straight from the formulas of PS3.3 C.11
(written out independently of dicomnode.imaging), from OpenCV, or from a lossless twin.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_windowing, convert_color_space
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicomnode.errors import DicomNodeError
from dicomnode.imaging import Image8, ImageDecodeError, to_uint8

SHARED_CXR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom_cxr"
MONO2_TWIN = "chest/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONO1_TWIN = "chest/torchxrayvision_Fake_MONOHR1.dcm"


# --- building test images ---------------------------------------------------------------


def _ramp(low: int, high: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Values low..high spread evenly over the image (each value once when they fit)."""
    count = shape[0] * shape[1]
    return np.rint(np.linspace(low, high, count)).astype(np.int64).reshape(shape)


def _picture(high: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth radiograph-like picture in 0..high: a gradient and two dark 'lungs'."""
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    rows /= shape[0]
    columns /= shape[1]
    lungs = np.exp(-(((columns - 0.3) / 0.12) ** 2) - ((rows - 0.5) / 0.3) ** 2)
    lungs += np.exp(-(((columns - 0.7) / 0.12) ** 2) - ((rows - 0.5) / 0.3) ** 2)
    picture = 0.2 + 0.6 * rows - 0.5 * lungs
    picture -= picture.min()
    return np.rint(picture / picture.max() * high).astype(np.int64)


def _image(
    stored: np.ndarray,
    *,
    bits_stored: int,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    frames: int | None = None,
    **attributes: object,
) -> Dataset:
    """A DX dataset holding ``stored`` (two's complement for negative values) as Pixel Data.

    ``stored`` is (Rows, Columns), (frames, Rows, Columns) when ``frames`` is given, and
    has a last axis of 3 samples for a colour ``photometric``.
    """
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    bits_allocated = 8 if bits_stored <= 8 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[-3:-1] if colour else stored.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    raw = stored.astype(np.int64) & ((1 << bits_allocated) - 1)
    ds.PixelData = raw.astype("<u1" if bits_allocated == 8 else "<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's bundled test file {name} is not installed")
    return str(path)


# --- independent references (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1, C.11.2.1.3.2) -------------


def _reference_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, as the standard writes it, with y_min = 0 and y_max = 255."""
    y_min, y_max = 0.0, 255.0
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = ((x - (center - 0.5)) / (width - 1) + 0.5) * (y_max - y_min) + y_min
    y = np.where(
        x <= center - 0.5 - (width - 1) / 2,
        y_min,
        np.where(x > center - 0.5 + (width - 1) / 2, y_max, inside),
    )
    return np.rint(y).astype(np.uint8)


def _reference_linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 with y_min = 0 and y_max = 255."""
    x = np.asarray(x, dtype=np.float64)
    inside = ((x - center) / width + 0.5) * 255.0
    y = np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 255.0, inside))
    return np.rint(y).astype(np.uint8)


def _reference_sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 with y_min = 0 and y_max = 255."""
    x = np.asarray(x, dtype=np.float64)
    return np.rint(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.uint8)


def _reference_min_max(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.rint((x - x.min()) / (x.max() - x.min()) * 255.0).astype(np.uint8)


# --- MONOCHROME1 / MONOCHROME2 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("window2", "window1"),
    [
        pytest.param(None, None, id="min-max"),
        # LINEAR is not symmetric: its window [c - w/2, c + w/2 - 1] mirrors to c' = 4096 - c.
        pytest.param((1800, 1001, "LINEAR"), (4095 + 1 - 1800, 1001, "LINEAR"), id="LINEAR"),
        pytest.param(
            (1800, 1001, "LINEAR_EXACT"), (4095 - 1800, 1001, "LINEAR_EXACT"), id="LINEAR_EXACT"
        ),
    ],
)
def test_monochrome1_and_monochrome2_of_the_same_picture_give_the_same_image(
    window2: tuple[int, int, str] | None, window1: tuple[int, int, str] | None
) -> None:
    picture = _picture(4095)
    attributes2: dict[str, object] = {}
    attributes1: dict[str, object] = {}
    if window2 is not None and window1 is not None:
        keywords = ("WindowCenter", "WindowWidth", "VOILUTFunction")
        attributes2 = dict(zip(keywords, window2, strict=True))
        attributes1 = dict(zip(keywords, window1, strict=True))
    mono2 = to_uint8(_image(picture, bits_stored=12, **attributes2))
    mono1 = to_uint8(
        _image(4095 - picture, bits_stored=12, photometric="MONOCHROME1", **attributes1)
    )
    assert int(np.ptp(mono2.pixels)) > 200
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)
    # Air (the dark 'lungs' of the picture, low values in MONOCHROME2) is dark in both.
    darkest = np.unravel_index(np.argmin(picture), picture.shape)
    assert mono1.pixels[darkest] < 64
    assert mono1.PhotometricInterpretation == "MONOCHROME1"


def test_monochrome1_of_the_same_stored_values_is_the_negative() -> None:
    picture = _picture(1023)
    mono2 = to_uint8(_image(picture, bits_stored=10)).pixels
    mono1 = to_uint8(_image(picture, bits_stored=10, photometric="MONOCHROME1")).pixels
    np.testing.assert_array_equal(mono1, 255 - mono2.astype(np.int64))


# --- VOI: windows -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "signed", "attributes", "modality_values"),
    [
        pytest.param(
            _ramp(0, 4095),
            False,
            {"WindowCenter": 2048, "WindowWidth": 4096},
            lambda x: x,
            id="full-12-bit-window",
        ),
        pytest.param(
            _ramp(0, 4095),
            False,
            {"WindowCenter": 700, "WindowWidth": 301, "VOILUTFunction": "LINEAR"},
            lambda x: x,
            id="narrow-window",
        ),
        pytest.param(
            _ramp(0, 4095),
            False,
            {"WindowCenter": 100.5, "WindowWidth": 1},
            lambda x: x,
            id="width-1-threshold",
        ),
        pytest.param(
            _ramp(0, 4095),
            False,
            {"WindowCenter": [1000, 3000], "WindowWidth": [500, 2000]},
            lambda x: x,
            id="first-of-several-windows",
        ),
        pytest.param(
            _ramp(-2048, 2047),
            True,
            {
                "WindowCenter": 40,
                "WindowWidth": 400,
                "RescaleSlope": 0.5,
                "RescaleIntercept": -100,
            },
            lambda x: x * 0.5 - 100,
            id="signed-rescaled",
        ),
    ],
)
def test_linear_window_matches_the_standard_formula(
    stored: np.ndarray,
    signed: bool,
    attributes: dict[str, object],
    modality_values: Callable[[np.ndarray], np.ndarray],
) -> None:
    image = to_uint8(_image(stored, bits_stored=12, signed=signed, **attributes))
    center = attributes["WindowCenter"]
    width = attributes["WindowWidth"]
    if isinstance(center, list) and isinstance(width, list):
        center, width = center[0], width[0]
    assert isinstance(center, int | float) and isinstance(width, int | float)
    expected = _reference_linear(modality_values(stored), float(center), float(width))
    assert image.voi == "WindowCenter/WindowWidth LINEAR"
    assert image.pixels.dtype == np.uint8
    assert image.pixels.shape == (64, 64)
    assert 0 < int(expected.mean()) < 255  # the window cuts inside the data
    np.testing.assert_array_equal(image.pixels, expected)


@pytest.mark.parametrize(
    ("function", "reference"),
    [("LINEAR_EXACT", _reference_linear_exact), ("SIGMOID", _reference_sigmoid)],
)
def test_linear_exact_and_sigmoid_match_the_standard_and_pydicom(
    function: str, reference: Callable[[np.ndarray, float, float], np.ndarray]
) -> None:
    stored = _ramp(0, 4095)
    ds = _image(stored, bits_stored=12, WindowCenter=1500, WindowWidth=1024)
    ds.VOILUTFunction = function
    image = to_uint8(ds)
    assert image.voi == f"WindowCenter/WindowWidth {function}"
    expected = reference(stored, 1500.0, 1024.0)
    tolerance = 1 if function == "SIGMOID" else 0  # exp() may round either way at a .5
    assert int(np.abs(image.pixels.astype(int) - expected).max()) <= tolerance
    assert np.mean(image.pixels == expected) > 0.99
    # pydicom's own windowing, scaled from its output range 0..4095 to 0..255
    pydicom_windowed = apply_windowing(stored.astype(np.float64), ds) / 4095.0 * 255.0
    assert float(np.abs(image.pixels - pydicom_windowed).max()) <= 1.0


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({"WindowCenter": 500, "WindowWidth": 0}, id="LINEAR-width-0"),
        pytest.param({"WindowCenter": 500, "WindowWidth": 0.5}, id="LINEAR-width-below-1"),
        pytest.param(
            {"WindowCenter": 500, "WindowWidth": 0, "VOILUTFunction": "SIGMOID"}, id="SIGMOID-0"
        ),
        pytest.param({"WindowCenter": 500}, id="no-width"),
    ],
)
def test_unusable_window_falls_back_to_min_max(attributes: dict[str, object]) -> None:
    stored = _picture(1000)
    image = to_uint8(_image(stored, bits_stored=10, **attributes))
    assert image.voi == "min-max"
    np.testing.assert_array_equal(image.pixels, _reference_min_max(stored))


def test_unknown_voi_lut_function_is_read_as_linear() -> None:
    stored = _ramp(0, 4095)
    ds = _image(stored, bits_stored=12, WindowCenter=700, WindowWidth=301)
    ds.VOILUTFunction = "CUBIC"
    image = to_uint8(ds)
    assert image.voi == "WindowCenter/WindowWidth LINEAR"
    np.testing.assert_array_equal(image.pixels, _reference_linear(stored, 700, 301))


def test_no_voi_stretches_min_to_max_and_a_constant_image_is_black() -> None:
    stored = _picture(3000) + 500
    image = to_uint8(_image(stored, bits_stored=12))
    assert image.voi == "min-max"
    np.testing.assert_array_equal(image.pixels, _reference_min_max(stored))
    assert (image.pixels.min(), image.pixels.max()) == (0, 255)
    flat = to_uint8(_image(np.full((8, 8), 77), bits_stored=8))
    assert not flat.pixels.any()


# --- VOI LUT Sequence and Modality LUT Sequence ---------------------------------------------


def _voi_lut_item(lut: np.ndarray, first_mapped: int, bits: int, as_bytes: bool) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [lut.size, first_mapped, bits]
    if as_bytes:
        item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(v) for v in lut])
    return item


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "lut_vr",
    [pytest.param("US", id="LUTData-US"), pytest.param("OW", id="LUTData-OW-via-no-meta-file")],
)
def test_voi_lut_sequence_is_looked_up_and_wins_over_the_window(
    tmp_path: Path, photometric: str, lut_vr: str
) -> None:
    stored = _ramp(0, 4095)
    entries, first_mapped = 2048, 1000
    # Non-linear and short of the 12-bit top, so the scale must come from the descriptor.
    lut = np.rint(3500 * np.sqrt(np.arange(entries) / (entries - 1))).astype(np.int64)
    ds = _image(stored, bits_stored=12, photometric=photometric, WindowCenter=10, WindowWidth=2)
    ds.VOILUTSequence = [_voi_lut_item(lut, first_mapped, 12, as_bytes=lut_vr == "OW")]
    source: Dataset | Path = ds
    if lut_vr == "OW":  # through an implicit VR file without meta: pydicom reads LUTData as bytes
        del ds.file_meta
        source = tmp_path / "voi_lut.raw"
        pydicom.dcmwrite(
            source, ds, implicit_vr=True, little_endian=True, enforce_file_format=False
        )
    image = to_uint8(source)
    # Independent lookup (PS3.3 C.11.2.1.1): below the first mapped value -> first entry,
    # beyond the last -> last entry, output range 0 .. 2**12 - 1.
    index = np.minimum(np.maximum(stored - first_mapped, 0), entries - 1)
    expected = np.rint(lut[index] / 4095.0 * 255.0).astype(np.int64)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    assert image.voi == "VOILUTSequence"
    np.testing.assert_array_equal(image.pixels, expected)
    assert len(np.unique(image.pixels)) > 200
    assert image.pixels.max() < 255 if photometric == "MONOCHROME2" else image.pixels.min() > 0


def test_voi_lut_after_a_fractional_rescale_looks_up_the_floor() -> None:
    stored = _ramp(-99, 100, shape=(10, 20))
    values = stored * 0.5 + 0.25  # -49.25 .. 50.25: the entry is the one at or below
    lut = np.arange(101, dtype=np.int64) * 2 + 40
    ds = _image(stored, bits_stored=16, signed=True, RescaleSlope=0.5, RescaleIntercept=0.25)
    ds.VOILUTSequence = [_voi_lut_item(lut, -50, 8, as_bytes=False)]
    image = to_uint8(ds)
    index = np.clip(np.floor(values).astype(int) + 50, 0, 100)
    np.testing.assert_array_equal(image.pixels, np.rint(lut[index] / 255.0 * 255.0))


def test_modality_lut_sequence_then_window() -> None:
    stored = _ramp(0, 1023, shape=(32, 32))
    entries, first_mapped = 1000, 24
    lut = (np.arange(entries, dtype=np.int64) ** 2) // 16  # non-linear, 16-bit output
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ds = _image(stored, bits_stored=10, WindowCenter=30000, WindowWidth=40000)
    ds.ModalityLUTSequence = [item]
    image = to_uint8(ds)
    index = np.minimum(np.maximum(stored - first_mapped, 0), entries - 1)
    expected = _reference_linear(lut[index], 30000, 40000)
    assert len(np.unique(expected)) > 100
    np.testing.assert_array_equal(image.pixels, expected)


def test_modality_lut_sequence_without_voi_stretches_the_lut_output() -> None:
    stored = _ramp(0, 255, shape=(16, 16))
    lut = np.asarray([4000 - 10 * i for i in range(200)], dtype=np.int64)  # decreasing
    item = Dataset()
    item.LUTDescriptor = [200, 0, 16]
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ds = _image(stored, bits_stored=8)
    ds.ModalityLUTSequence = [item]
    image = to_uint8(ds)
    expected = _reference_min_max(lut[np.minimum(stored, 199)])
    assert image.pixels[0, 0] == 255 and image.pixels[-1, -1] == 0
    np.testing.assert_array_equal(image.pixels, expected)


def test_negative_first_mapped_value_read_as_unsigned_is_taken_as_signed() -> None:
    stored = _ramp(-512, 511, shape=(32, 32))
    lut = 5000 - 3 * np.arange(1024, dtype=np.int64)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [1024, 65536 - 512, 16])  # -512 as US
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ds = _image(stored, bits_stored=16, signed=True)
    ds.ModalityLUTSequence = [item]
    image = to_uint8(ds)
    np.testing.assert_array_equal(image.pixels, _reference_min_max(lut[stored + 512]))


# --- Rescale Slope/Intercept and bit depths -------------------------------------------------


def test_rescale_slope_intercept_with_signed_16_bit_data() -> None:
    rng = np.random.default_rng(7)
    stored = rng.integers(-2000, 3001, size=(40, 50))
    stored[0, 0], stored[-1, -1] = -32768, 32767
    windowed = to_uint8(
        _image(
            stored,
            bits_stored=16,
            signed=True,
            RescaleSlope=0.5,
            RescaleIntercept=-100,
            WindowCenter=40,
            WindowWidth=400,
        )
    )
    values = stored * 0.5 - 100  # Hounsfield-like
    np.testing.assert_array_equal(windowed.pixels, _reference_linear(values, 40, 400))
    stretched = to_uint8(
        _image(stored, bits_stored=16, signed=True, RescaleSlope=0.5, RescaleIntercept=-100)
    )
    np.testing.assert_array_equal(stretched.pixels, _reference_min_max(values))
    # A negative slope flips the picture before min-max.
    flipped = to_uint8(
        _image(stored, bits_stored=16, signed=True, RescaleSlope=-2, RescaleIntercept=0)
    )
    np.testing.assert_array_equal(flipped.pixels, _reference_min_max(-2.0 * stored))


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits_stored", [8, 10, 12, 16])
def test_bits_stored_8_to_16_with_junk_in_the_unused_high_bits(
    bits_stored: int, signed: bool
) -> None:
    if signed:
        values = _ramp(-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
    else:
        values = _ramp(0, 2**bits_stored - 1)
    bits_allocated = 8 if bits_stored <= 8 else 16
    raw = values & ((1 << bits_stored) - 1)  # two's complement in BitsStored bits
    if bits_stored < bits_allocated:  # junk above the high bit (overlays in old files)
        raw |= 0b1010 << bits_stored & ((1 << bits_allocated) - 1)
    image = to_uint8(_image(raw, bits_stored=bits_stored, signed=signed))
    assert image.pixels.dtype == np.uint8
    assert (image.Rows, image.Columns) == (64, 64)
    assert image.pixels[0, 0] == 0 and image.pixels[-1, -1] == 255
    assert np.all(np.diff(image.pixels.ravel().astype(int)) >= 0)  # monotonic: sign handled
    np.testing.assert_array_equal(image.pixels, _reference_min_max(values))


# --- files without meta, transfer syntaxes ---------------------------------------------------


def test_file_without_meta_header_is_read_as_implicit_vr_little_endian(tmp_path: Path) -> None:
    picture = _picture(1023)
    ds = _image(picture, bits_stored=10, WindowCenter=600, WindowWidth=800)
    expected = to_uint8(ds).pixels
    del ds.file_meta
    path = tmp_path / "raw_dataset"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM" and head[:2] == b"\x08\x00"  # no preamble, no meta
    image = to_uint8(path)
    assert image.TransferSyntaxUID == ImplicitVRLittleEndian
    np.testing.assert_array_equal(image.pixels, expected)


def test_dataset_without_file_meta_is_decoded_and_not_modified() -> None:
    ds = _image(_picture(255), bits_stored=8)
    expected = to_uint8(ds).pixels
    del ds.file_meta
    image = to_uint8(ds)
    np.testing.assert_array_equal(image.pixels, expected)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset())


def test_big_endian_file_without_meta_header_uses_the_detected_encoding(tmp_path: Path) -> None:
    reference = to_uint8(_bundled("MR_small.dcm"))
    ds = pydicom.dcmread(_bundled("MR_small_bigendian.dcm"))
    del ds.file_meta
    ds.preamble = None
    path = tmp_path / "big_endian_raw"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=False)
    image = to_uint8(path)
    assert image.TransferSyntaxUID == ExplicitVRBigEndian
    np.testing.assert_array_equal(image.pixels, reference.pixels)


#: pydicom's bundled files: MR_small in every lossless encoding (must equal the explicit VR
#: little endian original), then other transfer syntaxes (must decode to a non-flat image).
LOSSLESS_MR_SMALL = [
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
]
OTHER_BUNDLED = [
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),  # deflate
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "1.2.840.10008.1.2.4.50"),
    ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5"),
]


@pytest.mark.parametrize(("name", "transfer_syntax"), LOSSLESS_MR_SMALL)
def test_bundled_lossless_encodings_give_the_same_image(name: str, transfer_syntax: str) -> None:
    reference = to_uint8(_bundled("MR_small.dcm"))
    assert reference.voi == "WindowCenter/WindowWidth LINEAR"
    image = to_uint8(_bundled(name))
    assert image.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(image.pixels, reference.pixels)


@pytest.mark.parametrize(("name", "transfer_syntax"), OTHER_BUNDLED)
def test_bundled_transfer_syntaxes_decode(name: str, transfer_syntax: str) -> None:
    path = _bundled(name)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    image = to_uint8(path)
    assert image.TransferSyntaxUID == transfer_syntax
    assert image.pixels.dtype == np.uint8
    assert image.pixels.shape == (header.Rows, header.Columns)
    assert len(np.unique(image.pixels)) >= 5  # not flat (JPEG-LS samples are 7-level bars)


def test_htj2k_transfer_syntax_is_decoded() -> None:
    # No HTJ2K file is bundled and no HTJ2K encoder is installed. A JPEG 2000 Part 1
    # codestream labelled HTJ2K Lossless checks that the syntax reaches a decoder that
    # reads it (OpenJPEG decodes Part 1 and Part 15 alike); not the HT block coder itself.
    ds = pydicom.dcmread(_bundled("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    image = to_uint8(ds)
    assert image.TransferSyntaxUID == HTJ2KLossless
    np.testing.assert_array_equal(image.pixels, to_uint8(_bundled("MR_small.dcm")).pixels)


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_pydicom_encoded_lossless_12_bit_gives_the_uncompressed_image(
    transfer_syntax: UID,
) -> None:
    ds = _image(_picture(4095), bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    expected = to_uint8(ds).pixels
    try:
        ds.compress(transfer_syntax)
    except RuntimeError as exc:  # no encoding plugin installed
        pytest.skip(f"cannot encode {transfer_syntax.name}: {exc}")
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(to_uint8(ds).pixels, expected)


@pytest.mark.parametrize(
    ("option", "transfer_syntax", "bits_stored", "tolerance"),
    [
        ("+e1", JPEGLosslessSV1, 12, 0),
        ("+el", JPEGLossless, 12, 0),
        ("+eb", JPEGBaseline8Bit, 8, 3),
        ("+ee", JPEGExtended12Bit, 12, 3),
    ],
)
def test_dcmtk_jpeg_encodings_decode(
    tmp_path: Path, option: str, transfer_syntax: str, bits_stored: int, tolerance: int
) -> None:
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed (apt-get install dcmtk)")
    ds = _image(_picture(2**bits_stored - 1), bits_stored=bits_stored)
    expected = to_uint8(ds).pixels.astype(int)
    source = _save(ds, tmp_path / "in.dcm")
    target = tmp_path / "out.dcm"
    subprocess.run([dcmcjpeg, option, str(source), str(target)], check=True, capture_output=True)
    image = to_uint8(target)
    assert image.TransferSyntaxUID == transfer_syntax
    difference = np.abs(image.pixels.astype(int) - expected)
    assert int(difference.max()) <= tolerance
    assert float(difference.mean()) <= tolerance / 3


# --- colour and frames -------------------------------------------------------------------------


def test_rgb_is_converted_to_bt601_luminance_like_opencv() -> None:
    path = _bundled("SC_rgb_rle.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    image = to_uint8(path)
    assert image.voi == "luminance"
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    assert int(np.abs(image.pixels.astype(int) - expected).max()) <= 1
    assert len(np.unique(image.pixels)) > 4


def test_16_bit_rgb_uses_the_stored_range() -> None:
    path = _bundled("SC_rgb_rle_16bit.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64) / 257.0
    assert float(np.abs(to_uint8(path).pixels - expected).max()) <= 1.0


def test_ybr_full_is_converted_to_rgb_then_luminance() -> None:
    rng = np.random.default_rng(3)
    rgb = np.stack([_picture(255), _picture(255)[::-1], rng.integers(0, 256, (64, 64))], axis=-1)
    rgb = rgb.astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = to_uint8(_image(ybr, bits_stored=8, photometric="YBR_FULL"))
    assert image.PhotometricInterpretation == "YBR_FULL"
    luma = rgb.astype(np.float64) @ np.asarray([0.299, 0.587, 0.114])
    assert float(np.abs(image.pixels - luma).max()) <= 2.0
    assert int(np.abs(image.pixels.astype(int) - ybr[..., 0]).max()) <= 2  # Y is the luma


def test_jpeg_ybr_and_rle_rgb_of_the_same_picture_agree() -> None:
    rgb = to_uint8(_bundled("SC_rgb_rle.dcm")).pixels.astype(int)
    jpeg = to_uint8(_bundled("SC_rgb_jpeg_dcmtk.dcm")).pixels.astype(int)
    assert int(np.abs(jpeg - rgb).max()) <= 4


def test_multi_frame_uses_the_first_frame() -> None:
    frames = np.stack([_picture(4095), 4095 - _picture(4095), np.full((64, 64), 9)])
    image = to_uint8(_image(frames, bits_stored=12, frames=3))
    assert image.NumberOfFrames == 3
    np.testing.assert_array_equal(image.pixels, to_uint8(_image(frames[0], bits_stored=12)).pixels)
    colour = to_uint8(_bundled("SC_rgb_rle_2frame.dcm"))
    assert colour.NumberOfFrames == 2 and colour.pixels.shape == (100, 100)
    rgb_frames = pydicom.dcmread(_bundled("SC_rgb_rle_2frame.dcm")).pixel_array
    first = cv2.cvtColor(rgb_frames[0], cv2.COLOR_RGB2GRAY)
    second = cv2.cvtColor(rgb_frames[1], cv2.COLOR_RGB2GRAY)
    assert int(np.abs(first.astype(int) - second).max()) > 10  # the frames differ
    assert int(np.abs(colour.pixels.astype(int) - first).max()) <= 1


# --- geometry -------------------------------------------------------------------------------------


def test_geometry_is_kept_with_dicom_keywords() -> None:
    ds = _image(_picture(255, shape=(30, 20)), bits_stored=8)
    ds.PixelSpacing = [0.139, 0.14]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    image = to_uint8(ds)
    assert isinstance(image, Image8)
    assert (image.Rows, image.Columns) == (30, 20) == image.pixels.shape
    assert image.PixelSpacing == (0.139, 0.14)
    assert image.ImagerPixelSpacing == (0.15, 0.15)
    assert image.TransferSyntaxUID == ExplicitVRLittleEndian
    assert image.NumberOfFrames == 1
    ds.PixelSpacing = [0.139]  # malformed: one value
    del ds.ImagerPixelSpacing
    image = to_uint8(ds)
    assert image.PixelSpacing is None and image.ImagerPixelSpacing is None


# --- errors ------------------------------------------------------------------------------------


def test_undecodable_jpeg_raises_a_clear_error(tmp_path: Path) -> None:
    ds = _image(_picture(255), bits_stored=8, transfer_syntax=JPEGBaseline8Bit)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 this is not a JPEG stream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = _save(ds, tmp_path / "broken.dcm")
    with pytest.raises(ImageDecodeError) as info:
        to_uint8(path)
    message = str(info.value)
    assert isinstance(info.value, DicomNodeError)
    assert "JPEG Baseline (Process 1)" in message and JPEGBaseline8Bit in message
    assert str(path) in message
    assert info.value.TransferSyntaxUID == JPEGBaseline8Bit
    assert info.value.reason and info.value.reason in message


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda: _image(_picture(255), bits_stored=8, PixelData=b"\x00" * 100),
            "less than expected",
            id="truncated",
        ),
        pytest.param(
            lambda: _image(_picture(255), bits_stored=8, transfer_syntax="1.2.840.10008.1.2.4.53"),
            "no pixel data decoder",
            id="unsupported-transfer-syntax",
        ),
        pytest.param(
            lambda: pydicom.dcmread(_bundled("examples_palette.dcm")),
            "'PALETTE COLOR'",
            id="palette-colour",
        ),
        pytest.param(
            lambda: pydicom.dcmread(_bundled("rtplan.dcm")), "no Pixel Data", id="no-pixel-data"
        ),
    ],
)
def test_images_that_cannot_be_made_raise_image_decode_error(
    make: Callable[[], Dataset], expected: str
) -> None:
    ds = make()
    with pytest.raises(ImageDecodeError, match="transfer syntax") as info:
        to_uint8(ds)
    assert expected in str(info.value)


def test_malformed_lut_raises_image_decode_error() -> None:
    ds = _image(_ramp(0, 255, shape=(16, 16)), bits_stored=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0]
    item.add_new("LUTData", "US", list(range(256)))
    ds.VOILUTSequence = [item]
    with pytest.raises(ImageDecodeError, match="LUTDescriptor"):
        to_uint8(ds)


def test_not_dicom_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n" * 20)
    with pytest.raises(ImageDecodeError) as info:
        to_uint8(text)
    assert str(text) in str(info.value)
    with pytest.raises(FileNotFoundError):
        to_uint8(tmp_path / "absent.dcm")


def test_pixel_attributes_that_contradict_the_pixel_data_are_refused(tmp_path: Path) -> None:
    """BitsAllocated 1 on 8-bit data: pydicom would decode an eighth of the bytes as a
    bitmap of noise; the node refuses it (the pipelines skip it as undecodable)."""
    ds = _image(_picture(255), bits_stored=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    with pytest.raises(ImageDecodeError, match="contradict the pixel data") as info:
        to_uint8(ds)
    assert "BitsAllocated 1" in info.value.reason
    bad_bits = _image(_picture(255), bits_stored=8)
    bad_bits.BitsStored = 12  # more than the 8 allocated
    with pytest.raises(ImageDecodeError, match="BitsStored 12"):
        to_uint8(bad_bits)
    assert to_uint8(_image(_picture(255), bits_stored=8)).pixels.shape == (64, 64)


def test_the_reason_keeps_the_decoders_words_and_a_path_under_the_data_directory(
    tmp_path: Path,
) -> None:
    """A stored instance is named relative to the data directory, and the decoder's
    reason is kept whole (it was cut at 300 characters, mostly the absolute path)."""
    stored = tmp_path / ("d" * 200) / "data" / "instances" / "1.2.3" / "1.2.4" / "1.2.5.dcm"
    stored.parent.mkdir(parents=True)
    ds = _image(_picture(255), bits_stored=8, PixelData=b"\x00" * 100)
    _save(ds, stored)
    with pytest.raises(ImageDecodeError) as info:
        to_uint8(stored)
    message = str(info.value)
    assert message.startswith("cannot make an 8-bit image of instances/1.2.3/1.2.4/1.2.5.dcm (")
    assert message.endswith(info.value.reason)
    assert "less than expected" in message
    assert info.value.source == "instances/1.2.3/1.2.4/1.2.5.dcm"
    assert str(tmp_path) not in message


def test_image_decode_error_survives_pickling() -> None:
    error = ImageDecodeError("a.dcm", JPEGBaseline8Bit, "broken stream")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert "JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)" in str(copy)
    assert copy.reason == "broken stream"


# --- the project's real radiographs (../shared/data/dicom_cxr) --------------------------------


def _shared_files() -> list[object]:
    if not SHARED_CXR.is_dir():
        return [pytest.param(None, id="shared-data-absent")]
    files = sorted(
        path
        for path in SHARED_CXR.rglob("*")
        if path.is_file() and path.suffix.lower() not in {".csv", ".md", ".txt"}
    )
    return [pytest.param(path, id=path.relative_to(SHARED_CXR).as_posix()) for path in files]


def _need_shared() -> None:
    if not SHARED_CXR.is_dir():
        pytest.skip(f"shared CXR DICOM files are absent: {SHARED_CXR}")


@pytest.mark.parametrize("path", _shared_files())
def test_every_shared_radiograph_decodes(path: Path | None) -> None:
    _need_shared()
    assert path is not None
    header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    image = to_uint8(path)
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 2
    assert image.pixels.shape == (int(header.Rows), int(header.Columns))
    assert (image.Rows, image.Columns) == image.pixels.shape
    assert len(np.unique(image.pixels)) > 32, "a real radiograph has many grey levels"


def test_shared_file_without_meta_header() -> None:
    _need_shared()
    path = SHARED_CXR / "chest" / "fo-dicom_CR-MONO1-10-chest"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    assert path.read_bytes()[128:132] != b"DICM"
    image = to_uint8(path)
    assert image.TransferSyntaxUID == ImplicitVRLittleEndian
    assert image.PhotometricInterpretation == "MONOCHROME1"
    assert image.voi == "WindowCenter/WindowWidth LINEAR"
    assert image.pixels.shape == (440, 440)


def test_shared_monochrome1_twin_is_the_negative_of_its_monochrome2_original() -> None:
    # PROVENANCE.md: torchxrayvision's Fake_MONOHR1.dcm is the SIIM file with only
    # PhotometricInterpretation changed to MONOCHROME1 (same JPEG bytes, not inverted
    # pixels). So a correct decoder shows it as the negative of the MONOCHROME2 file.
    _need_shared()
    mono2_path, mono1_path = SHARED_CXR / MONO2_TWIN, SHARED_CXR / MONO1_TWIN
    if not (mono2_path.is_file() and mono1_path.is_file()):
        pytest.skip("the MONOCHROME1/MONOCHROME2 twin files are absent")
    mono2_ds, mono1_ds = pydicom.dcmread(mono2_path), pydicom.dcmread(mono1_path)
    assert (mono2_ds.PhotometricInterpretation, mono1_ds.PhotometricInterpretation) == (
        "MONOCHROME2",
        "MONOCHROME1",
    )
    assert mono2_ds.PixelData == mono1_ds.PixelData
    mono2, mono1 = to_uint8(mono2_path), to_uint8(mono1_path)
    assert mono2.voi == mono1.voi == "min-max"
    np.testing.assert_array_equal(mono1.pixels, 255 - mono2.pixels.astype(np.int64))
    assert mono2.PixelSpacing == (0.168, 0.168)


def test_shared_jpeg2000_lossy_and_lossless_copies_agree() -> None:
    _need_shared()
    folder = SHARED_CXR / "non_chest_radiographs"
    lossy, lossless = folder / "pydicom-data_RG3_J2KI.dcm", folder / "pydicom-data_RG3_J2KR.dcm"
    if not (lossy.is_file() and lossless.is_file()):
        pytest.skip("the RG3 JPEG 2000 pair is absent")
    difference = np.abs(to_uint8(lossy).pixels.astype(int) - to_uint8(lossless).pixels)
    assert int(difference.max()) <= 4 and float(difference.mean()) < 0.5
