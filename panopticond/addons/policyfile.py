"""The compiled policy file as the addons see it: loaded, watched, fail closed.

The daemon writes the compiled policy (`Policy.to_dict`) as JSON and swaps it by
rename on reload. A `PolicyFile` reads it when the option is set and re-reads it
when the file at that path changes (device, inode, size or mtime), looking at most
once per `interval` seconds, on demand from a hook. Whenever no valid policy can be
read (no path, missing, unreadable, empty, not JSON, not a policy) it holds `None`
and `decide()` denies everything; the failure is logged once per distinct cause.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from panopticond.policy import Decision, Policy

logger = logging.getLogger(__name__)

OPTION = "panopticon_policy"

# A compiled policy is a few kilobytes; this only bounds a corrupt or hostile file.
MAX_BYTES = 8 * 1024 * 1024

NO_POLICY = Decision(False, None, "no valid policy is loaded")


def add_option(loader) -> None:
    """Declare `panopticon_policy`. Every addon that reads the policy calls this; mitmproxy
    accepts a second declaration with the same signature silently."""
    loader.add_option(
        OPTION,
        str,
        "",
        "Path of panopticon's compiled policy (JSON). Re-read when the file is replaced. "
        "If it is missing or invalid, every request and DNS query is denied.",
    )


class PolicyFile:
    def __init__(self, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.path = ""
        self.policy: Policy | None = None
        self.error: str | None = "no policy file is configured"
        self.configured = False
        self._signature: tuple[int, int, int, int] | None = None
        self._checked_at = float("-inf")
        self._last_logged_error: str | None = None

    def load(self, path: str) -> None:
        """Use the policy at `path` from now on (re-reading it if it changed)."""
        self.configured = True
        if path != self.path:
            self.path = path
            self._signature = None
        self._refresh()

    def current(self) -> Policy | None:
        """The policy in force, after a re-read if the file changed; None means deny all."""
        now = self.clock()
        if now - self._checked_at >= self.interval:
            self._refresh()
        return self.policy

    def decide(self, host: str, method: str | None = None, path: str | None = None) -> Decision:
        policy = self.current()
        if policy is None:
            return NO_POLICY
        return policy.decide(host, method, path)

    def _refresh(self) -> None:
        self._checked_at = self.clock()
        if not self.path:
            self._fail("no policy file is configured (option panopticon_policy)")
            return
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._fail(f"cannot read {self.path}: {e.strerror or e}")
            return
        if _signature(st) == self._signature and self.policy is not None:
            return
        self._read()

    def _read(self) -> None:
        try:
            # fstat on the descriptor we read from, so that the signature we keep is the
            # signature of the content we parsed even if the file is swapped meanwhile.
            with open(self.path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))
                raw = f.read(MAX_BYTES + 1)
        except OSError as e:
            self._fail(f"cannot read {self.path}: {e.strerror or e}")
            return
        self._signature = signature
        if len(raw) > MAX_BYTES:
            self._fail(f"{self.path} is larger than {MAX_BYTES} bytes")
            return
        if not raw.strip():
            self._fail(f"{self.path} is empty")
            return
        try:
            policy = Policy.from_dict(json.loads(raw))
        except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueError
            self._fail(f"{self.path} is not a valid policy: {e}")
            return
        self.policy = policy
        self.error = None
        self._last_logged_error = None
        logger.info(
            f"panopticon: policy loaded from {self.path} (instance {policy.instance!r}: "
            f"{len(policy.allow)} allow, {len(policy.deny)} deny)"
        )

    def _fail(self, why: str) -> None:
        self.policy = None
        self.error = why
        if why != self._last_logged_error:
            self._last_logged_error = why
            logger.error(f"panopticon: {why}; denying every request and DNS query")


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
