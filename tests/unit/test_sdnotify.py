"""sdnotify: the notification protocol spoken to a real datagram socket."""

from __future__ import annotations

import os
import socket

import pytest

from panopticond.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_without_a_socket_every_call_is_a_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False and n.watchdog() is False
    assert n.watchdog_interval() is None


def test_ready_and_status_arrive_as_one_datagram(listener):
    path, s = listener
    env = {"NOTIFY_SOCKET": path}
    n = Notifier(env)
    assert n.ready("up and\nrunning")
    assert s.recv(4096).decode() == "READY=1\nSTATUS=up and running"
    assert n.reloading()
    msg = s.recv(4096).decode().split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    n.stopping("bye")
    assert s.recv(4096).decode() == "STOPPING=1\nSTATUS=bye"
    n.close()


def test_the_variables_are_taken_out_of_the_environment(listener):
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    n = Notifier(env)
    assert env == {"OTHER": "kept"}  # the agent started later cannot speak for us
    assert n.watchdog_interval() == 30.0


def test_a_watchdog_meant_for_another_process_is_ignored(listener):
    path, _ = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval() is None


def test_abstract_socket_names(tmp_path):
    name = f"pnt-notify-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


def test_a_vanished_socket_is_not_an_error(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x") is False
