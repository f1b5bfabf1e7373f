import datetime
import json
import os
import subprocess
import sys

import pytest

from panopticond import logread
from panopticond.logfile import LogFile
from panopticond.policy import HostPattern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rec(n=0, **kw):
    base = {"schema": 1, "time": f"2024-05-01T10:00:{n % 60:02d}.000Z", "kind": "http",
            "instance": "bot", "host": "api.example.com", "decision": "allow",
            "reason": "allowed by api.example.com", "method": "GET", "path": "/", "n": n}
    base.update(kw)
    return base


def write(path, *records):
    with open(path, "ab") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())


def test_rotation_set_and_expand_order(tmp_path):
    p = tmp_path / "requests.jsonl"
    for name in ("requests.jsonl", "requests.jsonl.1", "requests.jsonl.2",
                 "requests.jsonl.10", "other.jsonl", "requests.jsonl.x"):
        (tmp_path / name).touch()
    s = str(p)
    assert logread.rotation_set(s) == [s + ".10", s + ".2", s + ".1", s]
    # A glob hands the files in the shell's order; they are read oldest first.
    assert logread.expand([s + ".1", s, s + ".2"]) == [s + ".10", s + ".2", s + ".1", s]
    assert logread.expand([s + ".2"]) == [s + ".2"]
    assert logread.expand([str(tmp_path / "missing")]) == [str(tmp_path / "missing")]


def test_read_log_spans_rotations_and_counts_bad_lines(tmp_path):
    path = str(tmp_path / "r.jsonl")
    write(path + ".1", rec(1))
    with open(path + ".1", "ab") as f:
        f.write(b"not json\n[1, 2]\n\n")
    write(path, rec(2))
    stats = logread.Stats()
    assert [r["n"] for r in logread.read_log(path, stats)] == [1, 2]
    assert (stats.records, stats.bad_lines) == (2, 2)


def test_follower_reads_across_rotation_without_loss(tmp_path):
    path = str(tmp_path / "r.jsonl")
    log = LogFile(path, max_bytes=600, keep=50)
    log.append((json.dumps(rec(0)) + "\n").encode())
    f = logread.Follower(path)  # starts at the end
    got = []
    for n in range(1, 40):
        log.append((json.dumps(rec(n)) + "\n").encode())
        if n % 7 == 0:
            got += f.poll()
    got += f.poll()
    assert [r["n"] for r in got] == list(range(1, 40))
    assert len(logread.rotation_set(path)) > 3


def test_follower_waits_for_whole_lines_and_for_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    f = logread.Follower(str(path))
    assert f.poll() == []
    with open(path, "wb") as out:
        out.write(b'{"n": 1}\n{"n": ')
        out.flush()
        assert [r["n"] for r in f.poll()] == [1]
        out.write(b'2}\n')
        out.flush()
        assert [r["n"] for r in f.poll()] == [2]


def test_follower_restarts_after_truncation(tmp_path):
    path = tmp_path / "r.jsonl"
    write(path, rec(1), rec(2))
    f = logread.Follower(str(path), from_start=True)
    assert len(f.poll()) == 2
    os.truncate(path, 0)
    write(path, rec(3))
    assert [r["n"] for r in f.poll()] == [3]


def test_history_then_follow_misses_and_repeats_nothing_across_rotations(tmp_path):
    path = str(tmp_path / "r.jsonl")
    write(path + ".1", rec(1))
    write(path, rec(2))
    f = logread.Follower(path, from_start=True)
    for n in (3, 4):  # two rotations after the follower opened its file
        for i in (3, 2, 1):
            if os.path.exists(f"{path}.{i}"):
                os.rename(f"{path}.{i}", f"{path}.{i + 1}")
        os.rename(path, path + ".1")
        write(path, rec(n))
    older = logread.open_older(path, f.ident)
    assert [r["n"] for fh in older for r in logread.read_open(fh)] == [1]
    assert [r["n"] for r in f.poll()] == [2, 3, 4]
    assert [r["n"] for r in logread.read_log(path)] == [1, 2, 3, 4]


