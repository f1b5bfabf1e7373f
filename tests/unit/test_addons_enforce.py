import json
import logging

import pytest
from mitmproxy import connection, exceptions, http, tls
from mitmproxy.proxy import layer as proxy_layer
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons.enforce import Enforce
from panopticond.policy import Policy

HINT = "agents.x.allow in /etc/panopticon/config.toml"
DEST = "198.51.100.7"


@pytest.fixture
def policy_path(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps(Policy.build(
        "x", ["allowed.example", "*.wild.example", "198.51.100.9"], ["bad.wild.example"], HINT,
    ).to_dict()))
    return p


@pytest.fixture
def enforce(policy_path):
    e = Enforce()
    with taddons.context(e) as tctx:
        tctx.configure(e, panopticon_policy=str(policy_path))
        yield e


def plain(host_header, *, dest=DEST, port=80, **req):
    headers = http.Headers(host=host_header) if host_header is not None else http.Headers()
    return tflow.tflow(req=tutils.treq(host=dest, port=port, headers=headers, content=b"", **req))


def tls_flow(sni, host_header=None, *, dest=DEST):
    f = plain(host_header if host_header is not None else sni, dest=dest, port=443, scheme=b"https")
    if host_header is None and sni is None:
        f.request.headers.clear()
    f.client_conn.tls = True
    f.client_conn.sni = sni
    return f


def judge(e, f):
    e.requestheaders(f)
    e.request(f)
    return f


def clienthello(e, client, dest=DEST):
    ctx = Context(client, e_options())
    ctx.server.address = (dest, 443)
    data = tls.ClientHelloData(ctx, None)
    e.tls_clienthello(data)
    return data


def e_options():
    from mitmproxy import ctx
    return ctx.options


def server_connect(e, client, address):
    server = connection.Server(address=address)
    e.server_connect(server_hooks.ServerConnectionHookData(server=server, client=client))
    return server


def text(f):
    return f.response.get_text()


def test_allowed_plain_http_passes_and_approves_its_destination(enforce):
    f = judge(enforce, plain("allowed.example"))
    assert f.response is None and not f.error
    v = verdict.get(f)
    assert v["decision"] == "allow" and v["host"] == "allowed.example"
    assert v["rule"] == "allowed.example"
    assert not server_connect(enforce, f.client_conn, (DEST, 80)).error
    assert server_connect(enforce, f.client_conn, ("203.0.113.1", 80)).error


def test_denied_request_gets_a_readable_403(enforce):
    f = judge(enforce, plain("denied.example"))
    assert f.response.status_code == 403
    assert f.response.headers["content-type"] == "text/plain"
    assert text(f) == (
        "panopticon: blocked request to denied.example: not in the allowlist.\n"
        f'To allow it, add "denied.example" to {HINT}.\n'
    )
    assert verdict.get(f)["decision"] == "deny"
    assert server_connect(enforce, f.client_conn, (DEST, 80)).error


def test_judges_the_host_header_not_the_destination(enforce):
    # The agent connects to an allowed IP literal but names a denied host.
    f = judge(enforce, plain("denied.example", dest="198.51.100.9"))
    assert f.response.status_code == 403


def test_host_with_port_and_case_and_trailing_dot(enforce):
    f = judge(enforce, plain("Allowed.Example.:80"))
    assert f.response is None


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("wild.example", True),
        ("a.wild.example", True),
        ("a.b.wild.example", True),
        ("evilwild.example", False),
        ("wild.example.evil.test", False),
    ],
)
def test_wildcard(enforce, host, allowed):
    f = judge(enforce, plain(host))
    assert (f.response is None) is allowed


def test_deny_wins_over_allow(enforce):
    f = judge(enforce, plain("bad.wild.example"))
    assert f.response.status_code == 403
    assert 'deny rule "bad.wild.example"' in text(f)
    assert verdict.get(f)["rule"] == "bad.wild.example"


def test_invalid_host_name_is_denied_and_quoted_safely(enforce):
    f = judge(enforce, plain("evil\x01name.example"))
    assert f.response.status_code == 403
    assert "\x01" not in text(f) and "\\x01" in text(f)


