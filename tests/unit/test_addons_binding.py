import asyncio
import ipaddress
import json
import ssl
import struct

import pytest
from mitmproxy import connection, ctx, dns, http, tcp
from mitmproxy.proxy import events, layers, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons.binding import ECH_EXTENSION, Binding, Unresolvable
from panopticond.addons.enforce import Enforce
from panopticond.addons.finalguard import FinalGuard
from panopticond.addons.flowlog import EXTRA
from panopticond.destinations import Destinations
from panopticond.policy import Policy

WWW = ("198.51.100.10", "2001:db8:10::10")
DENIED = "198.51.100.20"
HOST_ADDR = "203.0.113.2"


class Resolver:
    """Stands in for the upstream DNS: a zone, and the lookups it was asked."""

    def __init__(self, zone):
        self.zone = zone
        self.asked = []

    async def __call__(self, name, family):
        self.asked.append((name, family))
        if name == "broken.example":
            raise Unresolvable("SERVFAIL")
        return [a for a in self.zone.get(name, ()) if (":" in a) == (family == 6)]


@pytest.fixture
def env(tmp_path):
    policy = Policy.build(
        "x", ["www.allowed.example", "*.wild.example", "dns.allowed.example"],
        ["bad.pinned.example"],
        destinations=Destinations.build(["10.99.0.0/24", "198.51.100.11"], ["*.pinned.example"],
                                        [("git.example", 22)]))
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    resolver = Resolver({
        "www.allowed.example": list(WWW),
        "a.wild.example": ["198.51.100.40"],
        "rebind.wild.example": ["10.1.2.3", "169.254.169.254"],
        "host.wild.example": [HOST_ADDR],
        "inside.wild.example": ["10.99.0.5"],
        "a.pinned.example": ["198.51.100.50"],
    })
    b = Binding(resolve=resolver)
    with taddons.context(b) as tctx:
        tctx.configure(b, panopticon_policy=str(path),
                       panopticon_blocked=[f"{HOST_ADDR}/32", "10.231.0.0/16"])
        yield b, resolver


def transparent_client():
    """A fresh agent connection: no TLS yet."""
    return connection.Client(peername=("10.231.0.2", 40000), sockname=("127.0.0.1", 15001),
                             timestamp_start=946681200,
                             proxy_mode=ProxyMode.parse("transparent"))


def allowed(name, dest, *, port=80, rule=None, headers=(), method=b"GET", path=b"/",
            client=None):
    """A request Enforce has allowed on `name`, sent by the agent to `dest`."""
    f = tflow.tflow(req=tutils.treq(host=dest, port=port, method=method, path=path,
                                    headers=http.Headers(host=name, **dict(headers)),
                                    content=b""))
    f.client_conn = client or transparent_client()
    f.server_conn = connection.Server(address=(dest, port))
    verdict.record(f, allowed=True, reason="allowed", host=name, by="enforce",
                   rule=rule or name)
    return f


def bind(b, f):
    asyncio.run(b.requestheaders(f))
    return f


def connect(b, client, address):
    server = connection.Server(address=address)
    b.server_connect(server_hooks.ServerConnectionHookData(server=server, client=client))
    return server.error


def answer(name, qtype, addresses, ttl=60):
    q = dns.Question(name, qtype, dns.classes.IN)
    f = tflow.tdnsflow(req=tutils.tdnsreq(questions=[q]))
    f.response = tutils.tdnsresp(questions=[q], answers=[
        dns.ResourceRecord(name, qtype, dns.classes.IN, ttl, ipaddress.ip_address(a).packed)
        for a in addresses])
    return f


def resolved(b, name, addresses, qtype=dns.types.A):
    f = answer(name, qtype, addresses)
    verdict.record(f, allowed=True, reason="allowed", host=name, by="dnsfilter", rule=name)
    b.dns_response(f)
    return f


# -- DNS answers: pinning and rebinding -------------------------------------------------

def test_allowed_answers_are_pinned(env):
    b, _ = env
    f = resolved(b, "www.allowed.example", [WWW[0]])
    assert [str(r) for r in f.response.answers] == [WWW[0]]
    assert b.pins.addresses("www.allowed.example") == [WWW[0]]
    resolved(b, "www.allowed.example", [WWW[1]], dns.types.AAAA)
    assert b.pins.names_for(WWW[1]) == ["www.allowed.example"]


