"""free_port() hands out ports the kernel never gives a port-0 bind, and never the same one twice."""

from __future__ import annotations

import socket

import pytest

from testkit.procs import _PortCursor, ephemeral_range, free_port, port_accepts, port_pool


def test_free_port_is_outside_the_ephemeral_range() -> None:
    """No port free_port() returns can meanwhile go to an in-process server bound to port 0 (or a client socket)."""
    low, high = ephemeral_range()
    if port_pool((low, high)) is None:
        pytest.skip(f"ephemeral range {low}-{high} leaves no room for a pool")
    ports = [free_port() for _ in range(50)]
    assert not [p for p in ports if low <= p <= high]
    assert not [p for p in ports if port_accepts("127.0.0.1", p)]


def test_free_port_never_repeats_in_a_process() -> None:
    """A port once given (say to a server a test later killed) is not given again to another server."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_free_port_skips_a_port_in_use() -> None:
    """A port someone holds is passed over."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        cursor = _PortCursor(range(port, port + 1200), pid=0)
        assert cursor.take("127.0.0.1") != port


def test_pool_is_outside_any_ephemeral_range() -> None:
    """Above the range when there is room there, else below it (from 10000); none when the range covers it all."""
    assert port_pool((32768, 60999)) == range(61000, 65536)
    assert port_pool((49152, 65535)) == range(10000, 49152)
    assert port_pool((1024, 65535)) is None


def test_without_a_pool_the_kernel_picks() -> None:
    """An ephemeral range covering everything falls back to a kernel-chosen port (still bindable)."""
    cursor = _PortCursor(None, pid=123)
    port = cursor.take("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_processes_start_at_different_offsets() -> None:
    """Concurrent test processes (different pids) walk the pool from different places."""
    pool = range(61000, 65536)
    starts = {_PortCursor(pool, pid=pid).take("127.0.0.1") for pid in range(1000, 1010)}
    assert len(starts) == 10
