"""CT building blocks on real files: series assembly, HU, the classical lung mask,
series selection, slice preparation, aggregation, the manifest window, the [ct] config."""

from __future__ import annotations

import csv
import textwrap
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import dicom_files, shared_data

from dicomnode.config import CTSelectionSettings, load_settings
from dicomnode.errors import ConfigError
from dicomnode.imaging import to_hu
from dicomnode.inference.ct import (
    LUNG_WINDOW,
    aggregate,
    lung_crop_uint8,
    lung_mask_hu,
    prepare_slice,
    window_uint8,
)
from dicomnode.inference.geometry import lung_box
from dicomnode.inference.registry import DEFAULT_CT_WINDOW, ModelError, read_manifest
from dicomnode.pipelines.types import InstanceInput
from dicomnode.routing import (
    LOCALIZER,
    NOT_AXIAL,
    NOT_CHEST,
    NOT_CT,
    NOT_PREFERRED,
    REFORMAT,
    TOO_FEW_SLICES,
    select_ct_series,
)
from dicomnode.volume import SliceHeader, assemble, read_slice_header

J2K = ("dicom_ct", "totalsegmentator_example_ct_series_j2k")
SINGLES = ("dicom_ct", "tcia_covid19_ny_sbu_single_slices")


def _j2k_headers() -> list[SliceHeader]:
    return [read_slice_header(p) for p in dicom_files(shared_data(*J2K))]


