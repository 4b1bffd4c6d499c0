"""Hostile peers on the DICOM port, against the real node (issue 24; docs/security.md).

Raw sockets on loopback only, every loop bounded in count and time. One node, on the
receive settings the shipped ``config.toml`` uses (two receiving processes behind the
dispatcher), takes the whole sequence: a radiograph stored, length bombs, tricklers,
bare connects, aborted C-STOREs on both receive paths, a data set cut inside its
Study Instance UID, a wrong called AE title, and a radiograph stored again. A second
node is SIGKILLed while its worker loads models.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from support import (
    NodeProcess,
    dataset_bytes,
    dcmtk,
    descendant_pids,
    free_port,
    make_instance,
    node_env,
    p_data_tf,
    process_running,
    pynetdicom_store,
    running_node,
    spawned_pids,
    store_command,
    storescu,
    write_config,
)

#: Every test on both receive paths: the fast path and pynetdicom's stock code.
pytestmark = pytest.mark.usefixtures("receive_path")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: docs/security.md, known limits of ``receive.fast_path = false``.
STOCK_PATH_LEAVES_FILES = (
    "receive.fast_path = false: pynetdicom's temporary file of a data set cut off by an "
    "abort stays in incoming/ until the next start (docs/security.md, known limits)"
)
#: Where the tricklers come from: another loopback address than the allowed callers'
#: (127.0.0.1), so the per-address limit on pending connections is what they meet.
TRICKLER_ADDRESS = "127.0.0.2"
#: echoscu's connection, ACSE and DIMSE timeouts: an unanswered C-ECHO fails in seconds.
ECHO_TIMEOUTS = ("-to", "5", "-ta", "5", "-td", "5")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, receive_path: bool) -> Iterator[NodeProcess]:
    """The node on default receive settings, with the shipped two receiving processes,
    on the receive fast path and then on pynetdicom's stock path (``receive_path``)."""
    with running_node(tmp_path_factory.mktemp("hostile"), receive={"processes": 2}) as node:
        yield node


# --- raw DICOM upper layer ---------------------------------------------------------------


def associate_rq(called: str = "DICOMNODE", calling: str = "STORESCU") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing CT Image Storage in explicit VR little endian."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(CT_IMAGE, [ExplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.99"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body); None once the node closed the connection."""
    header = b""
    try:
        while len(header) < 6:
            chunk = sock.recv(6 - len(header))
            if not chunk:
                return None
            header += chunk
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = b""
        while len(body) < length:
            chunk = sock.recv(min(length - len(body), 65536))
            if not chunk:
                return None
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None
    return pdu_type, body


def associated(port: int) -> socket.socket:
    """A raw connection with an accepted association (context ID 1)."""
    sock = connect(port)
    sock.sendall(associate_rq())
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == 0x02, f"no A-ASSOCIATE-AC: {answer!r}"
    return sock


def ending(sock: socket.socket, within_s: float) -> list[int]:
    """Read until the node closes ``sock`` (at most ``within_s``); the PDU types it sent.

    Fails when the connection is still open after ``within_s``."""
    sock.settimeout(within_s)
    types = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            pdu = read_pdu(sock)
        except TimeoutError:
            break
        if pdu is None:
            return types
        types.append(pdu[0])
        if pdu[0] == 0x07:
            assert pdu[1][2:4] in (b"\x02\x06", b"\x02\x05", b"\x02\x00"), pdu[1].hex()
    raise AssertionError(f"the node left the connection open for {within_s} s ({types})")


def echo(port: int, called: str = "DICOMNODE") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), *ECHO_TIMEOUTS, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=20,
    )


def memory_kib(node: NodeProcess) -> dict[str, int]:
    """Peak and current resident memory over the node's processes (receivers included)."""
    assert node.proc is not None
    total = {"VmHWM": 0, "VmRSS": 0}
    for pid in [node.proc.pid, *spawned_pids(node.proc.pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value.split()[0])
    return total


def incoming_files(node: NodeProcess) -> list[Path]:
    return [p for p in (node.data_dir / "incoming").rglob("*") if p.is_file()]


# --- the sequence ------------------------------------------------------------------------


def _store_radiograph(node: NodeProcess, folder: Path) -> None:
    path = make_instance(folder, modality="DX", rows=256, columns=256)
    [run] = storescu([path], node.port)
    assert run.returncode == 0, run.stdout + run.stderr
    study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    assert node.studies()[study]["instances"] == 1


def test_01_a_radiograph_is_stored_before(node: NodeProcess, tmp_path: Path) -> None:
    _store_radiograph(node, tmp_path)


def test_02_length_bombs_are_aborted_before_memory_is_reserved(node: NodeProcess) -> None:
    """PDU headers that claim 2 and 4 GiB, a PDV that runs past its PDU and a command set
    sent in endless fragments: each connection ends with an A-ABORT or is closed, and the
    node's processes grow by less than 256 MiB at their peak."""
    before = memory_kib(node)
    # Before association, no AE title given: an A-ASSOCIATE-RQ header claiming 2 GiB.
    pre = [connect(node.port) for _ in range(3)]
    for sock in pre:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 2**31 - 1) + b"\0" * 4096)
    # On an accepted association: a P-DATA-TF header claiming 4 GiB.
    post = [associated(node.port) for _ in range(3)]
    for sock in post:
        sock.sendall(struct.pack(">BBL", 0x04, 0, 2**32 - 16) + b"\0" * 65536)
    # A PDV item that claims 1 GB inside a PDU of 100 bytes.
    item = associated(node.port)
    item.sendall(struct.pack(">BBLLBB", 0x04, 0, 100, 10**9, 1, 0x01) + b"\0" * 94)
    # A command set in fragments that never end (each PDU small).
    fragments = associated(node.port)
    with contextlib.suppress(OSError):
        for _ in range(200):
            fragments.sendall(p_data_tf((1, 0x01, b"\0" * 1000)))
    for sock in [*pre, *post, item, fragments]:
        ending(sock, within_s=10)
        sock.close()
    after = memory_kib(node)
    grown_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(f"peak resident memory of the node's processes grew by {grown_mib:.1f} MiB")
    assert grown_mib < 256, (before, after)
    log = node.log()
    assert log.count("more than the 262144 allowed before the association request") >= 3
    assert log.count("more than the 65536 allowed (receive.max_pdu_size)") >= 3
    assert "a DIMSE command set of more than 65536 bytes" in log
    assert echo(node.port).returncode == 0


