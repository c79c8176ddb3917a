"""The loopback helpers the tests, the demo and the benchmarks start their peers with."""

from __future__ import annotations

import socket

from dicom_node.loopback import free_port, wait_for_port


def test_ports_asked_for_before_any_is_bound_are_all_different() -> None:
    """A peer asks for its HTTP and its DICOM port before it binds either: they must
    differ. The kernel draws a free port at random (two draws in a row were the same
    port 4 times in 100,000 here), so among 1,000 draws some repeat unless
    ``free_port`` remembers what it handed out."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


def test_a_handed_out_port_can_be_bound_and_waited_for() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        wait_for_port(port, timeout=5)