def _slices_csv() -> list[dict[str, str]]:
    with (shared_data(*SINGLES) / "slices.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- assembly


def test_jpeg2000_series_is_ordered_along_the_normal_with_its_spacing_and_hu() -> None:
    headers = _j2k_headers()
    assert len(headers) == 20
    shuffled = headers[7:] + headers[:7]
    series = assemble(shuffled)
    positions = [s.position for s in series.slices]
    # z = -804.5 ... -766.5 in 2 mm steps (3 mm slices overlapping), ascending along +z.
    assert positions == pytest.approx([-804.5 + 2 * k for k in range(20)])
    assert series.spacing_mm == pytest.approx(2.0)
    assert series.slice_thickness_mm == pytest.approx(3.0)
    assert series.complete and not series.duplicates and series.geometry == "position"
    assert series.normal == pytest.approx((0.0, 0.0, 1.0))
    low, high = np.inf, -np.inf
    for s in series.slices:  # one slice at a time, as the pipeline reads them
        hu = to_hu(s.header.path)
        assert hu.dtype == np.float32 and hu.shape == (512, 512)
        low, high = min(low, float(hu.min())), max(high, float(hu.max()))
    # Stored 0..2863 with Rescale Intercept -1024: air at -1024 HU, bone up to ~1800 HU.
    assert low == -1024.0
    assert 1000 < high < 2000


def test_every_single_slice_is_a_one_slice_series() -> None:
    files = [
        p
        for folder in (SINGLES, ("dicom_ct", "dcmqi_ct_3slice"), ("dicom_ct", "misc_small"))
        for p in dicom_files(shared_data(*folder))
    ]
    assert len(files) >= 22
    for path in files:
        header = read_slice_header(path)
        series = assemble([header])
        assert len(series.slices) == 1 and series.spacing_mm is None and series.complete
        hu = to_hu(path)
        assert hu.shape == (header.Rows, header.Columns)
        # Air (or padding outside the field of view) below -800 HU, up to bone or metal
        # (ECG leads reach 5,622 HU on one slice); the body's soft tissue near 0 HU.
        assert -3100 <= float(hu.min()) <= -800 and 0 < float(hu.max()) <= 8000, path.name
        assert ((hu > -200) & (hu < 200)).mean() > 0.05, path.name


def test_duplicates_are_dropped_and_gaps_found() -> None:
    headers = sorted(_j2k_headers(), key=lambda h: h.ImagePositionPatient[2])  # type: ignore[index]
    duplicate = replace(headers[3], SOPInstanceUID="1.2.3.dup")
    gapped = headers[:10] + headers[13:] + [duplicate]  # 3 slices missing after the 10th
    series = assemble(gapped)
    assert series.duplicates == ("1.2.3.dup",)
    assert len(series.slices) == 17
    [gap] = series.gaps
    assert gap.after_sop_instance_uid == headers[9].SOPInstanceUID
    assert gap.distance_mm == pytest.approx(8.0)
    assert not series.complete


# --------------------------------------------------------------------------- lung mask


def test_lung_mask_finds_lung_on_chest_slices_and_nearly_none_on_abdominal_ones() -> None:
    rows = _slices_csv()
    chest = [r for r in rows if r["region_by_visual_check"].startswith("chest")]
    abdomen = [r for r in rows if r["region_by_visual_check"].startswith("abdomen")]
    assert len(chest) >= 10 and len(abdomen) == 4
    folder = shared_data(*SINGLES)
    for r in chest:
        header = read_slice_header(folder / r["file"])
        lung = lung_mask_hu(to_hu(header.path), header.PixelSpacing)
        # Diseased lungs (ground glass, consolidation) keep less aerated lung.
        assert lung.fraction >= 0.03, r
        assert lung.box is not None and lung.box.within(header.Columns, header.Rows)
        # Both lungs: the box spans more than a third of the image width.
        assert lung.box.width > header.Columns / 3, r
    for r in abdomen:
        header = read_slice_header(folder / r["file"])
        lung = lung_mask_hu(to_hu(header.path), header.PixelSpacing)
        assert lung.fraction <= 0.005, r  # bowel and stomach gas are not lung
    for path in dicom_files(shared_data(*J2K)):  # upper abdomen below the lungs
        header = read_slice_header(path)
        assert lung_mask_hu(to_hu(path), header.PixelSpacing).fraction < 0.02


def test_lung_mask_on_a_synthetic_phantom() -> None:
    hu = np.full((256, 256), -1000, np.float32)  # outside air
    cv2.ellipse(hu, (128, 128), (110, 80), 0, 0, 360, 40, -1)  # body: soft tissue
    cv2.ellipse(hu, (80, 128), (30, 50), 0, 0, 360, -850, -1)  # right lung
    cv2.ellipse(hu, (176, 128), (30, 50), 0, 0, 360, -850, -1)  # left lung
    cv2.circle(hu, (128, 100), 8, -1000, -1)  # trachea: gas, not lung
    hu[230:240, 10:246] = 300  # the table, apart from the body
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    lung = lung_mask_hu(hu, (1.0, 1.0))
    assert lung.mask[128, 80] and lung.mask[128, 176]
    assert not lung.mask[100, 128] and not lung.mask[5, 5] and not lung.mask[235, 128]
    expected = 2 * np.pi * 30 * 50 / (np.pi * 110 * 80)
    assert lung.fraction == pytest.approx(expected, rel=0.1)


# --------------------------------------------------------------------------- preparation


def test_prepare_slice_follows_the_contract() -> None:
    hu = np.linspace(-1500, 500, 300 * 200, dtype=np.float32).reshape(300, 200)
    mask = np.zeros(hu.shape, bool)
    mask[100:200, 50:150] = True
    x = prepare_slice(hu, mask, (64, 32), channels=3, scale=1 / 255)
    assert x.shape == (64, 32, 3) and x.dtype == np.float32
    assert np.array_equal(x[..., 0], x[..., 2])
    box = lung_box(mask)
    assert box is not None and (box.x, box.y, box.width, box.height) == (45, 95, 110, 110)
    window8 = window_uint8(hu, *LUNG_WINDOW)
    expected = cv2.resize(window8[95:205, 45:155], (32, 64), interpolation=cv2.INTER_AREA)
    assert np.allclose(x[..., 0], expected / 255.0)
    assert np.array_equal(lung_crop_uint8(hu, box, (64, 32)), expected)
    assert window8.min() == 0 and window8.max() == 255  # -1350 .. 150 HU clipped
    # No lung: the whole slice.
    whole = prepare_slice(hu, None, (16, 16), channels=1)
    assert whole.shape == (16, 16, 1)


def test_aggregations() -> None:
    p = [0.1, 0.9, 0.4, 0.8, 0.2]
    assert aggregate(p, "max") == pytest.approx(0.9)
    assert aggregate(p, "top_k_mean", top_k=2) == pytest.approx(0.85)
    assert aggregate(p, "top_k_mean", top_k=50) == pytest.approx(0.48)
    assert aggregate(p, "percentile", percentile=50) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="'median'"):
        aggregate(p, "median")
    with pytest.raises(ValueError, match="no slice"):
        aggregate([], "max")


