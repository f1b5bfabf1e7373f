"""`on_tripwire = "kill"`: the daemon ends the agent when the proxy says so.

The proxy cannot signal the agent (another uid, by design). On such a tripwire it writes
a record with `"kind": "tripwire", "action": "kill"` to the request log and refuses
every later request and query of the jail; this watcher, in the daemon (root), follows
the log (`logread.Follower`, across rotations) and kills every process in the jail's
network namespace except the proxy. `panopticon run` and panopticond then see the
agent exit (status 137) and tear the jail down as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from . import logread, netns

log = logging.getLogger("panopticon")

POLL = 0.1  # seconds between looks at the log
KILL_ROUNDS = 20  # a forking agent: kill again until nothing but the proxy is left


class TripwireWatch:
    def __init__(self, log_path: str, instance: str, netns_name: str,
                 spare: Callable[[], set[int]], *, interval: float = POLL,
                 kill: Callable[[str, Callable[[], set[int]]], int] | None = None):
        """`spare()`: the pids that must live (the proxy's). `kill(netns, spare)` ends the
        rest (`kill_jail`)."""
        self.instance = instance
        self.netns_name = netns_name
        self.spare = spare
        self.interval = interval
        self.kill = kill or kill_jail
        self.tripped: dict | None = None
        # Opened (at the log's end) now: every record written from here on is seen.
        self._follower = logread.Follower(log_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tripwire-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._follower.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                for rec in self._follower.poll():
                    if self._is_kill(rec):
                        self._kill(rec)
            except Exception:
                log.exception("tripwire watch failed; it goes on")

    def _is_kill(self, rec: dict) -> bool:
        return (rec.get("kind") == "tripwire" and rec.get("action") == "kill"
                and rec.get("instance") in (None, "", self.instance))

    def _kill(self, rec: dict) -> None:
        first = self.tripped is None
        self.tripped = self.tripped or rec
        if first:
            log.error("tripwire: secret %s sent to %s (%s): ending the agent",
                      logread.clean(rec.get("secret")), logread.clean(rec.get("host"), 253),
                      logread.clean(rec.get("where"), 100))
        self.kill(self.netns_name, self.spare)


def kill_jail(netns_name: str, spare: Callable[[], set[int]]) -> int:
    """SIGKILL every process in the namespace but `spare()`; returns how many died."""
    killed = 0
    for _ in range(KILL_ROUNDS):
        keep = spare()
        pids = [p for p in netns.pids_in(netns_name) if p not in keep and p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed
