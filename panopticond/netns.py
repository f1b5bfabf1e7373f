"""The instance's network namespace, veth pair, addresses, routes and sysctls (pyroute2).

    host namespace                              instance namespace (panopticon-NAME)
    ┌──────────────────────────┐                ┌─────────────────────────────────────┐
    │ uplink ── forward/masq ──┤ pnhTAG ══ veth ══ pnjTAG  10.231.x.2/29, fd7a:...::2 │
    │ 10.231.x.1/29, ...::1    │                │ lo: mitmdump 127.0.0.1/::1 :901     │
    └──────────────────────────┘                │     dns 127.0.0.1/::1 :953          │
                                                │ agent (own uid, no caps)            │
                                                └─────────────────────────────────────┘

Everything here has an idempotent undo (`delete`). The namespace is created with no
interface but `lo`; the caller installs the DROP rules before `connect()` gives it a route.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import time

from .errors import PanopticonError
from .plan import Addressing, Names

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def IPRoute(*args, **kwargs):  # noqa: N802 - stands for pyroute2's class
    # `import pyroute2` costs 0.15-0.3 s (its __init__ loads ndb, ipdb and conntrack):
    # paid only by what talks netlink, never by `enter` (the agent's launch).
    from pyroute2 import IPRoute as _IPRoute

    return _IPRoute(*args, **kwargs)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def enter(name: str) -> None:
    """Move the calling process (or a child in preexec) into an existing netns; never creates one."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({name}): {os.strerror(e)}")
    finally:
        os.close(fd)


def host_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of every interface of this namespace (the host's, for the daemon)."""
    out: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, None] = {}
    with IPRoute() as ipr:
        for fam in (2, 10):
            for a in ipr.get_addr(family=fam):
                for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                    addr = a.get_attr(attr)
                    if addr:
                        out[ipaddress.ip_address(addr.split("%", 1)[0])] = None
    return list(out)


def host_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every network that a route or an address of this namespace covers.

    Default routes are skipped (they cover everything); a subnet from the pool must
    only avoid what is routed more specifically than that.
    """
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    with IPRoute() as ipr:
        for fam in (2, 10):
            for r in ipr.get_routes(family=fam, table=254) + ipr.get_routes(family=fam, table=255):
                dst = r.get_attr("RTA_DST")
                if dst is None or r["dst_len"] == 0:
                    continue
                nets.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
            for a in ipr.get_addr(family=fam):
                addr = a.get_attr("IFA_ADDRESS")
                if addr:
                    nets.append(ipaddress.ip_network(f"{addr}/{a['prefixlen']}", strict=False))
    return nets


def create(names: Names) -> None:
    """Create the namespace with only `lo` up. Fails if it exists (clean up first).

    Made by this thread (unshare, bind mount, back home), as `ip netns add` does;
    pyroute2's `netns.create` forks a child for it (~30 ms).
    """
    if exists(names.netns):
        raise PanopticonError(
            f"network namespace {names.netns} already exists",
            hint=f"run 'panopticon cleanup {names.instance}'",
        )
    from pyroute2 import netns as pr_netns

    try:
        with _home_after():
            if _libc.unshare(CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"unshare: {os.strerror(e)}")
            # What `ip netns add` does next (pyroute2's steps): /run/netns made a shared
            # mount, the mount point, the bind mount of this thread's new namespace.
            pr_netns.attach(names.netns, "thread-self")
            with IPRoute() as ipr:  # opened in the new namespace
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except Exception as e:
        if not isinstance(e, FileExistsError):  # someone else's, made since exists()
            with contextlib.suppress(OSError):
                pr_netns.remove(names.netns)
        raise PanopticonError(f"cannot create network namespace {names.netns}: {e}") from e


@contextlib.contextmanager
def _home_after():
    """Whatever the body does to this thread's network namespace is undone after it."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield
    finally:
        try:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                # A thread stranded in a jail must not go on working as if at home.
                raise SystemExit(f"panopticon: cannot return to the host namespace: "
                                 f"{os.strerror(e)}")
        finally:
            os.close(home)


