"""The node as a subprocess, fed by real dcmtk SCUs over loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from support import (
    NodeProcess,
    dataset_bytes,
    dcmtk,
    descendant_pids,
    dicom_files,
    free_port,
    is_complete,
    make_instance,
    p_data_tf,
    process_running,
    pynetdicom_store,
    running_node,
    shared_data,
    spawned_pids,
    store_command,
    storescu,
)

#: Every test on both receive paths: the fast path and pynetdicom's stock code.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("receive_path")]


def _storescp(out: Path, port: int) -> subprocess.Popen[bytes]:
    """dcmtk storescp in bit-preserving mode: the oracle for "what was sent"."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [dcmtk("storescp"), "+B", "+xa", "-aet", "DICOMNODE", "-od", str(out), "--fork", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _by_sop_instance(folder: Path) -> dict[str, Path]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".part"):
            meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
            out[str(meta.MediaStorageSOPInstanceUID)] = path
    return out


def _wait_port(port: int) -> None:
    import socket
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_every_shared_file_is_stored_byte_identical_indexed_and_completed(
    tmp_path: Path,
) -> None:
    cxr = dicom_files(shared_data("dicom_cxr"))
    ct = dicom_files(shared_data("dicom_ct"))
    generated = [
        make_instance(tmp_path / "gen", study_uid=study, modality="CT")
        for study in [generate_uid()] * 3
    ] + [make_instance(tmp_path / "gen", modality="DX", rows=300, columns=200)]
    # dcmtk storescu cannot send files whose dataset lacks SOPClassUID (the J2K series keeps
    # its UIDs in the file meta only, as some archives export); pynetdicom sends those bytes.
    dcmtk_files, meta_only_files = [], []
    for path in cxr + ct + generated:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        (dcmtk_files if ds.get("SOPClassUID") else meta_only_files).append(path)
    assert len(meta_only_files) == 20  # the TotalSegmentator series

    oracle_port = free_port()
    oracle = _storescp(tmp_path / "oracle", oracle_port)
    try:
        _wait_port(oracle_port)
        for run in storescu(dcmtk_files, oracle_port):
            assert run.returncode == 0, run.stderr
    finally:
        oracle.terminate()
        oracle.wait(10)
    sent = _by_sop_instance(tmp_path / "oracle")

    with running_node(tmp_path / "node") as node:
        for run in storescu(dcmtk_files, node.port):
            assert run.returncode == 0, run.stdout + run.stderr
        for path in meta_only_files:
            assert pynetdicom_store(path, node.port) == 0x0000
        stored = _by_sop_instance(node.data_dir / "instances")

        for sop_uid, oracle_file in sent.items():
            assert sop_uid in stored, f"{sop_uid} not stored"
            assert dataset_bytes(stored[sop_uid]) == dataset_bytes(oracle_file), sop_uid
        for path in meta_only_files:
            uid = str(dcmread(path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
            assert dataset_bytes(stored[uid]) == dataset_bytes(path)
        assert len(stored) == len(sent) + len(meta_only_files)

        expected: dict[str, int] = {}
        for path in dcmtk_files:
            ds = dcmread(path, stop_before_pixels=True, force=True)
            expected[ds.StudyInstanceUID] = expected.get(ds.StudyInstanceUID, 0) + 1
        # dicom_cxr holds one image twice (MONOCHROME1 and 2 copies share a SOP Instance UID).
        duplicates = len(dcmtk_files) - len(sent)
        studies = node.wait_for(
            lambda s: len(s) == len(expected) + 1 and all(is_complete(v) for v in s.values()),
            timeout=30,
            what="every study complete",
        )
        for uid, count in expected.items():
            assert 1 <= studies[uid]["instances"] <= count
        assert sum(studies[uid]["instances"] for uid in expected) == len(dcmtk_files) - duplicates
        # The series without Study/Series UIDs is kept, grouped under derived UIDs, and flagged.
        [derived] = [s for uid, s in studies.items() if uid not in expected]
        assert derived["study_instance_uid"].startswith("2.25.")
        assert derived["instances"] == 20 and derived["series"] == 1
        assert "without StudyInstanceUID" in derived["reason"]


def test_the_configured_receive_path_serves(tmp_path: Path, receive_path: bool) -> None:
    """``receive.fast_path`` picks the path (the stock one says so in the log, the fast
    one does not fall back: pynetdicom is a tested version); either one stores."""
    with running_node(tmp_path / "node") as node:
        [run] = storescu([make_instance(tmp_path / "in")], node.port)
        assert run.returncode == 0, run.stdout + run.stderr
        stock_line = "receive.fast_path is false: associations use pynetdicom's stock code"
        assert (stock_line in node.log()) == (not receive_path)
        assert "receive fast path off" not in node.log()  # pynetdicom is a tested version
        assert len(_by_sop_instance(node.data_dir / "instances")) == 1


def test_unknown_calling_ae_is_rejected_and_known_one_echoes(tmp_path: Path) -> None:
    with running_node(tmp_path) as node:
        ok = subprocess.run(
            [dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(
            [
                dcmtk("echoscu"),
                "-aet",
                "INTRUDER",
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(node.port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode != 0
        assert "INTRUDER" in node.log() and "rejected association" in node.log()
        # The rejection is a proper A-ASSOCIATE-RJ with "calling AE title not recognized".
        from pynetdicom import AE

        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 0x03


def test_caller_host_restriction(tmp_path: Path) -> None:
    with running_node(tmp_path, receive={"allow_unknown_callers": False}) as node:
        config = node.config.read_text().replace(
            'ae_title = "ECHOSCU"\nhost = "127.0.0.1"', 'ae_title = "ECHOSCU"\nhost = "192.0.2.7"'
        )
        node.stop()
        node.config.write_text(config)
        node.start()
        run = subprocess.run(
            [dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode != 0
        assert "'ECHOSCU' at 127.0.0.1" in node.log()


def _crafted(tmp_path: Path) -> dict[str, tuple[Path, set[int]]]:
    """Broken inputs with the statuses each may get (a failure, or 0 for a safe store)."""
    cases: dict[str, tuple[Path, set[int]]] = {}
    good = make_instance(tmp_path / "crafted", modality="CT", rows=128, columns=128)
    data = good.read_bytes()
    head = dataset_bytes(good)
    meta = data[: len(data) - len(head)]

    garbage = tmp_path / "crafted" / "garbage.dcm"
    garbage.write_bytes(meta + b"\xff\xfe\x00\x01" * 64)
    cases["garbage"] = (garbage, {0xC210, 0xC211})

    empty = tmp_path / "crafted" / "empty.dcm"
    empty.write_bytes(meta)
    cases["empty dataset"] = (empty, {0xC211})

    truncated = tmp_path / "crafted" / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 10000])
    cases["truncated pixel data"] = (truncated, {0x0000, 0xC210})

    escape = make_instance(
        tmp_path / "crafted",
        study_uid="1.2.3/../../../../tmp/evil",
        modality="CT",
    )
    cases["study UID with ../"] = (escape, {0xC211})

    other = make_instance(tmp_path / "crafted", modality="CT")
    ds = dcmread(other)
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"  # differs from the meta/command UID
    ds.save_as(other)
    cases["SOP Instance UID mismatch"] = (other, {0xC212})
    return cases


def test_malformed_input_gets_a_status_a_log_line_and_the_node_keeps_serving(
    tmp_path: Path,
) -> None:
    with running_node(tmp_path / "node", node={"log_level": "INFO"}) as node:
        # pydicom's own odd files, sent as they are by dcmtk where dcmtk can read them.
        odd = [Path(get_testdata_file(n)) for n in ("no_meta.dcm", "badVR.dcm", "MR_truncated.dcm")]
        for path in odd:
            subprocess.run(
                [dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(path)],
                capture_output=True,
                timeout=30,
            )
            # and the same bytes without dcmtk's checks, under their own SOP class
            status = pynetdicom_store(path, node.port) if b"DICM" in path.read_bytes()[:132] else 0
            assert status in {0x0000, 0xC210, 0xC211, 0xC212, 0xA900}, (path.name, hex(status))

        for name, (path, allowed) in _crafted(tmp_path).items():
            status = pynetdicom_store(path, node.port)
            assert status in allowed, (name, hex(status))
            if status != 0:
                assert f"0x{status:04X}" in node.log(), name

        # Nothing escaped the storage root.
        assert not Path("/tmp/evil").exists()
        assert not list(node.data_dir.parent.glob("**/evil*"))
        # Still serving: echo and a good store work.
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            timeout=30,
        )
        assert echo.returncode == 0
        good = make_instance(tmp_path / "after", modality="CR")
        [run] = storescu([good], node.port)
        assert run.returncode == 0
        assert node.proc is not None and node.proc.poll() is None


def test_disk_below_floor_answers_a700_and_indexes_nothing(tmp_path: Path) -> None:
    with running_node(tmp_path, storage={"min_free_mb": 2**40}) as node:
        path = make_instance(tmp_path / "in", modality="CT")
        assert pynetdicom_store(path, node.port) == 0xA700
        [run] = storescu([path], node.port)
        assert "0xa700" in (run.stdout + run.stderr).lower() or run.returncode != 0
        assert node.studies() == {}
        assert "0xA700" in node.log() or "below the floor" in node.log()
        assert not list((node.data_dir / "instances").rglob("*.dcm"))


def test_kill_9_during_quiet_period_then_restart_completes(tmp_path: Path) -> None:
    with running_node(tmp_path, quiet_period_s={"CT": 4.0}) as node:
        study = generate_uid()
        files = [make_instance(tmp_path / "in", study_uid=study) for _ in range(3)]
        [run] = storescu(files, node.port)
        assert run.returncode == 0
        assert node.studies()[study]["state"] == "receiving"
        node.kill()
        node.start()
        studies = node.wait_for(
            lambda s: study in s and is_complete(s[study]), 30, "study complete"
        )
        assert studies[study]["instances"] == 3


def test_acknowledged_instances_survive_kill_9_mid_transfer(tmp_path: Path) -> None:
    """SIGKILL while storescu is sending: every instance it saw Success for is indexed."""
    study = generate_uid()
    files = [
        make_instance(tmp_path / "in", study_uid=study, rows=256, columns=256) for _ in range(60)
    ]
    with running_node(tmp_path / "node") as node:
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-xe", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)]
            + [str(f) for f in files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert sender.stdout is not None
        acknowledged: list[str] = []
        current = None
        lines: list[str] = []

        def read() -> None:
            nonlocal current
            for line in sender.stdout:  # type: ignore[union-attr]
                lines.append(line)
                m = re.search(r"Sending file: (\S+)", line)
                if m:
                    current = m.group(1)
                if "Received Store Response (Success)" in line and current:
                    acknowledged.append(current)

        reader = threading.Thread(target=read)
        reader.start()
        import time

        deadline = time.monotonic() + 30
        while len(acknowledged) < 15 and time.monotonic() < deadline:
            time.sleep(0.01)
        node.kill()
        sender.wait(30)
        reader.join(10)
        assert 15 <= len(acknowledged) < 60, "".join(lines[-20:])
        node.start()
        with_status = node.studies()[study]
        assert with_status["instances"] >= len(acknowledged)
        stored = _by_sop_instance(node.data_dir / "instances")
        for path in acknowledged:
            uid = Path(path).stem
            assert uid in stored, f"acknowledged {uid} lost"
            assert dataset_bytes(stored[uid]) == dataset_bytes(Path(path))


def test_sigterm_finishes_in_flight_association_and_exits_cleanly(tmp_path: Path) -> None:
    files = [make_instance(tmp_path / "in", rows=256, columns=256) for _ in range(40)]
    with running_node(tmp_path / "node") as node:
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-xe", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)]
            + [str(f) for f in files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        import time

        time.sleep(0.3)
        assert node.stop(timeout=30) == 0
        out, _ = sender.communicate(timeout=30)
        # The association in progress when SIGTERM came was allowed to finish.
        assert sender.returncode == 0, out
        assert "dicomnode stopped" in node.log()
        node.start()
        assert sum(s["instances"] for s in node.studies().values()) == 40


def test_association_and_pdu_limits(tmp_path: Path) -> None:
    from pynetdicom import AE

    with running_node(tmp_path, receive={"max_associations": 1, "max_pdu_size": 32768}) as node:
        run = subprocess.run(
            [dcmtk("echoscu"), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        # dcmtk reports the PDU size the node announced, less the 12 bytes of PDV header.
        assert "Max Send PDV: 32756" in run.stdout + run.stderr
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert first.is_established
        second = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert second.is_rejected
        first.release()
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert third.is_established
        third.release()


def test_many_small_pdus_store_byte_identical(tmp_path: Path) -> None:
    """The DUL's direct path for data set fragments, at the smallest PDU the node allows.

    A 2 MB instance arrives in about 500 P-DATA PDUs (most written straight to the
    file, the last one and the command through pynetdicom), sent by dcmtk and by
    pynetdicom (which fragment differently); another, sent in between, must not mix.
    """
    files = [make_instance(tmp_path / "in", rows=1024, columns=1024) for _ in range(3)]
    with running_node(tmp_path / "node", receive={"max_pdu_size": 4096}) as node:
        [run] = storescu(files[:2], node.port)
        assert run.returncode == 0, run.stdout + run.stderr
        assert pynetdicom_store(files[2], node.port) == 0x0000
        stored = _by_sop_instance(node.data_dir / "instances")
        for path in files:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(stored[uid]) == dataset_bytes(path)
        assert " ERROR " not in node.log()


def _echo_command(message_id: int) -> bytes:
    """A C-ECHO-RQ command set, as pynetdicom encodes it."""
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import encode

    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def test_pdus_with_several_pdvs_and_a_broken_message_order(
    tmp_path: Path, receive_path: bool
) -> None:
    """PDVs are handled one by one, whatever PDU they share (PS3.8 9.3.5 allows several).

    One PDU carries the end of a data set, the next command and its whole data set;
    both instances are stored byte-identical, and so is one whose command comes in two
    fragments (pynetdicom assembles that message). Then a command arriving in the middle
    of a data set is a protocol error: the association is aborted, the partial file
    is removed, and the node keeps serving.
    """
    if not receive_path:
        pytest.skip(
            "receive.fast_path = false: pynetdicom's stock DIMSE layer drops the PDVs "
            "that follow the last fragment of a message in the same P-DATA-TF PDU "
            "(docs/security.md, known limits)"
        )
    from pynetdicom import AE

    files = [make_instance(tmp_path / "in") for _ in range(6)]
    data = [dataset_bytes(path) for path in files]
    context_syntax = "1.2.840.10008.1.2.1"  # make_instance writes explicit VR little endian
    with running_node(tmp_path / "node") as node:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [context_syntax])
        ae.add_requested_context("1.2.840.10008.1.1", [context_syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        contexts = {cx.abstract_syntax: cx.context_id for cx in assoc.accepted_contexts}
        cid = contexts["1.2.840.10008.5.1.4.1.1.2"]
        send = assoc.dul.socket.send  # raw PDUs, past pynetdicom's own fragmentation
        # Hold pynetdicom's requestor reactor, as its own send_c_store() does, so that
        # it does not take the responses off the DIMSE queue first.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        time.sleep(0.05)  # past the one queue check a just-resumed loop may still make
        half = len(data[0]) // 2
        send(p_data_tf((cid, 0x03, store_command(files[0], 1)), (cid, 0x00, data[0][:half])))
        send(
            p_data_tf(
                (cid, 0x02, data[0][half:]),
                (cid, 0x03, store_command(files[1], 2)),
                (cid, 0x02, data[1]),
            )
        )
        statuses = {}
        for _ in range(2):
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "no C-STORE response"
            statuses[int(response.MessageIDBeingRespondedTo)] = int(response.Status)
        assert statuses == {1: 0x0000, 2: 0x0000}
        # A command in two fragments is pynetdicom's to assemble, and so is its data set.
        command = store_command(files[4], 5)
        send(p_data_tf((cid, 0x01, command[:20])))
        send(p_data_tf((cid, 0x03, command[20:]), (cid, 0x00, data[4][:100])))
        send(p_data_tf((cid, 0x02, data[4][100:])))
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None, "no C-STORE response"
        assert (int(response.MessageIDBeingRespondedTo), int(response.Status)) == (5, 0x0000)
        # A C-ECHO (pynetdicom's DIMSE layer, the association thread) right before a
        # C-STORE (direct path): answered in the order they were sent.
        send(p_data_tf((contexts["1.2.840.10008.1.1"], 0x03, _echo_command(6))))
        send(p_data_tf((cid, 0x03, store_command(files[5], 7)), (cid, 0x02, data[5])))
        answered = []
        for _ in range(2):
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "no response"
            answered.append((int(response.MessageIDBeingRespondedTo), int(response.Status)))
        assert answered == [(6, 0x0000), (7, 0x0000)]
        assoc._reactor_checkpoint.set()
        # A command where the rest of a data set should be: the node aborts.
        send(p_data_tf((cid, 0x03, store_command(files[2], 3)), (cid, 0x00, data[2][:100])))
        send(p_data_tf((cid, 0x03, store_command(files[3], 4))))
        deadline = time.monotonic() + 10
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
        assert "aborting association: a PDV" in node.log()

        stored = _by_sop_instance(node.data_dir / "instances")
        for i in (0, 1, 4, 5):
            uid = str(dcmread(files[i], stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(stored[uid]) == data[i]
        assert len(stored) == 4
        assert (node.data_dir / "incoming").is_dir()
        incoming = [p for p in (node.data_dir / "incoming").rglob("*") if p.is_file()]
        assert incoming == []
        [run] = storescu(files[2:4], node.port)  # still serving
        assert run.returncode == 0, run.stdout + run.stderr
        assert len(_by_sop_instance(node.data_dir / "instances")) == 6


def test_a_large_data_set_in_uneven_pdus_and_an_abort_inside_the_next(
    tmp_path: Path, receive_path: bool
) -> None:
    """Data set fragments are read straight into the staging buffer and written in chunks
    (the later ones with direct I/O): a 4 MiB instance sent in P-DATA-TF PDUs of uneven
    sizes, several crossing a chunk boundary, is stored byte-identical. Then an A-ABORT
    (10 bytes, shorter than the headers of a P-DATA-TF) arrives in the middle of the next
    data set: the node ends the association at once, removes the partial file and keeps
    serving. On the stock path (``receive.fast_path = false``) the same, except that
    pynetdicom's partial file stays until the next start (docs/security.md, known
    limits)."""
    from pynetdicom import AE

    from dicomnode.receive.fastpath.cstore import STAGING_BYTES

    files = [make_instance(tmp_path / "in", rows=1024, columns=2048) for _ in range(2)]
    data = [dataset_bytes(path) for path in files]
    assert len(data[0]) > 3 * STAGING_BYTES
    context_syntax = "1.2.840.10008.1.2.1"
    # PDUs up to 1.1 MB: the node must have announced that much (it aborts longer ones).
    with running_node(tmp_path / "node", receive={"max_pdu_size": 2_097_152}) as node:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [context_syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", max_pdu=0)
        assert assoc.is_established
        cid = assoc.accepted_contexts[0].context_id
        send = assoc.dul.socket.send
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        time.sleep(0.05)
        send(p_data_tf((cid, 0x03, store_command(files[0], 1))))
        offset, sizes = 0, [65_530, 1, 333_333, 4096, 7, 1_000_000]
        for i in range(len(data[0])):
            piece = data[0][offset : offset + sizes[i % len(sizes)]]
            offset += len(piece)
            if not piece:
                break
            send(p_data_tf((cid, 0x02 if offset == len(data[0]) else 0x00, piece)))
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None, "no C-STORE response"
        assert (int(response.MessageIDBeingRespondedTo), int(response.Status)) == (1, 0x0000)
        stored = _by_sop_instance(node.data_dir / "instances")
        uid = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(stored[uid]) == data[0]

        send(p_data_tf((cid, 0x03, store_command(files[1], 2))))
        send(p_data_tf((cid, 0x00, data[1][: STAGING_BYTES + 5000])))
        incoming_dir = node.data_dir / "incoming"
        deadline = time.monotonic() + 10
        while not any(p.is_file() for p in incoming_dir.rglob("*")):
            assert time.monotonic() < deadline, "the partial data set never reached the disk"
            time.sleep(0.01)
        # A-ABORT (PS3.8 9.3.8): type 0x07, length 4, reserved, source 0 (service user), reason 0.
        send(struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0, 0, 0, 0))
        deadline = time.monotonic() + 5
        while receive_path and any(p.is_file() for p in incoming_dir.rglob("*")):
            assert time.monotonic() < deadline, "the partial file is still there after the abort"
            time.sleep(0.01)
        assoc._reactor_checkpoint.set()
        assoc.abort()
        assert len(_by_sop_instance(node.data_dir / "instances")) == 1
        [run] = storescu(files[1:], node.port)  # still serving
        assert run.returncode == 0, run.stdout + run.stderr
        assert len(_by_sop_instance(node.data_dir / "instances")) == 2
        assert " ERROR " not in node.log()


def test_logs_carry_no_patient_names_or_ids(tmp_path: Path) -> None:
    with running_node(tmp_path / "node", node={"log_level": "DEBUG"}) as node:
        study = generate_uid()
        files = [
            make_instance(
                tmp_path / "in",
                study_uid=study,
                patient_name="Secretname^Verysecret",
                patient_id="PID-SECRET-4242",
            )
            for _ in range(2)
        ]
        [run] = storescu(files, node.port)
        assert run.returncode == 0
        node.wait_for(lambda s: study in s and is_complete(s[study]), 30, "complete")
        log = node.log()
        assert study in log  # the log does talk about the study...
        assert "Secretname" not in log and "PID-SECRET-4242" not in log  # ...never the patient
        # An admin debugging a site can turn patient IDs on.
        node.stop()
        node.config.write_text(node.config.read_text().replace("[node]", "[node]\nlog_phi = true"))
        node.start()
        [run] = storescu(files[:1], node.port)
        assert run.returncode == 0
        assert "PID-SECRET-4242" in node.log()


def test_several_receiving_processes_share_the_port(tmp_path: Path) -> None:
    study = generate_uid()
    files = [make_instance(tmp_path / "in", study_uid=study) for _ in range(40)]
    with running_node(tmp_path / "node", receive={"processes": 2}) as node:
        threads = []
        results: list[int] = []
        for part in range(4):
            chunk = files[part::4]
            t = threading.Thread(
                target=lambda c=chunk: results.extend(r.returncode for r in storescu(c, node.port))
            )
            t.start()
            threads.append(t)
        for t in threads:
            t.join(120)
        assert results == [0, 0, 0, 0]
        assert node.studies()[study]["instances"] == 40
        assert node.log().count("accepting associations") == 2


def test_associations_are_spread_over_the_receiving_processes(tmp_path: Path) -> None:
    """Each of 4 processes may hold 1 of the 4 allowed associations: all 4 fit only if
    every new one goes to an idle process; the fifth is refused with A-ASSOCIATE-RJ."""
    from pynetdicom import AE

    with running_node(tmp_path, receive={"processes": 4, "max_associations": 4}) as node:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(4)]
        assert [a.is_established for a in held] == [True] * 4
        fifth = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert fifth.is_rejected
        held[1].release()
        # The freed process is chosen for the next association once its thread has ended.
        deadline = time.monotonic() + 10
        while True:
            again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established
        assert again.send_c_echo().Status == 0x0000
        for assoc in [*held, again]:
            if assoc.is_established:
                assoc.release()


def test_a_killed_receiving_process_is_replaced(tmp_path: Path) -> None:
    files = [make_instance(tmp_path / "in") for _ in range(6)]
    with running_node(tmp_path / "node", receive={"processes": 2}) as node:
        assert node.proc is not None
        victim = spawned_pids(node.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        # Associations go to the live process at once, then to its replacement too.
        for chunk in (files[:3], files[3:]):
            [run] = storescu(chunk, node.port)
            assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.monotonic() + 30
        while node.log().count("accepting associations") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "exited with code -9; restarting it" in node.log()
        assert node.log().count("accepting associations") == 3
        replaced = spawned_pids(node.proc.pid)
        assert len(replaced) == 2 and victim not in replaced
        [run] = storescu([make_instance(tmp_path / "in")], node.port)
        assert run.returncode == 0
        assert sum(s["instances"] for s in node.studies().values()) == 7


def test_children_stop_when_the_main_process_is_killed(tmp_path: Path) -> None:
    with running_node(tmp_path, receive={"processes": 2}, worker={"processes": 1}) as node:
        assert node.proc is not None
        children = descendant_pids(node.proc.pid)
        assert len(spawned_pids(node.proc.pid)) == 3  # two receivers and a worker
        node.proc.kill()
        node.proc.wait(10)
        node.proc = None
        deadline = time.monotonic() + 30
        try:
            while any(process_running(pid) for pid in children):
                assert time.monotonic() < deadline, "children outlived the main process"
                time.sleep(0.2)
        finally:
            for pid in children:  # leave no strays behind if the assertion failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Nothing listens on the port any more: a fresh start can bind it.
        node.start()
        [run] = storescu([make_instance(tmp_path / "in")], node.port)
        assert run.returncode == 0


def test_node_on_postgresql(tmp_path: Path, postgres: object) -> None:
    url = postgres.create_database()  # type: ignore[attr-defined]
    with running_node(tmp_path, database={"url": url}) as node:
        study = generate_uid()
        files = [make_instance(tmp_path / "in", study_uid=study, modality="CR") for _ in range(2)]
        [run] = storescu(files, node.port)
        assert run.returncode == 0
        studies = node.wait_for(
            lambda s: study in s and is_complete(s[study]), 30, "complete on PostgreSQL"
        )
        assert studies[study]["instances"] == 2


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[node]\nport = "eleven"\n[receive]\nallow_unknown_callers = true\n')
    node = NodeProcess(config=config, port=0, log_path=tmp_path / "log")
    result = node.cli("serve")
    assert result.returncode == 2
    assert "node.port" in result.stderr and "'eleven'" in result.stderr


def test_idle_association_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    import time

    from pynetdicom import AE

    with running_node(tmp_path, receive={"network_timeout_s": 1}) as node:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert assoc.is_aborted
        assert "network timeout" in node.log().lower()  # "Network timeout" on the stock path
        again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert again.is_established
        assert again.send_c_echo().Status == 0
        again.release()
