"""Alerts: block, tripwire and health events, POSTed to the operator's webhook.

Runs in the daemon (and in `panopticon run`), on the host side: it needs nothing from
inside the proxy, because it reads what the proxy already writes: the request log
(followed across rotations, `logread.Follower`) and the log's state file. So the
webhook's host need not be allowed for the agent, and a slow or dead webhook can never
hold up a request.

`Monitor` (one per instance) turns records into events: a `deny` record is a "block",
a `tripwire` record a "tripwire", a change of the log's state (unwritable, writable
again, rotation failing) a "health" event, which it also logs (the journal). The daemon
adds its own health events with `Monitor.notify`. `Sender` delivers them:

- `submit()` never blocks: events go to a bounded queue; when it is full the oldest
  are dropped (and counted);
- a burst is batched: the sender lingers `linger` seconds after the first event and
  sends up to `max_batch` events in one POST;
- failures (connection errors, timeouts, 429 and 5xx) are retried with exponential
  backoff and jitter, up to `max_attempts`; other answers are not retried; a batch
  that cannot be delivered is dropped and counted;
- the state (sent, dropped, last error) is in `status()`, for /healthz.

Every POST body is one JSON object:

    {"source": "panopticon", "instance": "openclaw", "sent": "2024-05-01T10:00:00.000Z",
     "events": [{"event": "block", "time": "...", "instance": "openclaw",
                 "summary": "blocked GET evil.example/upload: not in the allowlist",
                 "record": {...the log record...}}, ...]}

With a secret, it carries `X-Panopticon-Signature: sha256=<hex HMAC-SHA256 of the body>`
(the body has the send time: a receiver should refuse stale ones).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from . import logread
from .config import WEBHOOK_EVENTS, WebhookConfig
from .errors import PanopticonError

log = logging.getLogger("panopticon")

SIGNATURE_HEADER = "X-Panopticon-Signature"
USER_AGENT = "panopticon-webhook/1"


def read_secret(path: str) -> bytes:
    """The HMAC key in `path`: root's alone (the agent's user must not read it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise PanopticonError(f"cannot read the webhook secret {path}: {e.strerror or e}",
                              hint="create it: (umask 077; openssl rand -hex 32 > FILE)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PanopticonError(
                f"the webhook secret {path} may be read by others than root",
                hint=f"chown root: {path} && chmod 600 {path}",
            )
        secret = f.read().strip()
    if not secret:
        raise PanopticonError(f"the webhook secret {path} is empty",
                              hint="put a random key in it, e.g. openssl rand -hex 32")
    return secret


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a POST is never silently re-sent
        return None


