import datetime
import json
import logging
import os
import re
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import dns, exceptions, http, tls
from mitmproxy.test import taddons, tflow, tutils

from panopticond.addons import verdict
from panopticond.addons import flowlog as flowlog_mod
from panopticond.addons.flowlog import FlowLog


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "requests.jsonl"


@pytest.fixture
def flowlog(log_path):
    old = os.umask(0o022)
    fl = FlowLog(reserve_bytes=0)
    try:
        with taddons.context(fl) as tctx:
            tctx.configure(fl, panopticon_log=str(log_path), panopticon_instance="openclaw",
                           panopticon_log_status=str(log_path.with_name("status.json")))
            yield fl
    finally:
        os.umask(old)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def http_flow(host="api.example", path=b"/v1/items?token=s3cret", *, allowed=True):
    """An HTTPS flow with its response, as FlowLog sees it at the end."""
    f = tflow.tflow(
        req=tutils.treq(host="198.51.100.7", port=443, scheme=b"https", path=path,
                        headers=http.Headers(host=host), content=b"abc",
                        timestamp_start=1700000000.123, timestamp_end=1700000000.2),
        resp=tutils.tresp(content=b"hello world", timestamp_start=1700000000.3,
                          timestamp_end=1700000000.5),
    )
    f.client_conn.peername = ("10.200.0.2", 40000)
    verdict.record(f, allowed=allowed, reason="allowed by api.example" if allowed else "nope",
                   host=host, by="enforce", rule="api.example" if allowed else None)
    return f


def test_line_fields(flowlog, log_path):
    flowlog.response(http_flow())
    (rec,) = lines(log_path)
    assert rec == {
        "schema": 1,
        "time": "2023-11-14T22:13:20.123Z",
        "kind": "http",
        "instance": "openclaw",
        "client": "10.200.0.2:40000",
        "host": "api.example",
        "decision": "allow",
        "reason": "allowed by api.example",
        "rule": "api.example",
        "method": "GET",
        "scheme": "https",
        "port": 443,
        "path": "/v1/items",
        "status": 200,
        "bytes_out": 3,
        "bytes_in": 11,
        "error": None,
        "duration_ms": 377,
    }
    assert "s3cret" not in log_path.read_text()


def test_file_mode_is_0640(flowlog, log_path):
    flowlog.response(http_flow())
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o640


def test_one_line_per_flow(flowlog, log_path):
    f = http_flow()
    flowlog.response(f)
    f.error = tflow.terr()
    flowlog.error(f)
    flowlog.response(f)
    assert len(lines(log_path)) == 1


def test_killed_flow_is_logged_once_with_its_error(flowlog, log_path):
    f = http_flow(allowed=False)
    f.response = None
    f.kill()
    flowlog.error(f)
    (rec,) = lines(log_path)
    assert rec["decision"] == "deny" and rec["status"] is None
    assert rec["error"] == "Connection killed."


def test_killed_connect_is_logged(flowlog, log_path):
    f = http_flow(allowed=False)
    f.response = None
    flowlog.http_connect(f)  # not killed: nothing yet
    f.kill()
    flowlog.http_connect(f)
    assert len(lines(log_path)) == 1


def test_newline_in_host_cannot_forge_a_line(flowlog, log_path):
    evil = 'x.example\n{"decision": "allow", "host": "forged"}'
    flowlog.response(http_flow(host=evil, allowed=False))
    raw = log_path.read_text()
    assert raw.count("\n") == 1
    (rec,) = lines(log_path)
    assert rec["host"] == evil


def test_dns_line(flowlog, log_path):
    f = tflow.tdnsflow(req=tutils.tdnsreq(
        questions=[dns.Question("denied.example", dns.types.AAAA, dns.classes.IN)]))
    verdict.answer_dns(f, dns.response_codes.NXDOMAIN, reason="not in the allowlist",
                       host="denied.example", by="dnsfilter")
    flowlog.dns_response(f)
    (rec,) = lines(log_path)
    assert rec["kind"] == "dns"
    assert (rec["qname"], rec["qtype"], rec["rcode"]) == ("denied.example", "AAAA", "NXDOMAIN")
    assert rec["decision"] == "deny" and rec["reason"] == "not in the allowlist"
    assert rec["client"] == "127.0.0.1:22"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])


def test_reused_dns_flow_logs_each_query(flowlog, log_path):
    f = tflow.tdnsflow(resp=True)
    flowlog.dns_response(f)
    flowlog.dns_response(f)
    f.request = tutils.tdnsreq(questions=[dns.Question("b.example", dns.types.A, dns.classes.IN)])
    flowlog.dns_response(f)
    assert [r["qname"] for r in lines(log_path)] == ["dns.google", "b.example"]


def test_undecided_flow_is_logged_as_such(flowlog, log_path):
    f = tflow.tflow(resp=True)
    flowlog.response(f)
    (rec,) = lines(log_path)
    assert rec["decision"] == "none"