@pytest.mark.parametrize("bad", ["10.1.2.3", "169.254.169.254", "127.0.0.1", HOST_ADDR,
                                 "10.231.7.1", "::ffff:10.0.0.1", "fd00:ec2::254"])
def test_an_allowed_name_resolving_to_a_blocked_address_is_refused(env, bad):
    b, _ = env
    qtype = dns.types.AAAA if ":" in bad else dns.types.A
    f = resolved(b, "rebind.wild.example", [bad], qtype)
    assert f.response.response_code == dns.response_codes.REFUSED and not f.response.answers
    v = verdict.get(f)
    assert v["decision"] == "deny" and "never connects" in v["reason"] and v["by"] == "binding"
    assert b.pins.addresses("rebind.wild.example") == []


def test_a_mixed_answer_keeps_only_the_reachable_addresses(env):
    b, _ = env
    f = resolved(b, "a.wild.example", ["10.1.2.3", "198.51.100.40"])
    assert [str(r) for r in f.response.answers] == ["198.51.100.40"]
    assert verdict.is_allowed(f) and "10.1.2.3" in f.metadata[EXTRA]["refused_answers"][0]


def test_allow_cidrs_opens_a_private_range(env):
    b, _ = env
    f = resolved(b, "inside.wild.example", ["10.99.0.5"])
    assert [str(r) for r in f.response.answers] == ["10.99.0.5"]


def test_denied_queries_are_left_alone(env):
    b, _ = env
    f = answer("denied.example", dns.types.A, ["10.1.2.3"])
    b.dns_response(f)
    assert f.response.answers and verdict.get(f) is None
    assert b.pins.addresses("denied.example") == []


def test_a_flood_of_data_labels_is_logged(env, caplog):
    b, _ = env
    b.flood.threshold = 3
    for i in range(3):
        f = tflow.tdnsflow(req=tutils.tdnsreq(questions=[dns.Question(
            f"{i}mzxw6ytboi2dqnzvgyytqmjsgq3ta.x.wild.example", dns.types.A, dns.classes.IN)]))
        b.dns_request(f)
    assert "under wild.example" in f.metadata[EXTRA]["alert"]
    assert "possibly data sent through DNS" in caplog.text


# -- HTTP: the address follows the name ------------------------------------------------

def test_a_pinned_destination_is_kept_and_bound(env):
    b, resolver = env
    resolved(b, "www.allowed.example", [WWW[0]])
    f = bind(b, allowed("www.allowed.example", WWW[0]))
    assert f.response is None and f.server_conn.address == (WWW[0], 80)
    assert resolver.asked == []
    assert connect(b, f.client_conn, (WWW[0], 80)) is None
    assert not b.approvals.refusal(f.client_conn, connection.Server(address=(WWW[0], 80)))


def test_a_spoofed_host_goes_to_the_names_address_never_the_agents(env):
    b, resolver = env
    resolved(b, "www.allowed.example", [WWW[0]])
    f = bind(b, allowed("www.allowed.example", DENIED))
    assert f.response is None
    assert f.server_conn.address == (WWW[0], 80) and f.request.host == WWW[0]
    assert f.request.headers["host"] == "www.allowed.example"
    assert f.metadata[EXTRA]["agent_address"] == DENIED
    assert resolver.asked == []
    assert connect(b, f.client_conn, (DENIED, 80))
    assert connect(b, f.client_conn, (WWW[0], 80)) is None


def test_without_a_pin_the_proxy_resolves_the_name_itself(env):
    b, resolver = env
    f = bind(b, allowed("www.allowed.example", "2001:db8:20::20", port=443))
    assert resolver.asked == [("www.allowed.example", 6)]  # the agent's family first
    assert f.server_conn.address == (WWW[1], 443)
    assert b.pins.has("www.allowed.example", WWW[1])


@pytest.mark.parametrize("name", ["rebind.wild.example", "host.wild.example"])
def test_a_name_resolving_only_to_blocked_addresses_is_refused(env, name):
    b, _ = env
    f = bind(b, allowed(name, DENIED))
    assert f.response.status_code == 403
    assert "never connects" in verdict.get(f)["reason"]
    text = f.response.get_text()
    assert "10.1.2.3" not in text and HOST_ADDR not in text
    assert connect(b, f.client_conn, (DENIED, 80))


