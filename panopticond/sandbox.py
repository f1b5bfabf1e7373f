"""What the agent may not do besides networking: create user namespaces, or reach
the host's Unix sockets.

Both are applied in the agent's child, as root, just before the privilege drop (see
privs.py); any failure aborts the launch (fail closed).

User namespaces (threat 7): a seccomp filter makes `unshare` and `clone` with
CLONE_NEWUSER fail with EPERM, and `clone3` (whose flags live in memory a filter cannot
read) fail with ENOSYS, so libc falls back to `clone`. Syscalls of a foreign ABI (i386,
x32 on x86_64) fail with EPERM: a filter written for one ABI's numbers says nothing
about another's.

Unix sockets (threat 11): a network namespace does not cover path-named Unix sockets,
so the agent gets a mount namespace of its own in which the directories and sockets of
host daemons (systemd and its resolver, D-Bus, the user's own bus and systemd manager
in /run/user, which could start processes outside the jail, nscd, container runtimes)
are covered by empty read-only tmpfs or /dev/null. Abstract sockets belong to the
network namespace and are already out of reach.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Directories covered by an empty tmpfs, and sockets covered by /dev/null, when they
# exist. /var/run is a link to /run on current systems; both are listed for older ones.
HIDDEN_DIRS = (
    "/run/systemd", "/run/dbus", "/run/user", "/run/nscd", "/run/docker", "/run/containerd",
    "/run/podman", "/run/crio", "/run/libvirt", "/run/lxd", "/run/incus", "/run/snapd",
    "/run/avahi-daemon", "/run/cups", "/run/sshd", "/run/screen", "/run/tmux",
    "/var/run/nscd", "/var/run/dbus", "/var/lib/lxd", "/var/snap/lxd/common/lxd",
    "/tmp/.X11-unix", "/tmp/tmux-0",
)
_RESOLV = "# panopticon: DNS is answered by the jail\nnameserver 127.0.0.53\n"
KEPT_FILES = {
    "/run/systemd": {"resolve/stub-resolv.conf": _RESOLV, "resolve/resolv.conf": _RESOLV},
}
HIDDEN_FILES = (
    "/run/docker.sock", "/var/run/docker.sock", "/run/snapd.socket", "/run/snapd-snap.socket",
    "/run/podman/podman.sock", "/run/containerd/containerd.sock",
)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None),
           f"mount {target}")


def hide_host_sockets() -> None:
    """In the calling process (root): a private mount namespace with host sockets hidden."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing we mount propagates back to the host.
    _mount("none", "/", None, MS_REC | MS_SLAVE)
    for d in HIDDEN_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            _mount("tmpfs", d, "tmpfs", flags, "size=16k,mode=0755")
            for rel, text in KEPT_FILES.get(d, {}).items():
                # /etc/resolv.conf is often a link into /run/systemd/resolve: keep a
                # resolver there (any address works: the jail redirects port 53).
                path = os.path.join(d, rel)
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
                os.chmod(path, 0o644)
            _mount("none", d, None, MS_REMOUNT | MS_RDONLY | flags)
    for f in HIDDEN_FILES:
        if os.path.exists(f) and not os.path.isdir(f) and not os.path.islink(f):
            _mount("/dev/null", f, None, MS_BIND)


# -- seccomp ---------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {  # unshare, clone, clone3
    "x86_64": (272, 56, 435),
    "aarch64": (97, 220, 435),
}
X32_BIT = 0x40000000

BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_JEQ, BPF_JGE, BPF_JSET = 0x10, 0x30, 0x40
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes:
    """The BPF program (pure, so it is tested without loading it)."""
    m = machine or platform.machine()
    if m not in AUDIT_ARCH:
        raise OSError(0, f"no seccomp filter for {m}: cannot keep the agent from user namespaces")
    unshare, clone, clone3 = SYSCALLS[m]
    ld_arch = _stmt(BPF_LD | BPF_W | BPF_ABS, 4)
    ld_nr = _stmt(BPF_LD | BPF_W | BPF_ABS, 0)
    ld_arg0 = _stmt(BPF_LD | BPF_W | BPF_ABS, 16)  # low word of args[0] (little endian)
    allow = _stmt(BPF_RET | BPF_K, RET_ALLOW)
    eperm = _stmt(BPF_RET | BPF_K, RET_ERRNO | EPERM)
    enosys = _stmt(BPF_RET | BPF_K, RET_ERRNO | ENOSYS)
    prog = [
        ld_arch,                                                   # 0
        _jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH[m], 1, 0),     # 1
        eperm,                                                     # 2 foreign ABI
        ld_nr,                                                     # 3
        _jump(BPF_JMP | BPF_JGE | BPF_K, X32_BIT, 0, 1),           # 4
        eperm,                                                     # 5 x32
        _jump(BPF_JMP | BPF_JEQ | BPF_K, clone3, 0, 1),            # 6
        enosys,                                                    # 7
        _jump(BPF_JMP | BPF_JEQ | BPF_K, unshare, 1, 0),           # 8
        _jump(BPF_JMP | BPF_JEQ | BPF_K, clone, 0, 3),             # 9
        ld_arg0,                                                   # 10
        _jump(BPF_JMP | BPF_JSET | BPF_K, CLONE_NEWUSER, 0, 1),    # 11
        eperm,                                                     # 12
        allow,                                                     # 13
    ]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def deny_user_namespaces() -> None:
    """Load the filter into the calling process; no_new_privs must be set already."""
    prog = filter_program()
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                       ctypes.byref(fprog), 0, 0), "seccomp")
