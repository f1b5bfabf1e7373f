"""dashboard: the page and its JSON API, served for real on a loopback port."""

from __future__ import annotations

import http.client
import json
import re

import pytest

from panopticond import dashboard
from panopticond.metrics import LogView
from panopticond.server import HealthServer

REPORT = {"instance": "t", "status": "ready", "ready": True, "not_ready": [],
          "checks": {"rules": {"ok": True, "detail": "x"}}, "proxy": {"pid": 5, "restarts": 0},
          "reload": {"generation": 0, "ok": None, "at": None}, "ca_sha256": "ab"}


def rec(n, decision="allow", host="api.example.com", reason="allowed", rule="api.example.com"):
    return {"schema": 1, "time": "2024-05-01T10:00:00.123Z", "kind": "http", "host": host,
            "decision": decision, "reason": reason, "rule": rule, "method": "GET",
            "path": f"/p/{n}", "status": 200, "secrets": ["OPENAI"], "duration_ms": 5}


@pytest.fixture
def served():
    v = LogView("/nonexistent")
    s = HealthServer(("127.0.0.1", 0), dashboard.pages(
        lambda: v, lambda: (200, REPORT), lambda: "allow of [agents.t] in the config"))
    s.start()
    yield v, s.port
    s.close()


def get(port, path, host=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path, headers={"Host": f"127.0.0.1:{port}" if host is None else host})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict(r.getheaders()), body


def test_recent_returns_what_is_new_after_n(served):
    v, port = served
    assert json.loads(get(port, "/api/recent?after=0")[2]) == {"next": 0, "records": []}
    v.add([rec(1), rec(2)])
    doc = json.loads(get(port, "/api/recent?after=0")[2])
    assert doc["next"] == 2 and [r["path"] for r in doc["records"]] == ["/p/1", "/p/2"]
    v.add([rec(3)])
    doc = json.loads(get(port, "/api/recent?after=2")[2])
    assert [(r["seq"], r["path"]) for r in doc["records"]] == [(3, "/p/3")]
    assert get(port, "/api/recent?after=x")[0] == 400
    assert len(json.loads(get(port, "/api/recent?limit=1")[2])["records"]) == 1


def test_summary_has_status_blocked_hosts_with_their_allow_entry_and_a_series(served):
    v, port = served
    v.add([rec(1), rec(2, "deny", "pypi.org", "not in the allowlist", None),
           rec(3, "deny", "bad.example", "denied by rule", "bad.example")])
    doc = json.loads(get(port, "/api/summary")[2])
    assert doc["status"]["status"] == "ready" and doc["counts"]["blocked"] == 2
    blocked = {b["host"]: b["allow_entry"] for b in doc["blocked"]}
    assert blocked == {"pypi.org": '"pypi.org"', "bad.example": None}
    assert doc["allow_where"] == "allow of [agents.t]"
    assert doc["top"][0]["count"] == 1 and doc["series"]


def test_nothing_secret_is_served(served):
    v, port = served
    r = rec(1)
    r["headers"] = {"authorization": "Bearer sk-live-123"}  # never logged; dropped even so
    v.add([r])
    for path in ("/api/recent", "/api/summary", "/metrics", "/"):
        assert b"sk-live-123" not in get(port, path)[2]


def test_the_page_is_self_contained_and_runs_only_its_own_script(served):
    _, port = served
    status, headers, body = get(port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from elsewhere
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp and headers["X-Frame-Options"] == "DENY"
    assert "textContent" in html and "innerHTML" not in html


def test_browser_pages_refuse_a_foreign_host_header(served):
    _, port = served
    for host in ("evil.example", f"evil.example:{port}", ""):
        assert get(port, "/api/recent", host)[0] == 403, host
        assert get(port, "/", host)[0] == 403
    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
        assert get(port, "/api/recent", host)[0] == 200
    # A scraper may name the host as it likes: /metrics is no browser page.
    assert get(port, "/metrics", "prometheus.example:9")[0] == 200


def test_metrics_page(served):
    v, port = served
    v.add([rec(1)])
    status, headers, body = get(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'panopticon_requests_total{kind="http",decision="allow"} 1\n' in body