def test_missing_policy_file_denies_everything(tmp_path, caplog):
    e = Enforce()
    with taddons.context(e) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(e, panopticon_policy=str(tmp_path / "nope.json"))
        f = judge(e, plain("allowed.example"))
    assert f.response.status_code == 403
    assert "no valid policy" in text(f)
    assert str(tmp_path) not in text(f)  # nothing about the host machine
    assert any("nope.json" in r.getMessage() for r in caplog.records)


def test_invalid_policy_file_denies_everything(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text('{"version": 1}')
    e = Enforce()
    with taddons.context(e) as tctx:
        tctx.configure(e, panopticon_policy=str(p))
        assert judge(e, plain("allowed.example")).response.status_code == 403


def test_policy_swap_by_rename_is_picked_up(enforce, policy_path):
    assert judge(enforce, plain("allowed.example")).response is None
    tmp = policy_path.with_name("new.json")
    tmp.write_text(json.dumps(Policy.build("x", ["other.example"], [], HINT).to_dict()))
    tmp.replace(policy_path)
    enforce.policy.interval = 0  # instead of waiting a second
    assert judge(enforce, plain("allowed.example")).response.status_code == 403
    assert judge(enforce, plain("other.example")).response is None


def test_exception_in_decide_denies(enforce, monkeypatch, caplog):
    def boom(self, host):
        raise RuntimeError("boom")

    monkeypatch.setattr(Policy, "decide", boom)
    with caplog.at_level(logging.ERROR):
        f = judge(enforce, plain("allowed.example"))
    assert f.response.status_code == 403
    assert "internal error" in text(f)
    assert verdict.get(f)["decision"] == "deny"
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


def test_exception_at_headers_kills_a_chunked_request(enforce, monkeypatch):
    def boom(self, host):
        raise RuntimeError("boom")

    monkeypatch.setattr(Policy, "decide", boom)
    f = plain("allowed.example")
    f.request.headers["transfer-encoding"] = "chunked"
    enforce.requestheaders(f)
    assert f.response is None and f.error.msg == f.error.KILLED_MESSAGE


def test_request_mitmproxy_refused_itself_is_recorded(enforce):
    f = plain("allowed.example", method=b"CONNECT")
    f.error = tflow.terr("mitmproxy received an HTTP CONNECT request")
    enforce.requestheaders(f)
    assert verdict.get(f)["decision"] == "deny"
    assert f.response is None


def test_tls_allowed_sni(enforce):
    f = tls_flow("allowed.example")
    data = clienthello(enforce, f.client_conn)
    assert not data.ignore_connection and not data.establish_server_tls_first
    assert judge(enforce, f).response is None


def test_tls_denied_sni_completes_then_403(enforce):
    f = tls_flow("denied.example")
    data = clienthello(enforce, f.client_conn)
    assert not data.ignore_connection
    judge(enforce, f)
    assert f.response.status_code == 403
    assert "denied.example" in text(f)


def test_tls_connection_denied_at_hello_stays_denied(enforce):
    # Even if the policy changed meanwhile, or a name check were skipped later.
    f = tls_flow("denied.example")
    clienthello(enforce, f.client_conn)
    f.client_conn.sni = "allowed.example"
    f.request.headers["host"] = "allowed.example"
    assert judge(enforce, f).response.status_code == 403


def test_tls_host_differs_from_sni_is_421(enforce):
    f = tls_flow("allowed.example", "a.wild.example")
    clienthello(enforce, f.client_conn)
    judge(enforce, f)
    assert f.response.status_code == 421
    assert "misdirected" in text(f)


def test_tls_denied_sni_with_allowed_host_is_403(enforce):
    f = tls_flow("denied.example", "allowed.example")
    clienthello(enforce, f.client_conn)
    assert judge(enforce, f).response.status_code == 403


def test_tls_without_sni_is_judged_on_the_destination_address(enforce):
    f = tls_flow(None, dest=DEST)
    clienthello(enforce, f.client_conn, DEST)
    assert judge(enforce, f).response.status_code == 403
    g = tls_flow(None, dest="198.51.100.9")
    clienthello(enforce, g.client_conn, "198.51.100.9")
    assert judge(enforce, g).response is None


def test_ip_literal_host_must_be_the_destination(enforce):
    f = judge(enforce, plain("198.51.100.9", dest=DEST))
    assert f.response.status_code == 421
    g = judge(enforce, plain("198.51.100.9", dest="198.51.100.9"))
    assert g.response is None


def test_http2_authority_and_host_must_agree(enforce):
    f = tls_flow("allowed.example")
    f.request.http_version = "HTTP/2.0"
    f.request.authority = "allowed.example"
    f.request.headers["host"] = "denied.example"
    clienthello(enforce, f.client_conn)
    assert judge(enforce, f).response.status_code == 421


def test_absolute_form_is_refused(enforce):
    f = plain("allowed.example")
    f.request.authority = "allowed.example"
    assert judge(enforce, f).response.status_code == 403


def test_connect_is_killed(enforce):
    f = plain("allowed.example", method=b"CONNECT")
    enforce.http_connect(f)
    assert f.error and f.error.msg == f.error.KILLED_MESSAGE
    assert verdict.get(f)["decision"] == "deny"


def test_denied_streamed_or_chunked_request_is_killed(enforce):
    f = plain("denied.example")
    f.request.headers["transfer-encoding"] = "chunked"
    enforce.requestheaders(f)
    assert f.response is None and f.error.msg == f.error.KILLED_MESSAGE
    g = plain("denied.example")
    g.request.stream = True
    enforce.requestheaders(g)
    assert g.response is None and g.error.msg == g.error.KILLED_MESSAGE


def test_chunked_allowed_request_is_not_touched(enforce):
    f = plain("allowed.example")
    f.request.headers["transfer-encoding"] = "chunked"
    enforce.requestheaders(f)
    assert f.response is None and not f.error


def test_earlier_local_answer_is_replaced_when_denied(enforce):
    f = plain("mitm.it")
    f.response = http.Response.make(200, b"onboarding")
    judge(enforce, f)
    assert f.response.status_code == 403


def test_server_connect_without_approval_is_refused(enforce):
    client = tflow.tclient_conn()
    server = server_connect(enforce, client, (DEST, 443))
    assert server.error and "panopticon" in server.error


def test_approvals_are_per_client_connection(enforce):
    f = judge(enforce, plain("allowed.example"))
    other = tflow.tclient_conn()
    assert server_connect(enforce, other, (DEST, 80)).error
    enforce.client_disconnected(f.client_conn)
    assert server_connect(enforce, f.client_conn, (DEST, 80)).error


def test_tcp_and_udp_flows_are_killed(enforce):
    t = tflow.ttcpflow()
    enforce.tcp_start(t)
    assert t.error.msg == t.error.KILLED_MESSAGE
    u = tflow.tudpflow()
    enforce.udp_start(u)
    assert u.error.msg == u.error.KILLED_MESSAGE


def test_raw_tcp_layer_is_replaced_by_http(enforce):
    from mitmproxy import ctx

    context = Context(tflow.tclient_conn(), ctx.options)
    nl = proxy_layer.NextLayer(context)
    nl.layer = layers.TCPLayer(context)
    enforce.next_layer(nl)
    assert isinstance(nl.layer, layers.HttpLayer)
    nl.layer = layers.TCPLayer(context, ignore=True)
    enforce.next_layer(nl)
    assert isinstance(nl.layer, layers.HttpLayer)


def test_unsafe_mitmproxy_options_are_refused(policy_path):
    e = Enforce()
    with taddons.context(e) as tctx:
        with pytest.raises(exceptions.OptionsError, match="rawtcp"):
            tctx.configure(e, rawtcp=True)
        with pytest.raises(exceptions.OptionsError, match="ignore_hosts"):
            tctx.configure(e, ignore_hosts=["."])
        tctx.configure(e, ignore_hosts=(), rawtcp=False)  # safe values are accepted


def test_running_fixes_unsafe_defaults(policy_path):
    e = Enforce()
    with taddons.context(e) as tctx:
        assert tctx.options.rawtcp is True  # mitmproxy's default
        tctx.configure(e, panopticon_policy=str(policy_path))
        e.running()
        assert tctx.options.rawtcp is False


def test_running_without_policy_option_denies_and_logs(caplog):
    e = Enforce()
    with taddons.context(e), caplog.at_level(logging.ERROR):
        e.running()
        assert judge(e, plain("allowed.example")).response.status_code == 403
    assert any("panopticon_policy" in r.getMessage() for r in caplog.records)