def test_tcp_flow_is_logged(flowlog, log_path):
    t = tflow.ttcpflow(err=True)
    verdict.record(t, allowed=False, reason="non-HTTP traffic is not relayed", host=None,
                   by="enforce")
    flowlog.tcp_error(t)
    (rec,) = lines(log_path)
    assert rec["kind"] == "tcp" and rec["decision"] == "deny"


def test_no_log_configured_writes_nothing(tmp_path):
    fl = FlowLog()
    with taddons.context(fl):
        fl.response(http_flow())
        f = http_flow()
        f.response = None
        fl.requestheaders(f)
        assert f.response is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_log_denies_until_it_works_again(tmp_path, caplog):
    missing_dir = tmp_path / "gone"
    path = missing_dir / "requests.jsonl"
    fl = FlowLog(reserve_bytes=0)
    with taddons.context(fl) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(fl, panopticon_log=str(path))
        assert fl.broken
        assert any("cannot open" in r.getMessage() for r in caplog.records)

        f = http_flow()
        f.response = None
        fl.requestheaders(f)
        assert f.response.status_code == 503
        assert verdict.get(f)["decision"] == "deny"
        fl.response(f)  # the write fails again: the flow stays denied, nothing raises

        q = tflow.tdnsflow()
        verdict.record(q, allowed=True, reason="ok", host="dns.google", by="dnsfilter")
        fl.dns_request(q)
        assert q.response.response_code == dns.response_codes.REFUSED

        missing_dir.mkdir()
        g = http_flow()
        g.response = None
        fl.requestheaders(g)
        assert g.response.status_code == 503
        fl.response(g)  # this write succeeds and heals the log
        assert not fl.broken
        h = http_flow()
        h.response = None
        fl.requestheaders(h)
        assert h.response is None and verdict.is_allowed(h)
    assert len(lines(path)) == 1


def test_disk_full_is_logged_reported_and_denies(tmp_path, caplog):
    # /dev/full fails every write with ENOSPC, as a full disk does.
    status = tmp_path / "status.json"
    fl = FlowLog(reserve_bytes=0)
    with taddons.context(fl) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(fl, panopticon_log="/dev/full", panopticon_log_status=str(status))
        assert json.loads(status.read_text())["ok"] is True
        fl.response(http_flow())
        assert fl.broken and "No space left" in fl.broken
        assert any("No space left" in r.getMessage() for r in caplog.records)
        f = http_flow()
        f.response = None
        fl.requestheaders(f)
        assert f.response.status_code == 503 and not verdict.is_allowed(f)
        doc = json.loads(status.read_text())
        assert doc["ok"] is False and "No space left" in doc["error"]
        assert doc["log"] == "/dev/full" and doc["schema"] == 1
        assert stat.S_IMODE(os.stat(status).st_mode) == 0o640


def test_low_space_denies_before_the_disk_is_full(log_path, caplog):
    # Checked before each request: the first request after the disk fills is refused
    # too, not let through and then found unloggable.
    status = log_path.with_name("status.json")
    fl = FlowLog(reserve_bytes=2**62)  # more than any file system has
    with taddons.context(fl) as tctx, caplog.at_level(logging.ERROR):
        tctx.configure(fl, panopticon_log=str(log_path), panopticon_log_status=str(status))
        f = http_flow()
        f.response = None
        fl.requestheaders(f)
        assert f.response.status_code == 503
        fl.response(f)  # the denial itself is still logged, from the reserve
        assert lines(log_path)[0]["reason"] == "the request log is unavailable"
        q = tflow.tdnsflow()
        fl.dns_request(q)
        assert q.response.response_code == dns.response_codes.REFUSED
        t = tflow.ttcpflow()
        verdict.record(t, allowed=True, reason="passthrough", host="pinned.example", by="x")
        fl.tcp_start(t)  # a relay the policy allowed waits for the log too
        assert verdict.get(t)["decision"] == "deny" and t.error
        doc = json.loads(status.read_text())
        assert doc["ok"] is False and "bytes left" in doc["error"]
        fl.reserve_bytes = 0
        g = http_flow()
        g.response = None
        fl.requestheaders(g)
        assert g.response is None
        assert json.loads(status.read_text())["ok"] is True


def test_reopens_after_external_rotation(flowlog, log_path):
    flowlog.response(http_flow())
    rotated = log_path.with_name("requests.jsonl.1")
    log_path.rename(rotated)
    flowlog.response(http_flow())
    assert len(lines(rotated)) == 1
    assert len(lines(log_path)) == 1