def test_an_unresolvable_name_is_a_502(env):
    b, _ = env
    f = bind(b, allowed("broken.example", DENIED))
    assert f.response.status_code == 502 and "could not be resolved" in verdict.get(f)["reason"]
    f = bind(b, allowed("nxdomain.wild.example", DENIED))
    assert f.response.status_code == 502 and "has no address" in verdict.get(f)["reason"]


def test_ip_literals_are_their_own_destination(env):
    b, resolver = env
    f = bind(b, allowed("198.51.100.11", "198.51.100.11"))
    assert f.response is None and connect(b, f.client_conn, ("198.51.100.11", 80)) is None
    f = bind(b, allowed("10.99.0.5", "10.99.0.5"))
    assert f.response is None
    f = bind(b, allowed("10.1.2.3", "10.1.2.3"))
    assert f.response.status_code == 403
    f = bind(b, allowed("198.51.100.11", DENIED))
    assert f.response.status_code == 421
    assert resolver.asked == []


@pytest.mark.parametrize("headers, path, method", [
    ({"content-type": "application/dns-message"}, b"/dns-query", b"POST"),
    ({"accept": "application/dns-message"}, b"/dns-query?dns=AAABAAAB", b"GET"),
    ({"accept": "application/dns-json"}, b"/resolve?name=x.example", b"GET"),
    ({}, b"/dns-query?dns=AAABAAAB", b"GET"),
])
def test_dns_over_https_needs_an_exact_rule(env, headers, path, method):
    b, _ = env
    resolved(b, "a.wild.example", ["198.51.100.40"])
    f = bind(b, allowed("a.wild.example", "198.51.100.40", rule="*.wild.example",
                        headers=headers, path=path, method=method))
    assert f.response.status_code == 403 and "DNS over HTTPS" in f.response.get_text()
    resolved(b, "dns.allowed.example", ["198.51.100.41"])
    f = bind(b, allowed("dns.allowed.example", "198.51.100.41", headers=headers, path=path,
                        method=method))
    assert f.response is None


def test_requests_nobody_allowed_and_inbound_ones_are_left_alone(env):
    b, resolver = env
    f = allowed("www.allowed.example", DENIED)
    verdict.record(f, allowed=False, reason="no", host="www.allowed.example", by="enforce")
    bind(b, f)
    assert f.server_conn.address == (DENIED, 80) and f.response is None
    f = allowed("www.allowed.example", "127.0.0.1", port=8080)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:8080")
    bind(b, f)
    assert f.server_conn.address == ("127.0.0.1", 8080) and resolver.asked == []


def test_the_gate_refuses_what_no_name_was_bound_to(env):
    b, _ = env
    client = transparent_client()
    assert "no allowed name" in connect(b, client, (WWW[0], 80))
    b.bound[client.id] = {(HOST_ADDR, 80)}
    assert "of the host" in connect(b, client, (HOST_ADDR, 80))
    dns_client = tflow.tclient_conn()
    dns_client.proxy_mode = ProxyMode.parse("dns")
    assert connect(b, dns_client, ("198.51.100.53", 53)) is None  # verdict.Approvals' job
    b.client_disconnected(client)
    assert client.id not in b.bound


