"""daemon (unit; tests/integration/test_daemon.py runs it for real): journal lines, backoff,
and the health report of a daemon that has not started."""

from __future__ import annotations

import json
import logging

from panopticond import daemon
from panopticond.daemon import CHECKS, Daemon, backoff, kv
from panopticond.sdnotify import Notifier


def test_values_are_bare_when_safe_and_json_strings_otherwise():
    assert kv("panopticon-a") == "panopticon-a"
    assert kv(3) == "3" and kv(True) == "true" and kv(None) == "null"
    assert kv("two words") == '"two words"'
    assert kv('a "quote"\nand=a line') == json.dumps('a "quote"\nand=a line')
    assert "\n" not in kv("x\ny")  # one event per line, whatever a value holds


def test_the_formatter_writes_one_key_value_event_per_line():
    fmt = daemon._EventFormatter(priority_prefix=True)
    rec = logging.LogRecord("panopticon.daemon", logging.ERROR, __file__, 1, "x", None, None)
    rec.fields = {"event": "proxy-down", "pid": 12, "reason": "exited\nbadly"}
    assert fmt.format(rec) == '<3>event=proxy-down pid=12 reason="exited\\nbadly"'
    plain = logging.LogRecord("panopticon", logging.INFO, __file__, 1, "ready: %s", ("x y",), None)
    assert daemon._EventFormatter(False).format(plain) == 'panopticond: event=log msg="ready: x y"'


def test_backoff_grows_and_stops_growing():
    delays = [backoff(i) for i in range(10)]
    assert delays[0] == 1.0 and delays == sorted(delays) and delays[-1] == 30.0


def test_a_daemon_that_has_not_started_is_not_ready():
    d = Daemon("a", "/nonexistent.toml", notifier=Notifier({}))
    code, doc = d.report()
    assert code == 503 and doc["ready"] is False
    assert doc["not_ready"] == list(CHECKS) and doc["status"] == "starting"
    for c in CHECKS:
        d._set(c, True, "ok")
    assert d.report()[0] == 200
    d.closed = "drift"
    d._publish()
    assert d.report()[0] == 503 and d.report()[1]["closed"] == "drift"
