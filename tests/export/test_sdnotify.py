"""sd_notify against a real AF_UNIX datagram socket, as systemd would listen on it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitfed import sdnotify


def _receive(sock: socket.socket, timeout: float = 2.0) -> list[bytes]:
    """All datagrams that arrive until `timeout` passes without one."""
    sock.settimeout(timeout)
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except TimeoutError:
            return out
        sock.settimeout(0.2)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_and_stopping_reach_the_socket(listener: socket.socket) -> None:
    assert sdnotify.notify("READY=1")
    assert sdnotify.notify("STATUS=round 3\nWATCHDOG=1")
    assert sdnotify.notify("STOPPING=1")
    assert _receive(listener, 1.0) == [b"READY=1", b"STATUS=round 3\nWATCHDOG=1", b"STOPPING=1"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"splitfed-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert _receive(sock, 1.0) == [b"READY=1"]
    finally:
        sock.close()


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))  # nobody listens
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("abc", "0", "-5"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


def test_watchdog_pings_are_rate_limited(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "600000000")  # ping every 300 s
    dog = sdnotify.Watchdog()
    assert dog.enabled and dog.interval == 300.0
    assert dog.ping() is True
    assert dog.ping() is False  # too soon
    assert _receive(listener, 0.5) == [b"WATCHDOG=1"]


def test_watchdog_thread_pings_only_while_healthy(listener: socket.socket) -> None:
    healthy = True
    dog = sdnotify.Watchdog(interval=0.05)
    dog.start(lambda: healthy)
    try:
        listener.settimeout(2.0)
        assert [listener.recv(64) for _ in range(3)] == [b"WATCHDOG=1"] * 3
        healthy = False
        time.sleep(0.2)  # a ping already under way may still arrive; drain it
        _receive(listener, 0.2)
        assert _receive(listener, 0.5) == []
    finally:
        dog.stop()


def test_watchdog_disabled_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = sdnotify.Watchdog()
    assert not dog.enabled
    assert dog.ping() is False
    dog.start()  # no thread, no error
    dog.stop()
