"""addons/inbound.py: the proxy's side of inbound routes, with mitmproxy's test helpers."""

from __future__ import annotations

import datetime
import gzip
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import connection, exceptions, http, tls
from mitmproxy.addons import block, tlsconfig
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import flowlog, verdict
from panopticond.addons.inbound import (WS_REFUSED, Inbound, _Close, is_inbound,
                                        load_routes)

WEB = {"name": "web", "port": 960, "to": ["127.0.0.1", 8443], "tls": "self",
       "cert_file": None, "allow_from": ["203.0.113.0/24", "2001:db8::/32"],
       "websocket": True, "block_patterns": ["evil-[0-9]+"]}
PLAIN = {"name": "plain", "port": 961, "to": ["127.0.0.1", 8080], "tls": "none",
         "cert_file": None, "allow_from": ["198.51.100.0/24"], "websocket": False,
         "block_patterns": []}


@pytest.fixture
def env(tmp_path):
    """(Inbound, FlowLog, log path) configured with the WEB and PLAIN routes."""
    routes = tmp_path / "inbound.json"
    routes.write_text(json.dumps({"routes": [WEB, PLAIN]}))
    log = tmp_path / "requests.jsonl"
    addon, fl = Inbound(), flowlog.FlowLog(reserve_bytes=0)
    with taddons.context(addon, fl, block.Block()) as tctx:
        tctx.configure(fl, panopticon_log=str(log), panopticon_instance="bot")
        tctx.configure(addon, panopticon_inbound=str(routes), block_global=False)
        yield addon, fl, log


def client(port=960, peer="203.0.113.5", *, tls_on=None, mode=None) -> connection.Client:
    c = tflow.tclient_conn()
    c.proxy_mode = ProxyMode.parse(mode or f"reverse:http://127.0.0.1:8443@0.0.0.0:{port}")
    c.sockname = ("10.231.0.2", port)
    c.peername = (peer, 40000)
    c.tls = (port == 960) if tls_on is None else tls_on
    c.sni = "inb.example" if c.tls else None
    return c


def flow(path="/x", *, method="GET", headers=(), content=b"", **kw) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=8443, path=path.encode(),
                                    method=method.encode(), content=content,
                                    headers=http.Headers(host="127.0.0.1:8443", **dict(headers))))
    f.client_conn = client(**kw)
    return f


def judge(addon, f):
    addon.requestheaders(f)
    if f.response is None and f.live:
        addon.request(f)
    return f


def records(log):
    return [json.loads(x) for x in log.read_text().splitlines()]


# -- the allowed path ---------------------------------------------------------------------

def test_allowed_request_is_decided_approved_and_marked(env):
    addon, _, _ = env
    f = judge(addon, flow(headers={"x-forwarded-for": "1.1.1.1", "forwarded": "for=1.1.1.1",
                                   "x-real-ip": "1.1.1.1"}))
    v = verdict.get(f)
    assert v["decision"] == "allow" and v["by"] == "inbound" and f.response is None
    # Never the client's name: addons keyed on the judged host must not match it.
    assert v["host"] is None
    assert f.request.headers["x-forwarded-for"] == "203.0.113.5"
    assert f.request.headers["x-forwarded-proto"] == "https"
    assert "forwarded" not in f.request.headers and "x-real-ip" not in f.request.headers
    assert is_inbound(f) and f.metadata["panopticon_direction"] == "inbound"
    assert f.metadata[flowlog.EXTRA] == {"direction": "inbound", "route": "web"}
    assert addon.approvals.refusal(f.client_conn, connection.Server(
        address=("127.0.0.1", 8443))) is None
    assert addon.approvals.refusal(f.client_conn, connection.Server(
        address=("127.0.0.1", 8080))) is not None


def test_ipv6_and_mapped_sources(env):
    addon, _, _ = env
    assert verdict.is_allowed(judge(addon, flow(peer="2001:db8::5")))
    assert verdict.is_allowed(judge(addon, flow(peer="::ffff:203.0.113.9")))
    assert not verdict.is_allowed(judge(addon, flow(peer="2001:db9::5")))


def test_outbound_flows_are_left_alone(env):
    addon, _, _ = env
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("transparent@127.0.0.1:901")
    judge(addon, f)
    assert verdict.get(f) is None and not is_inbound(f) and "panopticon_direction" not in f.metadata
    c = tflow.tclient_conn()
    addon.client_connected(c)
    assert c.error is None


# -- refusals -------------------------------------------------------------------------------

def test_source_not_allowed_is_refused_at_connect_and_logged(env):
    addon, _, log = env
    c = client(peer="192.0.2.66")
    addon.client_connected(c)
    assert "not allowed by route web" in c.error
    rec = records(log)[-1]
    assert rec["kind"] == "connection" and rec["direction"] == "inbound"
    assert rec["decision"] == "deny" and rec["client"] == "192.0.2.66:40000"
    ok = client()
    addon.client_connected(ok)
    assert ok.error is None