def shown_url(url: str) -> str:
    """The URL as logs and status pages show it: scheme and host only. Webhook URLs often
    are credentials themselves (Slack's, Discord's carry a token in the path)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}/..."


class Sender:
    """Delivers events to one URL from a thread of its own. `start()`, `submit()`, `stop()`."""

    def __init__(
        self,
        url: str,
        *,
        instance: str = "",
        secret: bytes | None = None,
        max_queue: int = 1000,
        max_batch: int = 100,
        linger: float = 0.5,
        timeout: float = 5.0,
        backoff: tuple[float, float] = (1.0, 60.0),
        max_attempts: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = url
        self.instance = instance
        self.secret = secret
        self.max_batch = max_batch
        self.linger = linger
        self.timeout = timeout
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.clock = clock
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # set by stop(): finish by then
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _NoRedirect())  # no *_proxy from the environment
        self.sent = self.posts = self.dropped = self.failed_batches = 0
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.last_success_at: str | None = None
        self._failing = False
        self._drop_logged_at = float("-inf")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="panopticon-webhook", daemon=True)
        self._thread.start()

    def submit(self, event: dict[str, Any]) -> None:
        """Queue `event`; never blocks. When the queue is full, the oldest event goes."""
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self._dropped(1, "the queue is full")
            self._queue.append(event)
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within `timeout` seconds, drop the rest, end the thread."""
        with self._cond:
            self._deadline = self.clock() + timeout
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout + self.timeout + 1)
            self._thread = None

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "url": shown_url(self.url),
                "ok": not self._failing,
                "queued": len(self._queue),
                "sent": self.sent,
                "posts": self.posts,
                "dropped": self.dropped,
                "failed_batches": self.failed_batches,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
                "last_success_at": self.last_success_at,
            }

    # -- the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._deadline is not None)
                if not self._queue:
                    return
                if self._deadline is not None and self.clock() >= self._deadline:
                    self._dropped(len(self._queue), "stopped before they could be sent")
                    self._queue.clear()
                    return
                if self._deadline is None:
                    # A burst: wait a little for the rest of it.
                    end = self.clock() + self.linger
                    self._cond.wait_for(
                        lambda: len(self._queue) >= self.max_batch or self._deadline is not None,
                        max(0.0, end - self.clock()))
                batch = [self._queue.popleft() for _ in range(min(self.max_batch,
                                                                   len(self._queue)))]
            self._deliver(batch)

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        for attempt in range(1, self.max_attempts + 1):
            error, retry = self._post(batch)
            with self._cond:
                if error is None:
                    self.sent += len(batch)
                    self.last_success_at = _now()
                    if self._failing:
                        log.warning("webhook: delivering to %s again", shown_url(self.url))
                    self._failing = False
                    return
                self.last_error, self.last_error_at = error, _now()
                if not self._failing:
                    log.error("webhook: cannot deliver to %s: %s", shown_url(self.url), error)
                self._failing = True
                if not retry or attempt == self.max_attempts:
                    break
                low, high = self.backoff
                delay = min(high, low * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if self._deadline is not None:
                    delay = min(delay, self._deadline - self.clock())
                    if delay <= 0:
                        break
                self._cond.wait_for(lambda: self._deadline is not None and
                                    self.clock() >= self._deadline, delay)
        with self._cond:
            self.failed_batches += 1
            self._dropped(len(batch), f"delivery failed ({self.last_error})")

    def _post(self, batch: list[dict[str, Any]]) -> tuple[str | None, bool]:
        """(None, _) on success, else (why, whether to retry)."""
        body = json.dumps({"source": "panopticon", "instance": self.instance, "sent": _now(),
                           "events": batch}, default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = self.timeout
        if self._deadline is not None:
            timeout = max(0.5, min(timeout, self._deadline - self.clock()))
        with self._cond:
            self.posts += 1
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                resp.read(65536)
            return None, False
        except urllib.error.HTTPError as e:
            e.close()
            return f"HTTP {e.code} {e.reason}", e.code in (408, 429) or e.code >= 500
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            return f"{type(e).__name__}: {reason}", True

    def _dropped(self, n: int, why: str) -> None:
        """Count `n` lost events; log at most once a minute. Holds the lock."""
        self.dropped += n
        now = self.clock()
        if now - self._drop_logged_at >= 60:
            self._drop_logged_at = now
            log.error("webhook: dropped %d event(s) so far: %s", self.dropped, why)


class Monitor:
    """Watches an instance's request log and log state; emits events, logs health changes.

    `start()` begins at the current end of the log; `stop()` reads what is left (call it
    after the proxy stopped, so that its last records are seen) and flushes the sender.
    """

    def __init__(
        self,
        instance: str,
        log_path: str,
        status_path: str,
        webhook: WebhookConfig | None = None,
        *,
        poll: float = 0.5,
        sender: Sender | None = None,
    ):
        self.instance = instance
        self.log_path = log_path
        self.status_path = status_path
        self.events = set(webhook.events) if webhook else set(WEBHOOK_EVENTS)
        self.poll_interval = poll
        self.sender = sender
        self._webhook = webhook  # its sender is made at start (below)
        self.log_status: dict[str, Any] | None = None
        self._follower: logread.Follower | None = None
        self._status_mtime: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        # The signing secret is read only now: Instance starts the monitor after the
        # proxy is launched, and a proxy forked by the resident helper must not hold it.
        if self.sender is None and self._webhook is not None:
            w = self._webhook
            secret = read_secret(w.secret_file) if w.secret_file else None
            self.sender = Sender(w.url, instance=self.instance, secret=secret)
        self._follower = logread.Follower(self.log_path)
        if self.sender is not None:
            self.sender.start()
        self._thread = threading.Thread(target=self._run, name="panopticon-monitor",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.check()
        if self.sender is not None:
            self.sender.stop(timeout)

    def notify(self, event: str, summary: str, **fields: Any) -> None:
        """An event of the daemon's own, e.g. notify("health", "the proxy restarted")."""
        if event in self.events and self.sender is not None:
            self.sender.submit({"event": event, "time": _now(), "instance": self.instance,
                                "summary": summary, **fields})

    def status(self) -> dict[str, Any]:
        """For /healthz: the request log's state (as the proxy reported it) and the
        webhook's; `ok` false if either is failing."""
        with self._lock:
            log_status = dict(self.log_status) if self.log_status else None
        hook = self.sender.status() if self.sender is not None else None
        ok = (log_status is None or bool(log_status.get("ok"))) and (hook is None or hook["ok"])
        return {"ok": ok, "log": log_status, "webhook": hook}

    def check(self) -> None:
        """One round: new records and the log state (the thread calls this every `poll`)."""
        with self._lock:
            if self._follower is not None:
                for rec in self._follower.poll():
                    self._record(rec)
            self._check_status()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.check()
            except Exception:
                log.exception("webhook: the monitor failed; it goes on")

    def _record(self, rec: dict[str, Any]) -> None:
        if rec.get("kind") == "tripwire":
            event = "tripwire"
        elif rec.get("decision") == "deny":
            event = "block"
        else:
            return
        if event in self.events and self.sender is not None:
            self.sender.submit({"event": event, "time": rec.get("time"),
                                "instance": rec.get("instance") or self.instance,
                                "summary": describe(rec), "record": rec})

    def _check_status(self) -> None:
        try:
            mtime = os.stat(self.status_path).st_mtime_ns
        except OSError:
            return
        if mtime == self._status_mtime:
            return
        self._status_mtime = mtime
        new = logread.read_status(self.status_path)
        if new is None:
            return
        old = self.log_status or {"ok": True, "error": None, "rotation_error": None}
        self.log_status = new
        changes = []
        if new.get("error") != old.get("error"):
            if new.get("error"):
                changes.append(f"request log unavailable, traffic refused: {new['error']}")
                log.error("instance %s: %s", self.instance, changes[-1])
            else:
                changes.append("request log writable again, traffic allowed")
                log.warning("instance %s: %s", self.instance, changes[-1])
        if new.get("rotation_error") != old.get("rotation_error") and new.get("rotation_error"):
            changes.append(f"request log rotation failing: {new['rotation_error']}")
            log.error("instance %s: %s", self.instance, changes[-1])
        for summary in changes:
            self.notify("health", summary, log=new)


def describe(rec: dict[str, Any]) -> str:
    """One line for a human about a block or tripwire record."""
    host = logread.clean(rec.get("host") or rec.get("qname") or "?", 253)
    kind = rec.get("kind")
    if kind == "http":
        what = f"{rec.get('method') or ''} {host}{logread.clean(rec.get('path') or '', 200)}"
    elif kind == "dns":
        what = f"DNS {rec.get('qtype') or '?'} {host}"
    elif kind == "tripwire":
        what = f"secret {logread.clean(rec.get('secret') or '?')} sent to {host}"
        return f"tripwire: {what}: {logread.clean(rec.get('reason') or '')}".rstrip(": ")
    else:
        what = f"{kind} {host}"
    return f"blocked {what.strip()}: {logread.clean(rec.get('reason') or '')}"


def _now() -> str:
    dt = datetime.datetime.now(tz=datetime.timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
