"""metrics: the request log folded into counts, and the Prometheus text of them."""

from __future__ import annotations

import json
import re

from panopticond import metrics
from panopticond.metrics import LogView, prometheus_text

T0 = 1714557600.0  # 2024-05-01T10:00:00Z


def rec(kind="http", decision="allow", host="api.example.com", **kw):
    r = {"schema": 1, "time": "2024-05-01T10:00:00.123Z", "kind": kind, "instance": "t",
         "host": host, "decision": decision, "reason": "allowed by rule", "rule": "*.example.com"}
    if kind == "http":
        r.update(method="GET", path="/x", status=200, bytes_out=10, bytes_in=100,
                 duration_ms=30)
    r.update(kw)
    return r


DAEMON = {"instance": "t", "status": "ready", "ready": True,
          "checks": {"rules": {"ok": True, "detail": ""}, "proxy": {"ok": False, "detail": ""}},
          "proxy": {"pid": 5, "restarts": 2},
          "reload": {"generation": 3, "ok": False, "at": "2024-05-01T10:00:05+00:00"}}

SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+|\+Inf)$')


def parse(text: str) -> dict[str, float]:
    """Every line is a comment or a sample (the format's grammar); samples by name+labels."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def view(records):
    v = LogView("/nonexistent", clock=lambda: T0 + 30)
    v.add(records)
    return v


def test_counts_by_decision_kind_and_the_latency_histogram():
    v = view([rec(), rec(duration_ms=700), rec(decision="deny", host="evil.example",
                                                reason="not in the allowlist", rule=None,
                                                status=403, bytes_in=0, duration_ms=2),
              rec("dns", qname="pypi.org", host=None, rcode="REFUSED", decision="deny"),
              rec("tripwire", host="evil.example", secret="OPENAI", action="deny"),
              rec("tcp", decision="none", port=22)])
    m = parse(prometheus_text(v.snapshot(), DAEMON, started=T0, log_stats=v.stats))
    assert m['panopticon_requests_total{kind="http",decision="allow"}'] == 2
    assert m['panopticon_requests_total{kind="http",decision="deny"}'] == 1
    assert m['panopticon_requests_total{kind="tcp",decision="none"}'] == 1
    assert m['panopticon_dns_queries_total{decision="deny",rcode="REFUSED"}'] == 1
    assert m['panopticon_tripwires_total{secret="OPENAI",action="deny"}'] == 1
    assert m['panopticon_http_body_bytes_total{direction="in"}'] == 200
    assert m['panopticon_http_body_bytes_total{direction="out"}'] == 30
    h = "panopticon_http_request_duration_seconds"
    assert m[f'{h}_bucket{{le="0.005"}}'] == 1
    assert m[f'{h}_bucket{{le="0.05"}}'] == 2
    assert m[f'{h}_bucket{{le="0.5"}}'] == 2
    assert m[f'{h}_bucket{{le="1"}}'] == 3 == m[f'{h}_bucket{{le="+Inf"}}'] == m[f"{h}_count"]
    assert abs(m[f"{h}_sum"] - 0.732) < 1e-9


def test_the_daemons_counters_restarts_and_last_reload():
    m = parse(prometheus_text(metrics.Totals(), DAEMON, started=T0))
    assert m["panopticon_proxy_restarts_total"] == 2
    assert m["panopticon_reloads_total"] == 3
    assert m["panopticon_reload_last_success"] == 0
    assert m["panopticon_reload_last_timestamp_seconds"] == T0 + 5
    assert m["panopticon_ready"] == 1
    assert m['panopticon_check_ok{check="proxy"}'] == 0
    # No reload yet: the config was loaded when the daemon started, and that succeeded.
    fresh = dict(DAEMON, reload={"generation": 0, "ok": None, "at": None})
    m = parse(prometheus_text(metrics.Totals(), fresh, started=T0))
    assert (m["panopticon_reload_last_success"], m["panopticon_reload_last_timestamp_seconds"]) \
        == (1, T0)
    # Zero series exist before the first request (rate() needs them).
    assert m['panopticon_requests_total{kind="http",decision="deny"}'] == 0


def test_label_values_are_escaped():
    v = view([rec("tripwire", secret='A"B\\C\nD', action="kill")])
    text = prometheus_text(v.snapshot(), DAEMON, started=T0)
    assert 'secret="A\\"B\\\\C\\\\x0aD"' in text  # clean()ed, then escaped
    parse(text)


def test_recent_is_numbered_and_keeps_only_safe_fields():
    v = view([rec(path=f"/{i}", secrets=["OPENAI"], headers={"authorization": "x"})
              for i in range(5)])
    newest, got = v.recent(after=2)
    assert newest == 5 and [r["seq"] for r in got] == [3, 4, 5]
    assert all(set(r) <= {"seq", *metrics.RECENT_FIELDS} for r in got)
    assert v.recent(after=5) == (5, [])
    assert [r["seq"] for r in v.recent(after=0, limit=2)[1]] == [4, 5]
    # A client holding the numbers of an earlier daemon starts over.
    assert [r["seq"] for r in v.recent(after=99)[1]] == [1, 2, 3, 4, 5]


def test_blocked_hosts_say_whether_an_allow_entry_would_do():
    v = view([rec(decision="deny", host="pypi.org", reason="not in the allowlist", rule=None)] * 3
             + [rec(decision="deny", host="bad.example", reason="denied by rule",
                    rule="bad.example")]
             + [rec(decision="allow", host="quiet.example", mode="discover",
                    would_decision="deny", reason="not in the allowlist (discover)", rule=None)]
             + [rec()] * 5)
    blocked, top = v.hosts_view()
    assert blocked[0] == {"host": "pypi.org", "count": 3, "reason": "not in the allowlist",
                          "allowable": True}
    assert {b["host"]: b["allowable"] for b in blocked} == {
        "pypi.org": True, "bad.example": False, "quiet.example": True}
    assert top[0] == {"host": "api.example.com", "count": 5, "blocked": 0}


def test_the_selftests_refused_names_are_never_offered_for_the_allowlist():
    v = view([rec(decision="deny", host=h, reason="not in the allowlist", rule=None)
              for h in ("panopticon.invalid", "5b0e2898f41f.panopticon.invalid")])
    assert [b["allowable"] for b in v.hosts_view()[0]] == [False, False]


def test_hosts_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "HOSTS_MAX", 3)
    v = view([rec(host=f"h{i}.example") for i in range(10)])
    _, top = v.hosts_view()
    assert len(top) == 4 and {"host": metrics.OTHER, "count": 7, "blocked": 0} in top


def test_series_fills_the_window_with_zeros():
    v = view([rec(), rec(decision="deny", reason="not in the allowlist", rule=None)])
    s = v.series(now=T0 + 30)
    assert len(s) == metrics.SERIES_POINTS and s[-1]["t"] == T0 + 30
    assert {"t": T0, "allowed": 1, "blocked": 1} in s
    assert sum(p["allowed"] + p["blocked"] for p in s) == 2


def test_follows_the_log_from_its_end(tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(json.dumps(rec(path="/old")) + "\n")
    v = LogView(str(log), interval=3600)
    v.start()
    try:
        with log.open("a") as f:
            f.write(json.dumps(rec(path="/new")) + "\nnot json\n")
        assert v.poll() == 1
        assert [r["path"] for r in v.recent()[1]] == ["/new"]
        assert (v.stats.records, v.stats.bad_lines) == (1, 1)
    finally:
        v.stop()