def test_03_tricklers_neither_lock_out_callers_nor_stay(node: NodeProcess) -> None:
    """17 connections trickle an association request, one byte every 3 s, for 45 s; an
    allowed caller's C-ECHOs meanwhile are answered (at least 90 %), and the node closes
    every trickling connection (those over the per-address limit at once, the others
    when acse_timeout_s has passed since they connected)."""
    request = associate_rq()
    tricklers = []
    for _ in range(17):
        sock = connect(node.port, source=TRICKLER_ADDRESS)
        sock.setblocking(False)
        tricklers.append(sock)
    closed_after: dict[int, float] = {}
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for step in range(16):  # 16 bytes, one every 3 s: 45 s
            for index, sock in enumerate(tricklers):
                if index in closed_after:
                    continue
                try:
                    while True:  # an A-ABORT, if any, then the end of the stream
                        if not sock.recv(4096):
                            raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after[index] = time.monotonic() - started
                    continue
                try:
                    sock.send(request[step : step + 1])
                except OSError:
                    closed_after[index] = time.monotonic() - started
            if stop.wait(3.0):
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    answered = tried = 0
    try:
        while time.monotonic() - started < 45:
            tried += 1
            answered += echo(node.port).returncode == 0
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started) % 1.0))
        thread.join(10)
    finally:
        stop.set()
        thread.join(10)
        for sock in tricklers:
            sock.close()
    print(f"C-ECHOs answered: {answered} of {tried}; tricklers closed after (s): {closed_after}")
    assert tried >= 20
    assert answered >= 0.9 * tried, f"{answered} of {tried} C-ECHOs answered"
    assert sorted(closed_after) == list(range(17)), f"still open: {closed_after}"
    # The node's acse_timeout_s is 30 s: nothing trickled past it (3 s steps, some slack).
    assert max(closed_after.values()) < 30 + 6, closed_after


def test_04_bare_connects_do_not_refuse_the_next_caller(node: NodeProcess) -> None:
    """16 TCP connections opened and closed at once hold no association slot.

    Closed connections stop counting among their address's pending ones when the node
    reads their end; on two shared cores that can come after the next connect, which is
    then closed by the per-address limit. So the caller tries again, at most 3 times in
    about a second: a slot held by a bare connect would refuse it for acse_timeout_s (30).
    """
    bare = [connect(node.port) for _ in range(16)]
    for sock in bare:
        sock.close()
    for _ in range(3):
        run = echo(node.port)
        if run.returncode == 0:
            break
        time.sleep(0.5)
    assert run.returncode == 0, run.stdout + run.stderr


def test_05_aborted_c_stores_leave_no_file(
    node: NodeProcess, tmp_path: Path, receive_path: bool
) -> None:
    """Six C-STOREs cut off after part of their data set (A-ABORT, close, reset), three
    on the node's direct path (the command in one fragment) and three on pynetdicom's
    (the command in two): nothing is left in incoming/ 3 s later."""
    if not receive_path:
        pytest.skip(STOCK_PATH_LEAVES_FILES)
    path = make_instance(tmp_path, rows=512, columns=512, patient_name="Leftover^Patient")
    data = dataset_bytes(path)
    command = store_command(path, 1)
    abort = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)
    seen_in_incoming = 0
    for split_command in (False, True):
        for ending_kind in ("abort", "close", "reset"):
            sock = associated(node.port)
            if split_command:
                sock.sendall(p_data_tf((1, 0x01, command[:20])))
                sock.sendall(p_data_tf((1, 0x03, command[20:])))
            else:
                sock.sendall(p_data_tf((1, 0x03, command)))
            for offset in range(0, 160_000, 16_000):
                sock.sendall(p_data_tf((1, 0x00, data[offset : offset + 16_000])))
            deadline = time.monotonic() + 5
            while not incoming_files(node) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_in_incoming += bool(incoming_files(node))
            if ending_kind == "abort":
                sock.sendall(abort)
            elif ending_kind == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    assert seen_in_incoming == 6  # each data set had reached the disk
    time.sleep(3)
    assert incoming_files(node) == []
    assert echo(node.port).returncode == 0


