"""The conversation between `run` and the resident helper (helperproto.py)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from panopticond import helperproto as proto


def _req(**kw) -> proto.RunRequest:
    base = dict(config="/etc/panopticon/config.toml", agent=None, allow=("a.example",),
                deny=(), mode=None, user="nobody", log=None, command=("true",),
                env={"K": "v"}, environ={"SUDO_UID": "1000"}, verbose=2, pid=42)
    return proto.RunRequest(**{**base, **kw})


def test_a_request_survives_the_wire_unchanged():
    a, b = socket.socketpair()
    with a, b:
        proto.send(a, {"run": _req().to_json()})
        msg = proto.recv(b)
    assert proto.RunRequest.from_json(msg["run"]) == _req()


def test_unknown_request_fields_are_refused():
    doc = {**_req().to_json(), "netns": "/proc/1/ns/net"}
    with pytest.raises(ValueError, match="netns"):
        proto.RunRequest.from_json(doc)


def test_eof_is_none_and_a_cut_message_too():
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack(">I", 10) + b'{"x"')
        a.close()
        assert proto.recv(b) is None
    a, b = socket.socketpair()
    with b:
        a.close()
        assert proto.recv(b) is None


def test_oversized_and_malformed_messages_are_protocol_errors():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", proto.MAX_MESSAGE + 1))
        with pytest.raises(proto.ProtocolError):
            proto.recv(b)
    a, b = socket.socketpair()
    with a, b:
        data = b'{"a": 1, "b": 2}'
        a.sendall(struct.pack(">I", len(data)) + data)
        with pytest.raises(proto.ProtocolError):
            proto.recv(b)


def test_a_descriptor_crosses_the_socket():
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b:
        proto.send_fd(a, w)
        got = proto.recv_fd(b)
    os.write(got, b"x")
    assert os.read(r, 1) == b"x"
    for fd in (r, w, got):
        os.close(fd)


def test_the_socket_path_comes_from_the_environment():
    assert proto.socket_path({}) == proto.DEFAULT_SOCKET
    assert proto.socket_path({proto.ENV: "/tmp/x.sock"}) == "/tmp/x.sock"
    for off in ("off", "OFF", "0", "no"):
        assert proto.socket_path({proto.ENV: off}) is None
