"""Inbound routes against the lab: a way IN to the agent's own service, and nothing else.

One jail runs `inbound_agent.py` (HTTP and WebSocket on 127.0.0.1:8080 inside the jail)
behind three routes: `web` (TLS from the instance CA, WebSocket, block patterns),
`plain` (plain HTTP, no WebSocket) and `own` (the operator's certificate). Clients run
in the lab's internet namespace (the LAN/internet: router addresses allowed, a second
address that is not) and in the simulated host itself. All probes run at once (the
dropped ones wait for their timeout), then each test judges one of them by what the
client saw AND by the agent's own log (what really arrived), and the request log.
Every refusal has a sibling that passes on the same path.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

import jailrun as jail
from panopticond.inbound import BASE_PORT
from panopticond.lab import HOST_V4, HOST_V6, ROUTER_V4, ROUTER_V6
from panopticond.lab import certs
from panopticond.plan import Names

pytestmark = pytest.mark.root

NAME = f"pntinb{os.getpid() % 100000}"
AGENT_PORT = 8080
WEB, PLAIN, OWN = 18443, 18080, 18444
WEB_LISTENER, PLAIN_LISTENER = BASE_PORT, BASE_PORT + 1  # inbound.BASE_PORT + route index
DENIED_V4, DENIED_V6 = "198.51.100.99", "2001:db8:99::99"  # extra client addresses
HERE = Path(__file__).parent
TIMEOUT = "2"  # seconds to wait for a dropped connection


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def _config(lab, own_cert: Path, own_key: Path) -> str:
    return jail.config_text(lab, extra=f"""
[agents.{NAME}]
ca = "ephemeral"

[agents.{NAME}.inbound.web]
listen = "*:{WEB}"
to = {AGENT_PORT}
allow_from = ["{ROUTER_V4}/32", "{ROUTER_V6}/128", "{HOST_V4}/32", "{HOST_V6}/128"]
websocket = true
block_patterns = ['forbidden-[0-9]+']

[agents.{NAME}.inbound.plain]
listen = "*:{PLAIN}"
to = {AGENT_PORT}
tls = "none"
allow_from = ["{ROUTER_V4}/32", "{ROUTER_V6}/128"]

