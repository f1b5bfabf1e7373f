"""AddHeaders: the operator's headers on allowed requests to their hosts, and nowhere else."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons.enforce import Enforce
from panopticond.addons.headers import AddHeaders
from panopticond.addons.policyfile import PolicyFile
from panopticond.policy import HeaderRule, Policy

DEST = "198.51.100.7"


@pytest.fixture
def addons(tmp_path):
    p = tmp_path / "policy.json"
    p.write_text(json.dumps(Policy.build(
        "x", ["api.example.com", "other.example.com", "*.wild.example"], [],
        headers=[HeaderRule.parse("api.example.com", {"X-Org": "acme", "X-Env": "prod"}),
                 HeaderRule.parse("*.wild.example", {"X-Org": "wild"})],
    ).to_dict()))
    policy = PolicyFile()
    enforce, headers = Enforce(policy), AddHeaders(policy)
    with taddons.context(enforce, headers) as tctx:
        tctx.configure(headers, panopticon_policy=str(p))
        yield enforce, headers


def judged(addons, host, **headers):
    enforce, add = addons
    f = tflow.tflow(req=tutils.treq(host=DEST, port=80, content=b"",
                                    headers=http.Headers(host=host, **headers)))
    enforce.requestheaders(f)
    add.requestheaders(f)
    return f


def test_headers_are_set_on_allowed_requests_to_their_host(addons):
    f = judged(addons, "API.example.com")
    assert f.request.headers["X-Org"] == "acme" and f.request.headers["X-Env"] == "prod"
    assert judged(addons, "a.b.wild.example").request.headers["x-org"] == "wild"


def test_the_agents_own_value_is_replaced(addons):
    f = judged(addons, "api.example.com", x_org="evil")
    assert f.request.headers.get_all("X-Org") == ["acme"]


def test_other_and_denied_hosts_get_nothing(addons):
    assert "X-Org" not in judged(addons, "other.example.com").request.headers
    denied = judged(addons, "denied.example")
    assert denied.response.status_code == 403 and "X-Org" not in denied.request.headers


def test_the_judged_name_counts_not_the_address(addons):
    # A request judged on another name gets that name's headers, whatever its address.
    f = judged(addons, "other.example.com")
    assert verdict.get(f)["host"] == "other.example.com" and "X-Org" not in f.request.headers


def test_without_a_policy_nothing_is_added(tmp_path):
    add = AddHeaders()
    with taddons.context(add) as tctx:
        tctx.configure(add, panopticon_policy=str(tmp_path / "missing.json"))
        f = tflow.tflow(req=tutils.treq(host=DEST, port=80, content=b"",
                                        headers=http.Headers(host="api.example.com")))
        verdict.record(f, allowed=True, reason="x", host="api.example.com", by="test")
        add.requestheaders(f)
        assert "X-Org" not in f.request.headers