# --------------------------------------------------------------------------- selection


def _instance(uid: str, series: str, modality: str = "CT") -> InstanceInput:
    return InstanceInput(
        path=Path(uid),
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series,
        modality=modality,
        body_part_examined=None,
        view_position=None,
        image_type=None,
        rows=512,
        columns=512,
    )


def _series(uid: str, n: int, thickness: float, **changes: object) -> list[SliceHeader]:
    """``n`` axial headers of a series, ``thickness`` apart, with ``changes`` applied."""
    return [
        SliceHeader(
            **{  # type: ignore[arg-type]
                "path": Path(f"{uid}.{k}"),
                "SOPInstanceUID": f"{uid}.{k}",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                "SeriesInstanceUID": uid,
                "Modality": "CT",
                "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
                "SeriesDescription": "",
                "BodyPartExamined": "",
                "Rows": 512,
                "Columns": 512,
                "InstanceNumber": k + 1,
                "ImagePositionPatient": (0.0, 0.0, -thickness * k),
                "ImageOrientationPatient": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                "PixelSpacing": (0.7, 0.7),
                "SliceThickness": thickness,
                "NumberOfFrames": 1,
                **changes,
            }
        )
        for k in range(n)
    ]


def test_series_selection_records_every_choice_and_skip() -> None:
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    headers = {
        "thick": _series("thick", 60, 5.0),
        "thin": _series("thin", 240, 1.25),
        "thin-gapped": [
            h for k, h in enumerate(_series("thin-gapped", 300, 1.0)) if not 100 <= k < 110
        ],
        "scout": _series("scout", 1, 1.0, ImageType=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        "mpr": _series("mpr", 80, 3.0, ImageType=("DERIVED", "SECONDARY", "REFORMATTED")),
        "tilted": _series("tilted", 80, 3.0, ImageOrientationPatient=coronal),
        "abdomen": _series("abdomen", 80, 1.0, SeriesDescription="ABD/PEL 2.5 MM"),
        "head": _series("head", 80, 1.0, BodyPartExamined="HEAD"),
        "few": _series("few", 3, 0.5, SeriesDescription="CHEST 0.5"),
    }
    instances = [_instance(h.SOPInstanceUID, uid) for uid, hs in headers.items() for h in hs]
    instances.append(_instance("dose", "dose-series", modality="SR"))
    by_uid = {h.SOPInstanceUID: h for hs in headers.values() for h in hs}
    selection = select_ct_series(
        instances, lambda i: by_uid[i.sop_instance_uid], CTSelectionSettings()
    )
    assert selection.series is not None and selection.series.series_instance_uid == "thin"
    assert selection.why == "complete, 1.25 mm slices, 240 slices"
    codes = {s.series_instance_uid: s.code for s in selection.skipped}
    assert codes == {
        "thick": NOT_PREFERRED,
        "thin-gapped": NOT_PREFERRED,
        "scout": LOCALIZER,
        "mpr": REFORMAT,
        "tilted": NOT_AXIAL,
        "abdomen": NOT_CHEST,
        "head": NOT_CHEST,
        "few": TOO_FEW_SLICES,
        "dose-series": NOT_CT,
    }
    assert selection.reason is None
    summary = selection.summary()
    assert summary["chosen"]["slices"] == 240  # type: ignore[index]
    assert len(summary["skipped_series"]) == 9  # type: ignore[arg-type]
    # Without the good series, nothing is chosen and the reason counts the codes.
    rest = [i for i in instances if i.series_instance_uid not in ("thin", "thick", "thin-gapped")]
    nothing = select_ct_series(rest, lambda i: by_uid[i.sop_instance_uid], CTSelectionSettings())
    assert nothing.series is None
    assert nothing.reason is not None and nothing.reason.startswith("no axial chest CT series: ")
    assert "2 not-chest" in nothing.reason and "1 localizer" in nothing.reason


def test_the_real_coronal_reformat_and_single_slices_are_routed() -> None:
    folder = shared_data(*SINGLES)
    rules = CTSelectionSettings(min_slices=1)
    for r in _slices_csv():
        header = read_slice_header(folder / r["file"])
        instance = _instance(header.SOPInstanceUID, header.SeriesInstanceUID)
        selection = select_ct_series([instance], lambda _i, h=header: h, rules)
        if r["orientation"] == "coronal" or "REFORMATTED" in header.ImageType:
            assert selection.series is None
            assert selection.skipped[0].code == REFORMAT
        elif r["series_description"].startswith("ABD") or header.BodyPartExamined == "ABDOMEN":
            assert selection.skipped[0].code == NOT_CHEST, r
        else:
            assert selection.series is not None, r


# --------------------------------------------------------------------------- manifest, config


def _manifest(tmp_path: Path, extra_input: str = "", classes: int = 1) -> Path:
    cls = (
        '[[classes]]\nname = "covid19"\ncode_value = "840539006"\ncoding_scheme = "SCT"\n'
        'code_meaning = "COVID-19"\n'
    )
    path = tmp_path / "manifest.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            name = "ct"
            version = "1"
            task = "ct-classifier"
            architecture = "densenet121_sigmoid"
            device_uid = "1.2.3"
            threshold = 0.42
            [weights]
            file = "w.keras"
            format = "keras"
            sha256 = "{"0" * 64}"
            [input]
            size = [224, 224]
            channels = 3
            """
        )
        + extra_input
        + "\n"
        + cls * classes
    )
    return path


def test_manifest_window_default_custom_and_errors(tmp_path: Path) -> None:
    spec = read_manifest(_manifest(tmp_path))
    assert spec.window == DEFAULT_CT_WINDOW == (-600.0, 1500.0) and spec.threshold == 0.42
    spec = read_manifest(_manifest(tmp_path, "window_center = -500\nwindow_width = 1400"))
    assert spec.window == (-500.0, 1400.0)
    with pytest.raises(ModelError, match="both 'window_center' and 'window_width'"):
        read_manifest(_manifest(tmp_path, "window_center = -500"))
    with pytest.raises(ModelError, match="'window_width' must be > 0 HU, got -3"):
        read_manifest(_manifest(tmp_path, "window_center = -500\nwindow_width = -3"))
    with pytest.raises(ModelError, match="at most one"):
        read_manifest(_manifest(tmp_path, classes=2))


def test_ct_config_mistakes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            """
            [[receive.callers]]
            ae_title = "X"
            [ct]
            aggregation = "median"
            top_k = 0
            lung_mask = "../x"
            [ct.selection]
            min_slices = 0
            modalities = [""]
            frontal = 1
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    for key in (
        "ct.aggregation",
        "ct.top_k",
        "ct.lung_mask",
        "ct.selection.min_slices",
        "ct.selection.modalities",
        "ct.selection.frontal",
    ):
        assert key in text, key
    assert "'median'" in text
