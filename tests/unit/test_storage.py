"""Storage: UID validation, paths that cannot escape, atomic durable commit, free-space floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.errors import InvalidUIDError, StorageFullError
from dicomnode.storage import InstanceStore, validate_uid


@pytest.mark.parametrize(
    "value",
    ["", "../1.2", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65, "1.2\\3", None, 12],
)
def test_invalid_uids_are_refused_with_the_value_quoted(value: object) -> None:
    with pytest.raises(InvalidUIDError) as info:
        validate_uid(value, "SOPInstanceUID")
    assert "SOPInstanceUID" in str(info.value)


def test_valid_uid_padding_is_removed() -> None:
    assert validate_uid("1.2.840.10008.1.2\x00") == "1.2.840.10008.1.2"
    assert validate_uid("1.2.3 ") == "1.2.3"
    assert validate_uid("1.02.3") == "1.02.3"  # leading zeros: not conformant, but seen in the wild


def _store(tmp_path: Path, floor: int = 0) -> InstanceStore:
    store = InstanceStore(tmp_path / "instances", tmp_path / "incoming", floor)
    store.prepare()
    return store


def test_commit_moves_file_into_uid_path_and_replaces_atomically(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rel = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert rel == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    first = store.write(b"first", rel)
    assert first.size_bytes == 5
    second = store.write(b"second!", rel)
    assert second.size_bytes == 7
    assert (tmp_path / "instances" / rel).read_bytes() == b"second!"
    # nothing left behind in the incoming directory
    assert list(store.host_incoming.iterdir()) == []


def test_path_of_refuses_escapes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(InvalidUIDError):
        store.path_of("../../etc/passwd")
    with pytest.raises(InvalidUIDError):
        store.relative_path("1.2", "1.2.3", "../../x")


def test_free_space_floor(tmp_path: Path) -> None:
    _store(tmp_path, floor=0).check_free_space()
    with pytest.raises(StorageFullError, match="min_free_mb"):
        _store(tmp_path, floor=2**62).check_free_space()


def test_clean_incoming_removes_partial_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    (store.host_incoming / "tmp1.part").write_bytes(b"partial")
    assert store.clean_incoming() == 1
    assert list(store.host_incoming.iterdir()) == []
