"""The lab: a simulated internet in two network namespaces, for tests and `panopticon demo`.

```
 pnl-<tag>-host  ("the host": the jail runs in here)    pnl-<tag>-net  ("the internet")
 ┌──────────────────────────────────────┐             ┌──────────────────────────────────────┐
 │ lo                                   │             │ lo: 198.51.100.10 ... 2001:db8:53::53 │
 │ pnl<tag>h 203.0.113.2/24             │── veth ─────│ pnl<tag>i 203.0.113.1/24              │
 │           2001:db8:ffff::2/64        │             │           2001:db8:ffff::1/64         │
 │ default via 203.0.113.1, ffff::1     │             │ python -m panopticond.lab.servers:    │
 │ ip_forward=1 (v4, v6)                │             │   http 80, https 443, dns 53,         │
 │ /etc/netns/pnl-<tag>-host/resolv.conf│             │   tcp/udp sinks -> events.jsonl       │
 └──────────────────────────────────────┘             └──────────────────────────────────────┘
```

Nothing here touches the real host's network: both namespaces are new, the veth is
created with its ends already inside them, and the internet namespace has no route
anywhere but back to the simulated host.

Every resource gets its undo pushed the moment it exists, so `close()` (or a creation
that fails halfway) removes exactly what this lab made. A lab whose owner died (a killed
test run) is found by its `pnl-` names and its owner file and removed by `cleanup_stale()`;
labs of live owners (another test session running at the same time) are left alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from panopticond.lab.capture import Capture

from panopticond.errors import ExitStatus, PanopticonError

ROUTER_V4, ROUTER_V6 = "203.0.113.1", "2001:db8:ffff::1"  # the internet side of the veth
HOST_V4, HOST_V6 = "203.0.113.2", "2001:db8:ffff::2"  # the simulated host's side
DNS_NAME = "ns.lab.example"

# The lab's DNS zone: name -> (IPv4, IPv6); either may be None. Copy it to extend it
# before `Lab.create(names=...)`, or call `lab.add_name()` on a running lab.
DEFAULT_NAMES: dict[str, tuple[str | None, str | None]] = {
    "www.allowed.example": ("198.51.100.10", "2001:db8:10::10"),
    "api.allowed.example": ("198.51.100.11", "2001:db8:10::11"),
    "denied.example": ("198.51.100.20", "2001:db8:20::20"),
    DNS_NAME: ("198.51.100.53", "2001:db8:53::53"),
}

# Role -> ports, bound on every server address (DNS on UDP and TCP).
PORTS: dict[str, tuple[int, ...]] = {
    "http": (80,),
    "https": (443,),
    "dns": (53,),
    "tcp_sink": (22, 853, 8080, 9999),
    "udp_sink": (443, 853, 9999),
}

# What the attack suite adds on demand (Lab.catch_all, serve_host, serve_metadata):
CATCHALL_PORT = 1  # the transparent listener every unserved TCP/UDP packet is sent to
HOST_TCP_PORTS = (22, 25, 53, 80, 443, 2375, 3306, 5432, 6379, 8080, 9999, 11211)
HOST_UDP_PORTS = (53, 123, 161, 5353, 9999)
METADATA = ("metadata.lab.example", "169.254.169.254", "fd00:ec2::254")

STATE_ROOT = Path("/run/pnl-lab")  # one directory per lab: owner, CA, certs, event log
NETNS_ETC = Path("/etc/netns")
_TAG = re.compile(r"^[0-9a-z]{1,10}$")  # "pnl" + tag + "i" stays within IFNAMSIZ (15)
_NETNS = re.compile(r"^pnl-([0-9a-z]{1,10})-(net|host)$")
_LINK = re.compile(r"^pnl([0-9a-z]{1,10})[ih]$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_-]{1,63})*$")
_V4_SERVERS = ipaddress.ip_network("198.51.100.0/24")
_V6_SERVERS = ipaddress.ip_network("2001:db8::/32")
_V4_LINK = ipaddress.ip_network("203.0.113.0/24")
_V6_LINK = ipaddress.ip_network("2001:db8:ffff::/64")

T = TypeVar("T")


def _run(argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PanopticonError(
            f"lab: `{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}",
            hint="the lab needs root, iproute2 and network namespaces",
        )
    return proc


def _output(argv: Sequence[str]) -> str:
    """The stdout of a listing command; empty when it fails (nothing to list)."""
    return subprocess.run(list(argv), check=False, capture_output=True, text=True).stdout


def _quiet(argv: Sequence[str]) -> None:
    """Run an undo step whose target may already be gone."""
    subprocess.run(list(argv), check=False, capture_output=True)


def _check_address(address: str | None, family: int) -> str | None:
    """The canonical form of a server address, or PanopticonError if the lab cannot serve it."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise PanopticonError(f"lab: {address!r} is not an IP address") from None
    servers, link, router = (
        (_V4_SERVERS, _V4_LINK, ROUTER_V4) if family == 4 else (_V6_SERVERS, _V6_LINK, ROUTER_V6)
    )
    if ip.version != family:
        raise PanopticonError(f"lab: {address} is not an IPv{family} address")
    if ip.compressed == router:
        return ip.compressed
    # Addresses inside the veth's own subnet would be answered by neighbour discovery
    # only on the veth, not from lo: keep servers off the link.
    if ip not in servers or ip in link:
        raise PanopticonError(
            f"lab: server address {address} is outside the lab's ranges",
            hint="use 198.51.100.0/24 or 2001:db8::/32 (not 2001:db8:ffff::/64)",
        )
    return ip.compressed