@contextlib.contextmanager
def in_netns(name: str):
    """An IPRoute socket in namespace `name`, opened by this thread (setns, open, back):
    pyroute2's `IPRoute(netns=...)` forks a child to open it."""
    with _home_after():
        enter(name)
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _sysctl_in(name: str, key: str, value: str) -> None:
    """/proc/sys/net shows the namespace of the thread that opens it."""
    with _home_after():
        enter(name)
        fd = os.open(f"/proc/sys/{key}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def connect(names: Names, addr: Addressing) -> None:
    """veth pair, addresses and routes, both ends; forwarding on the host side.

    Must run in the host namespace. IPv6 addresses are added with IFA_F_NODAD: with
    duplicate address detection they stay unusable for 1-2 s.
    """
    with IPRoute() as ipr:
        ipr.link("add", ifname=names.veth_host, kind="veth", peer={"ifname": names.veth_jail})
        host_idx = ipr.link_lookup(ifname=names.veth_host)[0]
        jail_idx = ipr.link_lookup(ifname=names.veth_jail)[0]
        if addr.v6_subnet is None:
            # No IPv6 for the agent: not even a link-local address on its side.
            pass
        else:
            # The link-local addresses get DAD too, and until the jail's completes
            # (1-2 s) it answers no neighbour solicitation: nothing from the host reaches
            # it (inbound routes). An interface moved into a namespace takes that
            # namespace's defaults, so the jail's default is set before the move.
            _sysctl_in(names.netns, "net/ipv6/conf/default/accept_dad", "0")
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{names.veth_host}/accept_dad", "0")
        ipr.link("set", index=jail_idx, net_ns_fd=names.netns)
        ipr.addr("add", index=host_idx, address=str(addr.v4_host), prefixlen=addr.v4_subnet.prefixlen)
        if addr.v6_subnet is not None:
            ipr.addr(
                "add", index=host_idx, address=str(addr.v6_host),
                prefixlen=addr.v6_subnet.prefixlen, flags=IFA_F_NODAD,
            )
        ipr.link("set", index=host_idx, state="up")
    # Forwarding is a namespace-wide switch on the host side; the per-instance FORWARD
    # chain decides what actually passes.
    _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    if addr.v6_subnet is not None:
        _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")

    with in_netns(names.netns) as ipr:
        idx = ipr.link_lookup(ifname=names.veth_jail)[0]
        if addr.v6_subnet is None:
            _sysctl_in(names.netns, "net/ipv6/conf/all/disable_ipv6", "1")
            _sysctl_in(names.netns, "net/ipv6/conf/default/disable_ipv6", "1")
        ipr.addr("add", index=idx, address=str(addr.v4_jail), prefixlen=addr.v4_subnet.prefixlen)
        if addr.v6_subnet is not None:
            ipr.addr(
                "add", index=idx, address=str(addr.v6_jail),
                prefixlen=addr.v6_subnet.prefixlen, flags=IFA_F_NODAD,
            )
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(addr.v4_host))
        if addr.v6_subnet is not None:
            ipr.route("add", dst="::/0", gateway=str(addr.v6_host), family=10)


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is `name` (for cleanup of a killed run)."""
    try:
        st = os.stat(netns_path(name))
    except FileNotFoundError:
        return []
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def delete(names: Names) -> None:
    """Idempotent: delete the host-side veth, then the namespace.

    Namespace deletion is asynchronous in the kernel; deleting the veth explicitly makes
    its end (and routes through it) disappear at once.
    """
    from pyroute2 import netns as pr_netns
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=names.veth_host)
        if idx:
            try:
                ipr.link("del", index=idx[0])
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
    if exists(names.netns):
        try:
            pr_netns.remove(names.netns)
        except FileNotFoundError:
            pass


def wait_gone(names: Names, timeout: float = 2.0) -> bool:
    """True once nothing of `names` is visible (used by tests and cleanup)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=names.veth_host) and not exists(names.netns):
                return True
        time.sleep(0.05)
    return False
