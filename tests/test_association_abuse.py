"""Association-level abuse against the in-process node over loopback: a silent peer, a
trickling peer, HTTP and TLS bytes on the plain port, PDUs declaring up to 4 GiB. Each
connection must be dropped within its bound, without the node reading or allocating
what was declared, and the node must go on answering (a C-ECHO after each)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import evt

from dicom_node.node import Node
from dicom_node.scp import MIN_PDU_READ, pdu_limit

from dicom_factory import chest_image
from helpers.dimse import associate, scu
from helpers.environment import NODE_AE, wait_until

NodeFactory = Callable[..., Node]

#: PDU types of PS3.8 9.3: A-ASSOCIATE-RQ, P-DATA-TF.
ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04


def header(pdu_type: int, length: int) -> bytes:
    """A PDU's type, reserved byte and length (PS3.8 9.3.1)."""
    return struct.pack(">BBL", pdu_type, 0, length)


def connect(node: Node) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.settings.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the node closed ``sock`` within ``seconds``, and what it sent before."""
    received = bytearray()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, bytes(received)
        except ConnectionError:
            return True, bytes(received)
        if not chunk:
            return True, bytes(received)
        received += chunk
    return False, bytes(received)


def still_answers(node: Node) -> None:
    assoc = associate(node.settings.port, [])
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_a_silent_peer_is_dropped_after_the_acse_timeout(make_node: NodeFactory) -> None:
    node = make_node(acse_timeout=1.0)
    with connect(node) as sock:
        closed, _ = closed_within(sock, 10)
    assert closed
    still_answers(node)


def test_a_peer_trickling_a_pdu_is_dropped_after_the_network_timeout(
        make_node: NodeFactory) -> None:
    """One byte every 0.3 s of a 200-byte A-ASSOCIATE-RQ: every single read is well
    within any timeout, so only a deadline on the whole PDU ends it."""
    node = make_node(network_timeout=2.0)
    with connect(node) as sock:
        sock.sendall(header(ASSOCIATE_RQ, 200))
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 12:
            try:
                sock.sendall(b"\x00")
            except ConnectionError:
                closed = True
                break
            closed, _ = closed_within(sock, 0.3)
        elapsed = time.monotonic() - started
    assert closed and elapsed < 8, elapsed
    still_answers(node)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n",
    # A TLS 1.2 ClientHello record (handshake 0x16, version 3.1, 512 bytes of body).
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(506),
], ids=["http", "tls"])
def test_http_or_tls_bytes_on_the_plain_port_are_aborted(make_node: NodeFactory,
                                                         garbage: bytes) -> None:
    """Answered with an A-ABORT (unrecognised PDU) and closed at once. (pynetdicom
    alone answers an A-ABORT per six bytes and then leaves the connection open, well
    past the ARTIM timer.)"""
    node = make_node()
    with connect(node) as sock:
        sock.sendall(garbage)
        closed, answer = closed_within(sock, 5)
    assert closed
    abort = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x01"
    assert answer.startswith(abort)
    assert len(answer) % 10 == 0 and all(answer[i] == 0x07 for i in range(0, len(answer), 10))
    still_answers(node)


def test_an_associate_request_declaring_4_gib_is_refused_unread(
        make_node: NodeFactory) -> None:
    """The node closes the connection on the header: it neither reads the 32 MiB the
    peer then pushes nor waits for the rest of the 4 GiB."""
    node = make_node()
    pushed = 0
    with connect(node) as sock:
        sock.sendall(header(ASSOCIATE_RQ, 0xFFFFFFF0))

        def push() -> None:
            nonlocal pushed
            chunk = bytes(2**20)
            try:
                for _ in range(32):
                    sock.sendall(chunk)
                    pushed += len(chunk)
            except OSError:
                pass

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        closed, _ = closed_within(sock, 10)
        with contextlib.suppress(OSError):  # already closed by the node
            sock.shutdown(socket.SHUT_RDWR)
        pusher.join(timeout=30)
    assert closed
    assert pushed < 32 * 2**20  # the node stopped reading
    still_answers(node)


@pytest.mark.parametrize("over", [None, 1], ids=["4GiB", "limit+1"])
def test_a_p_data_pdu_over_the_limit_ends_its_association_only(make_node: NodeFactory,
                                                               over: int | None) -> None:
    """A peer inside an established association declaring a P-DATA-TF PDU of 4 GiB, or
    one byte over the limit: the association is dropped, the node answers others."""
    node = make_node()
    limit = pdu_limit(node.settings)
    assert limit == max(node.settings.max_pdu_size, MIN_PDU_READ)
    declared = 0xFFFFFFF0 if over is None else limit + over
    ended = threading.Event()
    assoc = associate(node.settings.port, [chest_image()],
                      evt_handlers=[(evt.EVT_ABORTED, lambda _e: ended.set()),
                                    (evt.EVT_CONN_CLOSE, lambda _e: ended.set())])
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    transport.socket.sendall(header(P_DATA_TF, declared) + bytes(4096))
    try:
        # Well within our own side's network timeout (10 s), which would end it too.
        wait_until(lambda: ended.is_set() or not assoc.is_established, timeout=4)
    finally:
        assoc.abort()
    still_answers(node)


def test_max_associations_plus_five_senders_extras_refused_accepted_complete(
        make_node: NodeFactory) -> None:
    """``max_associations = 3``: three senders hold their associations open while five
    more try at once; the five get A-ASSOCIATE-RJ (no hang, no failure), the three then
    store their images. (The three connect one after the other: pynetdicom counts
    acceptors still negotiating, so a burst of eight at once may see fewer than three
    accepted.)"""
    node = make_node(max_associations=3)
    per_sender = 2
    datasets = [[chest_image(seed=10 * k + i) for i in range(per_sender)] for k in range(3)]
    held = [associate(node.settings.port, images) for images in datasets]
    assert all(assoc.is_established for assoc in held)
    answers: list[str] = []

    def extra() -> None:
        assoc = associate(node.settings.port, [chest_image()])
        answers.append("rejected" if assoc.is_rejected else
                       "established" if assoc.is_established else "failed")
        if assoc.is_established:
            assoc.release()

    extras = [threading.Thread(target=extra) for _ in range(5)]
    for thread in extras:
        thread.start()
    for thread in extras:
        thread.join(timeout=60)
    assert answers == ["rejected"] * 5
    for assoc, images in zip(held, datasets, strict=True):
        assert [int(assoc.send_c_store(ds).Status) for ds in images] == [0] * per_sender
        assoc.release()
    assert node.store.counts() == {"queued": 3 * per_sender}
    still_answers(node)


def _resources() -> tuple[int, int, int]:
    """This process's resident memory (KiB), open file descriptors and threads."""
    status = Path("/proc/self/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines()
                   if line.startswith("VmRSS:")))
    return rss, len(os.listdir("/proc/self/fd")), threading.active_count()


