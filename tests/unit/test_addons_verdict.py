from mitmproxy import connection, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils

from panopticond.addons import verdict


def test_printable_escapes_control_characters_and_truncates():
    assert verdict.printable("a\nb\x7f") == "a\\x0ab\\x7f"
    assert verdict.printable(None) == "(none)"
    assert verdict.printable("x" * 300).endswith("...")


def test_deny_http_answers_locally_when_safe():
    f = tflow.tflow()
    verdict.deny_http(f, 403, "no\n", phase="request", reason="r", host="h", by="t")
    assert f.response.status_code == 403 and f.response.headers["content-type"] == "text/plain"
    assert verdict.is_local_denial(f)


def test_deny_http_kills_what_may_be_streamed_or_already_answered():
    streamed = tflow.tflow()
    streamed.request.stream = True
    verdict.deny_http(streamed, 403, "", phase="request", reason="r", host="h", by="t")
    chunked = tflow.tflow(req=tutils.treq(headers=http.Headers(transfer_encoding="chunked")))
    verdict.deny_http(chunked, 403, "", phase="requestheaders", reason="r", host="h", by="t")
    upstream = tflow.tflow(resp=True)
    verdict.deny_http(upstream, 403, "", phase="responseheaders", reason="r", host="h", by="t")
    for f in (streamed, chunked, upstream):
        assert f.error.msg == f.error.KILLED_MESSAGE
        assert verdict.get(f)["decision"] == "deny" and not verdict.is_local_denial(f)


def test_approvals():
    a = verdict.Approvals()
    c = tflow.tclient_conn()
    v6 = connection.Server(address=("2001:db8::1", 443))
    assert a.refusal(c, v6)
    a.approve(c, ("2001:db8::1", 443))
    assert a.refusal(c, v6) is None
    assert a.refusal(c, connection.Server(address=("2001:db8::1", 80)))
    assert a.refusal(c, connection.Server(address=None)) == "no destination"


def test_dns_mode_may_reach_only_the_configured_resolver():
    a = verdict.Approvals()
    c = tflow.tclient_conn()
    c.proxy_mode = ProxyMode.parse("dns")
    assert a.refusal(c, connection.Server(address=("203.0.113.53", 53)), ["203.0.113.53"]) is None
    assert a.refusal(c, connection.Server(address=("203.0.113.99", 53)), ["203.0.113.53"])
    t = tflow.tclient_conn()  # transparent/regular mode: no such exception
    assert a.refusal(t, connection.Server(address=("203.0.113.53", 53)), ["203.0.113.53"])
