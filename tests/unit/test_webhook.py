import hashlib
import hmac
import http.server
import json
import os
import socket
import threading
import time

import pytest

from panopticond import webhook
from panopticond.config import WebhookConfig
from panopticond.errors import PanopticonError
from panopticond.logfile import LogFile


class Hook(http.server.ThreadingHTTPServer):
    """A webhook receiver on the loopback: records each POST, answers from `codes`
    (then 200)."""

    daemon_threads = True

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.posts: list[dict] = []
        self.cond = threading.Condition()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(h):  # noqa: N802
                body = h.rfile.read(int(h.headers["Content-Length"]))
                with self.cond:
                    self.posts.append({"headers": dict(h.headers), "body": body,
                                       "path": h.path})
                    code = self.codes.pop(0) if self.codes else 200
                    self.cond.notify_all()
                h.send_response(code)
                if code in (301, 302):
                    h.send_header("Location", "http://127.0.0.1:9/elsewhere")
                h.send_header("Content-Length", "0")
                h.end_headers()

            def log_message(h, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, n, timeout=20):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.posts) >= n, timeout), self.posts
        return self.posts

    def events(self):
        return [e for p in self.posts for e in json.loads(p["body"])["events"]]


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.shutdown()
    h.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_a_burst_goes_in_one_signed_post(hook):
    secret = b"k3y"
    s = webhook.Sender(hook.url, instance="bot", secret=secret, linger=0.5)
    s.start()
    for i in range(5):
        s.submit({"event": "block", "n": i})
    s.stop()
    (post,) = hook.posts
    doc = json.loads(post["body"])
    assert doc["source"] == "panopticon" and doc["instance"] == "bot"
    assert [e["n"] for e in doc["events"]] == [0, 1, 2, 3, 4]
    assert post["headers"]["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(secret, post["body"], hashlib.sha256).hexdigest()
    assert post["headers"][webhook.SIGNATURE_HEADER] == expected
    assert s.status()["sent"] == 5 and s.status()["ok"]


def test_batches_are_bounded(hook):
    s = webhook.Sender(hook.url, linger=0.5, max_batch=3)
    s.start()
    for i in range(7):
        s.submit({"n": i})
    s.stop()
    assert [len(json.loads(p["body"])["events"]) for p in hook.posts] == [3, 3, 1]
    assert [e["n"] for e in hook.events()] == list(range(7))


def test_failures_are_retried_with_backoff_and_shown_in_the_status(hook):
    hook.codes = [503, 500, 429]
    s = webhook.Sender(hook.url, linger=0, backoff=(0.05, 0.2))
    s.start()
    s.submit({"n": 1})
    hook.wait(4)
    s.stop()
    st = s.status()
    assert st["posts"] == 4 and st["sent"] == 1 and st["ok"]
    assert st["last_error"] == "HTTP 429 Too Many Requests" and st["last_success_at"]
    assert all(p["body"] == hook.posts[0]["body"] or
               json.loads(p["body"])["events"] == [{"n": 1}] for p in hook.posts)


def test_client_errors_and_redirects_are_not_retried(hook, caplog):
    hook.codes = [400, 302]
    s = webhook.Sender(hook.url, linger=0, backoff=(0.05, 0.1))
    s.start()
    s.submit({"n": 1})
    hook.wait(1)
    s.submit({"n": 2})
    hook.wait(2)
    s.stop()
    st = s.status()
    assert st["posts"] == 2 and st["failed_batches"] == 2 and st["dropped"] == 2
    assert not st["ok"] and st["last_error"].startswith("HTTP 302")
    assert any("cannot deliver" in r.getMessage() for r in caplog.records)


def test_an_unreachable_webhook_never_blocks_and_the_queue_stays_bounded():
    s = webhook.Sender(closed_port_url(), linger=0, max_queue=10, backoff=(0.05, 0.1),
                       max_attempts=2)
    s.start()
    for i in range(100):
        s.submit({"n": i})  # returns at once: the sender is another thread
    assert s.status()["queued"] <= 10
    s.stop(timeout=2)
    st = s.status()
    assert st["sent"] == 0 and st["dropped"] == 100 and st["queued"] == 0
    assert "ConnectionRefused" in st["last_error"] or "refused" in st["last_error"]


def test_stop_flushes_what_is_queued(hook):
    s = webhook.Sender(hook.url, linger=30)  # would wait long for more of the burst
    s.start()
    s.submit({"n": 1})
    s.stop(timeout=5)
    assert [e["n"] for e in hook.events()] == [1]


def test_secret_file_must_be_roots_alone(tmp_path):
    p = tmp_path / "key"
    p.write_text("s3cret\n")
    os.chmod(p, 0o644)
    with pytest.raises(PanopticonError, match="may be read by others"):
        webhook.read_secret(str(p))
    os.chmod(p, 0o600)
    assert webhook.read_secret(str(p)) == b"s3cret"
    p.write_text("\n")
    with pytest.raises(PanopticonError, match="empty"):
        webhook.read_secret(str(p))
    with pytest.raises(PanopticonError, match="cannot read"):
        webhook.read_secret(str(tmp_path / "missing"))


def _record(**kw):
    return (json.dumps({"schema": 1, "time": "2024-05-01T10:00:00.000Z", "kind": "http",
                        "instance": "bot", "decision": "allow", **kw}) + "\n").encode()


def test_monitor_turns_records_and_log_state_into_events(tmp_path, hook, caplog):
    log_path, status = str(tmp_path / "requests.jsonl"), tmp_path / "log.json"
    log = LogFile(log_path, max_bytes=300, keep=10)
    log.append(_record(host="before.example", decision="deny"))  # before start: not sent
    sender = webhook.Sender(hook.url, instance="bot", linger=0.2)
    cfg = WebhookConfig(url=hook.url, events=("block", "tripwire", "health"))
    m = webhook.Monitor("bot", log_path, str(status), cfg, poll=3600, sender=sender)
    m.start()
    try:
        log.append(_record(host="ok.example", method="GET", path="/"))
        log.append(_record(host="evil.example", method="POST", path="/up", decision="deny",
                           reason="not in the allowlist"))
        log.append(_record(kind="tripwire", host="x.example", secret="OPENAI",
                           decision="deny", reason="placeholder sent to x.example"))
        for i in range(5):  # across rotations
            log.append(_record(kind="dns", qname=f"n{i}.example", qtype="A",
                               decision="deny", reason="not in the allowlist"))
        status.write_text(json.dumps({"ok": False, "error": "cannot write: disk full",
                                      "rotation_error": None}))
        m.check()
        assert m.status()["ok"] is False and m.status()["log"]["error"]
        assert any("traffic refused" in r.getMessage() for r in caplog.records)
    finally:
        m.stop()
    events = hook.events()
    kinds = [e["event"] for e in events]
    assert kinds == ["block", "tripwire"] + ["block"] * 5 + ["health"]
    assert events[0]["summary"] == "blocked POST evil.example/up: not in the allowlist"
    assert events[0]["record"]["host"] == "evil.example"
    assert events[1]["summary"].startswith("tripwire: secret OPENAI sent to x.example")
    assert "disk full" in events[-1]["summary"]
    assert "before.example" not in json.dumps(events)


def test_monitor_sends_only_the_events_asked_for(tmp_path, hook):
    log_path = str(tmp_path / "requests.jsonl")
    log = LogFile(log_path)
    log.append(b"")
    sender = webhook.Sender(hook.url, linger=0)
    m = webhook.Monitor("bot", log_path, str(tmp_path / "none.json"),
                        WebhookConfig(url=hook.url, events=("tripwire",)), poll=0.05,
                        sender=sender)
    m.start()
    log.append(_record(host="evil.example", decision="deny"))
    log.append(_record(kind="tripwire", host="x.example", decision="deny"))
    time.sleep(0.3)
    m.stop()
    assert [e["event"] for e in hook.events()] == ["tripwire"]


def test_monitor_without_a_webhook_still_watches_the_log(tmp_path, caplog):
    status = tmp_path / "log.json"
    m = webhook.Monitor("bot", str(tmp_path / "r.jsonl"), str(status), None, poll=3600)
    m.start()
    status.write_text(json.dumps({"ok": True, "error": None,
                                  "rotation_error": "cannot rotate: Permission denied"}))
    m.check()
    m.stop()
    assert m.status() == {"ok": True, "log": json.loads(status.read_text()), "webhook": None}
    assert any("rotation failing" in r.getMessage() for r in caplog.records)


def test_the_url_is_shown_without_its_path_or_query():
    from panopticond.webhook import shown_url

    secret_url = "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX?token=abc"
    shown = shown_url(secret_url)
    assert shown == "https://hooks.example.com/..."
    assert "secret" not in shown and "token" not in shown
    assert shown_url("http://[2001:db8::1]:8080/x") == "http://[2001:db8::1]:8080/..."