def _cycles(node: Node, count: int) -> None:
    ae = scu()
    ae.add_requested_context("1.2.840.10008.1.1")
    for _ in range(count):
        assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE)
        assert assoc.is_established
        assoc.release()


def _flat_after_cycles(make_node: NodeFactory, count: int) -> None:
    node = make_node(max_associations=2)
    server = node.scp._server
    assert server is not None
    _cycles(node, 50)  # warm: imports, caches, the first threads
    wait_until(lambda: not server.active_associations, timeout=30)
    before = _resources()
    _cycles(node, count)
    wait_until(lambda: not server.active_associations, timeout=30)
    time.sleep(0.5)
    after = _resources()
    # A leak per association would show as hundreds of descriptors or threads; pools the
    # node starts lazily (the scheduler's executor, SQLite connections) add a few once.
    assert after[0] - before[0] < 20 * 1024, (before, after)  # RSS: under 20 MiB more
    assert after[1] - before[1] <= 4, (before, after)  # descriptors
    assert after[2] - before[2] <= 2, (before, after)  # threads
    still_answers(node)


def test_associate_release_cycles_leave_memory_descriptors_and_threads_flat(
        make_node: NodeFactory) -> None:
    _flat_after_cycles(make_node, 200)


@pytest.mark.long
def test_two_thousand_associate_release_cycles_stay_flat(make_node: NodeFactory) -> None:
    _flat_after_cycles(make_node, 2000)
