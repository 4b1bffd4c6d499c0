"""The receiver's header reader: the direct path gives what dcmread gives, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
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

    try:
        direct_taken = meta_module._read_header_direct(path, ts) is not None
    except meta_module.TruncatedDataSetError:
        direct_taken = True
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
    truncated = []
    for name in get_testdata_files("*.dcm"):
        path = Path(name)
        try:
            dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue  # not readable at all: nothing to compare
        direct, fallback, _ = _meta_both_ways(path, monkeypatch)
        if "truncated" in path.name:
            # pydicom takes a short last value as it is; the direct reader refuses it.
            assert direct == "0xC210", path
            truncated.append(path.name)
            continue
        assert direct == fallback, path
        compared += 1
    assert compared > 50
    assert sorted(truncated) == ["MR_truncated.dcm", "rtplan_truncated.dcm"]


def _cut_inside(path: Path, value: bytes, into: int) -> Path:
    """A copy of ``path`` that ends ``into`` bytes into the first occurrence of ``value``."""
    data = path.read_bytes()
    cut = path.with_name(f"cut-{into}-{path.name}")
    cut.write_bytes(data[: data.index(value) + into])
    return cut


def test_a_data_set_cut_short_is_cannot_understand_never_stored(tmp_path: Path) -> None:
    """A file that ends inside its Study Instance UID (pydicom would read "1"), inside a
    Patient's Name, or whose Pixel Data declares more bytes than the file holds is refused
    with 0xC210 and the element named (not its value)."""
    study = "1.2.826.0.1.3680043.8.498.1234567890"
    path = make_instance(tmp_path, study_uid=study, patient_name="Cut^Short")
    ds = dcmread(path)
    sop = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1")
    assert read_instance_meta(path, *sop).StudyInstanceUID == study  # whole: fine
    pixels_cut = tmp_path / "pixels-cut.dcm"
    pixels_cut.write_bytes(path.read_bytes()[:-100])
    for cut in (
        _cut_inside(path, study.encode(), 1),
        _cut_inside(path, b"Cut^Short", 3),
        pixels_cut,
    ):
        with pytest.raises(DatasetError) as caught:
            read_instance_meta(cut, *sop)
        assert caught.value.status == 0xC210
        assert "cut short" in str(caught.value)
        assert "Cut^" not in str(caught.value)


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
    values = read_header(odd, "1.2.840.10008.1.2.1")
    assert values["ImageType"] == "DERIVED \\PRIMARY"  # as dcmread gives it
    assert values["SeriesDescription"] == "Thorax p.a. — Übersicht"
    assert int(values["InstanceNumber"]) == 7


def _code(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = "R-10214"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = meaning
    return item


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-vr", "implicit-vr"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_the_scanner_steps_over_sequences_and_long_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, implicit: bool, undefined: bool
) -> None:
    """Nested sequences, a private block of 200 KB (more than the first read) and
    Latin-1 text before the wanted values; a View Code Sequence among them."""
    path = make_instance(
        tmp_path,
        modality="DX",
        extra={"SpecificCharacterSet": "ISO_IR 100", "SeriesDescription": "Thorax Übersicht"},
    )
    ds = dcmread(path)
    block = ds.private_block(0x0009, "DICOMNODE TEST", create=True)
    block.add_new(0x10, "OB", bytes(200_000))
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    outer = Dataset()
    outer.ReferencedImageSequence = Sequence([inner, inner])
    block.add_new(0x11, "SQ", Sequence([outer]))
    ds.ViewCodeSequence = Sequence([_code("postero-anterior")])
    for element in (ds["ViewCodeSequence"], block[0x11], outer["ReferencedImageSequence"]):
        element.is_undefined_length = undefined
        for item in element.value:
            item.is_undefined_length_sequence_item = undefined
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)

    direct, fallback, was_taken = _meta_both_ways(path, monkeypatch)
    assert was_taken
    assert direct == fallback
    assert isinstance(direct, InstanceMeta)
    assert direct.SeriesDescription == "Thorax Übersicht"
    assert direct.ViewEvidence == "postero-anterior"
    assert read_header(path, ts)["ViewCodeSequence"][0].CodeValue == "R-10214"
    delimiters = path.read_bytes().count(b"\xfe\xff\xdd\xe0")  # (FFFE,E0DD)
    assert delimiters == (3 if undefined else 0)


def test_a_file_that_ends_inside_its_header_is_refused_not_left_to_dcmread(
    tmp_path: Path,
) -> None:
    """dcmread takes the short value as it is; the direct reader says the file is cut."""
    path = make_instance(tmp_path)
    data = path.read_bytes()
    # Cut inside the Study Instance UID's value (the file meta has no such UID).
    cut = data.index(path.stem.encode("ascii"), 300) - 20
    path.write_bytes(data[:cut])
    with pytest.raises(meta_module.TruncatedDataSetError, match="cut short"):
        meta_module._read_header_direct(path, ExplicitVRLittleEndian)
