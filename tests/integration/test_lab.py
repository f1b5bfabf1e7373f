"""The lab itself: names resolve, servers answer, the event log sees it all, close leaves nothing.

Every other integration test trusts the lab's event log as its oracle for what reached
the internet, so these tests check the log against what the clients saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import panopticond
from panopticond.errors import PanopticonError
from panopticond.lab import DEFAULT_NAMES, Lab, cleanup_stale
from panopticond.lab.topology import NETNS_ETC, STATE_ROOT

pytestmark = pytest.mark.root

WWW = "www.allowed.example"
DENIED = "denied.example"
PY = sys.executable


def _curl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return lab.host_exec(["curl", "-sS", "--max-time", "10", *args])


def _host_python(lab: Lab, code: str) -> str:
    proc = lab.host_exec([PY, "-c", code], timeout=20)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _residue(lab: Lab) -> list[str]:
    """Every trace of `lab` on the machine, by name."""
    netns, links = _ip("netns", "list"), _ip("-o", "link", "show")
    found = [ns for ns in (lab.host_ns, lab.net_ns) if ns in netns.split()]
    found += [v for v in (lab.host_veth, lab.net_veth) if f" {v}:" in links or f" {v}@" in links]
    found += [str(p) for p in (NETNS_ETC / lab.host_ns, STATE_ROOT / lab.tag) if p.exists()]
    return found


def test_names_resolve_in_the_host_through_the_lab_dns(lab: Lab, mark: int) -> None:
    proc = lab.host_exec(["getent", "ahosts", WWW])
    assert proc.returncode == 0, proc.stderr
    assert {line.split()[0] for line in proc.stdout.splitlines()} == set(lab.names[WWW])

    queries = lab.events("dns", since=mark, name=WWW)
    assert {q["type"] for q in queries} == {"A", "AAAA"}
    assert {q["server_ip"] for q in queries} <= set(lab.dns_servers)
    assert {q["client_ip"] for q in queries} <= set(lab.host_addresses)
    assert all(q["rcode"] == "NOERROR" for q in queries)

    infos = _host_python(lab, f"import json, socket; print(json.dumps(sorted({{a[4][0] for a in "
                              f"socket.getaddrinfo({DENIED!r}, 443)}})))")
    assert json.loads(infos) == sorted(a for a in lab.names[DENIED] if a)


def test_unknown_names_are_nxdomain(lab: Lab, mark: int) -> None:
    proc = lab.host_exec(["getent", "ahosts", "nowhere.example"])
    assert proc.returncode == 2  # "key not found"
    queries = lab.events("dns", since=mark, name="nowhere.example")
    assert queries and all(q["rcode"] == "NXDOMAIN" and q["answers"] == [] for q in queries)


def test_dns_over_tcp(lab: Lab, mark: int) -> None:
    code = (
        "import socket, struct\n"
        "q = struct.pack('!6H', 7, 0x100, 1, 0, 0, 0) + b'\\x03www\\x07allowed\\x07example\\x00'"
        " + struct.pack('!HH', 28, 1)\n"
        "s = socket.create_connection(('2001:db8:53::53', 53), timeout=5)\n"
        "s.sendall(struct.pack('!H', len(q)) + q)\n"
        "print(s.recv(4096)[-16:].hex())\n"
    )
    answer = bytes.fromhex(_host_python(lab, code).strip())
    assert answer == bytes.fromhex("20010db8001000000000000000000010")  # 2001:db8:10::10
    [query] = lab.events("dns", since=mark, proto="tcp")
    assert (query["name"], query["type"], query["server_ip"]) == (WWW, "AAAA", "2001:db8:53::53")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_curl_reaches_the_server_and_the_log_shows_it(
    lab: Lab, mark: int, scheme: str, family: int
) -> None:
    tls = ["--cacert", str(lab.ca_cert)] if scheme == "https" else []
    proc = _curl(lab, f"-{family}", *tls, f"{scheme}://{WWW}/echo?family={family}")
    assert proc.returncode == 0, proc.stderr
    server_ip = lab.names[WWW][family == 6]
    client_ip = lab.host_addresses[family == 6]
    echo = json.loads(proc.stdout)
    assert (echo["server_ip"], echo["client_ip"], echo["host"]) == (server_ip, client_ip, WWW)

    [event] = lab.events(scheme, since=mark)
    assert event["server_ip"] == server_ip
    assert event["client_ip"] == client_ip
    assert event["port"] == {"http": 80, "https": 443}[scheme]
    assert (event["method"], event["path"]) == ("GET", f"/echo?family={family}")
    assert event["status"] == 200
    if scheme == "https":
        assert event["sni"] == WWW
    assert not lab.events("tcp", since=mark)


def test_https_without_the_lab_ca_fails_and_is_logged(lab: Lab, mark: int) -> None:
    proc = _curl(lab, "-4", f"https://{WWW}/")
    assert proc.returncode == 60, proc.stderr  # peer certificate cannot be authenticated
    assert not lab.events("https", since=mark)
    [event] = lab.events("tcp", since=mark, port=443)
    assert event["sni"] == WWW and "unknown ca" in event["tls_error"]


def test_status_and_bytes(lab: Lab, mark: int) -> None:
    proc = _curl(lab, "-o", "/dev/null", "-w", "%{http_code}", f"http://{WWW}/status/418")
    assert proc.stdout == "418"
    proc = _curl(lab, "-6", "--cacert", str(lab.ca_cert), "-o", "/dev/null",
                 "-w", "%{http_code} %{size_download}", f"https://{WWW}/bytes/1234567")
    assert proc.stdout == "200 1234567"
    proc = _curl(lab, "--data-binary", "x" * 5000, f"http://{WWW}/upload")
    assert json.loads(proc.stdout)["body_length"] == 5000
    assert [e["status"] for e in lab.events(since=mark) if e["kind"] in ("http", "https")] == [
        418, 200, 200]


def test_tcp_sink_logs_the_connection_and_its_first_bytes(lab: Lab, mark: int) -> None:
    code = (
        "import socket\n"
        "for address in ('198.51.100.20', '2001:db8:20::20'):\n"
        "    s = socket.create_connection((address, 9999), timeout=5)\n"
        "    s.sendall(b'hello sink')\n"
        "    assert s.recv(100) == b''  # the sink closes once it has logged\n"
    )
    _host_python(lab, code)
    events = lab.events("tcp", since=mark, port=9999)
    assert [(e["server_ip"], e["data"]) for e in events] == [
        ("198.51.100.20", "hello sink"), ("2001:db8:20::20", "hello sink")]


def test_udp_sink_logs_and_echoes_a_datagram(lab: Lab, mark: int) -> None:
    code = (
        "import socket\n"
        "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "u.settimeout(5)\n"
        "u.sendto(b'quic?', ('2001:db8:20::20', 443))\n"
        "print(u.recvfrom(100)[0].decode())\n"
    )
    assert _host_python(lab, code).strip() == "quic?"
    [event] = lab.events("udp", since=mark)
    assert (event["server_ip"], event["port"], event["data"]) == ("2001:db8:20::20", 443, "quic?")
    assert event["client_ip"] == lab.host_addresses[1]


def test_a_name_added_later_is_resolved_and_served_over_tls(lab: Lab, mark: int) -> None:
    lab.add_name("late.lab.example", "198.51.100.12", "2001:db8:10::12")
    proc = _curl(lab, "-6", "--cacert", str(lab.ca_cert), "https://late.lab.example/")
    assert proc.returncode == 0, proc.stderr
    [event] = lab.events("https", since=mark)
    assert (event["server_ip"], event["sni"]) == ("2001:db8:10::12", "late.lab.example")


def test_close_leaves_nothing(lab: Lab) -> None:
    other = Lab.create()
    server_pid = other._server.pid  # type: ignore[union-attr]
    assert len(_residue(other)) == 4  # both namespaces, /etc/netns and the state dir
    other.close()
    other.close()
    assert _residue(other) == []
    assert not Path(f"/proc/{server_pid}").exists()
    assert len(_residue(lab)) == 4  # the session's lab is untouched


def test_a_creation_that_fails_halfway_removes_what_it_made() -> None:
    tag = secrets.token_hex(3)
    NETNS_ETC.mkdir(exist_ok=True)
    blocker = NETNS_ETC / f"pnl-{tag}-host"
    blocker.write_text("not the lab's\n")  # makes the step after the namespaces fail
    try:
        with pytest.raises(PanopticonError, match="exists already"):
            Lab.create(tag=tag)
        assert blocker.read_text() == "not the lab's\n"  # what the lab did not make stays
        assert f"pnl-{tag}-" not in _ip("netns", "list")
        assert not (STATE_ROOT / tag).exists()
    finally:
        blocker.unlink()
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty, as the lab leaves it


def test_cleanup_stale_removes_dead_labs_and_spares_live_ones(lab: Lab) -> None:
    tag = secrets.token_hex(3)
    code = (
        "import os, signal\n"
        "from panopticond.lab import Lab\n"
        f"Lab.create(tag={tag!r})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(panopticond.__file__).parents[1]))
    proc = subprocess.run([PY, "-c", code], env=env, check=False, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = Lab(tag, dict(DEFAULT_NAMES))  # handles only: names are derived from the tag
    assert _residue(dead)

    removed = cleanup_stale()
    assert tag in removed and lab.tag not in removed
    assert _residue(dead) == []
    assert _curl(lab, f"http://{WWW}/still-here").returncode == 0
