"""Spotting DNS queries that carry data: floods of high-entropy labels (threat 15).

Pure. A name like `mzxw6ytboi2dqnzv.attacker.example` encodes bytes in its labels; one
query is nothing, many under the same domain within a minute is a channel. Queries for
denied names are answered NXDOMAIN without a lookup, so nothing leaves the jail this way
unless the domain is allowed (by a wildcard: a reason to prefer exact names); the
detector is for the log and the operator, and decides nothing.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from panopticond.suffixes import registrable_domain


def entropy(text: str) -> float:
    """Shannon entropy of `text`, in bits per character."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


class LabelFlood:
    """`observe(name)` each query; it returns an alert (a sentence) when `threshold`
    distinct high-entropy names under one registrable domain are asked within `window`
    seconds, at most once per window and domain (a name asked again is no new data)."""

    def __init__(
        self, *, window: float = 60.0, threshold: int = 20, min_length: int = 20,
        min_entropy: float = 3.5, max_domains: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window = window
        self.threshold = threshold
        self.min_length = min_length
        self.min_entropy = min_entropy
        self.max_domains = max_domains
        self.clock = clock
        self._seen: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self._alerted: dict[str, float] = {}

    def suspicious(self, name: str) -> str | None:
        """The registrable domain of canonical `name` if a label below it looks like data:
        long, and about as varied as base32 of random bytes, or as hex (16 symbols hold
        less entropy, but a good share of them are digits)."""
        domain = registrable_domain(name)
        labels = name[: -len(domain)].split(".") if name != domain else []
        longest = max(labels, key=len, default="")
        if len(longest) < self.min_length:
            return None
        h = entropy(longest)
        digits = sum(c.isdigit() for c in longest) / len(longest)
        if h >= self.min_entropy or (h >= 3.0 and digits >= 0.25):
            return domain
        return None

    def observe(self, name: str) -> str | None:
        domain = self.suspicious(name)
        if domain is None:
            return None
        now = self.clock()
        names = self._seen.pop(domain, None) or OrderedDict()
        self._seen[domain] = names  # the most recently seen domain last
        names.pop(name, None)
        names[name] = now  # oldest first
        while names and next(iter(names.values())) <= now - self.window:
            names.popitem(last=False)
        while len(names) > self.threshold:
            names.popitem(last=False)  # enough to decide: bounded per domain too
        while len(self._seen) > self.max_domains:
            old, _ = self._seen.popitem(last=False)
            self._alerted.pop(old, None)
        if len(names) < self.threshold or now - self._alerted.get(domain, -math.inf) < self.window:
            return None
        self._alerted[domain] = now
        return (f"{len(names)} names with high-entropy labels under {domain} within "
                f"{self.window:.0f} s: possibly data sent through DNS")
