"""The receiver's header reader: the direct path gives what dcmread gives, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from support import dicom_files, make_instance, shared_data

from dicomnode.errors import DatasetError
from dicomnode.index import InstanceMeta
from dicomnode.receive import meta as meta_module
from dicomnode.receive.meta import read_header, read_instance_meta


def _meta_both_ways(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[InstanceMeta | str, InstanceMeta | str, bool]:
    """read_instance_meta with the direct reader, then with dcmread only; and whether
    the direct reader took the file at all."""
    file_meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ts = str(file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    sop_class = str(file_meta.get("MediaStorageSOPClassUID", ""))
    sop_instance = str(file_meta.get("MediaStorageSOPInstanceUID", ""))

    def run() -> InstanceMeta | str:
        try:
            return read_instance_meta(path, sop_class, sop_instance, ts)
        except DatasetError as exc:
            return f"0x{exc.status:04X}"

    direct_taken = meta_module._read_header_direct(path, ts) is not None
    direct = run()
    with monkeypatch.context() as patch:
        patch.setattr(meta_module, "_read_header_direct", lambda *_: None)
        fallback = run()
    return direct, fallback, direct_taken


def test_direct_reader_equals_dcmread_on_every_shared_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = dicom_files(shared_data("dicom_cxr")) + dicom_files(shared_data("dicom_ct"))
    taken = 0
    for path in files:
        direct, fallback, was_taken = _meta_both_ways(path, monkeypatch)
        assert direct == fallback, path
        taken += was_taken
    # Most real files are laid out as Part 10 files with a group length: the direct path.
    assert taken >= len(files) * 0.8, f"direct path read only {taken} of {len(files)}"


def test_direct_reader_equals_dcmread_on_pydicoms_test_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared = 0
    for name in get_testdata_files("*.dcm"):
        path = Path(name)
        try:
            dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue  # not readable at all: nothing to compare
        direct, fallback, _ = _meta_both_ways(path, monkeypatch)
        assert direct == fallback, path
        compared += 1
    assert compared > 50


def test_direct_reader_on_generated_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = make_instance(
        tmp_path,
        modality="DX",
        extra={
            "ImageType": ["DERIVED ", "PRIMARY"],
            "InstanceNumber": " 7",
            "SeriesDescription": "Thorax p.a. — Übersicht",
            "SpecificCharacterSet": "ISO_IR 192",
        },
    )
    plain = make_instance(tmp_path)
    for path in (odd, plain):
        direct, fallback, was_taken = _meta_both_ways(path, monkeypatch)
        assert was_taken
        assert direct == fallback
    ds, values = read_header(odd, "1.2.840.10008.1.2.1")
    assert values["ImageType"] == "DERIVED \\PRIMARY"  # as dcmread gives it
    assert values["SeriesDescription"] == "Thorax p.a. — Übersicht"
    assert int(values["InstanceNumber"]) == 7
    assert "PixelData" not in ds
