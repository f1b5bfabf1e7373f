import json
import logging

import pytest
from mitmproxy import dns
from mitmproxy.addons.dns_resolver import DnsResolver
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons.dnsfilter import DnsFilter
from panopticond.policy import Policy

rcodes = dns.response_codes
types = dns.types


@pytest.fixture
def policy_path(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps(Policy.build("x", ["allowed.example", "*.wild.example"],
                                         ["bad.wild.example"]).to_dict()))
    return p


@pytest.fixture
def dnsfilter(policy_path):
    d = DnsFilter()
    with taddons.context(d) as tctx:
        tctx.configure(d, panopticon_policy=str(policy_path))
        yield d


def query(name, qtype=types.A, **kw):
    return tflow.tdnsflow(req=tutils.tdnsreq(
        questions=[dns.Question(name, qtype, dns.classes.IN)], **kw))


def ask(d, name, qtype=types.A, **kw):
    f = query(name, qtype, **kw)
    d.dns_request(f)
    return f


@pytest.mark.parametrize("qtype", [types.A, types.AAAA])
def test_allowed_address_query_is_left_to_the_resolver(dnsfilter, qtype):
    f = ask(dnsfilter, "a.wild.example", qtype)
    assert f.response is None and not f.error
    assert verdict.is_allowed(f)


@pytest.mark.parametrize("name", ["denied.example", "bad.wild.example", "evilwild.example"])
def test_denied_name_gets_nxdomain_locally(dnsfilter, name):
    f = ask(dnsfilter, name)
    assert f.response.response_code == rcodes.NXDOMAIN
    assert f.response.id == f.request.id and not f.response.query
    v = verdict.get(f)
    assert v["decision"] == "deny" and v["host"] == name


@pytest.mark.parametrize("qtype", [types.TXT, types.MX, types.HTTPS, types.PTR, types.CNAME,
                                   types.NS, types.ANY])
def test_other_types_are_refused_even_for_allowed_names(dnsfilter, qtype):
    f = ask(dnsfilter, "allowed.example", qtype)
    assert f.response.response_code == rcodes.REFUSED
    assert "queries are not answered" in verdict.get(f)["reason"]


def test_other_class_is_refused(dnsfilter):
    f = tflow.tdnsflow(req=tutils.tdnsreq(
        questions=[dns.Question("allowed.example", types.A, dns.classes.CH)]))
    dnsfilter.dns_request(f)
    assert f.response.response_code == rcodes.REFUSED


def test_several_questions_are_refused(dnsfilter):
    f = tflow.tdnsflow(req=tutils.tdnsreq(questions=[
        dns.Question("allowed.example", types.A, dns.classes.IN),
        dns.Question("denied.example", types.A, dns.classes.IN),
    ]))
    dnsfilter.dns_request(f)
    assert f.response.response_code == rcodes.REFUSED


def test_non_query_opcode_is_not_implemented(dnsfilter):
    f = ask(dnsfilter, "allowed.example", op_code=dns.op_codes.UPDATE)
    assert f.response.response_code == rcodes.NOTIMP


def test_answer_set_before_us_is_replaced_for_a_denied_name(dnsfilter):
    f = query("denied.example")
    f.response = f.request.succeed([])  # as if mitmproxy's resolver had run first
    dnsfilter.dns_request(f)
    assert f.response.response_code == rcodes.NXDOMAIN


def test_reused_flow_is_judged_again(dnsfilter):
    # mitmproxy reuses a DNS flow for a later query carrying the same message id.
    f = ask(dnsfilter, "allowed.example")
    assert verdict.is_allowed(f)
    f.response = f.request.succeed([])
    f.request = tutils.tdnsreq(questions=[dns.Question("denied.example", types.A, dns.classes.IN)])
    assert verdict.get(f) is None
    dnsfilter.dns_request(f)
    assert f.response.response_code == rcodes.NXDOMAIN
    assert f.response.questions[0].name == "denied.example"


def test_stale_answer_is_dropped_for_a_reused_allowed_query(dnsfilter):
    f = ask(dnsfilter, "allowed.example")
    f.response = f.request.succeed([])
    f.request = tutils.tdnsreq(questions=[dns.Question("a.wild.example", types.A, dns.classes.IN)])
    dnsfilter.dns_request(f)
    assert f.response is None and verdict.is_allowed(f)


def test_missing_policy_answers_nxdomain(tmp_path):
    d = DnsFilter()
    with taddons.context(d) as tctx:
        tctx.configure(d, panopticon_policy=str(tmp_path / "nope.json"))
        assert ask(d, "allowed.example").response.response_code == rcodes.NXDOMAIN


def test_exception_answers_servfail(dnsfilter, monkeypatch, caplog):
    def boom(self, host):
        raise RuntimeError("boom")

    monkeypatch.setattr(Policy, "decide", boom)
    with caplog.at_level(logging.ERROR):
        f = ask(dnsfilter, "allowed.example")
    assert f.response.response_code == rcodes.SERVFAIL
    assert not verdict.is_allowed(f)
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_running_reports_a_filter_placed_after_the_resolver(policy_path, caplog):
    d = DnsFilter()
    with taddons.context(DnsResolver(), d) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(d, panopticon_policy=str(policy_path))
        d.running()
    assert any("after mitmproxy's DNS resolver" in r.getMessage() for r in caplog.records)


def test_running_is_quiet_when_ordered(policy_path, caplog):
    d = DnsFilter()
    with taddons.context(d, DnsResolver()) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(d, panopticon_policy=str(policy_path))
        d.running()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