def test_06_a_data_set_cut_inside_its_study_uid_is_not_success(
    node: NodeProcess, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.9.7433.24.1"
    path = make_instance(tmp_path, study_uid=study, modality="DX")
    raw = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: raw.index(study.encode()) + 1])  # ends one byte into the UID
    status = pynetdicom_store(cut, node.port)
    assert 0xC210 <= status <= 0xC2FF, hex(status)
    assert not any(uid in ("1", study) for uid in node.studies())
    assert f"0x{status:04X}" in node.log() and "cut short" in node.log()


def test_07_a_wrong_called_ae_title_is_rejected(node: NodeProcess) -> None:
    run = echo(node.port, called="NOTTHENODE")
    assert run.returncode != 0
    assert "called AE title 'NOTTHENODE' is not this node's" in node.log()
    assert echo(node.port).returncode == 0


def test_08_a_radiograph_is_stored_after(node: NodeProcess, tmp_path: Path) -> None:
    _store_radiograph(node, tmp_path)
    assert node.proc is not None and node.proc.poll() is None
    assert "Leftover" not in node.log()


# --- supervisor death --------------------------------------------------------------------


def test_no_worker_outlives_a_sigkilled_serve(tmp_path: Path) -> None:
    """While the worker loads its models (120 s here): SIGTERM alone stops serve and the
    worker within seconds; SIGTERM then SIGKILL 1 s later (a supervisor's escalation),
    or SIGKILL alone, leaves no process behind 5 s later."""
    port = free_port()
    config = write_config(
        tmp_path, port, worker={"processes": 1, "pipeline": "fixture_pipelines:slow"}
    )
    for how in ("term", "term-then-kill", "kill"):
        log = (tmp_path / f"serve-{how}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=node_env({"DICOMNODE_TEST_LOAD_DELAY_S": "120"}),
        )
        try:
            deadline = time.monotonic() + 60
            while not spawned_pids(proc.pid):
                assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
                time.sleep(0.1)
            time.sleep(3)  # the worker is loading
            workers = spawned_pids(proc.pid)
            everything = descendant_pids(proc.pid)
            assert workers and all(process_running(pid) for pid in workers)
            if how == "term":
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
            else:
                if how == "term-then-kill":
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(1)
                proc.kill()
                proc.wait(10)
            deadline = time.monotonic() + 5
            while any(process_running(pid) for pid in everything):
                assert time.monotonic() < deadline, (how, everything)
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()


def test_a_pdu_that_trickles_is_cut_off_on_both_receive_paths(
    tmp_path: Path, receive_path: bool
) -> None:
    """On an accepted association a PDU must be complete within network_timeout_s of its
    first byte, however often bytes arrive: inside a data set on the node's direct path
    (the command in one fragment) and on pynetdicom's (the command in two); the
    connection is closed, its partial file removed, and the node keeps serving.
    With ``receive.fast_path = false`` the guard cuts the PDU off the same way; only the
    partial file stays (:data:`STOCK_PATH_LEAVES_FILES`), so that is checked on the fast
    path only."""
    path = make_instance(tmp_path / "in")
    data = dataset_bytes(path)
    command = store_command(path, 1)
    with running_node(tmp_path / "node", receive={"network_timeout_s": 3}) as node:
        for split_command in (False, True):
            sock = associated(node.port)
            if split_command:
                sock.sendall(p_data_tf((1, 0x01, command[:20])))
                sock.sendall(p_data_tf((1, 0x03, command[20:])))
            else:
                sock.sendall(p_data_tf((1, 0x03, command)))
            sock.sendall(p_data_tf((1, 0x00, data[:4000])))
            fragment = p_data_tf((1, 0x02, data[4000:]))
            started = time.monotonic()
            closed_after = None
            for index in range(30):  # one byte every 0.4 s: 12 s at most
                try:
                    sock.send(fragment[index : index + 1])
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.4)
            sock.close()
            assert closed_after is not None and closed_after < 3 + 2, closed_after
        assert "a PDU was not complete within receive.network_timeout_s" in node.log()
        time.sleep(1)
        if receive_path:
            assert incoming_files(node) == []
        assert echo(node.port).returncode == 0