def test_filters():
    deny = rec(1, host="evil.example", decision="deny", reason="not in the allowlist")
    dns = rec(2, kind="dns", host=None, qname="Sub.Evil.Example.", decision="deny")
    tripwire = rec(3, kind="tripwire", decision="deny", host="x.example")
    tls = rec(4, kind="tls", decision="none", host="pinned.example")
    ok = rec(5)
    allr = [deny, dns, tripwire, tls, ok]
    blocked = logread.Filter(blocked=True)
    assert [r["n"] for r in allr if blocked(r)] == [1, 2, 3, 4]
    by_host = logread.Filter(host=HostPattern.parse("*.evil.example"))
    assert [r["n"] for r in allr if by_host(r)] == [1, 2]
    exact = logread.Filter(host=HostPattern.parse("evil.example"))
    assert [r["n"] for r in allr if exact(r)] == [1]
    since = logread.Filter(since=logread.record_time(rec(3)))
    assert [r["n"] for r in allr if since(r)] == [3, 4, 5]
    assert not since({"kind": "http"})  # no time: not shown under --since


def test_parse_since():
    now = 1_714_557_600.0  # 2024-05-01T10:00:00Z
    assert logread.parse_since("90s", now) == now - 90
    assert logread.parse_since("15m", now) == now - 900
    assert logread.parse_since("1h30m", now) == now - 5400
    assert logread.parse_since("2d", now) == now - 172800
    assert logread.parse_since("2024-05-01T09:00:00Z", now) == now - 3600
    local = datetime.datetime(2024, 5, 1, 9, 30).timestamp()
    assert logread.parse_since("2024-05-01 09:30", now) == local
    midnight = datetime.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0)
    assert logread.parse_since("today", now) == midnight.timestamp()
    assert logread.parse_since("yesterday", now) == midnight.timestamp() - 86400
    for bad in ("soon", "5 parsecs", "", "12x"):
        with pytest.raises(ValueError):
            logread.parse_since(bad, now)


def test_table_escapes_what_the_agent_chose():
    evil = rec(1, host="x.example\x1b[2J\nforged", path="/a\rb", decision="deny",
               reason="not in the allowlist")
    row = logread.table_row(evil, local=lambda ts: datetime.datetime.utcfromtimestamp(ts))
    assert "\x1b" not in row and "\n" not in row and "\r" not in row
    assert row.startswith("2024-05-01 10:00:01  DENY")
    assert "\\x1b" in row
    assert logread.table_header().split()[:3] == ["TIME", "DECISION", "KIND"]


def test_table_rows_by_kind():
    utc = lambda ts: datetime.datetime.utcfromtimestamp(ts)  # noqa: E731
    dns = logread.table_row(rec(1, kind="dns", qname="a.example", qtype="AAAA",
                                rcode="NXDOMAIN", decision="deny"), local=utc)
    assert "AAAA a.example" in dns and "NXDOMAIN" in dns
    tw = logread.table_row(rec(2, kind="tripwire", secret="OPENAI", decision="deny"), local=utc)
    assert "TRIPWIRE" in tw and "secret OPENAI" in tw


def test_status_path_and_reading(tmp_path):
    assert logread.status_path("/run/panopticon/bot") == "/run/panopticon/bot/status/log.json"
    p = tmp_path / "log.json"
    assert logread.read_status(str(p)) is None
    p.write_text('{"ok": false, "error": "disk full"}')
    assert logread.read_status(str(p))["error"] == "disk full"
    p.write_text("[]")
    assert logread.read_status(str(p)) is None


def test_the_module_is_pure():
    code = ("import sys, panopticond.logread; "
            "print([m for m in ('iptc', 'pyroute2', 'mitmproxy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
