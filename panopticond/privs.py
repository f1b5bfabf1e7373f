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
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_NET_BIND_SERVICE = 10
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capset(caps: tuple[int, ...]) -> None:
    """This thread's effective, permitted and inheritable sets: exactly `caps`."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in caps:
        bit = 1 << (cap % 32)
        data[cap // 32].effective |= bit
        data[cap // 32].permitted |= bit
        data[cap // 32].inheritable |= bit
    if _libc.capset(ctypes.byref(header), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


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
    keep_caps: tuple[int, ...] = (),
) -> None:
    """For `preexec_fn`: any exception aborts the exec, so a half-dropped child never runs.

    `confine` (the agent): a mount namespace hiding host sockets, and a seccomp filter
    against user namespaces (sandbox.py). `keep_caps` (the proxy: CAP_NET_BIND_SERVICE,
    for its ports below 1024, which the agent cannot take): kept in the bounding set,
    effective after the uid change, and ambient, so that they survive an exec; every
    other capability goes as for the agent."""
    netns.enter(netns_name)
    if confine:
        sandbox.hide_host_sockets()
    if new_session:
        os.setsid()
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(_last_cap() + 1):
        if cap not in keep_caps:
            _prctl(PR_CAPBSET_DROP, cap)
    if keep_caps:
        _prctl(PR_SET_KEEPCAPS, 1)  # the permitted set survives the uid change
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_caps:
        _capset(keep_caps)
        for cap in keep_caps:
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
        _prctl(PR_SET_KEEPCAPS, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if confine:
        sandbox.deny_user_namespaces()
    if pdeathsig:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
