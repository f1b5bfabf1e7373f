import logging

import pytest
from mitmproxy import connection, dns, http, tls
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons.finalguard import FinalGuard


@pytest.fixture
def guard():
    g = FinalGuard()
    with taddons.context(g):
        yield g


def request_flow():
    return tflow.tflow(req=tutils.treq(headers=http.Headers(host="api.example"), content=b""))


def killed(f):
    return f.error is not None and f.error.msg == f.error.KILLED_MESSAGE


def test_flow_nobody_marked_is_denied(guard):
    f = request_flow()
    guard.request(f)
    assert f.response.status_code == 403
    assert "no rule allowed" in f.response.get_text()
    v = verdict.get(f)
    assert v["decision"] == "deny" and v["by"] == "finalguard"


def test_unmarked_chunked_request_is_killed_at_headers(guard):
    f = request_flow()
    f.request.headers["transfer-encoding"] = "chunked"
    guard.requestheaders(f)
    assert killed(f) and f.response is None


def test_unmarked_response_is_killed(guard):
    f = tflow.tflow(resp=True)
    guard.responseheaders(f)
    assert killed(f)


def test_allowed_flow_is_untouched(guard):
    f = request_flow()
    verdict.record(f, allowed=True, reason="ok", host="api.example", by="enforce")
    guard.requestheaders(f)
    guard.request(f)
    f.response = tutils.tresp()
    guard.responseheaders(f)
    assert f.response.status_code == 200 and not f.error


def test_local_denial_is_left_in_place(guard):
    f = request_flow()
    verdict.deny_http(f, 403, "no\n", phase="request", reason="nope", host="x", by="enforce")
    guard.request(f)
    guard.responseheaders(f)
    assert f.response.get_text() == "no\n" and not f.error


def test_denied_flow_whose_answer_was_removed_is_denied_again(guard):
    f = request_flow()
    verdict.deny_http(f, 403, "no\n", phase="request", reason="nope", host="x", by="enforce")
    f.response = None
    guard.request(f)
    assert f.response.status_code == 403
    assert verdict.get(f)["reason"] == "nope"


def test_dns_query_nobody_allowed_is_refused(guard):
    f = tflow.tdnsflow()
    guard.dns_request(f)
    assert f.response.response_code == dns.response_codes.REFUSED


def test_dns_answer_nobody_allowed_is_replaced(guard):
    f = tflow.tdnsflow(resp=True)  # e.g. mitmproxy's resolver answered
    guard.dns_request(f)
    assert f.response.response_code == dns.response_codes.REFUSED


def test_allowed_dns_query_is_untouched(guard):
    f = tflow.tdnsflow()
    verdict.record(f, allowed=True, reason="ok", host="dns.google", by="dnsfilter")
    guard.dns_request(f)
    assert f.response is None


def test_tcp_udp_and_connect_are_killed(guard):
    t, u = tflow.ttcpflow(), tflow.tudpflow()
    guard.tcp_start(t)
    guard.udp_start(u)
    c = request_flow()
    guard.http_connect(c)
    assert killed(t) and killed(u) and killed(c)


def test_server_connect_needs_an_approval():
    approvals = verdict.Approvals()
    g = FinalGuard(approvals)
    with taddons.context(g):
        client = tflow.tclient_conn()
        s = connection.Server(address=("198.51.100.7", 443))
        g.server_connect(server_hooks.ServerConnectionHookData(server=s, client=client))
        assert s.error
        approvals.approve(client, ("198.51.100.7", 443))
        s = connection.Server(address=("198.51.100.7", 443))
        g.server_connect(server_hooks.ServerConnectionHookData(server=s, client=client))
        assert not s.error


def test_tls_is_always_intercepted_and_lazy(guard):
    from mitmproxy import ctx

    data = tls.ClientHelloData(Context(tflow.tclient_conn(), ctx.options), None)
    data.ignore_connection = True
    data.establish_server_tls_first = True
    guard.tls_clienthello(data)
    assert not data.ignore_connection and not data.establish_server_tls_first


def test_running_without_enforce_reports_an_error(guard, caplog):
    with caplog.at_level(logging.ERROR):
        guard.running()
    assert any("Enforce addon is not loaded" in r.getMessage() for r in caplog.records)