def test_an_exception_denies(env, monkeypatch):
    b, _ = env

    async def boom(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(b, "destination", boom)
    f = bind(b, allowed("www.allowed.example", DENIED))
    assert f.response.status_code == 403 and verdict.get(f)["decision"] == "deny"


# -- passthrough and port rules ---------------------------------------------------------

def client_hello(sni: str) -> bytes:
    c = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = c.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def with_extension(record: bytes, ext_type: int, data: bytes = b"") -> bytes:
    """`record` (one TLS record holding a ClientHello) with one more extension at the end."""
    body = bytearray(record[9:])
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + struct.unpack_from("!H", body, pos)[0]
    pos += 1 + body[pos]
    (ext_len,) = struct.unpack_from("!H", body, pos)
    ext = struct.pack("!HH", ext_type, len(data)) + data
    struct.pack_into("!H", body, pos, ext_len + len(ext))
    body += ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return record[:3] + struct.pack("!H", len(hs)) + hs


def next_layer(dest, data: bytes, client=None):
    c = Context(client or transparent_client(), ctx.options)
    c.server.address = dest
    modes.TransparentProxy(c)
    nl = NextLayer(c)
    nl.events.append(events.DataReceived(c.client, data))
    nl.layer = None
    return nl


def decide(b, nl):
    asyncio.run(b.next_layer(nl))
    return nl


def test_passthrough_is_relayed_raw_to_a_pinned_address(env):
    b, _ = env
    resolved(b, "a.pinned.example", ["198.51.100.50"])
    nl = decide(b, next_layer(("198.51.100.50", 443), client_hello("a.pinned.example")))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert nl.context.layers == [nl.context.layers[0], nl.layer]  # nothing stale left
    info = b.approvals.relay(nl.context.client)
    assert info["kind"] == "passthrough" and info["name"] == "a.pinned.example"
    assert connect(b, nl.context.client, ("198.51.100.50", 443)) is None


def test_passthrough_to_an_address_the_agent_chose_goes_to_the_names(env):
    b, resolver = env
    nl = decide(b, next_layer((DENIED, 443), client_hello("a.pinned.example")))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert nl.context.server.address == ("198.51.100.50", 443)
    assert resolver.asked == [("a.pinned.example", 4)]
    assert connect(b, nl.context.client, (DENIED, 443))


@pytest.mark.parametrize("sni", ["www.allowed.example", "bad.pinned.example", "other.example"])
def test_only_passthrough_names_are_passed_through(env, sni):
    b, _ = env
    nl = decide(b, next_layer((DENIED, 443), client_hello(sni)))
    assert nl.layer is None and b.approvals.relay(nl.context.client) is None


def test_a_client_hello_with_ech_is_intercepted_not_passed(env):
    b, _ = env
    hello = with_extension(client_hello("a.pinned.example"), ECH_EXTENSION, b"\x00")
    nl = decide(b, next_layer(("198.51.100.50", 443), hello))
    assert nl.layer is None


def test_a_partial_client_hello_waits_for_more(env):
    b, _ = env
    nl = next_layer(("198.51.100.50", 443), client_hello("a.pinned.example")[:40])
    nl.layer = layers.HttpLayer(nl.context, layers.http.HTTPMode.transparent)
    decide(b, nl)
    assert nl.layer is None


def test_a_port_rule_relays_only_to_addresses_dns_gave_its_host(env):
    b, _ = env
    resolved(b, "git.example", ["198.51.100.60"])
    nl = decide(b, next_layer(("198.51.100.60", 22), b"SSH-2.0-probe\r\n"))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert b.approvals.relay(nl.context.client)["rule"] == "git.example port 22"
    # Another address on the same port: answered by the HTTP layer, never relayed.
    nl = decide(b, next_layer((DENIED, 22), b"SSH-2.0-probe\r\n"))
    assert isinstance(nl.layer, layers.HttpLayer)
    assert b.approvals.relay(nl.context.client) is None
    # The right host on a port its rule does not name.
    nl = decide(b, next_layer(("198.51.100.60", 2222), b"SSH-2.0-probe\r\n"))
    assert isinstance(nl.layer, layers.HttpLayer)


def test_relayed_flows_are_allowed_counted_and_not_kept(env):
    b, _ = env
    resolved(b, "git.example", ["198.51.100.60"])
    nl = decide(b, next_layer(("198.51.100.60", 22), b"SSH-2.0-probe\r\n"))
    f = tflow.ttcpflow(client_conn=nl.context.client, messages=False)
    f.messages = []
    f.server_conn = connection.Server(address=("198.51.100.60", 22))
    enforce, guard = Enforce(approvals=b.approvals), FinalGuard(b.approvals)
    enforce.tcp_start(f)
    b.tcp_start(f)
    guard.tcp_start(f)
    assert verdict.is_allowed(f) and not f.error and f.live
    for data, from_client in ((b"x" * 10, True), (b"y" * 25, False), (b"z", True)):
        f.messages.append(tcp.TCPMessage(from_client, data))
        b.tcp_message(f)
    assert f.messages == []
    b.tcp_end(f)
    assert f.metadata[EXTRA]["bytes_out"] == 11 and f.metadata[EXTRA]["bytes_in"] == 25
    assert f.metadata[EXTRA]["relay"] == "tcp"


def test_tcp_flows_without_a_relay_are_killed(env):
    b, _ = env
    f = tflow.ttcpflow(messages=False)
    f.client_conn.proxy_mode = ProxyMode.parse("transparent")
    enforce, guard = Enforce(approvals=b.approvals), FinalGuard(b.approvals)
    enforce.tcp_start(f)
    b.tcp_start(f)
    guard.tcp_start(f)
    assert not verdict.is_allowed(f) and f.error


def test_http_connections_are_not_touched(env):
    b, _ = env
    nl = next_layer((DENIED, 443), client_hello("www.allowed.example"))
    sentinel = layers.HttpLayer(nl.context, layers.http.HTTPMode.transparent)
    nl.layer = sentinel
    decide(b, nl)
    assert nl.layer is sentinel


# -- proxy workers: worker 0's pins, asked over its socket (pinshare.py) ---------------

@pytest.fixture
def worker1(tmp_path, env):
    """Binding as worker 1: `zero` is worker 0's pin table, served on a real socket."""
    from panopticond.pins import PinTable

    b, resolver = env
    sock = str(tmp_path / "pins.sock")
    ctx.options.update(panopticon_worker=1, panopticon_pins_socket=sock)
    return b, resolver, PinTable(), sock


def with_worker0(zero, sock, coro_fn):
    from panopticond import pinshare

    async def main():
        server = await pinshare.serve(sock, zero)
        try:
            return await coro_fn()
        finally:
            server.close()

    return asyncio.run(main())


def test_worker_1_keeps_an_address_only_worker_0s_dns_gave(worker1):
    b, resolver, zero, sock = worker1
    assert b.peer is not None
    zero.add("www.allowed.example", [WWW[0]], 60)  # the jail's DNS answered on worker 0
    f = allowed("www.allowed.example", WWW[0])
    with_worker0(zero, sock, lambda: b.requestheaders(f))
    assert f.response is None and f.server_conn.address == (WWW[0], 80)
    assert "agent_address" not in f.metadata[EXTRA] and resolver.asked == []
    assert b.pins.has("www.allowed.example", WWW[0])  # copied: not asked again


def test_worker_1_never_dials_an_address_nobody_pinned(worker1):
    b, resolver, zero, sock = worker1
    zero.add("www.allowed.example", [WWW[0]], 60)
    f = allowed("www.allowed.example", DENIED)
    with_worker0(zero, sock, lambda: b.requestheaders(f))
    assert f.server_conn.address == (WWW[0], 80)
    assert f.metadata[EXTRA]["agent_address"] == DENIED and resolver.asked == []
    assert connect(b, f.client_conn, (DENIED, 80))


def test_worker_1_without_worker_0_fails_closed(worker1, caplog):
    b, resolver, zero, sock = worker1
    f = bind(b, allowed("www.allowed.example", DENIED))  # worker 0 is not there
    assert "treating it as a miss" in caplog.text
    # As one proxy does on a miss: the name's own address, resolved by the proxy.
    assert f.server_conn.address == (WWW[0], 80) and resolver.asked
    assert connect(b, f.client_conn, (DENIED, 80))


def test_worker_1_relays_a_port_rule_to_an_address_worker_0_pinned(worker1):
    b, _, zero, sock = worker1
    nl = next_layer(("198.51.100.60", 22), b"SSH-2.0-probe\r\n")
    with_worker0(zero, sock, lambda: b.next_layer(nl))
    assert isinstance(nl.layer, layers.HttpLayer)  # not pinned anywhere: refused
    zero.add("git.example", ["198.51.100.60"], 60)
    nl = next_layer(("198.51.100.60", 22), b"SSH-2.0-probe\r\n")
    with_worker0(zero, sock, lambda: b.next_layer(nl))
    assert isinstance(nl.layer, layers.TCPLayer)
    assert b.approvals.relay(nl.context.client)["rule"] == "git.example port 22"


def test_worker_0_serves_its_pins_from_running(tmp_path, env):
    from panopticond import pinshare

    b, _ = env
    sock = str(tmp_path / "pins.sock")
    ctx.options.update(panopticon_worker=0, panopticon_pins_socket=sock)
    assert b.peer is None
    resolved(b, "www.allowed.example", [WWW[0]])

    async def main():
        await b.running()
        try:
            return await pinshare.Peer(sock).ask("www.allowed.example", None)
        finally:
            b.done()

    assert [(n, a) for n, a, _ in asyncio.run(main())] == [("www.allowed.example", WWW[0])]