def test_unknown_listener_is_refused(env):
    addon, _, _ = env
    c = client(port=15999)
    addon.client_connected(c)
    assert "no inbound route" in c.error
    f = judge(addon, flow(port=15999))
    assert f.response.status_code == 403 and not verdict.is_allowed(f)


@pytest.mark.parametrize("kw,reason", [
    ({"peer": "192.0.2.66"}, "source address not allowed"),
    ({"tls_on": False}, "route web is TLS"),
    ({"port": 961, "peer": "198.51.100.4", "tls_on": True}, "route plain is not TLS"),
    ({"method": "CONNECT"}, "CONNECT"),
    ({"path": "/x?q=evil-1"}, "query matches"),
    ({"path": "/x?q=evil%2D1"}, "query matches"),
    ({"path": "/x?q=evil+-1&a=evil-2"}, "query matches"),
    ({"headers": {"upgrade": "h2c", "connection": "upgrade"}}, "upgrade is not allowed"),
    ({"port": 961, "peer": "198.51.100.4", "headers": {"upgrade": "websocket"}},
     "does not allow WebSocket"),
])
def test_refused_requests_get_403_and_are_logged(env, kw, reason):
    addon, fl, log = env
    f = judge(addon, flow(**kw))
    assert f.response.status_code == 403, verdict.get(f)
    v = verdict.get(f)
    assert v["decision"] == "deny" and reason in v["reason"] and v["by"] == "inbound"
    fl.response(f)
    rec = records(log)[-1]
    assert rec["direction"] == "inbound" and rec["decision"] == "deny"
    assert "evil" not in json.dumps(rec)  # the query string is never logged


def test_websocket_upgrade_where_allowed(env):
    addon, _, _ = env
    f = judge(addon, flow(headers={"upgrade": "websocket", "connection": "upgrade"}))
    assert verdict.is_allowed(f)


@pytest.mark.parametrize("content,headers", [
    (b"note=evil-42", {}),
    (b"note=evil%2D42", {"content-type": "application/x-www-form-urlencoded"}),
    (gzip.compress(b"xx evil-7 xx"), {"content-encoding": "gzip"}),
])
def test_body_matching_a_pattern_is_refused(env, content, headers):
    addon, _, _ = env
    f = judge(addon, flow(method="POST", content=content, headers=headers))
    assert f.response.status_code == 403
    assert verdict.get(f)["reason"] == "the body matches a block pattern"


def test_undecodable_body_is_refused_and_a_clean_one_passes(env):
    addon, _, _ = env
    f = judge(addon, flow(method="POST", content=b"not gzip", headers={"content-encoding": "gzip"}))
    assert f.response.status_code == 403 and "cannot be decoded" in verdict.get(f)["reason"]
    assert verdict.is_allowed(judge(addon, flow(method="POST", content=b"note=fine")))


def test_streamed_body_cannot_be_inspected(env):
    addon, _, _ = env
    f = flow(method="POST", headers={"content-length": "5000000"})
    f.request.stream = True
    addon.requestheaders(f)
    assert not verdict.is_allowed(f)
    assert verdict.get(f)["reason"] == "the body is too large to inspect"
    # Without patterns, streaming is fine.
    g = flow(method="POST", port=961, peer="198.51.100.4", headers={"content-length": "5000000"})
    g.request.stream = True
    addon.requestheaders(g)
    assert verdict.is_allowed(g)


def test_a_hook_that_fails_kills_the_flow(env, monkeypatch):
    addon, _, _ = env
    monkeypatch.setattr(addon, "refusal", lambda c: 1 / 0)
    f = judge(addon, flow())
    assert not verdict.is_allowed(f) and f.error and not f.live


# -- WebSocket ------------------------------------------------------------------------------

def ws_flow(addon, messages):
    f = tflow.twebsocketflow()
    f.client_conn = client()
    f.metadata.clear()
    addon.requestheaders(f)
    assert verdict.is_allowed(f)
    f.websocket.messages = []
    for m in messages:
        f.websocket.messages.append(m)
        addon.websocket_message(f)
    return f


def test_every_websocket_message_is_logged_and_only_the_last_kept(env):
    from mitmproxy.websocket import WebSocketMessage
    addon, _, log = env
    msgs = [WebSocketMessage(1, True, b"hello"), WebSocketMessage(2, False, b"\0" * 300)]
    f = ws_flow(addon, msgs)
    assert f.websocket.messages == [msgs[1]]  # memory stays bounded
    frames = [r for r in records(log) if r["kind"] == "websocket"]
    assert [(r["from"], r["type"], r["bytes"], r["decision"]) for r in frames] == [
        ("client", "text", 5, "allow"), ("agent", "binary", 300, "allow")]
    assert all(r["direction"] == "inbound" and r["route"] == "web" and r["instance"] == "bot"
               for r in frames)
    assert not any(m.dropped for m in msgs)


