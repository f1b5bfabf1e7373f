"""Operator addons: loaded fail-closed, and boxed so that they can refuse, never allow.

Each test runs the whole chain of panopticon's addons (as the proxy does) with an
operator addon in its place, and judges by the flow and by the log record.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from mitmproxy import connection, dns, http, tls
from mitmproxy.proxy import layers, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer, NextLayerHook
from mitmproxy.proxy.layers import dns as dns_layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import tls as tls_layer
from mitmproxy.test import taddons, tflow, tutils

import panopticond.addons as pa
from panopticond.addons import verdict
from panopticond.addons.operator_addons import OperatorAddon, annotate, load_scripts, refuse
from panopticond.errors import PanopticonError
from panopticond.policy import Policy, RequestRule

DEST = "198.51.100.7"


@pytest.fixture
def paths(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(Policy.build(
        "x", ["allowed.example"], [], "agents.x.allow",
        rules=[RequestRule.parse("api.example", ["GET"], ["/repos/acme/*"])],
    ).to_dict()))
    return policy, tmp_path / "requests.jsonl"


def ours(operator):
    # Without Binding: it resolves names itself (a packet off this machine); it runs
    # before the operator boundary and has tests of its own.
    return [a for a in pa.all_addons(operator) if type(a).__name__ != "Binding"]


def chain(paths, *operator):
    wrapped = [OperatorAddon(o, f"test{i}") for i, o in enumerate(operator)]
    tctx = taddons.context(*ours(wrapped))
    policy, log = paths
    tctx.options.update(panopticon_policy=str(policy), panopticon_log=str(log),
                        panopticon_instance="x")
    return tctx


def run_http(master, f):
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


def plain(host, method="GET", path="/"):
    return tflow.tflow(req=tutils.treq(host=DEST, port=80, headers=http.Headers(host=host),
                                       content=b"", method=method.encode(), path=path.encode()))


def gate(master, client, address=(DEST, 80)):
    s = connection.Server(address=address)
    master.addons.trigger(server_hooks.ServerConnectHook(
        server_hooks.ServerConnectionHookData(server=s, client=client)))
    return s


def records(paths):
    return [json.loads(x) for x in paths[1].read_text().splitlines()]


# --- an operator addon cannot let through what the policy refused ----------------------------

class Undeny:
    """Everything a careless (or clever) operator addon could do to open a denied flow."""

    def _open(self, flow):
        v = flow.metadata.get(verdict.KEY)
        if isinstance(v, dict):
            v["decision"] = "allow"  # in place
        else:
            flow.metadata[verdict.KEY] = {"decision": "allow", "reason": "mine", "host": None}
        if flow.response is not None and flow.response.status_code in (403, 421):
            flow.response = None

    requestheaders = request = responseheaders = _open

    def dns_request(self, flow):
        flow.metadata[verdict.KEY] = {"decision": "allow", "reason": "mine", "host": None,
                                      "msg": id(flow.request)}
        flow.response = None

    def tls_clienthello(self, data):
        data.ignore_connection = True
        data.establish_server_tls_first = True

    def next_layer(self, nextlayer):
        nextlayer.layer = layers.TCPLayer(nextlayer.context)

    def server_connect(self, data):
        data.server.error = None
        data.server.address = ("203.0.113.66", 80)
        data.server.via = None


def test_undeny_cannot_open_a_denied_host(paths):
    with chain(paths, Undeny()) as tctx:
        f = run_http(tctx.master, plain("denied.example"))
        assert f.response.status_code == 403 and b"denied.example" in f.response.content
        assert verdict.get(f)["decision"] == "deny"
        assert gate(tctx.master, f.client_conn).error
        # Positive control: the same addon on an allowed host changes nothing.
        ok = run_http(tctx.master, plain("allowed.example"))
        assert ok.response.status_code == 200
    assert [(r["host"], r["decision"]) for r in records(paths)] == [
        ("denied.example", "deny"), ("allowed.example", "allow")]


def test_undeny_cannot_open_a_denied_method_or_path(paths):
    with chain(paths, Undeny()) as tctx:
        post = run_http(tctx.master, plain("api.example", "POST", "/repos/acme/x"))
        other = run_http(tctx.master, plain("api.example", "GET", "/repos/other"))
        ok = run_http(tctx.master, plain("api.example", "GET", "/repos/acme/x"))
    assert post.response.status_code == 403 and other.response.status_code == 403
    assert ok.response.status_code == 200


def test_undeny_cannot_answer_a_denied_dns_name(paths):
    with chain(paths, Undeny()) as tctx:
        f = tflow.tdnsflow(req=tutils.tdnsreq(
            questions=[dns.Question("denied.example", dns.types.A, dns.classes.IN)]))
        tctx.master.addons.trigger(dns_layer.DnsRequestHook(f))
        assert f.response.response_code == dns.response_codes.NXDOMAIN
        assert f.response.id == f.request.id  # else the client drops the answer
        assert verdict.get(f)["decision"] == "deny"


def test_undeny_cannot_change_tls_layers_or_the_upstream(paths):
    with chain(paths, Undeny()) as tctx:
        client = connection.Client(peername=("10.0.0.2", 40000), sockname=("127.0.0.1", 15001))
        context = Context(client, tctx.options)
        context.server.address = (DEST, 443)
        data = tls.ClientHelloData(context, None)
        tctx.master.addons.trigger(tls_layer.TlsClienthelloHook(data))
        assert not data.ignore_connection and not data.establish_server_tls_first

        nl = NextLayer(context)
        nl.layer = layers.HttpLayer(context, http_layer.HTTPMode.transparent)
        stack = list(context.layers)
        tctx.master.addons.trigger(NextLayerHook(nl))
        assert not isinstance(nl.layer, layers.TCPLayer)
        assert context.layers == stack  # building a layer pushes it: popped again

        s = connection.Server(address=(DEST, 80))
        tctx.master.addons.trigger(server_hooks.ServerConnectHook(
            server_hooks.ServerConnectionHookData(server=s, client=client)))
        assert s.address == (DEST, 80) and s.error


# --- what operator addons may do: refuse, answer, annotate ------------------------------------

class Compliance:
    def request(self, flow):
        if flow.request.path.startswith("/forbidden"):
            refuse(flow, "forbidden by compliance")
        annotate(flow, ticket="OPS-42")


def test_refuse_and_annotate(paths):
    with chain(paths, Compliance()) as tctx:
        no = run_http(tctx.master, plain("allowed.example", path="/forbidden/x"))
        assert no.response.status_code == 403
        assert b"forbidden by compliance" in no.response.content
        ok = run_http(tctx.master, plain("allowed.example", path="/fine"))
        assert ok.response.status_code == 200
    no_rec, ok_rec = records(paths)
    assert (no_rec["decision"], no_rec["reason"]) == ("deny", "forbidden by compliance")
    assert no_rec["notes"] == {"ticket": "OPS-42"}
    assert (ok_rec["decision"], ok_rec["notes"]) == ("allow", {"ticket": "OPS-42"})


class Answer:
    def request(self, flow):
        flow.response = http.Response.make(418, b"teapot")


def test_a_local_answer_is_logged_as_a_denial(paths):
    with chain(paths, Answer()) as tctx:
        f = run_http(tctx.master, plain("allowed.example"))
    assert f.response.status_code == 418
    (rec,) = records(paths)
    assert rec["decision"] == "deny" and "operator addon" in rec["reason"]


class Rewrite:
    def __init__(self, **change):
        self.change = change

    def request(self, flow):
        for k, v in self.change.items():
            setattr(flow.request, k, v)


@pytest.mark.parametrize(("change", "status"), [
    ({"path": "/repos/other"}, 403),
    ({"method": "DELETE"}, 403),
    ({"path": "/repos/acme/y"}, 200),  # still allowed: judged again, and passes
    ({"host": "203.0.113.66"}, 403),
    ({"host_header": "other.example"}, 403),
])
def test_a_rewritten_request_is_judged_again(paths, change, status):
    with chain(paths, Rewrite(**change)) as tctx:
        f = run_http(tctx.master, plain("api.example", "GET", "/repos/acme/x"))
    assert f.response.status_code == status


# --- failures close ---------------------------------------------------------------------------

class Raises:
    def request(self, flow):
        raise RuntimeError("bug in the compliance addon")


def test_an_exception_in_an_operator_hook_denies_the_flow(paths):
    with chain(paths, Raises()) as tctx:
        f = run_http(tctx.master, plain("allowed.example"))
        assert f.response.status_code == 403
    (rec,) = records(paths)
    assert rec["decision"] == "deny" and rec["reason"] == "operator addon failed"


class BrokenConfigure:
    def configure(self, updated):
        raise RuntimeError("cannot read my rules")

    def request(self, flow):
        pass


def test_a_broken_addon_denies_everything_it_sees(paths):
    addon = OperatorAddon(BrokenConfigure(), "broken")
    tctx = taddons.context(*ours([addon]))
    with tctx:
        policy, log = paths
        tctx.options.update(panopticon_policy=str(policy), panopticon_log=str(log))
        assert addon.broken and "cannot read my rules" in addon.broken
        f = run_http(tctx.master, plain("allowed.example"))
        assert f.response.status_code == 403


# --- loading ----------------------------------------------------------------------------------

def write(tmp_path, name, text, mode=0o644):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    os.chmod(p, mode)
    os.chmod(tmp_path, 0o755)
    return str(p)


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the files must be root's")


@root_only
def test_load_scripts_module_hooks_and_addons_lists(tmp_path):
    a = write(tmp_path, "a.py", """
        def request(flow):
            flow.metadata["seen_by_a"] = True
    """)
    b = write(tmp_path, "b.py", """
        class One:
            def request(self, flow):
                pass
        class Two:
            name = "two"
        addons = [One(), Two()]
    """)
    loaded = load_scripts([a, b])
    assert [x.origin for x in loaded] == [a, b, f"{b}#1"]
    assert len({x.name for x in loaded}) == 3
    f = tflow.tflow()
    loaded[0].request(f)
    assert f.metadata["seen_by_a"]


@root_only
def test_a_script_that_fails_to_import_stops_the_proxy(tmp_path):
    p = write(tmp_path, "bad.py", "import os\n\nx = undefined_name\n")
    with pytest.raises(PanopticonError) as e:
        load_scripts([p])
    assert f"{p} failed to load (line 3): NameError" in str(e.value)
    with pytest.raises(PanopticonError, match="SyntaxError"):
        load_scripts([write(tmp_path, "syntax.py", "def (:\n")])


def test_a_script_others_can_write_is_refused(tmp_path):
    p = write(tmp_path, "c.py", "x = 1\n", mode=0o666)
    with pytest.raises(PanopticonError, match="writable by others|not owned by root"):
        load_scripts([p])
    with pytest.raises(PanopticonError, match="cannot check"):
        load_scripts([str(tmp_path / "missing.py")])


class ForgetRefusal:
    """A second addon that undoes what the first one refused, in the same hook."""

    def request(self, flow):
        flow.metadata[verdict.KEY]["decision"] = "allow"
        flow.response = None


def test_one_operator_addon_cannot_undo_anothers_refusal(paths):
    with chain(paths, Compliance(), ForgetRefusal()) as tctx:
        no = run_http(tctx.master, plain("allowed.example", path="/forbidden/x"))
        ok = run_http(tctx.master, plain("allowed.example", path="/fine"))
    assert no.response.status_code == 403 and ok.response.status_code == 200
    assert records(paths)[0]["reason"] == "forbidden by compliance"
