"""Readiness for systemd's Type=notify, through python3-systemd, to a real notify socket."""

from __future__ import annotations

import socket

import pytest

from mrsyncd.daemon import readiness


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield listener
    listener.close()


def test_ready_and_status_reach_systemd(notify_socket):
    assert readiness.notify(ready=True, status="listening on 10.0.0.1 port 7718")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=listening on 10.0.0.1 port 7718"
    assert readiness.notify(stopping=True)
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_a_status_is_one_line(notify_socket):
    readiness.notify(status="waiting\nfor the master")
    assert notify_socket.recv(4096) == b"STATUS=waiting for the master"


def test_outside_systemd_nothing_is_sent(notify_socket, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not readiness.notify(ready=True)
    notify_socket.settimeout(0.1)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_without_python3_systemd_it_says_why_once(notify_socket, monkeypatch):
    """Type=notify with the library missing would time the unit out: the journal must say why."""
    monkeypatch.setattr(readiness, "systemd_daemon", None)
    monkeypatch.setattr(readiness, "_warned", False)
    logged = []
    monkeypatch.setattr(readiness.log, "error", logged.append)
    assert not readiness.notify(ready=True)
    assert not readiness.notify(ready=True)
    assert len(logged) == 1 and "python3-systemd is missing" in logged[0]
