"""How `panopticon run` and the resident helper (helper.py) talk: where the helper's
socket is, the run request, and the framing of messages on the connection.

Imported by every `run`: light on purpose (no config, no pyroute2, no mitmproxy).

The conversation, on one Unix stream connection (root's alone: 0600, and the helper
checks SO_PEERCRED):

    client -> helper   one byte carrying the client's stderr (SCM_RIGHTS): the jail's
                       messages (-v, errors) are written where the client's would be
    client -> helper   {"run": RunRequest}
    helper -> client   {"ready": {...}} or {"error": {"message", "hint", "status"}}
    client -> helper   {"done": exit status}     once the agent has exited
    helper -> client   {"stopped": {}}           once everything is torn down

The connection is the jail's lifeline: when it ends early (the client was killed), the
helper tears the jail down, agent included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from typing import Any

DEFAULT_SOCKET = "/run/panopticon/helper.sock"
ENV = "PANOPTICON_HELPER"  # a socket path, or "off"
MAX_MESSAGE = 4 << 20


def socket_path(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The helper's socket, or None when the helper is switched off."""
    value = environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "no", "none"):
        return None
    return value or DEFAULT_SOCKET


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """Everything `run` decides before a jail is built; the same for both paths (cold
    in the client, or in a process the helper forked)."""

    config: str | None
    agent: str | None
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    mode: str | None
    user: str | None
    log: str | None
    command: tuple[str, ...]
    env: dict[str, str]  # --env, resolved
    environ: dict[str, str]  # what the jail needs of the caller's (agent.caller_env)
    verbose: int = 0
    pid: int = 0  # the caller's: an ad-hoc run is named run-PID

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunRequest:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - fields
        if unknown:
            raise ValueError(f"unknown fields in a run request: {sorted(unknown)}")
        doc = dict(doc)
        for k in ("allow", "deny", "command"):
            doc[k] = tuple(doc.get(k) or ())
        return cls(**doc)


class ProtocolError(Exception):
    pass


def send(sock: socket.socket, msg: dict[str, Any]) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at EOF (the other side is gone)."""
    head = _read(sock, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"message of {n} bytes")
    body = _read(sock, n)
    if body is None:
        return None
    msg = json.loads(body)
    if not isinstance(msg, dict) or len(msg) != 1:
        raise ProtocolError("a message is an object with one key")
    return msg


def _read(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def send_fd(sock: socket.socket, fd: int) -> None:
    socket.send_fds(sock, [b"F"], [fd])


def recv_fd(sock: socket.socket) -> int:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    if data != b"F" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("expected one descriptor")
    return fds[0]
