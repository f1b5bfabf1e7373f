"""Dropping privileges in a child, after it entered the instance namespace.

`subprocess.Popen(user=...)` changes the uid before `preexec_fn` runs, and a process
that is no longer root cannot `setns`. So, in this order: enter the namespace,
optionally start a new session, drop the capability bounding set, set the groups, the
gid, the uid, then `PR_SET_NO_NEW_PRIVS` (setuid and file-capability binaries then give
nothing) and, for the proxy, a parent-death signal (set last: a credential change clears it).
"""

from __future__ import annotations

import ctypes
import os
import signal

from . import netns, sandbox

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def set_pdeathsig() -> None:
    """SIGKILL when the parent ends (cleared by any later credential change)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def enter_and_drop(
    netns_name: str,
    uid: int,
    gid: int,
    groups: list[int],
    *,
    new_session: bool = False,
    pdeathsig: bool = False,
    confine: bool = False,
) -> None:
    """For `preexec_fn`: any exception aborts the exec, so a half-dropped child never runs.

    `confine` (the agent): a mount namespace hiding host sockets, and a seccomp filter
    against user namespaces (sandbox.py)."""
    netns.enter(netns_name)
    if confine:
        sandbox.hide_host_sockets()
    if new_session:
        os.setsid()
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(_last_cap() + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if confine:
        sandbox.deny_user_namespaces()
    if pdeathsig:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
