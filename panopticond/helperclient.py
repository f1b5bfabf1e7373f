"""`panopticon run` through the resident helper (helper.py): the helper builds the jail,
this process runs the agent in it, as the cold path would, and then lets the helper
tear it down. See helperproto.py for the conversation.

No fallback once the helper has answered: an error it reports is the run's error (a
config mistake is one, wherever it is found). Only a helper that is not there (no
socket, or nobody listening on it) sends `run` down the cold path.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import time

from . import agent as agentmod
from . import helperproto as proto
from .errors import ExitStatus, PanopticonError

log = logging.getLogger("panopticon")

STOP_TIMEOUT = 60.0  # the teardown: the proxy's stop, the rules, the namespace


def connect(path: str) -> socket.socket | None:
    """A connection to the helper, or None if no helper listens at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            return None
        raise PanopticonError(f"cannot reach the resident helper at {path}: {e.strerror}",
                              hint="run as root, or pass --no-helper") from None
    return s


def run(path: str, req: proto.RunRequest) -> int | None:
    """Run `req` in a jail the helper builds; the agent's exit status, or None if there
    is no helper (the caller then takes the cold path)."""
    t0 = time.monotonic()
    sock = connect(path)
    if sock is None:
        return None
    with sock:
        try:
            proto.send_fd(sock, sys.stderr.fileno())
            proto.send(sock, {"run": req.to_json()})
            msg = proto.recv(sock)
        except (OSError, proto.ProtocolError) as e:
            raise _lost(path, f"{e}") from None
        if msg is None:
            raise _lost(path, "it closed the connection before the jail was ready")
        if "error" in msg:
            err = msg["error"]
            raise PanopticonError(err.get("message", "the helper failed"), hint=err.get("hint"),
                                  status=ExitStatus(err.get("status", int(ExitStatus.ERROR))))
        ready = msg.get("ready")
        if not isinstance(ready, dict):
            raise _lost(path, f"unexpected answer {sorted(msg)}")
        log.debug("helper: jail ready %.0f ms after connecting", (time.monotonic() - t0) * 1000)
        user = agentmod.AgentUser(**{**ready["user"], "groups": tuple(ready["user"]["groups"])})
        failure: BaseException | None = None
        rc = int(ExitStatus.ERROR)
        try:
            rc = agentmod.run(ready["netns"], user, ready["argv"], ready["env"])
        except BaseException as e:  # noqa: BLE001 - the jail is torn down first, then raised
            failure = e
        t1 = time.monotonic()
        try:
            proto.send(sock, {"done": rc})
            sock.settimeout(STOP_TIMEOUT)
            stopped = proto.recv(sock)
        except (OSError, proto.ProtocolError) as e:
            stopped = None
            log.warning("the helper's teardown did not report back: %s", e)
        log.debug("helper: torn down in %.0f ms", (time.monotonic() - t1) * 1000)
        if failure is not None:
            raise failure
        if stopped is not None and "error" in stopped:
            err = stopped["error"]
            raise PanopticonError(err.get("message", "the teardown failed"), hint=err.get("hint"),
                                  status=ExitStatus(err.get("status", int(ExitStatus.ERROR))))
        if stopped is None or "stopped" not in stopped:
            raise PanopticonError(
                "the resident helper did not confirm that the jail was torn down",
                hint=f"check with 'panopticon cleanup {ready['instance']}'")
    # The summary of the run was written by the helper, before it said "stopped".
    return rc


def _lost(path: str, why: str) -> PanopticonError:
    return PanopticonError(
        f"the resident helper at {path} failed: {why}",
        hint="see its log (journalctl -u panopticon-helper), or run with --no-helper")
