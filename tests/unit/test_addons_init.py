"""The addons together, in the order the proxy runs them."""

import asyncio
import json

import pytest
from mitmproxy import connection, dns, http, options
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import dns as dns_layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons, tflow, tutils
from mitmproxy.tools.dump import DumpMaster

import panopticond.addons as pa
from panopticond.addons import dispatch, verdict
from panopticond.policy import Policy

DEST = "198.51.100.7"


@pytest.fixture
def paths(tmp_path):
    policy = tmp_path / "policy.json"
    compiled = Policy.build("x", ["allowed.example"], [], "agents.x.allow").to_dict()
    policy.write_text(json.dumps(compiled))
    return policy, tmp_path / "requests.jsonl"


def chain(addons, paths):
    tctx = taddons.context(*addons)
    policy, log = paths
    tctx.options.update(panopticon_policy=str(policy), panopticon_log=str(log),
                        panopticon_instance="x")
    return tctx


def run_http(master, f):
    """The hooks mitmproxy fires for a request, and for the answer if there is one."""
    for hook in (http_layer.HttpRequestHeadersHook, http_layer.HttpRequestHook):
        master.addons.trigger(hook(f))
        if f.error:
            master.addons.trigger(http_layer.HttpErrorHook(f))
            return f
    if f.response is None:  # as if it went upstream
        f.response = tutils.tresp()
    master.addons.trigger(http_layer.HttpResponseHeadersHook(f))
    master.addons.trigger(http_layer.HttpResponseHook(f))
    return f


def plain(host):
    return tflow.tflow(req=tutils.treq(host=DEST, port=80, headers=http.Headers(host=host),
                                       content=b""))


def log_lines(paths):
    return [json.loads(x) for x in paths[1].read_text().splitlines()]


def gate(master, client, address):
    s = connection.Server(address=address)
    master.addons.trigger(server_hooks.ServerConnectHook(
        server_hooks.ServerConnectionHookData(server=s, client=client)))
    return s


def test_all_addons_are_fresh_and_ordered():
    class Operator:
        pass

    a, b = pa.all_addons([Operator()]), pa.all_addons([Operator()])
    assert [type(x).__name__ for x in a] == ["Inbound", "Enforce", "Binding", "SecretGuard",
                                             "SecretDns", "DnsFilter", "AddHeaders",
                                             "_Guard", "Operator", "_Guard", "FlowLog",
                                             "SecretSwap", "FinalGuard"]
    assert not set(map(id, a)) & set(map(id, b))
    (inbound, enforce, binding, secretguard, secretdns, dnsfilter, headers, opening, _,
     closing, _, secretswap, guard) = a
    assert secretguard.core is secretdns.core is secretswap.core
    assert enforce.policy is binding.policy is dnsfilter.policy is headers.policy \
        is opening.boundary.policy
    assert opening.boundary is closing.boundary
    assert inbound.approvals is enforce.approvals is binding.approvals is guard.approvals


def test_no_operator_addons_no_boundary_guards():
    # They would check nothing and cost a dispatch of every event.
    assert "_Guard" not in [type(x).__name__ for x in pa.all_addons()]


def test_install_puts_dnsfilter_before_mitmproxys_resolver():
    async def build():
        m = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        pa.install(m)
        # The order in which addons see events, through the Dispatch entries.
        return [getattr(a, "name", type(a).__name__.lower())
                for a in dispatch.expand(m.addons.chain)]

    names = asyncio.run(build())
    assert names.index("panopticon_dnsfilter") < names.index("dnsresolver")
    assert names.index("panopticon_secretdns") < names.index("panopticon_dnsfilter")
    # Enforce overrides choices of nextlayer and tlsconfig: it must come after them.
    assert names.index("panopticon_enforce") > names.index("nextlayer")
    assert names.index("panopticon_enforce") > names.index("tlsconfig")
    assert names[-1] == "panopticon_finalguard"


def test_allowed_and_denied_requests_end_to_end(paths):
    with chain(pa.all_addons(), paths) as tctx:
        ok = run_http(tctx.master, plain("allowed.example"))
        assert ok.response.status_code == 200
        assert not gate(tctx.master, ok.client_conn, (DEST, 80)).error
        no = run_http(tctx.master, plain("denied.example"))
        assert no.response.status_code == 403
        assert gate(tctx.master, no.client_conn, (DEST, 80)).error
    recs = log_lines(paths)
    assert [(r["host"], r["decision"], r["status"]) for r in recs] == [
        ("allowed.example", "allow", 200), ("denied.example", "deny", 403)]


def test_without_enforce_everything_is_denied(paths):
    addons = [a for a in pa.all_addons() if not isinstance(a, pa.Enforce)]
    with chain(addons, paths) as tctx:
        f = run_http(tctx.master, plain("allowed.example"))
        assert f.response.status_code == 403
        assert gate(tctx.master, f.client_conn, (DEST, 80)).error
    (rec,) = log_lines(paths)
    assert rec["decision"] == "deny"


def test_an_addon_that_raises_before_the_guard_cannot_open(paths, monkeypatch):
    # mitmproxy logs an exception in a hook and goes on with the next addon.
    def broken(self, flow):
        raise RuntimeError("bug")

    monkeypatch.setattr(pa.Enforce, "requestheaders", broken)
    monkeypatch.setattr(pa.Enforce, "request", broken)
    with chain(pa.all_addons(), paths) as tctx:
        f = run_http(tctx.master, plain("allowed.example"))
        assert f.response.status_code == 403


def test_dns_end_to_end(paths):
    with chain(pa.all_addons(), paths) as tctx:
        ok = tflow.tdnsflow(req=tutils.tdnsreq(
            questions=[dns.Question("allowed.example", dns.types.A, dns.classes.IN)]))
        tctx.master.addons.trigger(dns_layer.DnsRequestHook(ok))
        assert ok.response is None and verdict.is_allowed(ok)
        ok.response = ok.request.succeed([])  # the resolver's answer
        tctx.master.addons.trigger(dns_layer.DnsResponseHook(ok))

        txt = tflow.tdnsflow(req=tutils.tdnsreq(
            questions=[dns.Question("allowed.example", dns.types.TXT, dns.classes.IN)]))
        tctx.master.addons.trigger(dns_layer.DnsRequestHook(txt))
        assert txt.response.response_code == dns.response_codes.REFUSED
        tctx.master.addons.trigger(dns_layer.DnsResponseHook(txt))
    recs = log_lines(paths)
    assert [(r["qtype"], r["decision"], r["rcode"]) for r in recs] == [
        ("A", "allow", "NOERROR"), ("TXT", "deny", "REFUSED")]