def _any_address(address: str | None, family: int, serve: bool) -> str | None:
    """Any address of `family`; served ones must stay off the veth's own subnet."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise PanopticonError(f"lab: {address!r} is not an IP address") from None
    if ip.version != family:
        raise PanopticonError(f"lab: {address} is not an IPv{family} address")
    if serve and ip in (_V4_LINK if family == 4 else _V6_LINK):
        raise PanopticonError(f"lab: {address} is on the lab's link: it cannot be served",
                              hint="pass serve=False to only name it in DNS")
    return ip.compressed


def _check_names(
    names: Mapping[str, tuple[str | None, str | None]],
) -> dict[str, tuple[str | None, str | None]]:
    checked = {}
    for name, (v4, v6) in names.items():
        key = name.lower().rstrip(".")
        if not _HOSTNAME.match(key):
            raise PanopticonError(f"lab: {name!r} is not a host name")
        checked[key] = (_check_address(v4, 4), _check_address(v6, 6))
    if DNS_NAME not in checked or None in checked[DNS_NAME]:
        raise PanopticonError(f"lab: the zone needs {DNS_NAME} with both addresses")
    return checked


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def _owner_alive(state: Path) -> bool:
    try:
        pid, start = (state / "owner").read_text().split()
    except (OSError, ValueError):
        # No owner yet: a lab being created right now, unless it has been so for long.
        try:
            return time.time() - state.stat().st_mtime < 60
        except OSError:
            return False
    return _start_time(int(pid)) == start


def _ns_pids(ns: str) -> list[int]:
    return [int(p) for p in _output(["ip", "netns", "pids", ns]).split() if p.isdigit()]


def _kill_ns_processes(ns: str) -> None:
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _mkdir_in(parent: Path, name: str) -> Path:
    """Make parent/name, which must not exist yet, creating `parent` (0755) if needed."""
    # World-readable whatever the umask: the jail's unprivileged proxy reads ca.pem.
    for _ in range(5):
        if not parent.exists():
            with contextlib.suppress(FileExistsError):
                parent.mkdir()
                parent.chmod(0o755)
        try:
            (parent / name).mkdir()
        except FileNotFoundError:
            continue  # another lab removed the empty parent between the two calls
        except FileExistsError:
            raise PanopticonError(f"lab: {parent / name} exists already") from None
        (parent / name).chmod(0o755)
        return parent / name
    raise PanopticonError(f"lab: cannot create {parent / name}")


def _rmtree_in(parent: Path, name: str) -> None:
    shutil.rmtree(parent / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        parent.rmdir()  # only when empty: /etc/netns may hold other tools' namespaces


def _remove_tag(tag: str) -> None:
    net, host = f"pnl-{tag}-net", f"pnl-{tag}-host"
    for ns in (net, host):
        _kill_ns_processes(ns)
    # Namespace deletion is asynchronous: remove the veth explicitly so that it is gone
    # when this returns.
    _quiet(["ip", "-n", host, "link", "del", f"pnl{tag}h"])
    for link in (f"pnl{tag}h", f"pnl{tag}i"):
        if Path(f"/sys/class/net/{link}").exists():
            _quiet(["ip", "link", "del", link])
    for ns in (net, host):
        _quiet(["ip", "netns", "del", ns])
    _rmtree_in(NETNS_ETC, host)
    _rmtree_in(STATE_ROOT, tag)


def cleanup_stale(force: bool = False) -> list[str]:
    """Remove what labs of dead owners left (namespaces, veths, /etc/netns dirs, state dirs).

    Labs whose owner process still runs are kept unless `force`. Returns the tags removed.
    """
    tags: set[str] = set()
    for line in _output(["ip", "netns", "list"]).splitlines():
        if line.split() and (m := _NETNS.match(line.split()[0])):
            tags.add(m.group(1))
    for entry in (NETNS_ETC.iterdir() if NETNS_ETC.is_dir() else ()):
        if m := _NETNS.match(entry.name):
            tags.add(m.group(1))
    for entry in (STATE_ROOT.iterdir() if STATE_ROOT.is_dir() else ()):
        if _TAG.match(entry.name):
            tags.add(entry.name)
    for entry in Path("/sys/class/net").iterdir():
        if m := _LINK.match(entry.name):
            tags.add(m.group(1))
    removed = []
    for tag in sorted(tags):
        if not force and _owner_alive(STATE_ROOT / tag):
            continue
        _remove_tag(tag)
        removed.append(tag)
    return removed


class Lab:
    """A running lab. Create it with `Lab.create()`; use it as a context manager or `close()` it.

    `names` is the live DNS zone (name -> (v4, v6)); change it with `add_name()` only.
    """

    def __init__(self, tag: str, names: dict[str, tuple[str | None, str | None]]):
        self.tag = tag
        self.net_ns = f"pnl-{tag}-net"
        self.host_ns = f"pnl-{tag}-host"
        self.net_veth = f"pnl{tag}i"
        self.host_veth = f"pnl{tag}h"
        self.names = names
        self.dns_servers: list[str] = [a for a in names[DNS_NAME] if a]
        self.ports = PORTS
        self.router = (ROUTER_V4, ROUTER_V6)
        self.host_addresses = (HOST_V4, HOST_V6)
        self.dir = STATE_ROOT / tag
        self.ca_cert = self.dir / "ca.pem"
        self.log_path = self.dir / "events.jsonl"
        self.server_stderr = self.dir / "servers.stderr"
        self.timings: dict[str, float] = {}
        self._stack = contextlib.ExitStack()
        self._served: set[str] = set()
        self._server: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._closed = False
        self._host_server: subprocess.Popen[bytes] | None = None
        self._captures = 0

    def __repr__(self) -> str:
        return f"<Lab {self.tag} host={self.host_ns} net={self.net_ns}>"

    # --- life cycle --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        tag: str | None = None,
        names: Mapping[str, tuple[str | None, str | None]] | None = None,
        *,
        sink_wait: float = 1.0,
        ready_timeout: float = 15.0,
    ) -> Lab:
        """Build the lab and return it once every listener is bound.

        `names` replaces the zone (default `DEFAULT_NAMES`; it must keep `ns.lab.example`).
        `sink_wait` is how long the TCP sinks wait for a first byte. On any failure,
        everything made so far is removed and PanopticonError is raised.
        """
        if os.geteuid() != 0:
            raise PanopticonError("lab: needs root", status=ExitStatus.NOPERM)
        tag = tag if tag is not None else secrets.token_hex(3)
        if not _TAG.match(tag):
            raise PanopticonError(f"lab: tag {tag!r} must be 1-10 of [0-9a-z]")
        lab = cls(tag, _check_names(DEFAULT_NAMES if names is None else names))
        started = time.monotonic()
        try:
            lab._build(sink_wait, ready_timeout)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                lab.close()
            raise
        lab.timings["create"] = time.monotonic() - started
        return lab

    def _build(self, sink_wait: float, ready_timeout: float) -> None:
        from panopticond.lab import certs  # cryptography costs 0.1 s to import: only here

        push = self._stack.callback
        _mkdir_in(STATE_ROOT, self.tag)
        push(_rmtree_in, STATE_ROOT, self.tag)
        (self.dir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")

        ca_cert, ca_key = certs.make_ca(self.dir, f"panopticon lab CA {self.tag}")
        static_names = sorted(self.names)
        addresses = self._server_addresses()
        cert, key = self.dir / "server.pem", self.dir / "server.key"
        certs.issue(ca_cert, ca_key, static_names, addresses, cert, key)
        self.log_path.touch(mode=0o644)

        for ns in (self.net_ns, self.host_ns):
            _run(["ip", "netns", "add", ns])
            push(_quiet, ["ip", "netns", "del", ns])
            push(_kill_ns_processes, ns)
        _run(["ip", "link", "add", self.net_veth, "netns", self.net_ns, "type", "veth",
              "peer", "name", self.host_veth, "netns", self.host_ns])
        push(_quiet, ["ip", "-n", self.host_ns, "link", "del", self.host_veth])

        net = [
            "link set lo up",
            f"addr add {ROUTER_V4}/24 dev {self.net_veth}",
            f"addr add {ROUTER_V6}/64 dev {self.net_veth} nodad",
            f"link set {self.net_veth} up",
        ]
        for address in addresses:
            if address not in self.router:
                net.append(f"addr add {address}/128 dev lo nodad" if ":" in address
                           else f"addr add {address}/32 dev lo")
        _run(["ip", "-n", self.net_ns, "-batch", "-"], input="\n".join(net) + "\n")
        self._served.update(addresses)

        config = {
            "log": str(self.log_path),
            "cert": str(cert),
            "key": str(key),
            "ca_cert": str(ca_cert),
            "ca_key": str(ca_key),
            "cert_dir": str(self.dir),
            "static_names": static_names,
            "zone": self.names,
            "addresses": addresses,
            "ports": self.ports,
            "sink_wait": sink_wait,
        }
        config_path = self.dir / "servers.json"
        config_path.write_text(json.dumps(config, indent=1))
        self._start_server(config_path)

        # The host side is configured while the server process starts (its slowest step).
        _run(["ip", "-n", self.host_ns, "-batch", "-"], input="\n".join([
            "link set lo up",
            f"addr add {HOST_V4}/24 dev {self.host_veth}",
            f"addr add {HOST_V6}/64 dev {self.host_veth} nodad",
            f"link set {self.host_veth} up",
            f"route add default via {ROUTER_V4}",
            f"route add default via {ROUTER_V6}",
        ]) + "\n")
        _run(["ip", "netns", "exec", self.host_ns, "sysctl", "-q", "-w",
              "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])

        self._write_resolv_conf()
        ready = self._read_reply(ready_timeout, "start")
        if not ready.get("ready"):
            raise PanopticonError(f"lab: the server process said {ready!r} instead of ready")

    def _server_addresses(self) -> list[str]:
        addresses = [ROUTER_V4, ROUTER_V6]
        for v4, v6 in self.names.values():
            for address in (v4, v6):
                if address and address not in addresses:
                    addresses.append(address)
        return addresses

    def _start_server(self, config_path: Path) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(self.server_stderr, "wb") as stderr:
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.net_ns, sys.executable, "-m",
                 "panopticond.lab.servers", str(config_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                cwd=self.dir,
                # Its own session: a ^C at the terminal reaches the owner, which closes the lab.
                start_new_session=True,
            )
        self._stack.callback(self._stop_server)

    def _stop_server(self) -> None:
        proc = self._server
        if proc is None:
            return
        self._server = None
        _end(proc)

    def _write_resolv_conf(self) -> None:
        path = _mkdir_in(NETNS_ETC, self.host_ns)
        self._stack.callback(_rmtree_in, NETNS_ETC, self.host_ns)
        resolv = "".join(f"nameserver {a}\n" for a in self.dns_servers)
        (path / "resolv.conf").write_text(resolv)
        (path / "resolv.conf").chmod(0o644)

    def _read_reply(self, timeout: float, what: str) -> dict[str, Any]:
        proc = self._server
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise PanopticonError(f"lab: the server process did not answer ({what}) "
                                      f"within {timeout}s{self._stderr_tail()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PanopticonError(f"lab: the server process exited ({what}, status "
                                      f"{proc.wait()}){self._stderr_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stderr_tail(self) -> str:
        try:
            tail = self.server_stderr.read_text(errors="replace").strip().splitlines()[-5:]
        except OSError:
            return ""
        return (": " + " | ".join(tail)) if tail else ""

    def close(self) -> None:
        """Remove everything this lab made. Idempotent; safe after a half-built creation."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        self._stack.close()
        self.timings["close"] = time.monotonic() - started

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- zone --------------------------------------------------------------------------

    def add_name(self, name: str, v4: str | None = None, v6: str | None = None,
                 serve: bool = True, anywhere: bool = False) -> None:
        """Add (or replace) `name` in the zone; with `serve`, also serve its addresses.

        HTTPS works for it too: the servers issue a certificate for any SNI they lack.
        With `anywhere`, the addresses may lie outside the lab's ranges (10.x, 169.254.x,
        the simulated host's own), as for DNS rebinding: served, they are bound in the
        internet namespace, where the simulated host's default route leads.
        """
        key = name.lower().rstrip(".")
        if anywhere:
            v4, v6 = _any_address(v4, 4, serve), _any_address(v6, 6, serve)
        else:
            v4, v6 = _check_names({DNS_NAME: self.names[DNS_NAME], key: (v4, v6)})[key]
        new = [a for a in (v4, v6) if serve and a and a not in self._served]
        for address in new:
            _run(["ip", "-n", self.net_ns, "addr", "add",
                  f"{address}/{128 if ':' in address else 32}", "dev", "lo"]
                 + (["nodad"] if ":" in address else []))
        self._command({"op": "add", "name": key, "v4": v4, "v6": v6, "serve": bool(new)})
        self._served.update(new)
        self.names[key] = (v4, v6)

    def _command(self, command: dict[str, Any]) -> None:
        proc = self._server
        if proc is None or proc.stdin is None:
            raise PanopticonError("lab: closed")
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        proc.stdin.flush()
        reply = self._read_reply(10, command["op"])
        if not reply.get("ok"):
            raise PanopticonError(f"lab: {command['op']} failed: {reply.get('error')}")

    # --- running things in the namespaces -----------------------------------------------

    @staticmethod
    def _run_kw(kw: dict[str, Any]) -> dict[str, Any]:
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        if not {"text", "encoding", "errors", "universal_newlines"} & kw.keys():
            kw["text"] = True
        kw.setdefault("timeout", 60)
        return kw

    def host_exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """`subprocess.run(argv)` in the simulated host (output captured as text by default)."""
        return subprocess.run(["ip", "netns", "exec", self.host_ns, *argv],
                              check=kw.pop("check", False), **self._run_kw(kw))

    def in_host(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the simulated host's network namespace only, as `nsenter --net`.

        Unlike `ip netns exec`, no mount namespace of its own: a jail started this way
        binds its namespace in the real /run/netns, where a later `panopticon cleanup`
        (or the test's own check that nothing is left) can see it.
        """
        return ["nsenter", f"--net=/run/netns/{self.host_ns}", *argv]

    def net_exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """`subprocess.run(argv)` in the internet namespace (output captured as text by default)."""
        return subprocess.run(["ip", "netns", "exec", self.net_ns, *argv],
                              check=kw.pop("check", False), **self._run_kw(kw))

    def host_popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """`subprocess.Popen(argv)` in the simulated host."""
        return subprocess.Popen(["ip", "netns", "exec", self.host_ns, *argv], **kw)

    def net_popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """`subprocess.Popen(argv)` in the internet namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.net_ns, *argv], **kw)

    # --- the oracle ----------------------------------------------------------------------

    def mark(self) -> int:
        """A position in the event log: `events(since=mark)` returns only later events."""
        return self.log_path.stat().st_size

    def events(self, kind: str | None = None, since: int = 0, **filters: Any) -> list[dict]:
        """Events logged by the servers, oldest first.

        `kind` is http, https, tcp, udp or dns. Each filter compares a top-level field
        for equality, or, if it is callable, is called with the field's value (None when
        absent) and keeps the event when it returns true.
        """
        with open(self.log_path, "rb") as f:
            f.seek(since)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]
        found = []
        for line in data.splitlines():
            event = json.loads(line)
            if kind is not None and event["kind"] != kind:
                continue
            if all(v(event.get(k)) if callable(v) else event.get(k) == v
                   for k, v in filters.items()):
                found.append(event)
        return found

    @staticmethod
    def wait_for(pred: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.02,
                 message: str | None = None) -> T:
        """Poll `pred` until it returns something true and return that; TimeoutError after."""
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(message or f"condition not met within {timeout}s")
            time.sleep(interval)

    def wait_events(self, kind: str | None = None, since: int = 0, count: int = 1,
                    timeout: float = 5.0, **filters: Any) -> list[dict]:
        """Wait until at least `count` events match (as `events()`), and return them all."""
        return self.wait_for(
            lambda: (e if len(e := self.events(kind, since, **filters)) >= count else None),
            timeout,
            message=f"fewer than {count} {kind or ''} events matching {filters} "
                    f"within {timeout}s",
        )

    # --- the attack suite's additions (all on demand; a plain lab has none of them) -----

    def catch_all(self) -> None:
        """Make the internet answer on every TCP and UDP port of every address.

        A TPROXY rule in the internet namespace hands each packet from the link that no
        server listens for (any address, any port) to one transparent listener, which
        logs it (`catchall: true`) with its original destination. Idempotent.
        """
        if getattr(self, "_catch_all", False):
            return
        self._command({"op": "catchall", "port": CATCHALL_PORT})
        tcp = sorted({p for r in ("http", "https", "dns", "tcp_sink") for p in self.ports[r]})
        udp = sorted({p for r in ("dns", "udp_sink") for p in self.ports[r]})
        for tool, ip, default in (("iptables-legacy", "ip", "0.0.0.0/0"),
                                  ("ip6tables-legacy", "ip -6", "::/0")):
            base = [tool, "-t", "mangle", "-A", "PREROUTING", "-i", self.net_veth]
            for proto, ports in (("tcp", tcp), ("udp", udp)):
                self.net_exec([*base, "-p", proto, "-m", "addrtype", "--dst-type", "LOCAL",
                               "-m", "multiport", "--dports", ",".join(map(str, ports)),
                               "-j", "RETURN"], check=True)
            for proto in ("tcp", "udp"):
                self.net_exec([*base, "-p", proto, "-j", "TPROXY", "--on-port",
                               str(CATCHALL_PORT), "--tproxy-mark", "0x1/0x1"], check=True)
            self.net_exec([*ip.split(), "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"],
                          check=True)
            self.net_exec([*ip.split(), "route", "add", "local", default, "dev", "lo",
                           "table", "100"], check=True)
        self._catch_all = True

    def serve_host(self, tcp_ports: Sequence[int] = HOST_TCP_PORTS,
                   udp_ports: Sequence[int] = HOST_UDP_PORTS) -> None:
        """Services on the simulated host itself: TCP and UDP sinks on every address of
        its namespace (wildcard binds, so also addresses added later, such as a jail's
        gateway), logging to the same event log with `origin: host`. Idempotent."""
        if self._host_server is not None:
            return
        config = json.loads((self.dir / "servers.json").read_text())
        config.update(addresses=["0.0.0.0", "::"], origin="host",
                      ports={"tcp_sink": list(tcp_ports), "udp_sink": list(udp_ports)})
        path = self.dir / "host-servers.json"
        path.write_text(json.dumps(config, indent=1))
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        with open(self.dir / "host-servers.stderr", "wb") as stderr:
            proc = self._host_server = subprocess.Popen(
                ["ip", "netns", "exec", self.host_ns, sys.executable, "-m",
                 "panopticond.lab.servers", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                cwd=self.dir, start_new_session=True)
        self._stack.callback(_end, proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else b""
        if not line or not json.loads(line).get("ready"):
            raise PanopticonError("lab: the simulated host's services did not start: "
                                  + (self.dir / "host-servers.stderr").read_text()[-500:])

    def serve_metadata(self) -> tuple[str, str]:
        """Stand-ins for a cloud metadata service (169.254.169.254, fd00:ec2::254), named
        `metadata.lab.example`; returns the two addresses."""
        name, v4, v6 = METADATA
        if name not in self.names:
            self.add_name(name, v4=v4, v6=v6, anywhere=True)
        return v4, v6

    def rebind(self, name: str, answers: Sequence[tuple[str | None, str | None]]) -> None:
        """DNS rebinding: the k-th A (and AAAA) query for `name` gets answers[k], the last
        one from then on, all with TTL 0. Serve the addresses with `add_name` first."""
        key = name.lower().rstrip(".")
        self._command({"op": "rebind", "name": key, "answers": [list(a) for a in answers]})
        self.names[key] = tuple(answers[-1])  # type: ignore[assignment]

    def add_cdn(self, sites: Sequence[str], v4: str, v6: str | None = None) -> None:
        """One address pair serving several sites, routed by Host (421 for any other)."""
        for site in sites:
            self.add_name(site, v4=v4, v6=v6)
        for address in filter(None, (v4, v6)):
            self._command({"op": "cdn", "address": address, "sites": list(sites)})

    def capture(self, where: str = "net") -> Capture:
        """A packet capture (not started: use it in a `with`). "net": the internet's end
        of the link, all that reaches the simulated internet; "host": every interface of
        the simulated host, jails' veths included."""
        from panopticond.lab.capture import Capture

        if where not in ("net", "host"):
            raise PanopticonError(f"lab: no capture point {where!r} (net or host)")
        self._captures += 1
        cap = Capture(self.net_ns if where == "net" else self.host_ns,
                      self.net_veth if where == "net" else "any",
                      self.dir / f"{where}-{self._captures}.pcap")
        self._stack.callback(cap.stop)
        return cap


def _end(proc: subprocess.Popen) -> None:
    """Stop a server process started by the lab and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if pipe:
                pipe.close()