def test_a_client_message_matching_a_pattern_ends_the_websocket(env):
    from mitmproxy.websocket import WebSocketMessage
    addon, _, log = env
    msgs = [WebSocketMessage(1, True, b"evil-9"), WebSocketMessage(1, False, b"late"),
            WebSocketMessage(1, True, b"fine")]
    f = ws_flow(addon, msgs)
    assert [m.dropped for m in msgs] == [True, True, True]
    assert f.metadata[WS_REFUSED]
    frames = [r for r in records(log) if r["kind"] == "websocket"]
    assert [r["reason"] for r in frames] == ["a message matches a block pattern"] + [
        "the connection was refused earlier"] * 2
    # The agent's own messages are not matched against the patterns.
    g = ws_flow(addon, [WebSocketMessage(1, False, b"evil-9")])
    assert not g.websocket.messages[-1].dropped


# -- connection level -------------------------------------------------------------------------

def next_layer(addon, c, chosen):
    context = Context(c, _options())
    modes.ReverseProxy(context)
    nl = proxy_layer.NextLayer(context)
    nl.layer = chosen(context)
    addon.next_layer(nl)
    return nl, context


def _options():
    from mitmproxy import ctx
    return ctx.options


@pytest.mark.parametrize("port,peer,chosen,closed", [
    (960, "203.0.113.5", layers.ClientTLSLayer, False),
    (960, "203.0.113.5", lambda ctx: layers.HttpLayer(ctx, layers.http.HTTPMode.transparent),
     True),
    (961, "198.51.100.4", lambda ctx: layers.HttpLayer(ctx, layers.http.HTTPMode.transparent),
     False),
    (961, "198.51.100.4", layers.ClientTLSLayer, True),
])
def test_a_route_holds_to_its_tls_mode(env, port, peer, chosen, closed):
    addon, _, log = env
    nl, context = next_layer(addon, client(port=port, peer=peer), chosen)
    assert isinstance(nl.layer, _Close) == closed
    if closed:
        assert context.layers == [context.layers[0], nl.layer]
        assert records(log)[-1]["reason"].endswith(("which is TLS", "which is plain HTTP"))


def test_public_clients_are_not_blocked_by_mitmproxy(tmp_path):
    # mitmproxy kills clients with public addresses by default (block_global).
    routes = tmp_path / "inbound.json"
    routes.write_text(json.dumps({"routes": [WEB]}))
    addon = Inbound()
    with taddons.context(addon, block.Block()) as tctx:
        tctx.configure(addon, panopticon_inbound=str(routes))
        assert tctx.options.block_global is True
        addon.running()
        assert tctx.options.block_global is False
        with pytest.raises(exceptions.OptionsError, match="block_global"):
            tctx.options.update(block_global=True)


def test_bad_routes_file_fails_the_configuration(tmp_path):
    addon = Inbound()
    bad = tmp_path / "inbound.json"
    with taddons.context(addon) as tctx:
        for text in ("{", json.dumps({"routes": [{**WEB, "tls": "maybe"}]}),
                     json.dumps({"routes": [WEB, WEB]}),
                     json.dumps({"routes": [{**WEB, "allow_from": []}]}),
                     json.dumps({"routes": [{**WEB, "block_patterns": ["("]}]})):
            bad.write_text(text)
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(addon, panopticon_inbound=str(bad))
            assert addon.routes == {}
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, panopticon_inbound=str(tmp_path / "missing.json"))


# -- a custom certificate ------------------------------------------------------------------------

def _self_signed(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert, cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_custom_certificate_is_served(tmp_path):
    cert, pem, key = _self_signed("own.example")
    pem_file = tmp_path / "inbound-own.pem"
    pem_file.write_bytes(pem + key)
    routes = tmp_path / "inbound.json"
    routes.write_text(json.dumps({"routes": [{**WEB, "tls": "custom",
                                              "cert_file": str(pem_file)}]}))
    addon, tc = Inbound(), tlsconfig.TlsConfig()
    with taddons.context(addon, tc) as tctx:
        tctx.configure(tc, confdir=str(tmp_path / "confdir"))
        tctx.configure(addon, panopticon_inbound=str(routes))
        c = client()
        data = tls.TlsData(c, Context(c, tctx.options))
        tc.tls_start_client(data)
        addon.tls_start_client(data)
        served = data.ssl_conn.get_certificate().to_cryptography()
        assert served == cert


def test_custom_certificate_with_the_wrong_key_is_refused(tmp_path):
    _, pem, _ = _self_signed("a.example")
    _, _, other_key = _self_signed("b.example")
    f = tmp_path / "x.pem"
    f.write_bytes(pem + other_key)
    routes = tmp_path / "inbound.json"
    routes.write_text(json.dumps({"routes": [{**WEB, "tls": "custom", "cert_file": str(f)}]}))
    with pytest.raises(ValueError, match="does not belong"):
        load_routes(str(routes))