[agents.{NAME}.inbound.own]
listen = "*:{OWN}"
to = "127.0.0.1:{AGENT_PORT}"
tls = {{ cert = "{own_cert}", key = "{own_key}" }}
allow_from = ["{ROUTER_V4}/32", "{ROUTER_V6}/128"]
""")


def _jail_addresses(names: Names) -> dict[int, str]:
    out = subprocess.run(["ip", "-n", names.netns, "-j", "addr", "show", "dev",
                          names.veth_jail], capture_output=True, text=True, check=True).stdout
    found = {}
    for info in json.loads(out)[0]["addr_info"]:
        if info.get("scope") == "global":
            found[4 if info["family"] == "inet" else 6] = info["local"]
    return found


class Inbound:
    """The running jail, the probes' results and what the agent and proxy logged."""

    def __init__(self, lab):
        self.lab = lab
        self.work = jail.Workdir()
        self.names = Names.of(NAME)
        self.proc: subprocess.Popen | None = None
        self.results: dict[str, dict] = {}
        self.stopped: tuple[int, str] | None = None
        self.log = self.work.path / "requests.jsonl"
        self.agent_log = self.work.write("agent.jsonl", "", 0o666)
        self.ready = self.work.write("ready", "", 0o666)
        self.ca = f"/run/panopticon/{NAME}/ca.pem"
        self._undo: list[list[str]] = []

    def start(self) -> None:
        lab = self.lab
        for f in ("inbound_agent.py", "ws_client.py"):
            self.work.write(f, (HERE / f).read_text())
        cert, key = self.work.path / "own.pem", self.work.path / "own.key"
        certs.issue(lab.ca_cert, lab.dir / "ca.key", ["own.test"], [], cert, key)
        self.work.write("config.toml", _config(lab, cert, key))
        for addr in (f"{DENIED_V4}/32", f"{DENIED_V6}/128"):
            subprocess.run(["ip", "-n", lab.net_ns, "addr", "add", addr, "dev", "lo"]
                           + (["nodad"] if ":" in addr else []), check=True)
            self._undo.append(["ip", "-n", lab.net_ns, "addr", "del", addr, "dev", "lo"])
        argv = jail.run_argv(
            lab, self.work.path / "config.toml",
            [jail.VENV_PYTHON, str(self.work.path / "inbound_agent.py"), str(AGENT_PORT),
             str(self.agent_log), str(self.ready)],
            "--agent", NAME, log=self.log)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        jail.wait_ready(NAME, self.proc)
        lab.wait_for(lambda: self.ready.read_text(), 15, message="the agent did not start")
        self.jail = _jail_addresses(self.names)
        # A route to the jail's subnets, so that the internet namespace can even try a
        # direct connection (the host would forward it if its rules let it).
        for fam, gw in ((4, HOST_V4), (6, HOST_V6)):
            net = f"{self.jail[fam]}/{32 if fam == 4 else 128}"
            subprocess.run(["ip", "-n", lab.net_ns, "route", "add", net, "via", gw], check=True)
            self._undo.append(["ip", "-n", lab.net_ns, "route", "del", net, "via", gw])

    def stop(self) -> tuple[int, str]:
        if self.stopped is None and self.proc is not None:
            jail.kill_group(self.proc, signal.SIGTERM)
            try:
                _, err = self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                jail.kill_group(self.proc, signal.SIGKILL)
                _, err = self.proc.communicate()
            self.stopped = (self.proc.returncode, err)
        return self.stopped or (0, "")

    def close(self) -> None:
        self.stop()
        for argv in reversed(self._undo):
            subprocess.run(argv, capture_output=True)
        self.work.close()

    # -- probes

    def curl(self, where: str, url: str, *opts: str, resolve: str | None = None) -> list[str]:
        argv = ["curl", "-sS", "--connect-timeout", TIMEOUT, "-m", "10", *opts]
        if resolve:
            argv += ["--resolve", resolve]
        argv.append(url)
        if where == "net":
            return ["ip", "netns", "exec", self.lab.net_ns, *argv]
        if where == "host":
            return ["ip", "netns", "exec", self.lab.host_ns, *argv]
        return ["nsenter", f"--net=/run/netns/{self.names.netns}", *argv]  # inside the jail

    def ws(self, address: str, port: int, path: str, messages: list, tls: bool = True,
           cafile: str | None = None) -> list[str]:
        spec = {"address": address, "port": port, "tls": tls, "cafile": cafile or self.ca,
                "name": "inb.test", "path": path, "messages": messages}
        return ["ip", "netns", "exec", self.lab.net_ns, jail.VENV_PYTHON,
                str(self.work.path / "ws_client.py"), json.dumps(spec)]

    def probes(self) -> dict[str, list[str]]:
        h4, h6 = HOST_V4, _host(HOST_V6)
        j4, j6 = self.jail[4], _host(self.jail[6])
        ca = ("--cacert", self.ca)
        web4 = f"inb.test:{WEB}:{h4}"
        web6 = f"inb.test:{WEB}:{h6}"
        p: dict[str, list[str]] = {
            "tls_4": self.curl("net", f"https://inb.test:{WEB}/p/tls_4?x=1", *ca, resolve=web4),
            "tls_6": self.curl("net", f"https://inb.test:{WEB}/p/tls_6", *ca, resolve=web6),
            "plain_4": self.curl("net", f"http://{h4}:{PLAIN}/p/plain_4"),
            "plain_6": self.curl("net", f"http://{h6}:{PLAIN}/p/plain_6"),
            "own_4": self.curl("net", f"https://own.test:{OWN}/p/own_4", "--cacert",
                               str(self.lab.ca_cert), resolve=f"own.test:{OWN}:{h4}"),
            "own_6": self.curl("net", f"https://own.test:{OWN}/p/own_6", "--cacert",
                               str(self.lab.ca_cert), resolve=f"own.test:{OWN}:{h6}"),
            "host_4": self.curl("host", f"https://inb.test:{WEB}/p/host_4", *ca, resolve=web4),
            "host_6": self.curl("host", f"https://inb.test:{WEB}/p/host_6", *ca, resolve=web6),
            "host_plain_4": self.curl("host", f"http://{h4}:{PLAIN}/p/host_plain_4"),
            "denied_4": self.curl("net", f"https://inb.test:{WEB}/p/denied_4", *ca,
                                  "--interface", DENIED_V4, resolve=web4),
            "denied_6": self.curl("net", f"https://inb.test:{WEB}/p/denied_6", *ca,
                                  "--interface", DENIED_V6, resolve=web6),
            "block_query": self.curl("net", f"https://inb.test:{WEB}/p/block_query?q=forbidden-1",
                                     *ca, resolve=web4),
            "block_body": self.curl("net", f"https://inb.test:{WEB}/p/block_body", *ca,
                                    "--data", "note=forbidden-2", resolve=web4),
            "body_ok": self.curl("net", f"https://inb.test:{WEB}/p/body_ok", *ca,
                                 "--data", "note=fine-2", resolve=web4),
            "plain_on_tls": self.curl("net", f"http://{h4}:{WEB}/p/plain_on_tls"),
            "tls_on_plain": self.curl("net", f"https://{h4}:{PLAIN}/p/tls_on_plain", "-k"),
            "ws_4": self.ws(HOST_V4, WEB, "/p/ws_4", ["hello-4", {"bytes": 1000}]),
            "ws_6": self.ws(HOST_V6, WEB, "/p/ws_6", ["hello-6"]),
            "ws_not_allowed": self.ws(HOST_V4, PLAIN, "/p/ws_not_allowed", ["x"], tls=False),
            "ws_blocked": self.ws(HOST_V4, WEB, "/p/ws_blocked", ["ok-ws", "forbidden-3", "z"]),
        }
        for fam, j in ((4, j4), (6, j6)):
            p[f"direct_listener_{fam}"] = self.curl("net", f"http://{j}:{PLAIN_LISTENER}/p/dl")
            p[f"direct_agent_{fam}"] = self.curl("net", f"http://{j}:{AGENT_PORT}/p/da")
            p[f"host_direct_{fam}"] = self.curl("host", f"http://{j}:{AGENT_PORT}/p/hd")
            p[f"host_direct_listener_{fam}"] = self.curl(
                "host", f"http://{j}:{PLAIN_LISTENER}/p/hdl")
        p["inside_listener"] = self.curl("jail", f"http://127.0.0.1:{PLAIN_LISTENER}/p/inside")
        p["inside_listener_jail_addr"] = self.curl(
            "jail", f"http://{j4}:{PLAIN_LISTENER}/p/inside2")
        return p

    def run_probes(self) -> None:
        def run(argv: list[str]) -> dict:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            out = {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
            if argv[-2].endswith("ws_client.py"):
                out.update(json.loads(r.stdout))
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = {name: pool.submit(run, argv) for name, argv in self.probes().items()}
            self.results = {name: f.result() for name, f in futures.items()}

    def arrived(self) -> list[dict]:
        return [json.loads(x) for x in self.agent_log.read_text().splitlines()]

    def records(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def inbound(lab):
    jail.add_lab_names(lab)
    env = Inbound(lab)
    try:
        env.start()
        env.run_probes()
        yield env
    finally:
        env.close()


def _paths(env: Inbound) -> set[str]:
    return {e["path"].split("?")[0] for e in env.arrived() if e["kind"] == "http"}


# -- allowed clients reach the agent, both families --------------------------------------

@pytest.mark.parametrize("probe,client", [
    ("tls_4", ROUTER_V4), ("tls_6", ROUTER_V6), ("plain_4", ROUTER_V4), ("plain_6", ROUTER_V6),
    ("own_4", ROUTER_V4), ("own_6", ROUTER_V6), ("host_4", HOST_V4), ("host_6", HOST_V6),
])
def test_allowed_client_reaches_the_agent(inbound, probe, client):
    r = inbound.results[probe]
    assert r["rc"] == 0, r
    echo = json.loads(r["out"])
    # The agent's own answer; its peer is the proxy, which names the real client.
    assert echo["path"].startswith(f"/p/{probe}") and echo["peer"] == "127.0.0.1"
    assert echo["xff"] == client
    assert echo["proto"] == ("http" if probe.startswith("plain") else "https")
    assert f"/p/{probe}" in _paths(inbound)


def test_own_certificate_is_served(inbound):
    # Verified against the lab CA: only the operator's certificate chains to it, the
    # instance CA's would not (the positive control is tls_4 against the instance CA).
    assert inbound.results["own_4"]["rc"] == 0
    fail = subprocess.run(inbound.curl("net", f"https://own.test:{OWN}/p/own_x", "--cacert",
                                       inbound.ca, resolve=f"own.test:{OWN}:{HOST_V4}"),
                          capture_output=True, text=True)
    assert fail.returncode == 60, fail.stderr  # the instance CA does not verify it


# -- everyone else is dropped ------------------------------------------------------------

@pytest.mark.parametrize("probe", ["denied_4", "denied_6", "host_plain_4"])
def test_source_not_allowed_is_dropped_at_the_host(inbound, probe):
    r = inbound.results[probe]
    assert r["rc"] == 28, r  # dropped (a timeout), not refused
    assert f"/p/{probe}" not in _paths(inbound)
    # Never reached the proxy either: the host firewall dropped it.
    client, route = {"denied_4": (DENIED_V4, "web"), "denied_6": (f"[{DENIED_V6}]", "web"),
                     "host_plain_4": (HOST_V4, "plain")}[probe]
    assert not [x for x in inbound.records() if x.get("route") == route
                and (x.get("client") or "").startswith(client + ":")]
    # Positive control: the allowed source, same route and family.
    assert inbound.results["plain_4" if route == "plain" else f"tls_{probe[-1]}"]["rc"] == 0


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("kind", ["direct_listener", "direct_agent", "host_direct",
                                  "host_direct_listener"])
def test_the_jail_address_is_not_reachable_directly(inbound, kind, fam):
    r = inbound.results[f"{kind}_{fam}"]
    assert r["rc"] in (7, 28), r  # refused or dropped
    assert not {"/p/dl", "/p/da", "/p/hd", "/p/hdl"} & _paths(inbound)
    # Positive control: the same client through the host port.
    assert inbound.results[f"plain_{fam}" if kind.startswith("direct") else f"host_{fam}"][
        "rc"] == 0


@pytest.mark.parametrize("probe", ["inside_listener", "inside_listener_jail_addr"])
def test_inbound_listeners_are_not_reachable_from_inside_the_jail(inbound, probe):
    r = inbound.results[probe]
    assert r["rc"] == 7, r  # refused by the jail's OUTPUT rules
    assert not {"/p/inside", "/p/inside2"} & _paths(inbound)


# -- the inbound filter --------------------------------------------------------------------

@pytest.mark.parametrize("probe", ["block_query", "block_body"])
def test_block_pattern_is_refused_before_the_agent(inbound, probe):
    r = inbound.results[probe]
    assert r["rc"] == 0 and r["out"] == "panopticon: request refused.\n", r
    assert f"/p/{probe}" not in _paths(inbound)
    rec = [x for x in inbound.records() if x.get("path") == f"/p/{probe}"]
    assert len(rec) == 1 and rec[0]["decision"] == "deny" and rec[0]["status"] == 403
    assert "block pattern" in rec[0]["reason"]
    # Positive control: the same route with a harmless body.
    assert json.loads(inbound.results["body_ok"]["out"])["body"] == "note=fine-2"


@pytest.mark.parametrize("probe", ["plain_on_tls", "tls_on_plain"])
def test_wrong_protocol_for_the_route_is_closed(inbound, probe):
    r = inbound.results[probe]
    assert r["rc"] in (35, 52, 56), r  # TLS error or empty reply: closed at once
    assert f"/p/{probe}" not in _paths(inbound)
    assert [x for x in inbound.records() if x["kind"] == "connection"
            and x["decision"] == "deny" and "on route" in x["reason"]]


# -- WebSocket ---------------------------------------------------------------------------------

@pytest.mark.parametrize("probe,sent", [("ws_4", "hello-4"), ("ws_6", "hello-6")])
def test_websocket_passes_and_every_frame_is_logged(inbound, probe, sent):
    r = inbound.results[probe]
    assert r["ok"] and r["status"] == 101, r
    assert r["replies"][0] == f"echo:{sent}"
    assert {"kind": "ws", "path": f"/p/{probe}", "type": "text", "data": sent} in inbound.arrived()
    frames = [x for x in inbound.records() if x["kind"] == "websocket"
              and x["path"] == f"/p/{probe}"]
    assert {(f["from"], f["type"], f["bytes"]) for f in frames} >= {
        ("client", "text", len(sent)), ("agent", "text", len(sent) + 5)}
    if probe == "ws_4":
        assert ("client", "binary", 1000) in {(f["from"], f["type"], f["bytes"]) for f in frames}
    assert all(f["direction"] == "inbound" and f["route"] == "web" for f in frames)


def test_websocket_refused_where_the_route_does_not_allow_it(inbound):
    r = inbound.results["ws_not_allowed"]
    assert r["status"] == 403, r
    assert "/p/ws_not_allowed" not in _paths(inbound)


def test_websocket_message_matching_a_block_pattern_ends_the_connection(inbound):
    r = inbound.results["ws_blocked"]
    assert not r["ok"], r
    ws = [e for e in inbound.arrived() if e["kind"] == "ws" and e["path"] == "/p/ws_blocked"]
    assert [e["data"] for e in ws] == ["ok-ws"]  # the blocked message never arrived
    denied = [x for x in inbound.records() if x["kind"] == "websocket"
              and x["path"] == "/p/ws_blocked" and x["decision"] == "deny"]
    assert denied[0]["from"] == "client" and "block pattern" in denied[0]["reason"]
    # Whatever was already in flight behind it is dropped as well.
    assert all(x["reason"] == "the connection was refused earlier" for x in denied[1:])


# -- the request log -------------------------------------------------------------------------

def test_inbound_requests_are_logged(inbound):
    http = {x["path"]: x for x in inbound.records() if x["kind"] == "http"}
    for probe, client, route in [("tls_4", ROUTER_V4, "web"), ("tls_6", f"[{ROUTER_V6}]", "web"),
                                 ("plain_6", f"[{ROUTER_V6}]", "plain"),
                                 ("own_4", ROUTER_V4, "own"), ("host_4", HOST_V4, "web")]:
        rec = http[f"/p/{probe}"]
        assert rec["direction"] == "inbound" and rec["route"] == route, rec
        assert rec["decision"] == "allow" and rec["status"] == 200
        assert rec["client"].startswith(client + ":")
        assert rec["instance"] == NAME
    # The query string is never logged.
    assert "x=1" not in inbound.log.read_text()


def test_teardown_leaves_nothing(inbound, lab):
    rc, err = inbound.stop()
    assert rc == 0, err
    assert jail.leftovers(lab, NAME) == []