def test_rotates_by_size(log_path):
    fl = FlowLog(reserve_bytes=0)
    with taddons.context(fl) as tctx:
        tctx.configure(fl, panopticon_log=str(log_path), panopticon_log_max_bytes=1024,
                       panopticon_log_keep=2)
        for _ in range(20):
            fl.response(http_flow())
    files = sorted(log_path.parent.glob("requests.jsonl*"))
    assert [f.name for f in files] == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
    for f in files:
        assert f.stat().st_size <= 1024
        assert all(r["kind"] == "http" for r in lines(f))


def test_bad_rotation_options_are_refused(log_path):
    fl = FlowLog()
    with taddons.context(fl) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(fl, panopticon_log_keep=0)
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(fl, panopticon_log_max_bytes=-1)


def test_write_record_for_other_addons(flowlog, log_path):
    assert flowlog_mod.write_record({"kind": "tripwire", "secret": "OPENAI",
                                     "host": "evil.example", "decision": "deny",
                                     "reason": "placeholder of OPENAI sent to evil.example"})
    assert flowlog.write_record({"kind": "tripwire", "time": "2024-01-01T00:00:00.000Z"})
    assert not flowlog.write_record({"no": "kind"})
    a, b = lines(log_path)
    assert list(a)[:4] == ["schema", "time", "kind", "instance"]
    assert a["schema"] == 1 and a["instance"] == "openclaw" and a["secret"] == "OPENAI"
    assert b["time"] == "2024-01-01T00:00:00.000Z"


def test_write_record_without_a_running_log(caplog, monkeypatch):
    monkeypatch.setattr(flowlog_mod, "_active", None)  # as before the proxy configured one
    with caplog.at_level(logging.ERROR):
        assert not flowlog_mod.write_record({"kind": "tripwire"})


def test_annotate_adds_fields_but_never_replaces_core_ones(flowlog, log_path):
    f = http_flow()
    flowlog_mod.annotate(f, secrets=["OPENAI"], decision="allow-forged")
    flowlog_mod.annotate(f, mode="discover")
    f2 = http_flow(allowed=False)
    flowlog_mod.annotate(f2, decision="allow")
    flowlog.response(f)
    flowlog.response(f2)
    a, b = lines(log_path)
    assert a["secrets"] == ["OPENAI"] and a["mode"] == "discover" and a["decision"] == "allow"
    assert b["decision"] == "deny"


def test_failed_tls_handshake_is_logged(flowlog, log_path):
    client = tflow.tclient_conn()
    client.sni = "pinned.example"
    client.error = "Client TLS handshake failed: certificate unknown"
    flowlog.tls_failed_client(tls.TlsData(client, context=None))
    (rec,) = lines(log_path)
    assert rec["kind"] == "tls" and rec["host"] == "pinned.example"
    assert rec["decision"] == "none" and "certificate unknown" in rec["error"]


# --- the per-record shortcuts (issue 8) -------------------------------------------------------


def _reference_rfc3339(ts):
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # to 2100
def test_time_format_is_the_datetime_one(ts):
    assert flowlog_mod._rfc3339(ts) == _reference_rfc3339(ts)


@pytest.mark.parametrize("ts", [0.0, 1.0, 1763817308.0, 1763817308.9995, 1763817308.9999995,
                                1763817308.0000004, 1763817308.0005, 1763817309.999999999,
                                1763817308.1234565, 1763817308.1234575, 1e9 + 0.5e-6])
def test_time_format_edges(ts):
    # Around a second's end and microsecond ties (rounded half-even, then truncated).
    for t in (ts, ts, ts + 1):  # the second is cached: again, and the next one
        assert flowlog_mod._rfc3339(t) == _reference_rfc3339(t)


def test_the_encoder_is_json_dumps_with_the_same_options():
    rec = {"a": "é\u2028", "b": [1, 2.5, None, True], "c": {"d": b"x"}, "e": object}
    assert FlowLog._dumps(rec) == json.dumps(rec, ensure_ascii=True, allow_nan=False,
                                              default=str)
    with pytest.raises(ValueError):
        FlowLog._dumps({"x": float("nan")})


def test_a_changed_instance_name_reaches_the_next_record(log_path):
    fl = FlowLog(reserve_bytes=0)
    with taddons.context(fl) as tctx:
        tctx.configure(fl, panopticon_log=str(log_path), panopticon_instance="one")
        fl.response(http_flow())
        tctx.options.update(panopticon_instance="two")
        fl.response(http_flow())
    assert [r["instance"] for r in lines(log_path)] == ["one", "two"]


def test_with_several_workers_every_record_says_which(flowlog, log_path):
    from mitmproxy import ctx

    flowlog.response(http_flow())  # one proxy: no such field
    ctx.options.update(panopticon_worker=1)
    flowlog.response(http_flow())
    flowlog.write_record({"kind": "tripwire", "secret": "X"})
    ctx.options.update(panopticon_worker=-1)
    flowlog.response(http_flow())
    assert [r.get("worker") for r in lines(log_path)] == [None, 1, 1, None]
    assert "worker" not in lines(log_path)[0]
